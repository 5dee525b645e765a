"""``rlmt serve``: a local model behind an OpenAI-compatible API (standard library HTTP, continuous batching).

Routes: ``POST /v1/chat/completions`` (``messages`` under the chat template), ``POST /v1/completions``
(``prompt``: plain text, no template), both with ``max_tokens``, ``temperature``, ``top_p``, ``n``, ``stop``,
``seed`` and ``stream``; ``GET /v1/models`` and ``GET /health`` (``{"status": "ok", "chat_requests": N,
"running", "waiting", "steps", ...}``: completion requests received, rows decoding, jobs queued, the
scheduler's counters).

- :mod:`rlmt.serve.protocol`: parsing, the fields refused, the per-request limits (body bytes, JSON depth,
  characters, prompt + completion tokens within the model's context, ``max_tokens`` at most 4096, ``n`` x
  prompts at most 16), response, stream-chunk and error bodies;
- :mod:`rlmt.serve.scheduler`: continuous batching, one token per running request per decode step, requests
  admitted and retired between steps, long ones preempted after ``quantum`` steps when others wait; every
  row sampled with its own request's temperature, top-p and seed;
- :mod:`rlmt.serve.batch`: the dense KV cache rows join and leave;
- :mod:`rlmt.serve.text`: a choice's text as its tokens arrive (incremental detokenizing, stop strings);
- :mod:`rlmt.serve.server`: sockets (backlog, total read deadline, connection cap), the handler (JSON reply or
  server-sent events), ``serve``.

Decisions:

- Every request is a fresh sample (no cache): at temperature > 0 clients expect new draws. Clients cache; a
  client that wants the same draws again gives a ``seed``.
- Bad input is a 400 with an OpenAI-style ``{"error": {message, type, param, code}}`` body (a prompt beyond the
  context: ``code: context_length_exceeded``), and so is a field the server does not implement (``logprobs``,
  ``tools``, ``logit_bias``, a penalty, ...): it is named, never silently dropped. A body over the size limit
  is a 413; a request that did not arrive in time a 408 or a dropped connection; a full queue or too many
  connections a 503; an unknown route a 404; a failed generation a 500 (mid-stream: an error event).
- It binds loopback by default; ``--port 0`` asks the OS for a free port. Once it is listening it prints
  exactly one line, ``rlmt serve: listening on http://HOST:PORT/v1``, to stdout and flushes it, so a
  parent process can wait for that line.
"""

from rlmt.serve.protocol import (
    MAX_BODY_BYTES,
    MAX_CHOICES,
    MAX_TOKENS_CAP,
    BadRequest,
    CompletionRequest,
    chars_per_token_bound,
    check_prompt_chars,
    chunk_body,
    completion_body,
    error_body,
    fit_max_tokens,
    parse_chat_request,
    parse_request,
)
from rlmt.serve.scheduler import Job, Overloaded, Scheduler
from rlmt.serve.server import RlmtServer, ServeLimits, make_server, model_context, serve
from rlmt.serve.text import ChoiceText

__all__ = [
    "MAX_BODY_BYTES",
    "MAX_CHOICES",
    "MAX_TOKENS_CAP",
    "BadRequest",
    "ChoiceText",
    "CompletionRequest",
    "Job",
    "Overloaded",
    "RlmtServer",
    "Scheduler",
    "ServeLimits",
    "chars_per_token_bound",
    "check_prompt_chars",
    "chunk_body",
    "completion_body",
    "error_body",
    "fit_max_tokens",
    "make_server",
    "model_context",
    "parse_chat_request",
    "parse_request",
    "serve",
]
