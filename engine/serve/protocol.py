"""OpenAI's chat and completions API, read into Parley's terms and written back: no HTTP here.

A request body becomes a `Request` (the prompt's token ids and one Settings per choice); the
engine's Token and Finished events become OpenAI's response objects and stream chunks. Parley's
own decoding settings (every field of engine/settings.py's Settings: top_k, min_p,
repetition_penalty, ...) are accepted as extra body fields, as vLLM accepts them.

Defaults are OpenAI's, not the app's: a request that names no setting samples at temperature 1
with top_p 1 and no top-k or min-p, so it means here what it means at OpenAI. Bad input raises
`ApiError`, which carries OpenAI's error shape and status.
"""
import dataclasses
import math
import os
import time
from dataclasses import dataclass, field

from engine.errors import ParleyError
from engine.generate import Finished, Token
from engine.settings import FIELDS, Settings


class ApiError(Exception):
    """An error reply: {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Limits:
    """What one request may ask for (the server's flags)."""
    max_tokens: int = 2048     # per choice; also capped by the model's context
    max_n: int = 16            # choices per request


# OpenAI's name -> Settings' (the other Settings fields are taken under their own names)
RENAMED = {"max_tokens": "max_new_tokens", "max_completion_tokens": "max_new_tokens"}
# OpenAI fields read by the parsers below, besides the settings
COMMON = {"model", "n", "stream", "stream_options", "user", "logprobs"}
# accepted and ignored: they change nothing about the reply
IGNORED = {"store", "metadata", "service_tier", "parallel_tool_calls", "prompt_cache_key", "safety_identifier"}
# beam search's own settings: served only at their neutral values (see batcher.py)
BEAM_ONLY = {"num_beams": 1, "num_return_sequences": 1}


@dataclass
class Request:
    endpoint: str                 # "chat" or "completions"
    model: str
    prompt_ids: list[int]
    settings: list[Settings]      # one per choice, seeds set
    stream: bool = False
    include_usage: bool = False
    top_logprobs: int = 0         # alternatives per token
    logprobs: bool = False        # whether logprobs are reported at all
    user: str = ""
    messages: list[dict] = field(default_factory=list)   # what the store keeps: the chat, or the prompt as a user turn
    id: str = ""
    created: int = 0


def parse(endpoint: str, body, models: dict, limits: Limits) -> Request:
    """A chat ("chat") or completions ("completions") body into a Request for one of `models`
    (name -> lm); raises ApiError naming the field at fault."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    body = {k: v for k, v in body.items() if v is not None}   # clients send null for "not given"
    prompt_field = "messages" if endpoint == "chat" else "prompt"
    logprob_fields = {"top_logprobs"} if endpoint == "chat" else set()
    known = COMMON | IGNORED | set(RENAMED) | set(FIELDS) | {prompt_field} | logprob_fields
    for name in body:
        if name not in known:
            raise ApiError(400, f"{name!r} is not a field parley serve takes: OpenAI's sampling fields and Parley's "
                                f"settings ({', '.join(FIELDS)}) are", param=name)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "'model' is required: one of " + ", ".join(models), param="model")
    if model not in models:
        raise ApiError(404, f"the model {model!r} does not exist here: this server has {', '.join(models)}",
                       param="model", code="model_not_found")
    lm = models[model]
    if prompt_field not in body:
        raise ApiError(400, f"{prompt_field!r} is required", param=prompt_field)
    if endpoint == "chat":
        messages = _messages(body["messages"])
        try:
            prompt_ids = lm.tokenizer.encode_chat(messages)
        except ParleyError as e:
            raise ApiError(400, str(e), param="messages") from None
    else:
        prompt_ids, text = _prompt(body["prompt"], lm)
        messages = [{"role": "user", "content": text}]
    if not prompt_ids:
        raise ApiError(400, "the prompt is empty: give at least one token of context", param=prompt_field)
    room = lm.max_context - len(prompt_ids)
    if room < 1:
        raise ApiError(400, f"the prompt has {len(prompt_ids)} tokens and the model's context holds {lm.max_context}: "
                            "shorten it", param=prompt_field, code="context_length_exceeded")
    n = _whole(body, "n", 1)
    if not 1 <= n <= limits.max_n:
        raise ApiError(400, f"n = {n} is out of range: this server gives 1 to {limits.max_n} choices per request",
                       param="n")
    top, logprobs = _logprobs(endpoint, body)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false", param="stream")
    options = body.get("stream_options", {})
    if not isinstance(options, dict) or set(options) - {"include_usage", "continuous_usage_stats"}:
        raise ApiError(400, "'stream_options' takes {\"include_usage\": true|false}", param="stream_options")
    user = body.get("user", "")
    if not isinstance(user, str):
        raise ApiError(400, "'user' must be a string", param="user")
    settings = _settings(body, n, room, limits.max_tokens)
    return Request(endpoint, model, prompt_ids, settings, stream, bool(options.get("include_usage")), top, logprobs,
                   user, messages, ("chatcmpl-" if endpoint == "chat" else "cmpl-") + os.urandom(12).hex(),
                   int(time.time()))


def _messages(messages) -> list[dict]:
    """OpenAI messages as the chat template takes them: role and text (text parts joined)."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list of {\"role\", \"content\"}", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(400, f"messages[{i}] must be an object with a 'role'", param="messages")
        role = "system" if m["role"] == "developer" else m["role"]
        if role not in ("system", "user", "assistant"):
            raise ApiError(400, f"messages[{i}] has role {m['role']!r}: parley serve takes system (or developer), "
                                "user and assistant messages", param="messages")
        content = m.get("content", "")
        if isinstance(content, list):   # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ApiError(400, f"messages[{i}] has a content part that is not text: these models read text only",
                               param="messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be text", param="messages")
        out.append({"role": role, "content": content})
    return out


def _prompt(prompt, lm) -> tuple[list[int], str]:
    """A completions prompt (text, or token ids; a list of one of them) as ids and its text."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return lm.tokenizer.encode(prompt), prompt
    if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        vocab = lm.tokenizer.vocab_size
        bad = next((t for t in prompt if not 0 <= t < vocab), None)
        if bad is not None:
            raise ApiError(400, f"prompt token id {bad} is not in the vocabulary (0 to {vocab - 1})", param="prompt")
        return list(prompt), lm.tokenizer.decode(prompt, skip_special_tokens=False)
    raise ApiError(400, "'prompt' must be one text or one list of token ids: send one request per prompt",
                   param="prompt")


def _whole(body: dict, name: str, default: int) -> int:
    value = body.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"{name!r} must be a whole number, not {value!r}", param=name)
    return value


def _logprobs(endpoint: str, body: dict) -> tuple[int, bool]:
    """(alternatives per token, whether logprobs are reported): chat's logprobs + top_logprobs
    (0 to 20), completions' logprobs (0 to 20; OpenAI's own limit is 5)."""
    if endpoint == "chat":
        wanted = body.get("logprobs", False)
        if not isinstance(wanted, bool):
            raise ApiError(400, "'logprobs' must be true or false", param="logprobs")
        top = _whole(body, "top_logprobs", 0)
        if not 0 <= top <= 20:
            raise ApiError(400, f"top_logprobs = {top} is out of range: it must be 0 to 20", param="top_logprobs")
        if top and not wanted:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        return top, wanted
    if "logprobs" not in body:
        return 0, False
    top = _whole(body, "logprobs", 0)
    if not 0 <= top <= 20:
        raise ApiError(400, f"logprobs = {top} is out of range: it must be 0 to 20", param="logprobs")
    return top, True


def _settings(body: dict, n: int, room: int, max_tokens: int) -> list[Settings]:
    """One Settings per choice from OpenAI's fields and Parley's; choice i is seeded seed + i. A
    reply gets at most `max_tokens` and the `room` its prompt leaves in the model's context."""
    values = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "max_new_tokens": min(max_tokens, room)}
    for name, value in body.items():
        target = RENAMED.get(name, name)
        if target in FIELDS:
            values[target] = value
    if isinstance(values.get("stop"), str):
        values["stop"] = [values["stop"]]
    given = next((k for k in ("max_completion_tokens", "max_tokens", "max_new_tokens") if k in body), "max_tokens")
    for name, neutral in BEAM_ONLY.items():
        if values.get(name, neutral) != neutral:
            raise ApiError(400, f"{name} = {values[name]!r}: parley serve samples or decodes greedily, beam search "
                                "runs in `parley generate`", param=name)
    tokens = values["max_new_tokens"]
    if isinstance(tokens, int) and not isinstance(tokens, bool) and tokens > max_tokens:
        raise ApiError(400, f"{given} = {tokens} is more than this server gives a reply ({max_tokens}): ask for fewer, "
                            "or start `parley serve --max-tokens N`", param=given)
    try:
        base = Settings(**values).validate()
    except ParleyError as e:
        name = str(e).split(" ", 1)[0]
        param = next((k for k, v in RENAMED.items() if v == name and k in body), name)
        raise ApiError(400, str(e).replace(name, param, 1) if param != name else str(e), param=param) from None
    if base.seed is None:
        base = dataclasses.replace(base, seed=int.from_bytes(os.urandom(8), "little") >> 2)
    if base.max_new_tokens > room:   # as Generation does: the reply gets what the context leaves
        base = dataclasses.replace(base, max_new_tokens=room, min_new_tokens=min(base.min_new_tokens, room))
    if base.seed + n - 1 >= 2**63:
        raise ApiError(400, f"seed = {base.seed} with n = {n} seeds choices past 2**63 - 1: use a smaller seed",
                       param="seed")
    return [dataclasses.replace(base, seed=base.seed + i) for i in range(n)]


# -- replies ----------------------------------------------------------------------------------------
FINISH = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "stop"}


def usage(req: Request, finished: list[Finished]) -> dict:
    completion = sum(len(f.token_ids) for f in finished)
    return {"prompt_tokens": len(req.prompt_ids), "completion_tokens": completion,
            "total_tokens": len(req.prompt_ids) + completion}


def _lp(value: float) -> float:
    return value if math.isfinite(value) else -9999.0   # JSON has no -inf; vLLM writes this


def _bytes(text: str) -> list[int]:
    return list(text.encode("utf-8", errors="replace"))


def chat_logprobs(tokens: list[Token]) -> dict:
    """OpenAI's chat `logprobs`: each token with its log-probability and the top alternatives
    (the model's own distribution, before this request's processors)."""
    return {"content": [{"token": t.piece, "logprob": _lp(t.logprob), "bytes": _bytes(t.piece),
                         "top_logprobs": [{"token": a.text, "logprob": _lp(a.prob), "bytes": _bytes(a.text)}
                                          for a in t.top_before]} for t in tokens], "refusal": None}


def completion_logprobs(tokens: list[Token], offset: int = 0) -> dict:
    """The completions API's `logprobs`: tokens, their log-probabilities, top alternatives as
    {token: logprob}, and each token's offset in the text."""
    offsets, at = [], offset
    for t in tokens:
        offsets.append(at)
        at += len(t.text)
    return {"tokens": [t.piece for t in tokens], "token_logprobs": [_lp(t.logprob) for t in tokens],
            "top_logprobs": [_by_text(t.top_before) for t in tokens], "text_offset": offsets}


def _by_text(alternatives) -> dict:
    """{text: logprob}, most likely first; tokens that read the same (byte pieces of one character
    show as U+FFFD) share a key, which keeps the likeliest of them."""
    out = {}
    for a in alternatives:
        out.setdefault(a.text, _lp(a.prob))
    return out


def response(req: Request, finished: list[Finished], tokens: dict[int, list[Token]]) -> dict:
    """The whole reply of a request that did not stream."""
    choices = []
    for f in sorted(finished, key=lambda f: f.candidate):
        logprobs = None
        if req.logprobs:
            got = tokens.get(f.candidate, [])
            logprobs = chat_logprobs(got) if req.endpoint == "chat" else completion_logprobs(got)
        if req.endpoint == "chat":
            choices.append({"index": f.candidate, "message": {"role": "assistant", "content": f.text, "refusal": None},
                            "logprobs": logprobs, "finish_reason": FINISH[f.finish_reason]})
        else:
            choices.append({"index": f.candidate, "text": f.text, "logprobs": logprobs,
                            "finish_reason": FINISH[f.finish_reason]})
    return {"id": req.id, "object": "chat.completion" if req.endpoint == "chat" else "text_completion",
            "created": req.created, "model": req.model, "system_fingerprint": None, "choices": choices,
            "usage": usage(req, finished)}


def chunk(req: Request, choices: list[dict], usage_value: dict | None = None) -> dict:
    """One stream chunk (`choices` as `delta_choice` makes them; none in the usage chunk)."""
    out = {"id": req.id, "object": "chat.completion.chunk" if req.endpoint == "chat" else "text_completion",
           "created": req.created, "model": req.model, "system_fingerprint": None, "choices": choices}
    if req.include_usage:
        out["usage"] = usage_value
    return out


def delta_choice(req: Request, index: int, text: str | None = None, token: Token | None = None,
                 finish_reason: str | None = None, role: bool = False) -> dict:
    """One choice of a stream chunk: new text (and its token's logprobs), the role, or the end."""
    logprobs = None
    if req.logprobs and token is not None:
        logprobs = chat_logprobs([token]) if req.endpoint == "chat" else completion_logprobs([token])
    reason = FINISH[finish_reason] if finish_reason else None
    if req.endpoint == "chat":
        delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
    return {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": reason}
