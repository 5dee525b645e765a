"""`rlmt serve` through the official `openai` client on loopback (tiny-random, a server in this process): chat and
text completions against the rollout engine's greedy tokens (text, usage, finish_reason), streams that concatenate
to the non-streamed reply with the same seed, n choices, stop strings, the SSE wire format ending in [DONE],
unsupported fields as BadRequestError naming them, and a streaming client that leaves cancelling its job."""

from __future__ import annotations

import json
import threading
import time
import urllib.request

import openai  # the `dev` extra
import pytest

from rlmt.data import PromptFormat, encode_prompt
from rlmt.models import load_model
from rlmt.rollout import SamplingParams, generate
from rlmt.serve import Scheduler, ServeLimits, make_server

MODEL = "tiny-random"
HELLO = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def tiny():
    return load_model(MODEL)


def start(lm, **kw):
    srv = make_server(lm, "127.0.0.1", 0, MODEL, **kw)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def stop(srv) -> None:
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def server(tiny):
    srv = start(tiny, max_batch=8, limits=ServeLimits(poll_s=0.05))
    yield srv
    stop(srv)


def client_of(srv):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{srv.server_address[1]}/v1", api_key="unused", max_retries=0,
                         timeout=60)


@pytest.fixture(scope="module")
def client(server):
    return client_of(server)


def decode(lm, ids: list[int]) -> str:
    return lm.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def engine_greedy(lm, ids: list[int], n: int) -> list[int]:
    b = generate(lm.model, lm.tokenizer, [ids], SamplingParams(temperature=0.0, max_new_tokens=n))
    return b.response_ids[0, :int(b.response_lengths[0])].tolist()


def chat(client, **kw):
    return client.chat.completions.create(model=MODEL, **{"messages": HELLO, **kw})


def streamed_chat(client, **kw) -> tuple[list[str], list[str | None], list]:
    """-> (text per choice, finish_reason per choice, all chunks)."""
    chunks = list(chat(client, stream=True, **kw))
    n = kw.get("n", 1)
    texts, reasons = [""] * n, [None] * n
    for c in chunks:
        for ch in c.choices:
            texts[ch.index] += ch.delta.content or ""
            reasons[ch.index] = ch.finish_reason or reasons[ch.index]
    return texts, reasons, chunks


def test_chat_completion_is_the_engines_greedy_reply(tiny, client):
    ids = encode_prompt(tiny.tokenizer, PromptFormat(chat=True), HELLO)
    want = engine_greedy(tiny, ids, 12)
    r = chat(client, max_tokens=12, temperature=0)
    assert r.model == MODEL and r.object == "chat.completion" and len(r.choices) == 1
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == decode(tiny, want)
    assert r.choices[0].finish_reason == ("stop" if len(want) < 12 else "length")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), len(want),
                                                                                        len(ids) + len(want))
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_stream_concatenates_to_the_reply_with_the_same_seed(client):
    full = chat(client, max_tokens=40, temperature=1.0, seed=123)
    again = chat(client, max_tokens=40, temperature=1.0, seed=123)
    other = chat(client, max_tokens=40, temperature=1.0, seed=124)
    text = full.choices[0].message.content
    assert again.choices[0].message.content == text != other.choices[0].message.content
    texts, reasons, chunks = streamed_chat(client, max_tokens=40, temperature=1.0, seed=123,
                                           stream_options={"include_usage": True})
    assert texts == [text] and reasons == [full.choices[0].finish_reason]
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].object == "chat.completion.chunk"
    assert len({c.id for c in chunks}) == 1 and chunks[-1].choices == [] and chunks[-1].usage == full.usage
    assert sum(bool(c.choices and c.choices[0].delta.content) for c in chunks) > 1  # it came in pieces


def test_n_choices(tiny, client):
    ids = encode_prompt(tiny.tokenizer, PromptFormat(chat=True), HELLO)
    want = engine_greedy(tiny, ids, 10)
    r = chat(client, n=2, max_tokens=10, temperature=0)
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.message.content for c in r.choices] == [decode(tiny, want)] * 2
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), 2 * len(want))  # the prompt once
    hot = chat(client, n=3, max_tokens=30, temperature=1.0, seed=5)
    texts = [c.message.content for c in hot.choices]
    assert len(set(texts)) == 3
    assert texts[0] == chat(client, max_tokens=30, temperature=1.0, seed=5).choices[0].message.content
    streamed, reasons, _ = streamed_chat(client, n=3, max_tokens=30, temperature=1.0, seed=5)
    assert streamed == texts and reasons == [c.finish_reason for c in hot.choices]


def first_clean_window(text: str, start: int, width: int = 2) -> str:
    for i in range(start, len(text) - width):
        window = text[i:i + width]
        if "\ufffd" not in window and window.isprintable():
            return window
    raise AssertionError(f"no printable window in {text!r}")


def test_stop_truncates_and_counts_the_tokens_up_to_it(client):
    """The seeded reply without a stop is the reference: with ``stop`` the text ends before the stop's first
    occurrence, and completion_tokens is the fewest max_tokens whose seeded reply contains it (the same draws)."""
    seeded = {"temperature": 1.0, "seed": 9}
    full = chat(client, max_tokens=60, **seeded).choices[0].message.content
    stop_at = first_clean_window(full, 10)
    r = chat(client, max_tokens=60, stop=stop_at, **seeded)
    assert r.choices[0].message.content == full[:full.index(stop_at)] and r.choices[0].finish_reason == "stop"
    lo, hi = 1, 60  # the fewest tokens whose text holds the stop
    while lo < hi:
        mid = (lo + hi) // 2
        if stop_at in chat(client, max_tokens=mid, **seeded).choices[0].message.content:
            hi = mid
        else:
            lo = mid + 1
    assert r.usage.completion_tokens == lo
    later = first_clean_window(full, full.index(stop_at) + 3)
    listed = chat(client, max_tokens=60, stop=[later, stop_at], **seeded)
    assert listed.choices[0].message.content == r.choices[0].message.content  # the earliest, not the first listed
    texts, reasons, chunks = streamed_chat(client, max_tokens=60, stop=stop_at, **seeded)
    assert texts == [r.choices[0].message.content] and reasons == ["stop"]


def test_text_completions(tiny, client):
    prompts = ["Once upon a time", "b"]
    ids = [encode_prompt(tiny.tokenizer, PromptFormat(chat=False), p) for p in prompts]
    want = [decode(tiny, engine_greedy(tiny, i, 8)) for i in ids]
    r = client.completions.create(model=MODEL, prompt=prompts[0], max_tokens=8, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text == want[0]
    assert r.usage.prompt_tokens == len(ids[0])
    both = client.completions.create(model=MODEL, prompt=prompts, n=2, max_tokens=8, temperature=0)
    assert [c.index for c in both.choices] == [0, 1, 2, 3]
    assert [c.text for c in both.choices] == [want[0], want[0], want[1], want[1]]
    assert both.usage.prompt_tokens == len(ids[0]) + len(ids[1])
    seeded = {"prompt": prompts[0], "max_tokens": 30, "temperature": 1.0, "seed": 3}
    full = client.completions.create(model=MODEL, **seeded).choices[0].text
    pieces = [c.choices[0].text for c in client.completions.create(model=MODEL, stream=True, **seeded) if c.choices]
    assert "".join(pieces) == full and len(pieces) > 1


def test_sse_wire_format_ends_with_done(server):
    body = json.dumps({"model": MODEL, "messages": HELLO, "max_tokens": 5, "stream": True}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{server.server_address[1]}/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=60) as resp:
        assert resp.headers["Content-Type"] == "text/event-stream"
        raw = resp.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: {") for e in events[:-2])
    last = json.loads(events[-3][len("data: "):])
    assert last["choices"][0]["finish_reason"] in ("stop", "length") and last["choices"][0]["delta"] == {}


@pytest.mark.parametrize("kw,field", [
    ({"logprobs": True}, "logprobs"),
    ({"logit_bias": {"42": 5}}, "logit_bias"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ({"frequency_penalty": 0.5}, "frequency_penalty"),
    ({"extra_body": {"top_k": 5}}, "top_k"),
])
def test_unsupported_field_is_a_bad_request_naming_it(server, client, kw, field):
    admitted = server.scheduler.stats.admitted
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, max_tokens=3, **kw)
    assert f"'{field}'" in e.value.message and e.value.body["param"] == field
    assert server.scheduler.stats.admitted == admitted  # refused before anything was queued


def test_streaming_client_that_leaves_cancels_its_job(tiny):
    """EOS ignored, so the stream would run 4000 steps; the client reads three chunks and closes it: its job is
    cancelled within a few polls (at 200 steps/s that is far fewer than 4000 steps)."""
    scheduler = Scheduler(tiny.model, tiny.tokenizer, max_batch=2, eos_ids=())
    srv = start(tiny, limits=ServeLimits(poll_s=0.02, context_tokens=8192), scheduler=scheduler)
    try:
        stream = chat(client_of(srv), max_tokens=4000, stream=True)
        chunks = [next(iter(stream)) for _ in range(3)]
        assert scheduler.load()["running"] == 1 and chunks[0].choices[0].delta.role == "assistant"
        stream.close()
        deadline = time.monotonic() + 60
        while scheduler.load()["running"]:
            assert time.monotonic() < deadline, "the job was not cancelled"
            time.sleep(0.01)
        assert scheduler.stats.finished == 1 and scheduler.stats.steps < 4000
    finally:
        stop(srv)
