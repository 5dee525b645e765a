"""OpenAIChat against real processes: `rlmt serve` on tiny-random (round trip, usage, cache), scripted stdlib
servers (bounded concurrency, 500 then success, garbage, slow, 4xx) and a closed port (server down)."""

from __future__ import annotations

import json
import random
import re
import sys
import time
import urllib.request

import pytest

from chat_servers import closed_port, server_stats, start_process, start_scripted, stop_process
from rlmt.chat import ChatRequest, build_chat_backend
from rlmt.chat.http import BadCompletion, OpenAIChat, backoff_delay, is_retryable_status, load_cache, parse_completion


def req(text: str, max_tokens: int = 6) -> ChatRequest:
    return ChatRequest(({"role": "user", "content": text},), max_tokens, 0.0)


@pytest.fixture(scope="module")
def rlmt_server():
    proc, url = start_process([sys.executable, "-m", "rlmt.cli", "serve", "--model", "tiny-random", "--port", "0"],
                              ready_timeout=90)
    yield url
    stop_process(proc)


@pytest.fixture
def scripted(request):
    procs = []

    def start(mode: str, delay: float = 0.0) -> str:
        proc, url = start_scripted(mode, delay)
        procs.append(proc)
        return url

    yield start
    for p in procs:
        stop_process(p)


def health(url: str) -> dict:
    with urllib.request.urlopen(url.rsplit("/v1", 1)[0] + "/health", timeout=5) as r:
        return json.loads(r.read())


# ---------------------------------------------------------------------------------------------- pure parts


def test_parse_completion_reads_content_and_usage():
    body = json.dumps({"choices": [{"message": {"content": "hi"}}], "usage": {"prompt_tokens": 3, "completion_tokens": 2}})
    assert parse_completion(body.encode()) == ("hi", 3, 2)
    assert parse_completion(b'{"choices": [{"message": {"content": "x"}}]}') == ("x", 0, 0)  # usage optional
    for bad in [b"not json", b"{}", b'{"choices": []}', b'{"choices": [{"message": {"content": null}}]}', b"[1]"]:
        with pytest.raises(BadCompletion):
            parse_completion(bad)


def test_retry_policy_and_backoff():
    assert is_retryable_status(429) and is_retryable_status(500) and is_retryable_status(503)
    assert not any(is_retryable_status(c) for c in (400, 401, 403, 404, 422))
    rng = random.Random(0)
    delays = [backoff_delay(a, 0.5, rng) for a in range(4)]
    for a, d in enumerate(delays):
        assert 0.5 * 2 ** a <= d <= 0.5 * 2 ** a + 0.5


def test_cache_file_skips_torn_lines(tmp_path):
    path = tmp_path / "cache.jsonl"
    path.write_text('{"key": "a", "text": "x"}\n{"key": "b", "te')  # the second line was cut short by a kill
    assert set(load_cache(path)) == {"a"}


# ---------------------------------------------------------------------------------------------- real server


def test_round_trip_usage_and_cache(rlmt_server):
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/v1", rlmt_server)  # loopback by default
    chat = OpenAIChat(rlmt_server, "tiny-random")
    before = health(rlmt_server)["chat_requests"]
    replies = chat.complete([req("hello"), req("world"), req("hello")])
    assert all(isinstance(r.text, str) and r.error is None for r in replies)
    assert replies[0].prompt_tokens > 0 and 0 < replies[0].completion_tokens <= 6
    assert health(rlmt_server)["chat_requests"] - before == 2  # the duplicate in one call is sent once
    assert chat.stats.calls == 2 and chat.stats.prompt_tokens == replies[0].prompt_tokens + replies[1].prompt_tokens
    again = chat.complete([req("hello"), req("world")])
    assert [r.text for r in again] == [replies[0].text, replies[1].text] and all(r.cached for r in again)
    assert health(rlmt_server)["chat_requests"] - before == 2  # no request made
    assert chat.stats.cache_hits == 3 and chat.stats.requests == 5 and chat.stats.failures == 0


def test_cache_file_survives_restart(rlmt_server, tmp_path):
    path = tmp_path / "judge-cache.jsonl"
    first = OpenAIChat(rlmt_server, "tiny-random", cache_path=str(path), price_input_per_1k=1.0,
                       price_output_per_1k=2.0)
    r1 = first.complete([req("cache me")])[0]
    assert first.stats.cost == pytest.approx(r1.prompt_tokens / 1000 + 2 * r1.completion_tokens / 1000)
    with open(path, "a") as f:
        f.write('{"key": "torn", "te')  # a killed writer
    before = health(rlmt_server)["chat_requests"]
    second = build_chat_backend({"backend": "http", "base_url": rlmt_server, "model": "tiny-random",
                                 "cache_path": str(path)})
    assert second.complete([req("cache me")])[0].text == r1.text
    assert second.stats.cache_hits == 1 and health(rlmt_server)["chat_requests"] == before
    second.complete([req("new one")])  # appended after the torn line, still readable
    assert len(load_cache(path)) == 2


def test_rlmt_serve_rejects_bad_request(rlmt_server):
    data = json.dumps({"messages": [{"role": "wizard", "content": "x"}]}).encode()
    r = urllib.request.Request(rlmt_server + "/chat/completions", data=data, method="POST")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(r, timeout=10)
    assert e.value.code == 400 and json.loads(e.value.read())["error"]["param"] == "messages"


# ---------------------------------------------------------------------------------------------- scripted servers


def test_bounded_concurrency(scripted):
    url = scripted("ok", delay=0.15)
    chat = OpenAIChat(url, "m", concurrency=3)
    t0 = time.monotonic()
    replies = chat.complete([req(f"q{i}") for i in range(12)])
    assert [r.text for r in replies] == [f"echo: q{i}" for i in range(12)]
    stats = server_stats(url)
    assert stats["requests"] == 12 and stats["max_inflight"] <= 3
    assert stats["max_inflight"] >= 2 and time.monotonic() - t0 < 12 * 0.15  # it did run in parallel
    assert chat.stats.prompt_tokens == 120 and chat.stats.completion_tokens == 60


def test_server_down_fails_after_retries(monkeypatch):
    monkeypatch.setenv("SECRET_KEY_ENV", "sk-very-secret")
    chat = OpenAIChat(f"http://127.0.0.1:{closed_port()}/v1", "m", api_key_env="SECRET_KEY_ENV", retries=2,
                      backoff_s=0.01, timeout_s=2)
    t0 = time.monotonic()
    reply = chat.complete([req("x")])[0]
    assert reply.text is None and "connection" in reply.error and "3 attempt" in reply.error
    assert "sk-very-secret" not in reply.error
    assert chat.stats.retries == 2 and chat.stats.failures == 1 and time.monotonic() - t0 < 3


def test_slow_server_times_out(scripted):
    url = scripted("slow")
    chat = OpenAIChat(url, "m", timeout_s=0.4, retries=1, backoff_s=0.01)
    t0 = time.monotonic()
    reply = chat.complete([req("x")])[0]
    assert reply.text is None and "timed out" in reply.error
    assert time.monotonic() - t0 < 3 and chat.stats.retries == 1


@pytest.mark.parametrize("mode", ["garbage", "nochoices"])
def test_garbage_reply_is_missing_after_retries(scripted, mode):
    url = scripted(mode)
    chat = OpenAIChat(url, "m", retries=1, backoff_s=0.01)
    replies = chat.complete([req("x"), req("y")])
    assert all(r.text is None and r.error for r in replies)
    assert server_stats(url)["requests"] == 4 and chat.stats.failures == 2
    assert chat.complete([req("x")])[0].text is None  # a failure is not cached: asked again
    assert server_stats(url)["requests"] == 6


def test_500_then_success_is_retried(scripted):
    url = scripted("flaky")
    chat = OpenAIChat(url, "m", retries=2, backoff_s=0.01)
    reply = chat.complete([req("again")])[0]
    assert reply.text == "echo: again" and chat.stats.retries == 1 and chat.stats.failures == 0


def test_other_4xx_is_not_retried(scripted):
    url = scripted("badrequest")
    chat = OpenAIChat(url, "m", retries=3, backoff_s=0.01)
    reply = chat.complete([req("x")])[0]
    assert reply.text is None and "HTTP 400" in reply.error
    assert server_stats(url)["requests"] == 1 and chat.stats.retries == 0
