"""`rlmt serve`: request parsing and limits, unsupported fields refused by name, the OpenAI response shape,
400/404 errors, and concurrent requests sharing decode steps, on a server in this process over tiny-random;
LocalChat itself (order, cache, failures). The OpenAI client against the server: tests/test_serve_openai.py."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from rlmt.chat import ChatRequest
from rlmt.chat.local import LocalChat
from rlmt.serve import (
    BadRequest,
    CompletionRequest,
    chars_per_token_bound,
    check_prompt_chars,
    completion_body,
    fit_max_tokens,
    make_server,
    parse_chat_request,
    parse_request,
)


def msgs(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def tiny():
    from rlmt.models import load_model

    return load_model("tiny-random")


@pytest.fixture(scope="module")
def server(tiny):
    srv = make_server(tiny, "127.0.0.1", 0, "tiny-random", max_batch=8)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1", srv
    srv.shutdown()
    srv.server_close()


def post(url: str, body) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = urllib.request.Request(url + "/chat/completions", data=data, method="POST",
                               headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(r, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


# ---------------------------------------------------------------------------------------------- pure parts


def test_parse_chat_request_accepts_openai_bodies():
    r = parse_chat_request(json.dumps({"model": "x", "messages": msgs("hi"), "max_tokens": 5, "temperature": 0}).encode())
    assert r == CompletionRequest(({"role": "user", "content": "hi"},), 5, 0.0)
    assert parse_chat_request(json.dumps({"messages": msgs("hi")}).encode()).max_tokens is None
    assert parse_chat_request(json.dumps({"messages": msgs("hi"), "max_completion_tokens": 7}).encode()).max_tokens == 7
    full = {"model": "any name", "messages": msgs("hi"), "temperature": 0.5, "top_p": 0.9, "n": 3, "stop": "\n\n",
            "seed": -5, "stream": True, "stream_options": {"include_usage": True}, "user": "u1",
            "logprobs": False, "presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {}, "tools": None}
    assert parse_chat_request(json.dumps(full).encode()) == CompletionRequest(
        ({"role": "user", "content": "hi"},), None, 0.5, 0.9, 3, ("\n\n",), -5, True, True)
    assert parse_chat_request(json.dumps({"messages": msgs("hi"), "stop": ["a", "b", "a"]}).encode()).stop == ("a", "b")


def test_parse_text_completion_request():
    r = parse_request(json.dumps({"prompt": "Once upon", "max_tokens": 3, "n": 2}).encode(), chat=False)
    assert r.prompts == ("Once upon",) and not r.chat and r.n == 2 and r.prompt_param == "prompt"
    assert parse_request(json.dumps({"prompt": ["a", "b"]}).encode(), chat=False).prompts == ("a", "b")
    for bad in ({"prompt": [1, 2]}, {"prompt": []}, {"messages": msgs("x")}, {"prompt": ["a"] * 5, "n": 4}):
        with pytest.raises(BadRequest) as e:
            parse_request(json.dumps(bad).encode(), chat=False)
        assert e.value.param in ("prompt", "messages", "n")
    with pytest.raises(BadRequest) as e:  # logprobs: 0 asks a text completion for the sampled tokens' log-probs
        parse_request(json.dumps({"prompt": "a", "logprobs": 0}).encode(), chat=False)
    assert e.value.param == "logprobs"


@pytest.mark.parametrize("body,param", [
    (b"{not json", None),
    (b"[]", None),
    (b"[" * 100_000 + b"]" * 100_000, None),  # deeper than Python's parser recurses: RecursionError, not a 400, before
    (b'{"messages": [{"role": "user", "content": "x"}], "extra": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", None),
    (json.dumps({"messages": []}).encode(), "messages"),
    (json.dumps({"messages": [{"role": "user"}]}).encode(), "messages"),
    (json.dumps({"messages": [{"role": "tool", "content": "x"}]}).encode(), "messages"),
    (json.dumps({"messages": msgs("x"), "max_tokens": 0}).encode(), "max_tokens"),
    (json.dumps({"messages": msgs("x"), "max_tokens": 4097}).encode(), "max_tokens"),
    (json.dumps({"messages": msgs("x"), "max_tokens": "9"}).encode(), "max_tokens"),
    (json.dumps({"messages": msgs("x"), "temperature": 5}).encode(), "temperature"),
    (json.dumps({"messages": msgs("x"), "stream": "yes"}).encode(), "stream"),
    (json.dumps({"messages": msgs("x"), "n": 17}).encode(), "n"),
    (json.dumps({"messages": msgs("x"), "n": 0}).encode(), "n"),
    (json.dumps({"messages": msgs("x"), "top_p": 1.5}).encode(), "top_p"),
    (json.dumps({"messages": msgs("x"), "seed": 1.5}).encode(), "seed"),
    (json.dumps({"messages": msgs("x"), "stop": ""}).encode(), "stop"),
    (json.dumps({"messages": msgs("x"), "stop": ["a", "b", "c", "d", "e"]}).encode(), "stop"),
    (json.dumps({"messages": msgs("x"), "stop": [1]}).encode(), "stop"),
    (json.dumps({"messages": msgs("x"), "stream_options": {"include_usage": True}}).encode(), "stream_options"),
    (json.dumps({"messages": msgs("x"), "stream": True, "stream_options": {"obfuscate": True}}).encode(),
     "stream_options.obfuscate"),
])
def test_parse_chat_request_rejects(body, param):
    with pytest.raises(BadRequest) as e:
        parse_chat_request(body)
    assert e.value.param == param


@pytest.mark.parametrize("field,value,says", [
    ("logprobs", True, "only False"),
    ("top_logprobs", 3, "only 0"),
    ("logit_bias", {"42": 5}, "only {}"),
    ("tools", [{"type": "function", "function": {"name": "f"}}], "only []"),
    ("tool_choice", "auto", "only 'none'"),
    ("presence_penalty", 0.5, "only 0"),
    ("response_format", {"type": "json_object"}, "only {'type': 'text'}"),
    ("temprature", 0.5, "did you mean 'temperature'"),
    ("prompt", "x", "not supported"),
])
def test_unsupported_fields_are_refused_by_name(field, value, says):
    """A field the server does not implement is a 400 naming it, never dropped (a no-op value is accepted)."""
    with pytest.raises(BadRequest) as e:
        parse_chat_request(json.dumps({"messages": msgs("x"), field: value}).encode())
    assert e.value.param == field and f"'{field}'" in str(e.value) and says in str(e.value)


def test_unsupported_message_fields_are_refused_by_name():
    with pytest.raises(BadRequest) as e:
        parse_chat_request(json.dumps({"messages": [msgs("a")[0], {"role": "user", "content": "x", "name": "bob"}]
                                       }).encode())
    assert e.value.param == "messages" and "messages[1].name" in str(e.value)


def test_prompt_limits_characters_then_tokens(tiny):
    """Characters bound tokens from above (no token covers more than the longest vocabulary entry), so a prompt
    with more characters than the context can hold is refused before it is tokenized; the token check then
    refuses prompt + max_tokens beyond the context and clips an absent max_tokens to the room left."""
    per_token = chars_per_token_bound(tiny.tokenizer)
    assert per_token == len("<|endoftext|>")  # the tiny tokenizer: bytes, and this longest special token
    req = parse_chat_request(json.dumps({"messages": msgs("x" * (1024 * per_token + 1))}).encode())
    with pytest.raises(BadRequest) as e:
        check_prompt_chars(req, 1024, per_token)
    assert e.value.code == "context_length_exceeded" and e.value.param == "messages"
    check_prompt_chars(parse_chat_request(json.dumps({"messages": msgs("x" * 1024 * per_token)}).encode()), 1024,
                       per_token)
    given = CompletionRequest(tuple(msgs("x")), 100, 1.0)
    assert fit_max_tokens(given, 924, 1024) == 100
    with pytest.raises(BadRequest) as e:
        fit_max_tokens(given, 925, 1024)
    assert e.value.code == "context_length_exceeded"
    absent = CompletionRequest(tuple(msgs("x")), None, 1.0)
    assert fit_max_tokens(absent, 10, 1024, default_max_tokens=256) == 256
    assert fit_max_tokens(absent, 1000, 1024, default_max_tokens=256) == 24
    with pytest.raises(BadRequest):
        fit_max_tokens(absent, 1024, 1024)


def test_completion_body_shape():
    body = completion_body([("hi", "length"), ("yo", "stop")], 4, 2, model="m")
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "hi"}
    assert [c["finish_reason"] for c in body["choices"]] == ["length", "stop"]
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}
    text = completion_body([("hi", "stop")], 4, 2, model="m", chat=False)
    assert text["object"] == "text_completion" and text["id"].startswith("cmpl-")
    assert text["choices"] == [{"index": 0, "text": "hi", "logprobs": None, "finish_reason": "stop"}]


# ---------------------------------------------------------------------------------------------- the server


def test_chat_completion_round_trip(server):
    url, _ = server
    code, body = post(url, {"model": "tiny-random", "messages": msgs("hello"), "max_tokens": 4, "temperature": 0})
    assert code == 200 and isinstance(body["choices"][0]["message"]["content"], str)
    assert body["choices"][0]["finish_reason"] in ("stop", "length")
    assert 0 < body["usage"]["completion_tokens"] <= 4 and body["usage"]["prompt_tokens"] > 0
    again = post(url, {"messages": msgs("hello"), "max_tokens": 4, "temperature": 0})[1]
    assert again["choices"][0]["message"]["content"] == body["choices"][0]["message"]["content"]  # greedy


def test_models_health_and_404(server):
    url, _ = server
    with urllib.request.urlopen(url + "/models", timeout=10) as r:
        assert json.loads(r.read())["data"][0]["id"] == "tiny-random"
    with urllib.request.urlopen(url.rsplit("/v1", 1)[0] + "/health", timeout=10) as r:
        health = json.loads(r.read())
    assert health["status"] == "ok" and {"chat_requests", "running", "waiting", "steps"} <= set(health)
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(url + "/nothing", timeout=10)
    assert e.value.code == 404 and "error" in json.loads(e.value.read())


def test_bad_request_is_400_with_openai_error(server):
    url, srv = server
    code, body = post(url, {"messages": msgs("x"), "temperature": -1})
    assert code == 400
    assert body["error"]["type"] == "invalid_request_error" and body["error"]["param"] == "temperature"
    assert post(url, b"garbage")[0] == 400
    admitted = srv.scheduler.stats.admitted
    code, body = post(url, {"messages": msgs("x"), "logprobs": True})
    assert code == 400 and body["error"]["param"] == "logprobs" and srv.scheduler.stats.admitted == admitted


def test_concurrent_requests_share_decode_steps(server):
    """8 clients at once, 20 tokens each: one after another they would take 8 x 19 decode steps (the first
    token comes from the prefill); batched, the steps are shared."""
    url, srv = server
    before = srv.scheduler.stats.steps
    barrier = threading.Barrier(8)

    def one(i):
        barrier.wait()
        return post(url, {"messages": msgs(f"q{i}"), "max_tokens": 20, "temperature": 1.0})

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(8)))
    assert all(code == 200 for code, _ in results)
    assert sum(body["usage"]["completion_tokens"] for _, body in results) > 8  # not all ended at the first token
    assert srv.scheduler.stats.steps - before < 8 * 19 / 2


def test_serve_device_defaults_to_auto_like_train(monkeypatch):
    """`rlmt serve` without --device loads on cuda when there is one, else cpu (as model.device: auto)."""
    import torch

    import rlmt.models
    from rlmt.cli import build_parser

    args = build_parser().parse_args(["serve", "--model", "tiny-random"])
    assert args.device == "auto"
    seen = {}

    class Loaded(Exception):
        pass

    def load_model(name, device="cpu", **kw):
        seen["device"] = device
        raise Loaded

    monkeypatch.setattr(rlmt.models, "load_model", load_model)
    with pytest.raises(Loaded):
        args.func(args)
    assert seen["device"] == ("cuda" if torch.cuda.is_available() else "cpu")


# ---------------------------------------------------------------------------------------------- LocalChat


def test_local_chat_order_cache_and_stats(tiny):
    chat = LocalChat.from_loaded(tiny, max_batch=2)
    reqs = [ChatRequest(tuple(msgs(t)), n, 0.0) for t, n in [("a", 3), ("bb", 5), ("a", 3), ("ccc", 3), ("d", 4)]]
    replies = chat.complete(reqs)
    assert len(replies) == 5 and replies[0].text == replies[2].text
    assert [r.completion_tokens <= q.max_tokens for r, q in zip(replies, reqs)] == [True] * 5
    singles = [chat.complete([q])[0] for q in reqs]  # cached now, and the batch gave the same greedy texts
    assert [r.text for r in singles] == [r.text for r in replies] and all(r.cached for r in singles)
    assert chat.stats.requests == 10 and chat.stats.calls == 4 and chat.stats.cache_hits == 6


def test_local_chat_failed_batch_is_failed_replies(tiny, monkeypatch):
    chat = LocalChat.from_loaded(tiny)
    monkeypatch.setattr(chat, "prompt_ids", lambda r: (_ for _ in ()).throw(RuntimeError("boom")))
    reply = chat.complete([ChatRequest(tuple(msgs("x")), 3, 0.0)])[0]
    assert reply.text is None and "boom" in reply.error and chat.stats.failures == 1
