"""``rlmt serve``: a local model behind an OpenAI-compatible chat endpoint (standard library HTTP, continuous batching).

Routes: ``POST /v1/chat/completions`` (``messages``, ``max_tokens``, ``temperature``), ``GET /v1/models`` and
``GET /health`` (``{"status": "ok", "chat_requests": N, "running", "waiting", "steps", ...}``: completion
requests received, rows decoding, jobs queued, the scheduler's counters).

- :mod:`rlmt.serve.protocol`: parsing, the per-request limits (body bytes, JSON depth, characters, prompt +
  completion tokens within the model's context, ``max_tokens`` at most 4096), response and error bodies;
- :mod:`rlmt.serve.scheduler`: continuous batching, one token per running request per decode step, requests
  admitted and retired between steps, long ones preempted after ``quantum`` steps when others wait;
- :mod:`rlmt.serve.batch`: the dense KV cache rows join and leave;
- :mod:`rlmt.serve.server`: sockets (backlog, total read deadline, connection cap), the handler, ``serve``.

Decisions:

- Every request is a fresh sample (no cache): at temperature > 0 clients expect new draws. Clients cache.
- Bad input is a 400 with an OpenAI-style ``{"error": {message, type, param, code}}`` body (a prompt beyond the
  context: ``code: context_length_exceeded``); a body over the size limit a 413; a request that did not arrive
  in time a 408 or a dropped connection; a full queue or too many connections a 503; an unknown route a 404; a
  failed generation a 500. ``stream: true`` and ``n`` > 1 are refused (400) for now.
- It binds loopback by default; ``--port 0`` asks the OS for a free port. Once it is listening it prints
  exactly one line, ``rlmt serve: listening on http://HOST:PORT/v1``, to stdout and flushes it, so a
  parent process can wait for that line.
"""

from rlmt.serve.protocol import (
    MAX_BODY_BYTES,
    MAX_TOKENS_CAP,
    BadRequest,
    CompletionRequest,
    chars_per_token_bound,
    check_prompt_chars,
    completion_body,
    error_body,
    fit_max_tokens,
    parse_chat_request,
)
from rlmt.serve.scheduler import Job, Overloaded, Scheduler
from rlmt.serve.server import RlmtServer, ServeLimits, make_server, model_context, serve

__all__ = [
                                 "MAX_BODY_BYTES",
                                 "MAX_TOKENS_CAP",
                                 "BadRequest",
                                 "CompletionRequest",
                                 "Job",
                                 "Overloaded",
                                 "RlmtServer",
                                 "Scheduler",
                                 "ServeLimits",
                                 "chars_per_token_bound",
                                 "check_prompt_chars",
                                 "completion_body",
                                 "error_body",
                                 "fit_max_tokens",
                                 "make_server",
                                 "model_context",
                                 "parse_chat_request",
                                 "serve",
]
