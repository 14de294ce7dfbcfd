"""Chat templates rendered the way transformers' apply_chat_template renders them.

Templates come with downloaded models, so they are untrusted code: they run in jinja2's immutable
sandbox, with the same options, filters and globals that transformers gives them, and within two
limits, on the text they build and on the time they take (see `_Sandbox`). Whatever a template
does wrong ends in one ParleyError line, never a traceback.
"""
import json
import re
import time
from contextvars import ContextVar
from datetime import datetime
from functools import lru_cache, wraps

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer

from engine.errors import ParleyError

# A real chat template renders a few thousand characters in milliseconds. The limits are far above
# that and far below harm:
# - MAX_TEMPLATE_CHARS bounds the prompt text and every string or list a template builds on the way
#   (`'ab ' * 30000000` is refused before it is built). 4M characters is about a million tokens, past
#   any model's context window, and small enough to build without straining memory.
# - MAX_RENDER_SECONDS bounds one render, checked at the start of every loop, at every macro or
#   function call and at every intercepted operator, so that a template stuck in nested loops stops in seconds. Chat renders
#   run in the app's worker threads, where signals (SIGALRM) cannot interrupt them, hence the checks.
MAX_TEMPLATE_CHARS = 4_000_000
MAX_RENDER_SECONDS = 2.0

_FIX = "fix the model's chat template (chat_template.jinja, or chat_template in tokenizer_config.json)"
_deadline: ContextVar[float | None] = ContextVar("chat_template_deadline", default=None)


def _too_big(what: str):
    return ParleyError(f"the model's chat template builds {what} over {MAX_TEMPLATE_CHARS:,} characters or items, "
                       f"Parley's limit: {_FIX}, or use a raw prompt (--raw)")


def _check_clock() -> None:
    deadline = _deadline.get()
    if deadline is not None and time.monotonic() > deadline:
        raise ParleyError(f"the model's chat template ran longer than {MAX_RENDER_SECONDS:g} s, Parley's limit: "
                          f"{_FIX}, or use a raw prompt (--raw)")


def _check_size(value) -> None:
    if isinstance(value, (str, list, tuple)) and len(value) > MAX_TEMPLATE_CHARS:
        raise _too_big("a value")


def _check_args(args, kwargs) -> None:
    """Refuse a width or count beyond the limit ('x'|center(10**9), '%0999999999d' % 1) before it is used."""
    for a in (*args, *kwargs.values()):
        if isinstance(a, int) and not isinstance(a, bool) and abs(a) > MAX_TEMPLATE_CHARS:
            raise _too_big("a value")


def _check_format(fmt: str) -> None:
    # a format's widths and precisions are the numbers in it; a huge one would build a huge string
    if any(int(n) > MAX_TEMPLATE_CHARS for n in re.findall(r"\d{7,}", fmt)):
        raise _too_big("a value")


def _loop_start(iterable):
    """What every {% for %} calls first (see `_GuardLoops`), so that starting a loop is a call, whose
    sandbox hook checks the clock. One loop walks at most MAX_TEMPLATE_CHARS items (no value is
    bigger), so that check bounds nested loops too: they restart their inner loop at every outer step.
    """
    return iterable


def _bounded_concat(*parts):
    """The `~` operator (see `_GuardLoops`), refused when its result would pass the limit."""
    texts = [str(p) for p in parts]
    if sum(map(len, texts)) > MAX_TEMPLATE_CHARS:
        raise _too_big("a string")
    return "".join(texts)


class _GuardLoops(NodeTransformer):
    """Route every loop through `_loop_start` and every `~` through `_bounded_concat`.

    The sandbox has hooks for calls and arithmetic but none for a loop or a `~`, so the parsed
    template is rewritten: `{% for x in xs %}` runs as `{% for x in _loop_start(xs) %}`.
    """

    def visit_For(self, node):
        node = self.generic_visit(node)
        node.iter = nodes.Call(nodes.Name("_loop_start", "load"), [node.iter], [], None, None)
        return node

    def visit_Concat(self, node):
        node = self.generic_visit(node)
        return nodes.Call(nodes.Name("_bounded_concat", "load"), node.nodes, [], None, None)


class _Sandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, with the clock and size checks on every call and on * + ** %."""

    intercepted_binops = frozenset({"*", "+", "**", "%"})

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (the sandbox's own signature)
        _check_clock()
        _check_args(args, kwargs)
        target = getattr(__obj, "__wrapped__", __obj)      # the sandbox wraps str.format
        if isinstance(getattr(target, "__self__", None), str) and target.__name__ in ("format", "format_map"):
            _check_format(target.__self__)
        result = super().call(__context, __obj, *args, **kwargs)
        _check_size(result)
        return result

    def call_binop(self, context, operator, left, right):
        _check_clock()
        sized = (str, list, tuple)
        if operator == "*" and isinstance(left, int) and isinstance(right, sized):
            left, right = right, left
        if operator == "*" and isinstance(left, sized) and isinstance(right, int):
            if len(left) * right > MAX_TEMPLATE_CHARS:
                raise _too_big("a value")
        elif operator == "+" and isinstance(left, sized) and isinstance(right, sized):
            if len(left) + len(right) > MAX_TEMPLATE_CHARS:
                raise _too_big("a value")
        elif operator == "**" and isinstance(left, int) and isinstance(right, int):
            # an integer of millions of digits takes long to build and cannot be printed anyway
            if right > 0 and abs(left) > 1 and right * abs(left).bit_length() > 4 * MAX_TEMPLATE_CHARS:
                raise _too_big("a number")
        elif operator == "%" and isinstance(left, str):
            _check_format(left)
            _check_args(right if isinstance(right, tuple) else (right,), {})
        result = super().call_binop(context, operator, left, right)
        _check_size(result)
        return result


def _bounded_filter(name, f):
    """A filter with the same size checks as a call (filters do not pass through the sandbox's `call`)."""
    @wraps(f)   # keeps jinja's pass_context/pass_environment marks
    def bounded(*args, **kwargs):
        _check_clock()
        _check_args(args[1:], kwargs)
        if name == "format":
            _check_format(next((a for a in args if isinstance(a, str)), ""))
        result = f(*args, **kwargs)
        _check_size(result)
        return result
    return bounded


class _Generation(Extension):
    """`{% generation %}…{% endgeneration %}`, the tag transformers adds so that a template can mark the
    assistant's text (SmolLM3's template uses it). jinja has no such tag; rendered, the block is its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters, which would change the prompt.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


def _one_line(e: Exception, limit: int = 300) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[:limit] + "…"


@lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, _Generation])
    env.filters["tojson"] = _tojson
    env.filters = {name: _bounded_filter(name, f) for name, f in env.filters.items()}
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now,
                       _loop_start=_loop_start, _bounded_concat=_bounded_concat)
    try:
        return env.from_string(_GuardLoops().visit(env.parse(source)))
    except jinja2.TemplateSyntaxError as e:
        raise ParleyError(f"the model's chat template has a syntax error on line {e.lineno} ({_one_line(e)}): "
                          f"{_FIX}") from None
    except ParleyError:
        raise
    except Exception as e:  # constant folding runs the template's literal expressions while compiling
        raise ParleyError(f"the model's chat template cannot be compiled ({type(e).__name__}: {_one_line(e)}): "
                          f"{_FIX}") from None


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
    template = compile_template(source)
    token = _deadline.set(time.monotonic() + MAX_RENDER_SECONDS)
    try:
        pieces, size = [], 0
        for piece in template.generate(messages=messages, add_generation_prompt=add_generation_prompt,
                                       **(special_tokens or {}), **variables):
            size += len(piece)
            if size > MAX_TEMPLATE_CHARS:
                raise _too_big("a prompt")
            pieces.append(piece)
        return "".join(pieces)
    except ParleyError:
        raise
    except SecurityError as e:
        raise ParleyError(f"the model's chat template did something the sandbox forbids ({_one_line(e)}): "
                          f"{_FIX}, or use a raw prompt (--raw)") from None
    except jinja2.TemplateError as e:   # raise_exception: the template's own refusal
        raise ParleyError(f"the model's chat template refused the conversation: {_one_line(e)}") from None
    except Exception as e:  # RecursionError, ZeroDivisionError, OverflowError...: the template's own bug
        raise ParleyError(f"the model's chat template failed ({type(e).__name__}: {_one_line(e)}): "
                          f"{_FIX}, or use a raw prompt (--raw)") from None
    finally:
        _deadline.reset(token)
