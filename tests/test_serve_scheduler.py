"""`rlmt serve`'s scheduler on tiny-random, measured in decode steps (its clock), not seconds, so the bounds hold on
a loaded machine: continuous batching gives the same greedy tokens as the rollout engine; a small request beside a
long one ends within its own length in steps; preemption bounds the wait when every row is busy; cancellation,
the bounded queue, and a cache that follows the longest live row."""

from __future__ import annotations

import time

import pytest
import torch

from rlmt.data import PromptFormat, encode_prompt
from rlmt.rollout import SamplingParams, generate, sample_tokens
from rlmt.serve import Overloaded, Scheduler
from rlmt.serve.scheduler import choice_seed
from rlmt.serve.batch import prefill, relayout

WAIT_S = 120  # generous: only a hung scheduler takes this long


@pytest.fixture(scope="module")
def tiny():
    from rlmt.models import load_model

    return load_model("tiny-random")


def prompt(lm, text: str) -> list[int]:
    return encode_prompt(lm.tokenizer, PromptFormat(chat=True), [{"role": "user", "content": text}])


def wait_until(condition, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


@pytest.fixture
def make(tiny):
    made = []

    def factory(**kw) -> Scheduler:
        made.append(Scheduler(tiny.model, tiny.tokenizer, **kw))
        return made[-1]

    yield factory
    for s in made:
        s.close()


def solo_greedy(lm, ids: list[int], n: int) -> list[int]:
    b = generate(lm.model, lm.tokenizer, [ids], SamplingParams(temperature=0.0, max_new_tokens=n))
    return b.response_ids[0, :int(b.response_lengths[0])].tolist()


def test_continuous_batching_gives_the_engines_greedy_tokens(tiny, make):
    """Jobs join a running batch at different steps (other prompt lengths, so rows sit at other offsets of the
    cache), and with max_batch=2 and quantum=4 some are preempted and recomputed; each still gets exactly the
    tokens the rollout engine gives it alone."""
    texts = ["hi", "a much longer prompt than the others", "x" * 60, "abc", "the fifth"]
    ids = [prompt(tiny, t) for t in texts]
    want = [solo_greedy(tiny, p, 30) for p in ids]
    s = make(max_batch=2, quantum=4)
    jobs = []
    for p in ids:
        jobs.append(s.submit(p, 30, 0.0))
        wait_until(lambda: s.stats.steps >= 3 * len(jobs) or all(j.done for j in jobs))
    assert all(j.wait(WAIT_S) for j in jobs)
    assert [j.tokens for j in jobs] == want
    assert [j.finish_reason for j in jobs] == ["stop" if w[-1] in s.eos else "length" for w in want]
    assert s.stats.preempted > 0 and s.stats.relayouts > 1


def test_small_request_beside_a_long_one_ends_within_its_own_steps(tiny, make):
    """Before (one batch held until its longest row ended) the small request waited for all 4000 tokens."""
    s = make(max_batch=4, eos_ids=())
    big = s.submit(prompt(tiny, "long"), 4000, 1.0)
    wait_until(lambda: s.stats.steps >= 5)
    small = s.submit(prompt(tiny, "short"), 4, 1.0)
    assert small.wait(WAIT_S) and small.finish_reason == "length" and len(small.tokens) == 4
    assert not big.done
    # admitted at the next step boundary, first token from its prefill, then one a step
    assert small.finished_step - small.submitted_step <= 4 + 1
    big.cancel()
    assert big.wait(WAIT_S) and big.finish_reason == "cancelled" and len(big.tokens) < 4000
    wait_until(lambda: s.load()["running"] == 0)


def test_preemption_bounds_the_wait_when_every_row_is_busy(tiny, make):
    """One row, taken by a 300-token job: a new job waits at most `quantum` steps for it, then the long job is
    recomputed from its prompt and tokens and still ends with exactly the greedy tokens it would have had.
    Before (no preemption) the new job waited for all 300."""
    ids = prompt(tiny, "long")
    s = make(max_batch=1, quantum=8, eos_ids=())
    alone = s.submit(ids, 300, 0.0)
    assert alone.wait(WAIT_S) and alone.preemptions == 0
    big = s.submit(ids, 300, 0.0)
    wait_until(lambda: big.admitted_step is not None)
    small = s.submit(prompt(tiny, "short"), 3, 0.0)
    assert small.wait(WAIT_S)
    assert small.finished_step - small.submitted_step <= 8 + 3
    assert not big.done
    assert big.wait(WAIT_S) and big.preemptions == 1 and big.finish_reason == "length"
    assert big.tokens == alone.tokens


def test_cancelled_jobs_leave_and_a_full_queue_is_refused(tiny, make):
    s = make(max_batch=1, max_waiting=2, quantum=10_000, eos_ids=())
    running = s.submit(prompt(tiny, "a"), 4000, 1.0)
    wait_until(lambda: running.admitted_step is not None)
    queued = [s.submit(prompt(tiny, "b"), 5, 1.0), s.submit(prompt(tiny, "c"), 5, 1.0)]
    with pytest.raises(Overloaded):
        s.submit(prompt(tiny, "d"), 5, 1.0)
    queued[0].cancel()
    running.cancel()
    assert running.wait(WAIT_S) and running.finish_reason == "cancelled"
    assert queued[1].wait(WAIT_S) and queued[1].finish_reason == "length"
    assert queued[0].done and queued[0].finish_reason == "cancelled" and queued[0].tokens == []


def test_temperatures_per_row_and_failures_end_jobs(tiny, make, monkeypatch):
    s = make(max_batch=4)
    greedy = s.submit(prompt(tiny, "same"), 12, 0.0)
    hot = s.submit(prompt(tiny, "same"), 12, 2.0)
    assert greedy.wait(WAIT_S) and hot.wait(WAIT_S)
    assert greedy.tokens == solo_greedy(tiny, prompt(tiny, "same"), 12)
    monkeypatch.setattr(s, "_sample", lambda logits, jobs: (_ for _ in ()).throw(RuntimeError("boom")))
    failed = s.submit(prompt(tiny, "x"), 5, 1.0)
    assert failed.wait(WAIT_S) and failed.finish_reason == "error" and "boom" in failed.error


def test_top_p_and_seed_stay_per_row_within_a_batch(tiny, make):
    """Rows of one batch sample with their own settings: top_p=0 at temperature 1 keeps only the likeliest token
    (the greedy tokens) beside hot rows; a seeded job draws the same tokens alone and beside other jobs, and
    after a preemption; choice 0 of a seeded request of 3 is the seeded request of 1, its other choices differ.
    The seeded tokens are those a full forward over the prompt and the tokens so far samples with the job's
    draws (before, every decode step fed the first sampled token again, which greedy tiny-random, repeating
    one token, did not show)."""
    ids = prompt(tiny, "same")
    alone = make(max_batch=1, eos_ids=())
    ref = alone.submit(ids, 24, 1.0, seed=7)
    other_seed = alone.submit(ids, 24, 1.0, seed=8)
    assert ref.wait(WAIT_S) and other_seed.wait(WAIT_S) and ref.tokens != other_seed.tokens
    draws, seq = torch.Generator().manual_seed(choice_seed(7, 0)), list(ids)
    with torch.inference_mode():
        for _ in range(24):
            logits = tiny.model(torch.tensor([seq])).logits[:, -1]
            u = torch.rand(1, dtype=torch.float64, generator=draws)
            seq.append(int(sample_tokens(logits, 1.0, 1.0, None, u)[0]))
    assert ref.tokens == seq[len(ids):]
    s = make(max_batch=3, quantum=5, eos_ids=())
    hot = [s.submit(prompt(tiny, f"noise {i}"), 24, 1.5) for i in range(2)]
    nucleus = s.submit(ids, 24, 1.0, top_p=0.0)
    choices = s.submit_all([(ids, 24)] * 3, 1.0, seed=7)  # 5 jobs, 3 rows: rows are preempted and recomputed
    for job in hot + [nucleus] + choices:
        assert job.wait(WAIT_S) and job.finish_reason == "length"
    assert s.stats.preempted > 0
    assert nucleus.tokens == solo_greedy(tiny, ids, 24)
    assert choices[0].tokens == ref.tokens
    assert choices[1].tokens != choices[0].tokens != choices[2].tokens != choices[1].tokens
    assert all(j.news.is_set() for j in choices) and len({id(j.news) for j in choices}) == 1


def test_relayout_trims_to_the_longest_live_row(tiny):
    """Rows right-aligned, masked slots zero; when the long-prompt row leaves, the cache shrinks to the
    short rows' span instead of keeping the long prompt's slots."""
    with torch.inference_mode():
        a, _ = prefill(tiny.model, [prompt(tiny, "x" * 200)], 0, ["long"])
        b, _ = prefill(tiny.model, [prompt(tiny, "hi"), prompt(tiny, "hey")], 0, ["hi", "hey"])
        merged = relayout([(a, [0]), (b, [0, 1])])
        assert merged.rows == ["long", "hi", "hey"] and merged.length == a.length
        assert merged.key_mask[:, :merged.length].sum(-1).tolist() == [a.length] + b.key_mask.sum(-1).tolist()
        assert merged.key_mask[:, merged.length - 1].all()  # right-aligned: every row's newest key in the last slot
        pad = merged.key_mask[1:, :merged.length] == 0
        assert bool((merged.layers[0].kbuf[1:, :, :merged.length][pad[:, None, :, None].expand(
            -1, merged.layers[0].kbuf.shape[1], -1, merged.layers[0].kbuf.shape[3])] == 0).all())
        merged.last = torch.zeros(3, dtype=torch.long)
        merged.step()
        short = relayout([(merged, [1, 2])])
        assert short.length == b.length + 1 and short.rows == ["hi", "hey"]
