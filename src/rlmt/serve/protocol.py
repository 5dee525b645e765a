"""The OpenAI protocol of ``rlmt serve``: request parsing, the limits on a request, response and stream bodies.

Pure functions (no model, no sockets). Two kinds of request: a chat completion (``messages``, under the model's
chat template) and a text completion (``prompt``: a string or a list of strings, tokenized as they are, as
``rlmt train`` tokenizes a plain-text prompt with ``data.chat: false``).

Fields, and why:

- Sampling: ``max_tokens`` (or ``max_completion_tokens``), ``temperature``, ``top_p``, ``n``, ``stop`` (a string
  or up to four), ``seed``, ``stream`` (with ``stream_options.include_usage``). ``model`` may name anything:
  the server has one model and every reply names it. ``user`` is accepted (metadata; it changes nothing).
- Every other field is a 400 naming it (with a did-you-mean for a near miss), never silently dropped: a client
  that asks for ``logprobs``, ``tools`` or a ``logit_bias`` would otherwise take a reply made without them for
  one made with them. A field given at its no-op value (:data:`NO_OP_VALUES`: ``logprobs: false``,
  ``presence_penalty: 0``, ``logit_bias: {}``, ...) is accepted, since clients send those by default; a
  field given as ``null`` is absent, as in OpenAI's API.

The limits:

- A body is JSON of at most ``max_body_bytes``; JSON nested too deeply for Python's parser (``RecursionError``)
  is a 400 like any other malformed body, never a dropped connection.
- ``n`` times the number of prompts is at most ``max_choices``: every choice is a row of the batch.
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

import difflib
import json
import time
import uuid
from dataclasses import dataclass

MAX_BODY_BYTES = 4 << 20
MAX_TOKENS_CAP = 4096
MAX_CHOICES = 16
MAX_STOP = 4  # OpenAI's limit on stop sequences
DEFAULT_MAX_TOKENS = 256
CHARS_PER_TOKEN_CAP = 16
ROLES = ("system", "user", "assistant")
CONTEXT_EXCEEDED = "context_length_exceeded"

SAMPLING_FIELDS = ("model", "user", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stop",
                   "seed", "stream", "stream_options")
NO_OP_VALUES = {  # unsupported fields, accepted at these values only (each changes nothing there)
    "frequency_penalty": (0,), "presence_penalty": (0,), "logprobs": (False,), "top_logprobs": (0,),
    "logit_bias": ({},), "tools": ([],), "functions": ([],), "tool_choice": ("none",),
    "response_format": ({"type": "text"},), "store": (False,), "echo": (False,), "best_of": (1,), "suffix": ("",),
}


class BadRequest(ValueError):
    """A request the server refuses (400); ``param`` names the offending field, ``code`` an OpenAI error code."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


@dataclass(frozen=True)
class CompletionRequest:
    """A validated request, before tokenizing: a chat completion (``messages``) or a text one (``prompts``)."""

    messages: tuple[dict, ...]  # ({role, content}, ...); () for a text completion
    max_tokens: int | None  # None: not given (the default, clipped to the context's room, applies)
    temperature: float
    top_p: float = 1.0
    n: int = 1  # choices per prompt
    stop: tuple[str, ...] = ()  # the text ends before the first of these (not included)
    seed: int | None = None  # the same seed and request draw the same tokens; None: the server's generator
    stream: bool = False
    include_usage: bool = False  # streamed: a last chunk with the usage (stream_options.include_usage)
    prompts: tuple[str, ...] = ()  # a text completion's prompts (no chat template); () for a chat completion

    @property
    def chat(self) -> bool:
        return not self.prompts

    @property
    def prompt_param(self) -> str:
        """The field that holds the prompt (named by context-length errors)."""
        return "messages" if self.chat else "prompt"


def _number(data: dict, key: str, default, lo: float, hi: float, integer: bool):
    value = data.get(key, default)
    if value is None:
        return default
    kinds = (int,) if integer else (int, float)
    if not isinstance(value, kinds) or isinstance(value, bool) or not lo <= value <= hi:
        kind = "an integer" if integer else "a number"
        raise BadRequest(f"'{key}' must be {kind} in [{lo}, {hi}]", key)
    return value


def _load_object(body: bytes) -> dict:
    try:
        data = json.loads(body)
    except RecursionError:
        raise BadRequest("the request body is JSON nested too deeply") from None
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("the request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise BadRequest("the request body must be a JSON object")
    return data


def _no_op(key: str, value) -> bool:
    """Whether ``value`` is one of ``key``'s no-op values (``False`` is not ``0`` here: for a text completion
    ``logprobs: 0`` asks for the sampled tokens' log-probabilities)."""
    return any(value == v and isinstance(value, bool) == isinstance(v, bool) for v in NO_OP_VALUES.get(key, ()))


def _refuse_unsupported(data: dict, prompt_field: str) -> None:
    """:class:`BadRequest` naming the first field this server does not implement (see the module doc)."""
    known = (prompt_field,) + SAMPLING_FIELDS
    for key, value in data.items():
        if key in known or value is None or _no_op(key, value):
            continue
        if key in NO_OP_VALUES:
            raise BadRequest(f"'{key}' is not supported by rlmt serve (only {NO_OP_VALUES[key][0]!r} is accepted)",
                             key)
        near = difflib.get_close_matches(key, known + tuple(NO_OP_VALUES), n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        raise BadRequest(f"'{key}' is not supported by rlmt serve{hint}", key)


def _stop(data: dict) -> tuple[str, ...]:
    stop = data.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if (not isinstance(stops, list) or len(stops) > MAX_STOP
            or not all(isinstance(s, str) and s for s in stops)):
        raise BadRequest(f"'stop' must be a non-empty string or a list of at most {MAX_STOP} of them", "stop")
    return tuple(dict.fromkeys(stops))


def _stream(data: dict) -> tuple[bool, bool]:
    stream = data.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise BadRequest("'stream' must be true or false", "stream")
    options = data.get("stream_options")
    if options is None:
        return bool(stream), False
    if not stream:
        raise BadRequest("'stream_options' is only allowed with 'stream': true", "stream_options")
    if not isinstance(options, dict):
        raise BadRequest("'stream_options' must be an object", "stream_options")
    for key, value in options.items():
        if key != "include_usage" and value is not None:
            raise BadRequest(f"'stream_options.{key}' is not supported by rlmt serve", f"stream_options.{key}")
    usage = options.get("include_usage")
    if usage is not None and not isinstance(usage, bool):
        raise BadRequest("'stream_options.include_usage' must be true or false", "stream_options.include_usage")
    return True, bool(usage)


def _messages(data: dict) -> tuple[dict, ...]:
    msgs = data.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise BadRequest("'messages' must be a non-empty list of {role, content}", "messages")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise BadRequest(f"messages[{i}] must be {{role: one of {list(ROLES)}, content: string}}", "messages")
        extra = [k for k, v in m.items() if k not in ("role", "content") and v is not None]
        if extra:
            raise BadRequest(f"messages[{i}].{extra[0]} is not supported by rlmt serve", "messages")
    return tuple({"role": m["role"], "content": m["content"]} for m in msgs)


def _prompts(data: dict) -> tuple[str, ...]:
    prompt = data.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise BadRequest("'prompt' must be a string or a non-empty list of strings (token ids are not supported)",
                         "prompt")
    return tuple(prompts)


def parse_request(body: bytes, chat: bool, max_tokens_cap: int = MAX_TOKENS_CAP,
                  max_choices: int = MAX_CHOICES) -> CompletionRequest:
    """An OpenAI chat-completion (``chat``) or completion body -> :class:`CompletionRequest`;
    :class:`BadRequest` saying which field is wrong or unsupported."""
    data = _load_object(body)
    _refuse_unsupported(data, "messages" if chat else "prompt")
    messages, prompts = (_messages(data), ()) if chat else ((), _prompts(data))
    key = "max_tokens" if data.get("max_tokens") is not None else "max_completion_tokens"
    max_tokens = _number(data, key, None, 1, max_tokens_cap, integer=True)
    temperature = _number(data, "temperature", 1.0, 0, 2, integer=False)
    top_p = _number(data, "top_p", 1.0, 0, 1, integer=False)
    n = _number(data, "n", 1, 1, max_choices, integer=True)
    if n * max(1, len(prompts)) > max_choices:
        raise BadRequest(f"'n' x the number of prompts is {n * len(prompts)}; at most {max_choices}", "n")
    seed = _number(data, "seed", None, -(1 << 63), (1 << 64) - 1, integer=True)
    stream, include_usage = _stream(data)
    return CompletionRequest(messages, max_tokens, float(temperature), float(top_p), n, _stop(data), seed, stream,
                             include_usage, prompts)


def parse_chat_request(body: bytes, max_tokens_cap: int = MAX_TOKENS_CAP,
                       max_choices: int = MAX_CHOICES) -> CompletionRequest:
    """A ``POST /v1/chat/completions`` body (see :func:`parse_request`)."""
    return parse_request(body, True, max_tokens_cap, max_choices)


def chars_per_token_bound(tokenizer) -> int:
    """The most characters one token of ``tokenizer`` can cover (its longest vocabulary entry; a byte-level
    entry has one character per byte, at least as many as the text it decodes to), capped at
    :data:`CHARS_PER_TOKEN_CAP` (see the module doc)."""
    longest = max((len(t) for t in tokenizer.get_vocab()), default=CHARS_PER_TOKEN_CAP)
    return max(1, min(longest, CHARS_PER_TOKEN_CAP))


def check_prompt_chars(request: CompletionRequest, context: int, chars_per_token: int) -> None:
    """:class:`BadRequest` when the messages (or a prompt) have more characters than ``context`` tokens can hold."""
    texts = ["".join(m["content"] for m in request.messages)] if request.chat else request.prompts
    chars = max(len(t) for t in texts)
    if chars > context * chars_per_token:
        what = "the messages have" if request.chat else "a prompt has"
        raise BadRequest(f"{what} {chars} characters; this model's context of {context} tokens holds "
                         f"at most {context * chars_per_token}", request.prompt_param, CONTEXT_EXCEEDED)


def fit_max_tokens(request: CompletionRequest, prompt_tokens: int, context: int,
                   default_max_tokens: int = DEFAULT_MAX_TOKENS) -> int:
    """The completion budget of a request whose prompt is ``prompt_tokens`` long: ``prompt + max_tokens <= context``
    (an absent ``max_tokens`` is ``default_max_tokens`` clipped to the room left); :class:`BadRequest` otherwise."""
    room = context - prompt_tokens
    if room < 1 or (request.max_tokens is not None and request.max_tokens > room):
        wanted = f" + {request.max_tokens} max_tokens" if request.max_tokens is not None else ""
        raise BadRequest(f"this model's maximum context length is {context} tokens; the request has {prompt_tokens} "
                         f"prompt tokens{wanted}", request.prompt_param, CONTEXT_EXCEEDED)
    return request.max_tokens if request.max_tokens is not None else min(default_max_tokens, room)


# ---------------------------------------------------------------------------------------------- responses


def usage_body(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def response_id(chat: bool) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"


def completion_body(choices: list[tuple[str, str]], prompt_tokens: int, completion_tokens: int, model: str,
                    chat: bool = True, rid: str | None = None) -> dict:
    """The OpenAI ``chat.completion`` (``chat``) or ``text_completion`` object; ``choices``: (text,
    finish_reason) in index order, finish_reason ``stop`` or ``length``."""
    if chat:
        items = [{"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": reason} for i, (text, reason) in enumerate(choices)]
    else:
        items = [{"index": i, "text": text, "logprobs": None, "finish_reason": reason}
                 for i, (text, reason) in enumerate(choices)]
    return {"id": rid or response_id(chat), "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": items,
            "usage": usage_body(prompt_tokens, completion_tokens)}


def chunk_body(rid: str, created: int, model: str, chat: bool, index: int | None = None, text: str | None = None,
               finish_reason: str | None = None, role: bool = False, usage: dict | None = None) -> dict:
    """One streamed chunk: a choice's text ``delta`` (``role``: the chat's first chunk, which names the
    assistant) and/or its ``finish_reason``; ``index`` None: the usage chunk, with no choices."""
    choices = []
    if index is not None:
        if chat:
            delta = ({"role": "assistant"} if role else {}) | ({"content": text} if text is not None else {})
            choices = [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
        else:
            choices = [{"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}]
    body = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
            "model": model, "choices": choices}
    if usage is not None:
        body["usage"] = usage
    return body


def error_body(message: str, err_type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """The OpenAI error object."""
    return {"error": {"message": message, "type": err_type, "param": param, "code": code}}
