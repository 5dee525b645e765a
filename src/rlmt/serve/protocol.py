"""The OpenAI chat-completion protocol of ``rlmt serve``: request parsing, the limits on a request, response bodies.

Pure functions (no model, no sockets). The limits, and why:

- A body is JSON of at most ``max_body_bytes``; JSON nested too deeply for Python's parser (``RecursionError``)
  is a 400 like any other malformed body, never a dropped connection.
- A prompt may use the model's context less the completion: ``prompt_tokens + max_tokens <= context``. An
  explicit ``max_tokens`` that does not fit is a 400 (``code: context_length_exceeded``, as OpenAI answers); an
  absent one is the default clipped to the room left.
- Before tokenizing, the characters are counted: a prompt longer than ``context * chars_per_token`` characters
  cannot fit (:func:`chars_per_token_bound`), so a 1 MB body is refused in microseconds, not after seconds of
  tokenizing. ``chars_per_token`` is the tokenizer's longest vocabulary entry, capped at
  :data:`CHARS_PER_TOKEN_CAP` (16): English averages ~4 characters a token, so the cap refuses only prompts that
  would average more than 16 characters a token, e.g. long runs of one repeated character, and it bounds the
  text a handler ever tokenizes to 16 x context characters.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

MAX_BODY_BYTES = 4 << 20
MAX_TOKENS_CAP = 4096
DEFAULT_MAX_TOKENS = 256
CHARS_PER_TOKEN_CAP = 16
ROLES = ("system", "user", "assistant")
CONTEXT_EXCEEDED = "context_length_exceeded"


class BadRequest(ValueError):
    """A request the server refuses (400); ``param`` names the offending field, ``code`` an OpenAI error code."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


@dataclass(frozen=True)
class CompletionRequest:
    """A validated chat-completion request, before tokenizing."""

    messages: tuple[dict, ...]  # ({role, content}, ...)
    max_tokens: int | None  # None: not given (the default, clipped to the context's room, applies)
    temperature: float


def _number(data: dict, key: str, default, lo: float, hi: float, integer: bool):
    value = data.get(key, default)
    if value is None:
        return default
    kinds = (int,) if integer else (int, float)
    if not isinstance(value, kinds) or isinstance(value, bool) or not lo <= value <= hi:
        kind = "an integer" if integer else "a number"
        raise BadRequest(f"'{key}' must be {kind} in [{lo}, {hi}]", key)
    return value


def parse_chat_request(body: bytes, max_tokens_cap: int = MAX_TOKENS_CAP) -> CompletionRequest:
    """An OpenAI chat-completion body -> :class:`CompletionRequest`; :class:`BadRequest` saying which field is wrong."""
    try:
        data = json.loads(body)
    except RecursionError:
        raise BadRequest("the request body is JSON nested too deeply") from None
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("the request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise BadRequest("the request body must be a JSON object")
    msgs = data.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise BadRequest("'messages' must be a non-empty list of {role, content}", "messages")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise BadRequest(f"messages[{i}] must be {{role: one of {list(ROLES)}, content: string}}", "messages")
    key = "max_tokens" if data.get("max_tokens") is not None else "max_completion_tokens"
    max_tokens = _number(data, key, None, 1, max_tokens_cap, integer=True)
    temperature = _number(data, "temperature", 1.0, 0, 2, integer=False)
    if data.get("stream"):
        raise BadRequest("streaming is not supported", "stream")
    if data.get("n", 1) != 1:
        raise BadRequest("only n=1 is supported", "n")
    messages = tuple({"role": m["role"], "content": m["content"]} for m in msgs)
    return CompletionRequest(messages, max_tokens, float(temperature))


def chars_per_token_bound(tokenizer) -> int:
    """The most characters one token of ``tokenizer`` can cover (its longest vocabulary entry; a byte-level
    entry has one character per byte, at least as many as the text it decodes to), capped at
    :data:`CHARS_PER_TOKEN_CAP` (see the module doc)."""
    longest = max((len(t) for t in tokenizer.get_vocab()), default=CHARS_PER_TOKEN_CAP)
    return max(1, min(longest, CHARS_PER_TOKEN_CAP))


def check_prompt_chars(request: CompletionRequest, context: int, chars_per_token: int) -> None:
    """:class:`BadRequest` when the messages have more characters than ``context`` tokens can hold."""
    chars = sum(len(m["content"]) for m in request.messages)
    if chars > context * chars_per_token:
        raise BadRequest(f"the messages have {chars} characters; this model's context of {context} tokens holds "
                         f"at most {context * chars_per_token}", "messages", CONTEXT_EXCEEDED)


def fit_max_tokens(request: CompletionRequest, prompt_tokens: int, context: int,
                   default_max_tokens: int = DEFAULT_MAX_TOKENS) -> int:
    """The completion budget of a request whose prompt is ``prompt_tokens`` long: ``prompt + max_tokens <= context``
    (an absent ``max_tokens`` is ``default_max_tokens`` clipped to the room left); :class:`BadRequest` otherwise."""
    room = context - prompt_tokens
    if room < 1 or (request.max_tokens is not None and request.max_tokens > room):
        wanted = f" + {request.max_tokens} max_tokens" if request.max_tokens is not None else ""
        raise BadRequest(f"this model's maximum context length is {context} tokens; the request has {prompt_tokens} "
                         f"prompt tokens{wanted}", "messages", CONTEXT_EXCEEDED)
    return request.max_tokens if request.max_tokens is not None else min(default_max_tokens, room)


def completion_body(text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int, model: str) -> dict:
    """The OpenAI chat-completion object for one successful reply (``finish_reason``: stop or length)."""
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }


def error_body(message: str, err_type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """The OpenAI error object."""
    return {"error": {"message": message, "type": err_type, "param": param, "code": code}}
