"""``rlmt serve``: a local model behind an OpenAI-compatible chat endpoint (standard library only).

Routes: ``POST /v1/chat/completions`` (``messages``, ``max_tokens``, ``temperature``), ``GET /v1/models`` and
``GET /health`` (``{"status": "ok", "chat_requests": N}``: how many completion requests were received).

Decisions:

- ``http.server.ThreadingHTTPServer``: one thread per connection. Handler threads hand their request to a
  :class:`MicroBatcher`, whose single worker thread gathers whatever arrives within a few milliseconds (up
  to ``max_batch``) into one batched, KV-cached generation: concurrent clients share forward passes.
- The backend's cache is off: at temperature > 0 every request is a fresh sample. Clients cache.
- Bad input (not JSON, missing or malformed ``messages``, a bad ``max_tokens`` / ``temperature``,
  ``stream: true``, ``n`` > 1) is a 400 with an OpenAI-style ``{"error": {message, type, param}}`` body;
  an unknown route is a 404; a failed generation a 500.
- It binds loopback by default; ``--port 0`` asks the OS for a free port. Once it is listening it prints
  exactly one line, ``rlmt serve: listening on http://HOST:PORT/v1``, to stdout and flushes it, so a
  parent process can wait for that line.
"""

from __future__ import annotations

import json
import queue
import sys
import threading
import time
import uuid
from concurrent.futures import Future
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TextIO

from rlmt.chat import ChatReply, ChatRequest

MAX_BODY_BYTES = 4 << 20
MAX_TOKENS_CAP = 4096
ROLES = ("system", "user", "assistant")


class BadRequest(ValueError):
    """A request the server refuses (400); ``param`` names the offending field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def parse_chat_request(body: bytes, default_max_tokens: int = 256) -> ChatRequest:
    """An OpenAI chat-completion body -> :class:`ChatRequest`; :class:`BadRequest` saying which field is wrong."""
    try:
        data = json.loads(body)
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
    max_tokens = data.get("max_tokens", data.get("max_completion_tokens", default_max_tokens))
    if max_tokens is None:
        max_tokens = default_max_tokens
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or not 1 <= max_tokens <= MAX_TOKENS_CAP:
        raise BadRequest(f"'max_tokens' must be an integer in [1, {MAX_TOKENS_CAP}]", "max_tokens")
    temperature = data.get("temperature", 1.0)
    if temperature is None:
        temperature = 1.0
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not 0 <= temperature <= 2:
        raise BadRequest("'temperature' must be a number in [0, 2]", "temperature")
    if data.get("stream"):
        raise BadRequest("streaming is not supported", "stream")
    if data.get("n", 1) != 1:
        raise BadRequest("only n=1 is supported", "n")
    messages = tuple({"role": m["role"], "content": m["content"]} for m in msgs)
    return ChatRequest(messages, max_tokens, float(temperature))


def completion_body(reply: ChatReply, finished: bool, model: str) -> dict:
    """The OpenAI chat-completion object for one successful reply."""
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": reply.text},
                     "finish_reason": "stop" if finished else "length"}],
        "usage": {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
                  "total_tokens": reply.prompt_tokens + reply.completion_tokens},
    }


def error_body(message: str, err_type: str = "invalid_request_error", param: str | None = None) -> dict:
    return {"error": {"message": message, "type": err_type, "param": param, "code": None}}


class MicroBatcher:
    """Gathers requests from many threads into batched backend calls (at most ``max_batch`` each)."""

    def __init__(self, chat, max_batch: int = 16, wait_s: float = 0.005):
        self.chat, self.max_batch, self.wait_s = chat, max_batch, wait_s
        self._queue: queue.Queue[tuple[ChatRequest, Future]] = queue.Queue()
        threading.Thread(target=self._loop, name="rlmt-serve-batcher", daemon=True).start()

    def submit(self, request: ChatRequest) -> tuple[ChatReply, bool]:
        """Block until the reply is ready: -> (reply, finished on its own)."""
        fut: Future = Future()
        self._queue.put((request, fut))
        return fut.result()

    def _loop(self) -> None:
        while True:
            batch = [self._queue.get()]
            deadline = time.monotonic() + self.wait_s
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._queue.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            try:
                results = self._complete([r for r, _ in batch])
            except Exception as e:  # noqa: BLE001 - every waiting client gets the error
                results = [(ChatReply(None, f"{type(e).__name__}: {e}"), False)] * len(batch)
            for (_, fut), res in zip(batch, results):
                fut.set_result(res)

    def _complete(self, requests: list[ChatRequest]) -> list[tuple[ChatReply, bool]]:
        if hasattr(self.chat, "complete_with_finish"):
            return self.chat.complete_with_finish(requests)
        replies = self.chat.complete(requests)
        return [(r, r.completion_tokens < q.max_tokens) for r, q in zip(replies, requests)]


def make_server(chat, host: str = "127.0.0.1", port: int = 0, model_name: str = "rlmt",
                max_batch: int = 16) -> ThreadingHTTPServer:
    """A bound (not yet serving) server over ``chat``; ``server.server_address`` has the real port."""
    batcher = MicroBatcher(chat, max_batch)
    counter = {"chat_requests": 0}
    count_lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        server_version = "rlmt-serve"

        def log_message(self, format, *args):  # noqa: A002 - quiet: stdout carries only the listening line
            pass

        def _send(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):  # noqa: N802 - http.server's naming
            path = self.path.split("?")[0].rstrip("/")
            if path == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": model_name, "object": "model",
                                                             "created": 0, "owned_by": "rlmt"}]})
            elif path == "/health":
                with count_lock:
                    self._send(200, {"status": "ok", "model": model_name, **counter})
            else:
                self._send(404, error_body(f"no route GET {self.path}", "not_found_error"))

        def do_POST(self):  # noqa: N802
            if self.path.split("?")[0].rstrip("/") != "/v1/chat/completions":
                self._send(404, error_body(f"no route POST {self.path}", "not_found_error"))
                return
            with count_lock:
                counter["chat_requests"] += 1
            try:
                length = int(self.headers.get("Content-Length") or -1)
            except ValueError:
                length = -1
            if not 0 <= length <= MAX_BODY_BYTES:
                self._send(400, error_body(f"a Content-Length of at most {MAX_BODY_BYTES} bytes is required"))
                return
            try:
                request = parse_chat_request(self.rfile.read(length))
            except BadRequest as e:
                self._send(400, error_body(str(e), param=e.param))
                return
            reply, finished = batcher.submit(request)
            if reply.text is None:
                self._send(500, error_body(reply.error or "generation failed", "server_error"))
            else:
                self._send(200, completion_body(reply, finished, model_name))

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server


def serve(model: str, host: str = "127.0.0.1", port: int = 0, max_batch: int = 16, seed: int = 0,
          device: str = "cpu", out: TextIO = sys.stdout) -> int:
    """Load ``model``, bind, print the listening line, serve until interrupted."""
    from rlmt.chat.local import LocalChat

    chat = LocalChat(model, max_batch=max_batch, seed=seed, device=device, cache=False)
    server = make_server(chat, host, port, model, max_batch)
    bound_host, bound_port = server.server_address[:2]
    print(f"rlmt serve: listening on http://{bound_host}:{bound_port}/v1", file=out, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
