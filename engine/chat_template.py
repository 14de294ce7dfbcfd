"""Chat templates rendered the way transformers' apply_chat_template renders them.

Templates come with downloaded models, so they are untrusted code: they run in jinja2's immutable
sandbox, with the same options, filters and globals that transformers gives them.
"""
import json
from datetime import datetime
from functools import lru_cache

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from engine.errors import ParleyError


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters, which would change the prompt.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ParleyError(f"the model's chat template has a syntax error on line {e.lineno} ({e.message}): "
                          "fix chat_template in tokenizer_config.json") from None


def render(source: str, messages: list[dict], add_generation_prompt: bool = True,
           special_tokens: dict | None = None, **variables) -> str:
    """Render `messages` ({"role", "content"} dicts) to the prompt text the model was trained on."""
    if not messages:
        raise ParleyError("cannot render an empty conversation: give at least one message")
    for m in messages:
        if not isinstance(m, dict) or "role" not in m:
            raise ParleyError(f"a chat message must be a dict with 'role' and 'content', got {m!r}")
    # Keys whose value is None are dropped, as transformers does: templates test for presence.
    messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
    try:
        return compile_template(source).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                               **(special_tokens or {}), **variables)
    except jinja2.TemplateError as e:
        raise ParleyError(f"the model's chat template refused the conversation: {e}") from None
