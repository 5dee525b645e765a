"""The HTTP side of ``rlmt serve``: sockets, deadlines, the handler, and ``serve`` itself (standard library only).

- ``http.server.ThreadingHTTPServer``, one thread per connection, a listen backlog of ``backlog`` (1024, not the
  standard library's 5: at 5, 17 to 94 of 200 concurrent requests on loopback timed out, their SYNs dropped) and at most
  ``max_connections`` open at once (beyond: an immediate 503).
- A request's line, headers and body must all arrive within ``read_timeout_s`` in total: every ``recv`` is
  limited to the time left (:class:`DeadlineReader`), so neither a silent client nor one trickling a byte at a
  time holds a thread; it is dropped (a 408 when the headers had arrived). Writes have ``write_timeout_s``.
- The handler thread parses, counts characters, tokenizes and checks the context (see
  :mod:`rlmt.serve.protocol`) before anything is queued, so a huge prompt costs its own thread microseconds
  and the scheduler nothing. It queues one job per choice (``n`` per prompt) and detokenizes their tokens as
  they come (:class:`rlmt.serve.text.ChoiceText`), cancelling a job whose text reached a stop string. While
  they run, it checks every ``poll_s`` that the client is still there; a client that has gone (or a stream
  write that fails or takes over ``write_timeout_s``) cancels its jobs, so abandoned requests stop costing
  decode steps.
- ``stream: true`` is answered with server-sent events, one ``data: {chunk}`` per piece of text a step adds
  (a chat stream opens each choice with its role and closes it with a chunk that holds only the
  ``finish_reason``), then the usage chunk when asked for, then ``data: [DONE]``; the connection closes after.
  A generation that fails mid-stream sends ``data: {"error": ...}`` (the OpenAI client raises it) and no
  ``[DONE]``. A non-streaming handler wakes every ``poll_s`` or when a job ends, a streaming one at every
  step it has text for.
- The tokenizer is called under a lock: a Rust fast tokenizer used from many threads at once can fail with
  "RuntimeError: Already borrowed" (huggingface/tokenizers#537), and a call is short (the character check
  bounds its input).
"""

from __future__ import annotations

import io
import json
import select
import socket
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TextIO

from rlmt.serve.protocol import (
    DEFAULT_MAX_TOKENS,
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
    parse_request,
    response_id,
    usage_body,
)
from rlmt.serve.scheduler import Job, Overloaded, Scheduler
from rlmt.serve.text import ChoiceText

CHAT_ROUTE = "/v1/chat/completions"
COMPLETIONS_ROUTE = "/v1/completions"


@dataclass(frozen=True)
class ServeLimits:
    """What one request and one connection may cost the server."""

    max_body_bytes: int = MAX_BODY_BYTES  # largest request body read (bytes); larger is a 413
    max_tokens_cap: int = MAX_TOKENS_CAP  # largest max_tokens a request may ask for
    max_choices: int = MAX_CHOICES  # most choices (n x prompts) one request may ask for
    default_max_tokens: int = DEFAULT_MAX_TOKENS  # completion budget when a request gives none (clipped to the context)
    context_tokens: int | None = None  # prompt + completion tokens per request; None: the model's context
    read_timeout_s: float = 30.0  # a request's line, headers and body must arrive within this, in total
    write_timeout_s: float = 30.0  # each send of the response must complete within this
    poll_s: float = 0.25  # how often a handler waiting on its jobs checks that the client is still connected
    backlog: int = 1024  # listen backlog (connections the kernel queues before they are accepted)
    max_connections: int = 1024  # connections handled at once; beyond, an immediate 503


def model_context(model) -> int:
    """The model's context length in tokens (``max_position_embeddings`` or the like)."""
    cfg = model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ValueError("the model's config gives no context length; set ServeLimits.context_tokens")


class DeadlineReader(io.RawIOBase):
    """A socket's bytes where every ``recv`` may wait only for the time left until ``deadline`` (monotonic s):
    a bound on the whole read, which a per-``recv`` timeout is not."""

    def __init__(self, sock: socket.socket, deadline: float):
        self.sock, self.deadline = sock, deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request did not arrive in time")
        self.sock.settimeout(left)
        return self.sock.recv_into(buffer)


def client_gone(sock: socket.socket) -> bool:
    """Whether the peer has closed ``sock`` (readable with nothing to read, or reset); never blocks."""
    try:
        poller = select.poll()  # not select.select: it fails on descriptors above 1023
        poller.register(sock, select.POLLIN)
        events = poller.poll(0)
        if not events:
            return False
        if events[0][1] & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
            return True
        return sock.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


class ClientGone(Exception):
    """The client of a request has disconnected (its jobs are cancelled)."""


class RlmtServer(ThreadingHTTPServer):
    """ThreadingHTTPServer with a backlog, a cap on open connections, a quiet error log and its scheduler."""

    daemon_threads = True

    def __init__(self, address, handler, scheduler: Scheduler, limits: ServeLimits):
        self.request_queue_size = limits.backlog  # read by server_activate inside __init__
        self.scheduler, self.limits = scheduler, limits
        self.open_connections, self._count_lock = 0, threading.Lock()
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        with self._count_lock:
            full = self.open_connections >= self.limits.max_connections
            self.open_connections += not full
        if full:
            body = json.dumps(error_body("too many open connections", "server_error")).encode()
            try:
                request.setblocking(False)
                request.send(b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                             + f"Content-Length: {len(body)}\r\nRetry-After: 1\r\n\r\n".encode() + body)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._count_lock:
                self.open_connections -= 1

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], OSError):  # resets and timeouts are the clients' business
            super().handle_error(request, client_address)

    def server_close(self):
        super().server_close()
        self.scheduler.close()


def make_server(lm, host: str = "127.0.0.1", port: int = 0, model_name: str | None = None, max_batch: int = 16,
                limits: ServeLimits = ServeLimits(), scheduler: Scheduler | None = None, seed: int = 0) -> RlmtServer:
    """A bound, listening (not yet serving) server over ``lm`` (a :class:`rlmt.models.LoadedModel`);
    ``server.server_address`` has the real port. ``scheduler``: one made over ``lm.model`` (default: a new one)."""
    from rlmt.data import PromptFormat, encode_prompt

    tokenizer, name = lm.tokenizer, model_name or lm.name
    scheduler = scheduler or Scheduler(lm.model, tokenizer, max_batch, seed=seed)
    context = limits.context_tokens or model_context(lm.model)
    chars_per_token = chars_per_token_bound(tokenizer)
    tokenizer_lock = threading.Lock()
    counter, count_lock = {"chat_requests": 0}, threading.Lock()

    def encode(request: CompletionRequest) -> list[list[int]]:
        """The prompts' token ids: the messages under the chat template, or each prompt as plain text."""
        with tokenizer_lock:
            if request.chat:
                return [encode_prompt(tokenizer, PromptFormat(chat=True), [dict(m) for m in request.messages])]
            return [encode_prompt(tokenizer, PromptFormat(chat=False), p) for p in request.prompts]

    def decode(ids: list[int]) -> str:
        with tokenizer_lock:
            return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    class Handler(BaseHTTPRequestHandler):
        server_version = "rlmt-serve"

        def setup(self):
            super().setup()
            self.rfile.close()
            deadline = time.monotonic() + limits.read_timeout_s
            self.rfile = io.BufferedReader(DeadlineReader(self.connection, deadline))

        def log_message(self, format, *args):
            pass

        def _send(self, code: int, body: dict) -> None:
            self.connection.settimeout(limits.write_timeout_s)
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            path = self.path.split("?")[0].rstrip("/")
            if path == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": name, "object": "model", "created": 0,
                                                             "owned_by": "rlmt"}]})
            elif path == "/health":
                with count_lock:
                    count = dict(counter)
                self._send(200, {"status": "ok", "model": name, **count, **scheduler.load()})
            else:
                self._send(404, error_body(f"no route GET {self.path}", "not_found_error"))

        def _read_body(self) -> bytes | None:
            try:
                length = int(self.headers.get("Content-Length") or -1)
            except ValueError:
                length = -1
            if length < 0:
                self._send(400, error_body("a Content-Length header is required"))
                return None
            if length > limits.max_body_bytes:
                self._send(413, error_body(f"the body may have at most {limits.max_body_bytes} bytes"))
                return None
            try:
                return self.rfile.read(length)
            except TimeoutError:
                self.close_connection = True
                self._send(408, error_body(f"the request did not arrive within {limits.read_timeout_s} s"))
                return None

        def do_POST(self):
            route = self.path.split("?")[0].rstrip("/")
            if route not in (CHAT_ROUTE, COMPLETIONS_ROUTE):
                self._send(404, error_body(f"no route POST {self.path}", "not_found_error"))
                return
            with count_lock:
                counter["chat_requests"] += 1
            body = self._read_body()
            if body is None:
                return
            try:
                request = parse_request(body, route == CHAT_ROUTE, limits.max_tokens_cap, limits.max_choices)
                check_prompt_chars(request, context, chars_per_token)
                prompts = encode(request)
                if not all(prompts):
                    raise BadRequest("a prompt has no tokens", request.prompt_param)
                budgets = [fit_max_tokens(request, len(p), context, limits.default_max_tokens) for p in prompts]
            except BadRequest as e:
                self._send(400, error_body(str(e), param=e.param, code=e.code))
                return
            try:  # choices prompt-major: choice i * n + j is sample j of prompt i
                jobs = scheduler.submit_all([(p, b) for p, b in zip(prompts, budgets) for _ in range(request.n)],
                                            request.temperature, request.top_p, request.seed)
            except Overloaded as e:
                self._send(503, error_body(f"the server is overloaded: {e}", "server_error"))
                return
            texts = [ChoiceText(decode, request.stop) for _ in jobs]
            prompt_tokens = sum(len(p) for p in prompts)
            try:
                if request.stream:
                    self._stream(request, jobs, texts, prompt_tokens)
                else:
                    self._reply(request, jobs, texts, prompt_tokens)
            except (ClientGone, OSError):
                for job in jobs:
                    job.cancel()
                self.close_connection = True

        def _follow(self, jobs: list[Job], texts: list[ChoiceText], on_text=None) -> str | None:
            """Feed each job's new tokens to its text until every text is finished -> None, or the error of a
            job that failed (the others are cancelled). ``on_text(i)`` after choice ``i`` changed; it may
            raise OSError (the client left). :class:`ClientGone` when the client disconnected."""
            seen = [0] * len(jobs)
            check_at = time.monotonic() + limits.poll_s
            while True:
                jobs[0].news.clear()
                for i, (job, text) in enumerate(zip(jobs, texts)):
                    if text.finished:
                        continue
                    done = job.done  # before the tokens: once done, no token is appended after this read
                    new = job.tokens[seen[i]:]
                    seen[i] += len(new)
                    for token in new:
                        if text.push(token):  # a stop string: the rest is not needed
                            job.cancel()
                            break
                    if done and not text.finished:
                        if job.finish_reason not in ("stop", "length"):
                            for other in jobs:
                                other.cancel()
                            return job.error or f"generation {job.finish_reason}"
                        text.finish()
                    if on_text is not None and (new or text.finished):
                        on_text(i)
                if all(t.finished for t in texts):
                    return None
                left = max(0.0, check_at - time.monotonic())
                if on_text is not None:
                    jobs[0].news.wait(left)  # every job of a request sets this one event
                else:
                    next(j for j, t in zip(jobs, texts) if not t.finished).wait(left)
                if time.monotonic() >= check_at:
                    if client_gone(self.connection):
                        raise ClientGone
                    check_at = time.monotonic() + limits.poll_s

        @staticmethod
        def _finish_reason(job: Job, text: ChoiceText) -> str:
            return "stop" if text.stopped or job.finish_reason == "stop" else "length"

        def _reply(self, request: CompletionRequest, jobs: list[Job], texts: list[ChoiceText],
                   prompt_tokens: int) -> None:
            error = self._follow(jobs, texts)
            if error is not None:
                self._send(500, error_body(error, "server_error"))
                return
            choices = [(t.text, self._finish_reason(j, t)) for j, t in zip(jobs, texts)]
            self._send(200, completion_body(choices, prompt_tokens, sum(t.tokens for t in texts), name,
                                            request.chat))

        def _stream(self, request: CompletionRequest, jobs: list[Job], texts: list[ChoiceText],
                    prompt_tokens: int) -> None:
            rid, created, sent = response_id(request.chat), int(time.time()), [0] * len(jobs)
            self.connection.settimeout(limits.write_timeout_s)
            self.close_connection = True
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()

            def event(body: dict | bytes) -> None:
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.wfile.write(b"data: " + data + b"\n\n")

            def on_text(i: int) -> None:
                ready = texts[i].ready()
                if len(ready) > sent[i]:
                    event(chunk_body(rid, created, name, request.chat, i, ready[sent[i]:]))
                    sent[i] = len(ready)
                if texts[i].finished:
                    event(chunk_body(rid, created, name, request.chat, i,
                                     finish_reason=self._finish_reason(jobs[i], texts[i])))

            if request.chat:
                for i in range(len(jobs)):
                    event(chunk_body(rid, created, name, True, i, "", role=True))
            error = self._follow(jobs, texts, on_text)
            if error is not None:
                event(error_body(error, "server_error"))
                return
            if request.include_usage:
                event(chunk_body(rid, created, name, request.chat,
                                 usage=usage_body(prompt_tokens, sum(t.tokens for t in texts))))
            event(b"[DONE]")

    return RlmtServer((host, port), Handler, scheduler, limits)


def serve(model: str, host: str = "127.0.0.1", port: int = 0, max_batch: int = 16, seed: int = 0,
          device: str = "auto", out: TextIO = sys.stdout) -> int:
    """Load ``model`` (on ``device``; 'auto': cuda when available, else cpu), bind, print the listening line,
    serve until interrupted."""
    from rlmt.models import load_model, pick_device

    lm = load_model(model, device=pick_device(device), seed=seed)
    server = make_server(lm, host, port, model, max_batch, seed=seed)
    bound_host, bound_port = server.server_address[:2]
    print(f"rlmt serve: listening on http://{bound_host}:{bound_port}/v1", file=out, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
