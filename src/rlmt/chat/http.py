"""A chat backend on any OpenAI-compatible endpoint (vLLM, llama.cpp server, Ollama, ``rlmt serve``, hosted APIs).

Standard library only (``urllib.request`` and a thread pool), so a judge needs no client package.

Decisions:

- **Bounded concurrency**: a pool of ``concurrency`` workers per :meth:`OpenAIChat.complete` call, and a
  semaphore of the same size around every HTTP request, so the endpoint never sees more than ``concurrency``
  requests in flight from one backend, even when ``complete`` is called from several threads.
- **Retries**: connection errors, timeouts, HTTP 429 and 5xx, and replies that are not an OpenAI chat
  completion (not JSON, no ``choices[0].message.content``) are retried up to ``retries`` times with
  exponential backoff plus jitter (:func:`backoff_delay`). Other 4xx (bad request, auth) are not retried:
  sending the same request again cannot help. After the last try the reply is a failed
  ``ChatReply(text=None, error=...)``; :meth:`complete` never raises for a failed call.
- **Cache**: successful replies are kept in memory, keyed by ``ChatRequest.key(f"{base_url}|{model}")``,
  and appended to the JSONL file ``cache_path`` (flushed per line), which is reloaded on start. A line cut
  short by a kill is skipped on reload. Failed replies are never cached (the next run tries again).
  Identical requests within one call are sent once.
- **Stats**: ``requests`` counts every request, ``cache_hits`` those served without a call, ``calls`` the
  requests sent to the endpoint, ``retries`` the extra attempts, ``failures`` the replies that stayed
  failed; tokens come from the response's ``usage`` and ``cost`` from the per-1k-token prices.
- **The API key** is read from the environment variable ``api_key_env`` (if set) and sent as a Bearer
  header; it is never put in errors, stats or the cache.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import os
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Sequence

from rlmt.chat.base import ChatReply, ChatRequest, ChatStats


class BadCompletion(ValueError):
    """A 200 reply that is not an OpenAI chat completion."""


def parse_completion(body: bytes) -> tuple[str, int, int]:
    """-> (content, prompt_tokens, completion_tokens) of a chat-completion body; :class:`BadCompletion` if malformed."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadCompletion(f"reply is not JSON ({e.__class__.__name__}): {body[:80]!r}") from e
    try:
        content = data["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError) as e:
        raise BadCompletion(f"reply has no choices[0].message.content: {str(data)[:80]}") from e
    if not isinstance(content, str):
        raise BadCompletion(f"choices[0].message.content is {type(content).__name__}, not a string")
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    return content, _as_count(usage.get("prompt_tokens")), _as_count(usage.get("completion_tokens"))


def _as_count(v) -> int:
    return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 else 0


def is_retryable_status(code: int) -> bool:
    """429 (rate limited) and 5xx (server trouble) may pass on a later try; other 4xx will not."""
    return code == 429 or 500 <= code <= 599


def backoff_delay(attempt: int, base_s: float, rng: random.Random) -> float:
    """Seconds to wait before retry ``attempt`` (0-based): base * 2**attempt, plus up to base of jitter."""
    return base_s * (2 ** attempt) + rng.uniform(0.0, base_s)


def load_cache(path: Path) -> dict[str, dict]:
    """Entries of a JSONL reply cache; malformed lines (e.g. cut short by a kill) are skipped."""
    out: dict[str, dict] = {}
    if not path.exists():
        return out
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if isinstance(e, dict) and isinstance(e.get("key"), str) and isinstance(e.get("text"), str):
            out[e["key"]] = e
    return out


class OpenAIChat:
    """POST ``{base_url}/chat/completions``; see the module doc for retries, cache, concurrency and stats."""

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY", concurrency: int = 4,
                 timeout_s: float = 30.0, retries: int = 3, backoff_s: float = 0.5, cache_path: str | None = None,
                 price_input_per_1k: float = 0.0, price_output_per_1k: float = 0.0):
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        if retries < 0 or timeout_s <= 0 or backoff_s < 0:
            raise ValueError("retries and backoff_s must be >= 0 and timeout_s > 0")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.name = f"{self.base_url}|{model}"
        self.api_key_env = api_key_env
        self.concurrency, self.timeout_s, self.retries, self.backoff_s = concurrency, timeout_s, retries, backoff_s
        self.price_input_per_1k, self.price_output_per_1k = price_input_per_1k, price_output_per_1k
        self.stats = ChatStats()
        self.cache_path = Path(cache_path) if cache_path else None
        self._cache: dict[str, dict] = load_cache(self.cache_path) if self.cache_path else {}
        self._slots = threading.BoundedSemaphore(concurrency)
        self._lock = threading.Lock()
        self._rng = random.Random()

    def complete(self, requests: Sequence[ChatRequest]) -> list[ChatReply]:
        keys = [r.key(self.name) for r in requests]
        todo: dict[str, ChatRequest] = {}
        with self._lock:
            self.stats.requests += len(requests)
            for k, r in zip(keys, requests):
                if k not in self._cache and k not in todo:
                    todo[k] = r
            self.stats.cache_hits += len(keys) - len(todo)
            self.stats.calls += len(todo)
        fresh: dict[str, ChatReply] = {}
        if todo:
            with concurrent.futures.ThreadPoolExecutor(min(self.concurrency, len(todo))) as pool:
                fresh = dict(zip(todo, pool.map(self._call, todo.values())))
        out = []
        for k in keys:
            if k in fresh:
                out.append(fresh[k])
            else:
                e = self._cache[k]
                out.append(ChatReply(e["text"], None, _as_count(e.get("prompt_tokens")),
                                     _as_count(e.get("completion_tokens")), cached=True))
        return out

    def _call(self, request: ChatRequest) -> ChatReply:
        """One request with retries; records stats and caches a success."""
        error = "no attempt made"
        for attempt in range(self.retries + 1):
            if attempt:
                with self._lock:
                    self.stats.retries += 1
                time.sleep(backoff_delay(attempt - 1, self.backoff_s, self._rng))
            try:
                with self._slots:
                    body = self._post(request)
                text, pt, ct = parse_completion(body)
            except urllib.error.HTTPError as e:
                error = f"HTTP {e.code} {e.reason}"
                if not is_retryable_status(e.code):
                    break
                continue
            except BadCompletion as e:
                error = str(e)
                continue
            except (TimeoutError, socket.timeout) as e:
                error = f"timed out after {self.timeout_s}s ({e})"
                continue
            except urllib.error.URLError as e:
                reason = e.reason
                kind = "timed out" if isinstance(reason, (TimeoutError, socket.timeout)) else "connection error"
                error = f"{kind}: {reason}"
                continue
            except (OSError, http.client.HTTPException) as e:
                error = f"connection error: {type(e).__name__}: {e}"
                continue
            except Exception as e:  # noqa: BLE001 - complete() never raises for one failed call
                error = f"{type(e).__name__}: {e}"
                break
            self._record_success(request, text, pt, ct)
            return ChatReply(text, None, pt, ct)
        with self._lock:
            self.stats.failures += 1
        return ChatReply(None, f"{self.name}: {error} (after {attempt + 1} attempt(s))")

    def _post(self, request: ChatRequest) -> bytes:
        payload = {"model": self.model, "messages": [dict(m) for m in request.messages],
                   "max_tokens": request.max_tokens, "temperature": request.temperature}
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        req = urllib.request.Request(f"{self.base_url}/chat/completions", data=json.dumps(payload).encode(),
                                     headers=headers, method="POST")
        with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
            return resp.read()

    def _record_success(self, request: ChatRequest, text: str, pt: int, ct: int) -> None:
        entry = {"key": request.key(self.name), "text": text, "prompt_tokens": pt, "completion_tokens": ct}
        with self._lock:
            self.stats.prompt_tokens += pt
            self.stats.completion_tokens += ct
            self.stats.cost += pt / 1000 * self.price_input_per_1k + ct / 1000 * self.price_output_per_1k
            self._cache[entry["key"]] = entry
            if self.cache_path:
                self._append(entry)

    def _append(self, entry: dict) -> None:
        """Append one JSONL line; first end a line left unfinished by a killed writer, so it stays one bad line."""
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.cache_path, "a+b") as f:
            f.seek(0, os.SEEK_END)
            if f.tell():
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")
            f.write((json.dumps(entry) + "\n").encode())
            f.flush()
