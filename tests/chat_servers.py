"""Scripted OpenAI-style chat servers for the chat-backend and judge tests, and helpers to run server processes.

Run as ``python tests/chat_servers.py MODE PORT [DELAY_S]``; it prints ``listening on http://127.0.0.1:PORT/v1``
once bound (PORT 0 picks a free one). Modes of ``POST /v1/chat/completions``:

- ``ok``: replies ``echo: <last message, first 40 chars>`` with usage 10/5, after DELAY_S seconds;
- ``slow``: sleeps 30 s before answering (longer than any test's timeout);
- ``garbage``: 200 with a body that is not JSON;  ``nochoices``: 200 with JSON that has no choices;
- ``flaky``: the first request gets a 500, later ones are ``ok``;  ``badrequest``: always 400;
- ``keyword``: ``Verdict: A`` if the RESPONSE A block contains GOOD, ``Verdict: B`` if RESPONSE B does,
  otherwise ``Verdict: tie`` (an order-consistent judge);  ``always-a``: always ``Verdict: A`` (pure position bias).
- ``critic``: a GRAPE json-mode critic: reasoning, then ``{"ref": NONCE, "score": 9 if the RESPONSE block has GOOD
  else 2, "confidence": 0.8}`` with the nonce read from the RESPONSE marker;
- ``critic-echo``: like ``critic``, but when the RESPONSE block holds a JSON line it replies with that line instead
  (the most gullible critic: whatever score a response writes, it repeats).

``GET /stats`` -> ``{"requests": N, "max_inflight": M}`` (chat requests received, most in flight at once).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_BLOCK = r"<<<{label} (\w+)>>>\n(.*?)\n<<<END {label} \1>>>"


def _block(text: str, label: str) -> str:
    m = re.search(_BLOCK.format(label=label), text, re.S)
    return m.group(2) if m else ""


def reply_text(mode: str, messages: list[dict]) -> str:
    content = "\n".join(m.get("content", "") for m in messages)
    if mode == "keyword":
        a, b = "GOOD" in _block(content, "RESPONSE A"), "GOOD" in _block(content, "RESPONSE B")
        return "Verdict: A" if a and not b else "Verdict: B" if b and not a else "Verdict: tie"
    if mode == "always-a":
        return "Some thoughts.\nVerdict: A"
    if mode in ("critic", "critic-echo"):
        m = re.search(_BLOCK.format(label="RESPONSE"), content, re.S)
        nonce, response = (m.group(1), m.group(2)) if m else ("", "")
        copied = [ln for ln in response.splitlines() if ln.strip().startswith("{")]
        if mode == "critic-echo" and copied:
            return "The response states its own grade.\n" + copied[-1].strip()
        score = 9 if "GOOD" in response else 2
        return f"Graded against the criterion.\n{json.dumps({'ref': nonce, 'score': score, 'confidence': 0.8})}"
    return "echo: " + messages[-1].get("content", "")[:40]


def make_server(mode: str, port: int, delay: float) -> ThreadingHTTPServer:
    state = {"requests": 0, "inflight": 0, "max_inflight": 0}
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _send(self, code: int, data: bytes, ctype: str = "application/json") -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):  # noqa: N802
            with lock:
                self._send(200, json.dumps({"requests": state["requests"], "max_inflight": state["max_inflight"]}).encode())

        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with lock:
                state["requests"] += 1
                state["inflight"] += 1
                state["max_inflight"] = max(state["max_inflight"], state["inflight"])
                first = state["requests"] == 1
            left = []

            def leave():  # out of flight before the reply's bytes go out: the client may send its next at once
                if not left:
                    left.append(True)
                    with lock:
                        state["inflight"] -= 1

            send = self._send

            def reply(*args, **kwargs):
                leave()
                return send(*args, **kwargs)

            self._send = reply
            try:
                time.sleep(30 if mode == "slow" else delay)
                if mode == "garbage":
                    return self._send(200, b"<html>definitely not json</html>", "text/html")
                if mode == "nochoices":
                    return self._send(200, json.dumps({"object": "chat.completion", "choices": []}).encode())
                if mode == "badrequest":
                    return self._send(400, json.dumps({"error": {"message": "bad"}}).encode())
                if mode == "flaky" and first:
                    return self._send(500, json.dumps({"error": {"message": "try again"}}).encode())
                text = reply_text(mode, body["messages"])
                out = {"id": "x", "object": "chat.completion",
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                    "finish_reason": "stop"}],
                       "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}
                self._send(200, json.dumps(out).encode())
            except (BrokenPipeError, ConnectionResetError):
                pass
            finally:
                leave()
                self._send = send

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    return server


# ------------------------------------------------------------------------------------ process helpers for tests


def start_process(argv: list[str], ready_timeout: float = 60.0) -> tuple[subprocess.Popen, str]:
    """Start a server process and wait for its ``listening on URL`` line -> (process, base URL)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    line: list[str] = []
    reader = threading.Thread(target=lambda: line.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(ready_timeout)
    m = re.search(r"listening on (http://\S+)", line[0]) if line else None
    if not m:
        stop_process(proc)
        raise RuntimeError(f"server {argv} did not report a listening address within {ready_timeout}s: {line}")
    return proc, m.group(1)


def start_scripted(mode: str, delay: float = 0.0) -> tuple[subprocess.Popen, str]:
    return start_process([sys.executable, __file__, mode, "0", str(delay)], ready_timeout=20)


def stop_process(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
    if proc.stdout:
        proc.stdout.close()


def server_stats(base_url: str) -> dict:
    import urllib.request

    root = base_url.rsplit("/v1", 1)[0]
    with urllib.request.urlopen(f"{root}/stats", timeout=5) as r:
        return json.loads(r.read())


def closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    mode, port = sys.argv[1], int(sys.argv[2])
    srv = make_server(mode, port, float(sys.argv[3]) if len(sys.argv) > 3 else 0.0)
    print(f"listening on http://127.0.0.1:{srv.server_address[1]}/v1", flush=True)
    srv.serve_forever()
