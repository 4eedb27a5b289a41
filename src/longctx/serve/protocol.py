"""The OpenAI wire format: request validation and error bodies.

Requests are checked by hand rather than through pydantic models so that each refusal
names the offending field (``param``) and says why, as OpenAI's own errors do.  Fields
that change nothing here (``user``, ``metadata``, ``store``, ...) are accepted and
ignored; fields whose silent omission would mislead the caller (``n > 1``, ``logprobs``,
``tools``, a JSON ``response_format``, penalties, ``logit_bias``) are refused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

# Session names become file names: no path separators, no hidden files.
SESSION_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}")
MAX_STOP_STRINGS = 4  # OpenAI's limit


class APIError(Exception):
    """A request the server refuses: an HTTP status and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(param: str | None, message: str, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclass
class Request:
    """A validated completion or chat request.  ``prompt`` is text, token ids (completions)
    or ``None`` for chat, whose ``messages`` are rendered by the model's chat template."""

    chat: bool
    model: str
    stream: bool = False
    prompt: str | list[int] | None = None
    messages: list[dict[str, str]] = field(default_factory=list)
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    include_usage: bool = False  # stream_options.include_usage: a last chunk with usage
    session: str | None = None
    fork: str | None = None
    draft: str | None = None  # speculative decoding: "lookup" or "none"; None: the server's default


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _get(body: dict, name: str, check, what: str, default=None):
    """``body[name]`` if present and not null, after ``check``; else ``default``."""
    value = body.get(name)
    if value is None:
        return default
    if not check(value):
        raise invalid(name, f"'{name}' must be {what}; got {value!r}", "invalid_type")
    return value


# Fields this server cannot honour -> the values that ask for nothing (accepted and ignored).
# Any other value is refused: answering without what was asked for would mislead.
UNSUPPORTED = {"n": (None, 1), "best_of": (None, 1), "logprobs": (None, False), "top_logprobs": (None, 0),
               "echo": (None, False), "suffix": (None, ""), "tools": (None, []), "functions": (None, []),
               "tool_choice": (None, "none", "auto"), "function_call": (None, "none", "auto"),
               "logit_bias": (None, {}), "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0),
               "prediction": (None,), "audio": (None,), "modalities": (None, ["text"])}


def _asks_nothing(value, harmless: tuple) -> bool:
    # type-exact: logprobs=0 (completions: "the sampled token's logprob") is not False
    return any(value is h or (type(value) is type(h) and value == h) for h in harmless)


def _refuse_unsupported(body: dict) -> None:
    for name, harmless in UNSUPPORTED.items():
        if not _asks_nothing(body.get(name), harmless):
            raise invalid(name, f"'{name}' = {body[name]!r} is not supported by this server (accepted: "
                                f"{', '.join(repr(h) for h in harmless[1:]) or 'null'})", "unsupported_parameter")
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise invalid("response_format", "only response_format {'type': 'text'} is supported (no JSON mode)",
                      "unsupported_parameter")


def _message(m: Any, i: int) -> dict[str, str]:
    """One chat message as the template wants it: role and text content.  Content given as
    parts must be text parts only."""
    param = f"messages[{i}]"
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        raise invalid(param, f"{param} must be an object with a 'role' string", "invalid_type")
    if m.get("tool_calls") or m["role"] in ("tool", "function"):
        raise invalid(param, "tool messages and tool calls are not supported", "unsupported_parameter")
    content = m.get("content")
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise invalid(f"{param}.content", "only text content parts are supported", "unsupported_parameter")
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise invalid(f"{param}.content", f"{param}.content must be a string or a list of text parts",
                      "invalid_type")
    return {"role": m["role"], "content": content}


def parse_request(body: Any, chat: bool) -> Request:
    """Validate a ``/v1/chat/completions`` (``chat``) or ``/v1/completions`` body."""
    if not isinstance(body, dict):
        raise invalid(None, "the request body must be a JSON object", "invalid_json")
    _refuse_unsupported(body)
    model = body.get("model")
    if not isinstance(model, str):
        raise invalid("model", "'model' is required and must be a string", "invalid_type")
    req = Request(chat=chat, model=model)
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise invalid("messages", "'messages' must be a non-empty list", "invalid_type")
        req.messages = [_message(m, i) for i, m in enumerate(messages)]
    else:
        prompt = body.get("prompt", "")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]  # a batch of one prompt
        token_ids = isinstance(prompt, list) and all(_is_int(t) for t in prompt)
        if not isinstance(prompt, str) and not token_ids:
            raise invalid("prompt", "'prompt' must be a string or a list of token ids (one prompt per request)",
                          "invalid_type")
        req.prompt = prompt
    req.stream = _get(body, "stream", lambda v: isinstance(v, bool), "a boolean", False)
    options = _get(body, "stream_options", lambda v: isinstance(v, dict), "an object", {})
    req.include_usage = bool(options.get("include_usage", False))
    # max_completion_tokens is the newer chat name of max_tokens
    for name in ("max_tokens", "max_completion_tokens"):
        value = _get(body, name, lambda v: _is_int(v) and v >= 1, "an integer >= 1")
        if value is not None:
            req.max_tokens = value
    req.temperature = float(_get(body, "temperature", lambda v: _is_number(v) and 0 <= v <= 2,
                                 "a number in [0, 2]", 1.0))
    top_p = _get(body, "top_p", lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]")
    top_k = _get(body, "top_k", lambda v: _is_int(v) and v >= 1, "an integer >= 1")
    if req.temperature > 0:  # greedy ignores them (and generation would warn)
        req.top_p = None if top_p is None else float(top_p)
        req.top_k = top_k
    req.seed = _get(body, "seed", lambda v: _is_int(v) and -2**63 <= v < 2**64, "a 64-bit integer")
    stop = _get(body, "stop", lambda v: isinstance(v, str) or (
        isinstance(v, list) and all(isinstance(s, str) for s in v)), "a string or a list of strings", [])
    stop = [stop] if isinstance(stop, str) else stop
    if len(stop) > MAX_STOP_STRINGS or any(not s for s in stop):
        raise invalid("stop", f"'stop' takes up to {MAX_STOP_STRINGS} non-empty strings", "invalid_value")
    req.stop = stop
    for name in ("session", "fork"):
        value = _get(body, name, lambda v: isinstance(v, str) and SESSION_NAME.fullmatch(v) is not None,
                     "a session name (letters, digits, '_', '-', '.'; up to 128; not starting with '.')")
        setattr(req, name, value)
    req.draft = _get(body, "draft", lambda v: v in ("lookup", "none"), "'lookup' or 'none'")
    if req.fork is not None and req.session is None:
        raise invalid("fork", "'fork' names the session to start from: give the new session's name in 'session'",
                      "invalid_value")
    return req


def completion_body(req: Request, rid: str, created: int, text: str, finish: str, usage: dict) -> dict:
    """A whole (non-streamed) answer."""
    if req.chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    return {"id": rid, "object": "chat.completion" if req.chat else "text_completion", "created": created,
            "model": req.model, "choices": [choice], "usage": usage}


def chunk_body(req: Request, rid: str, created: int, *, text: str | None = None, finish: str | None = None,
               usage: dict | None = None) -> dict:
    """One server-sent event of a streamed answer: a piece of ``text``, the ``finish``
    reason, or (``usage``, no choices) the token counts after the last one."""
    if usage is not None:
        choices = []
    elif req.chat:
        # the first chunk carries the role, as OpenAI's do
        delta = {} if finish is not None else {"role": "assistant", "content": ""} if text is None else {
            "content": text}
        choices = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    else:
        choices = [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}]
    body = {"id": rid, "object": "chat.completion.chunk" if req.chat else "text_completion", "created": created,
            "model": req.model, "choices": choices}
    if usage is not None:
        body["usage"] = usage
    return body
