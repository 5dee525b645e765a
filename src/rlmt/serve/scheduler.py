"""Continuous batching: one thread decodes every running request one token a step; requests join and leave between steps.

The loop, once per decode step:

1. **Admit** (between steps): waiting jobs, oldest first, fill the free rows of the batch (at most ``max_batch``),
   and their prompts are prefilled together (at most ``prefill_tokens`` padded prompt tokens at once, at least one
   job) and joined to the batch (:func:`rlmt.serve.batch.relayout`). Rows that finished leave in the same relayout.
2. **Preempt** when every row is busy and jobs wait: a row that has decoded ``quantum`` steps since it was
   admitted is evicted and its job goes to the back of the queue; when admitted again, its prompt plus the
   tokens it already has are prefilled (recompute, as vLLM's preemption), and it continues. So a request that
   reaches the head of the queue waits at most ``quantum`` decode steps (plus prefills) for a row, however many
   long requests run; with free rows it waits for none.
3. **Step**: one forward over all rows; each row's token is sampled with its own job's temperature, top-p and
   random draw, appended to its job, and the job's ``news`` event is set. A job ends at an EOS (``stop``), at
   ``max_tokens`` (``length``), or when its client has gone or a stop string was found
   (:meth:`Job.cancel`: ``cancelled``); ended rows leave at the next relayout.

So a small request runs beside a long one from the next step on, one token a step each: the huge request delays
it by at most one prefill and shares the steps, it never holds the batch. Per-step delivery is the natural unit:
a streaming handler sends what step 3 appends. The step is one thread: the model is not re-entrant, and one
batched forward is the fast path. The queue is bounded (``max_waiting``; :class:`Overloaded` beyond).
Tokenizing and detokenizing happen in the callers' threads, never here.

Random draws: a token is sampled by inverse CDF from one uniform (:func:`rlmt.rollout.sample_tokens`), and each
row's uniform comes from its own job's generator when the request gave a ``seed`` (choice ``i`` of a request
seeded by ``(seed, i)``, :func:`choice_seed`), else from the scheduler's. So a seeded request draws the same
uniforms whichever requests share its steps, and across a preemption (the generator travels with the job); its
tokens are the same unless the batch's other rows move a logit (padding and matmul shapes change float
rounding, ~1e-6) across one of its draws, which a draw meets with about that probability.
"""

from __future__ import annotations

import collections
import hashlib
import sys
import threading
from dataclasses import dataclass, field

import torch

from rlmt.rollout import sample_tokens
from rlmt.serve.batch import RunningBatch, prefill, relayout


class Overloaded(RuntimeError):
    """The scheduler's queue is full (the server answers 503)."""


@dataclass(eq=False)
class Job:
    """One choice of a request in the scheduler: its prompt, budget and sampling in, its tokens and how it ended
    out.

    The ``*_step`` fields count decode steps of the scheduler (its clock): when the job was submitted, first
    admitted, and ended."""

    prompt: list[int]
    max_tokens: int
    temperature: float
    top_p: float = 1.0
    generator: torch.Generator | None = field(default=None, repr=False)  # its own draws (seeded); None: the scheduler's
    news: threading.Event = field(default_factory=threading.Event, repr=False)  # set at each token and at the end
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # stop | length | cancelled | error
    error: str | None = None
    submitted_step: int = 0
    admitted_step: int | None = None
    finished_step: int | None = None
    preemptions: int = 0
    running_since: int = 0  # step of the latest admission (preemption's clock)
    cancelled: bool = False
    _ended: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def done(self) -> bool:
        return self._ended.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job ended (or ``timeout`` s passed) -> whether it ended."""
        return self._ended.wait(timeout)

    def cancel(self) -> None:
        """Ask the scheduler to stop this job (its client left); it ends ``cancelled`` at the next step."""
        self.cancelled = True


def choice_seed(seed: int, index: int) -> int:
    """The seed of choice ``index`` of a request seeded ``seed``: distinct choices draw independently, and
    ``(seed, 1)`` is not ``(seed + 1, 0)``."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def eos_token_ids(model: torch.nn.Module, tokenizer) -> frozenset[int]:
    """The tokenizer's EOS and the model's generation-config EOS ids (as the rollout engine stops on)."""
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    return frozenset(int(i) for i in ids if i is not None)


@dataclass
class SchedulerStats:
    """Counters since start: decode steps, prefills, relayouts, admissions, preemptions, jobs ended."""

    steps: int = 0
    prefills: int = 0
    relayouts: int = 0
    admitted: int = 0
    preempted: int = 0
    finished: int = 0


class Scheduler:
    """Continuous batching over ``model`` (see the module doc). ``eos_ids`` None: the model's own."""

    def __init__(self, model: torch.nn.Module, tokenizer, max_batch: int = 16, max_waiting: int = 512,
                 quantum: int = 256, prefill_tokens: int = 8192, seed: int = 0,
                 eos_ids: frozenset[int] | tuple[int, ...] | None = None):
        if max_batch < 1 or max_waiting < 1 or quantum < 1 or prefill_tokens < 1:
            raise ValueError("max_batch, max_waiting, quantum and prefill_tokens must be >= 1")
        self.model = model.eval()
        self.max_batch, self.max_waiting, self.quantum, self.prefill_tokens = (max_batch, max_waiting, quantum,
                                                                               prefill_tokens)
        self.eos = frozenset(eos_token_ids(model, tokenizer) if eos_ids is None else eos_ids)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = int(pad if pad is not None else 0)
        self.generator = torch.Generator().manual_seed(seed)  # CPU: uniforms are drawn per row, then moved
        self.stats = SchedulerStats()
        self._cond = threading.Condition()
        self._waiting: collections.deque[Job] = collections.deque()
        self._batch: RunningBatch | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="rlmt-serve-scheduler", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------------------------- callers' side

    def submit(self, prompt: list[int], max_tokens: int, temperature: float, top_p: float = 1.0,
               seed: int | None = None) -> Job:
        """Queue a job (prompt token ids, already within the context) -> the :class:`Job` to wait on."""
        return self.submit_all([(prompt, max_tokens)], temperature, top_p, seed)[0]

    def submit_all(self, choices: list[tuple[list[int], int]], temperature: float, top_p: float = 1.0,
                   seed: int | None = None) -> list[Job]:
        """Queue one request's choices, each ``(prompt ids, max_tokens)``, all or none -> their jobs, which share
        one ``news`` event. With a ``seed``, choice ``i`` draws from a generator seeded by :func:`choice_seed`."""
        if not choices or any(not prompt or max_tokens < 1 for prompt, max_tokens in choices):
            raise ValueError("a job needs a non-empty prompt and max_tokens >= 1")
        news = threading.Event()
        with self._cond:
            if self._closed:
                raise Overloaded("the server is shutting down")
            if len(self._waiting) + len(choices) > self.max_waiting:
                raise Overloaded(f"{len(self._waiting)} jobs are waiting; {len(choices)} more would pass the limit "
                                 f"of {self.max_waiting}")
            jobs = [Job(list(prompt), int(max_tokens), float(temperature), float(top_p),
                        None if seed is None else torch.Generator().manual_seed(choice_seed(seed, i)), news,
                        submitted_step=self.stats.steps)
                    for i, (prompt, max_tokens) in enumerate(choices)]
            self._waiting.extend(jobs)
            self._cond.notify()
        return jobs

    def load(self) -> dict:
        """Rows decoding (live ones), jobs waiting, and the counters."""
        with self._cond:
            batch = self._batch
            running = sum(not j.done for j in batch.rows) if batch is not None else 0
            return {"running": running, "waiting": len(self._waiting), **vars(self.stats)}

    def close(self) -> None:
        """Stop the loop; waiting and running jobs end with an error."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=30)

    # ------------------------------------------------------------------------------------------- the loop

    def _end(self, job: Job, reason: str, error: str | None = None) -> None:
        if job.done:
            return
        job.finish_reason, job.error, job.finished_step = reason, error, self.stats.steps
        self.stats.finished += 1
        job._ended.set()
        job.news.set()

    def _plan(self) -> tuple[list[Job], list[Job]] | None:
        """Under the lock, between steps: (jobs to admit, rows to evict); blocks while idle; None once closed."""
        with self._cond:
            while not self._closed and not self._waiting and self._batch is None:
                self._cond.wait()
            if self._closed:
                return None
            for job in [j for j in self._waiting if j.cancelled or j.done]:
                self._waiting.remove(job)
                self._end(job, "cancelled")
            live = [j for j in self._batch.rows if not j.done] if self._batch is not None else []
            free = self.max_batch - len(live)
            evictable = sorted((j for j in live if self.stats.steps - j.running_since >= self.quantum),
                               key=lambda j: j.running_since)
            admit: list[Job] = []
            while self._waiting and len(admit) < free + len(evictable):
                n = len(self._waiting[0].prompt) + len(self._waiting[0].tokens)
                longest = max([n] + [len(j.prompt) + len(j.tokens) for j in admit])
                if admit and (len(admit) + 1) * longest > self.prefill_tokens:
                    break
                admit.append(self._waiting.popleft())
            evict = evictable[:max(0, len(admit) - free)]
            for job in evict:
                job.preemptions += 1
                self.stats.preempted += 1
            self._waiting.extend(evict)
            return admit, evict

    def _uniforms(self, jobs: list[Job]) -> torch.Tensor:
        """(B,) float64 draws on the CPU: a seeded job's from its own generator, the others' from the scheduler's;
        none drawn for a greedy row."""
        u = torch.zeros(len(jobs), dtype=torch.float64)
        shared = [i for i, j in enumerate(jobs) if j.temperature > 0 and j.generator is None]
        if shared:
            u[shared] = torch.rand(len(shared), dtype=torch.float64, generator=self.generator)
        for i, job in enumerate(jobs):
            if job.temperature > 0 and job.generator is not None:
                u[i] = torch.rand(1, dtype=torch.float64, generator=job.generator)[0]
        return u

    def _sample(self, logits: torch.Tensor, jobs: list[Job]) -> torch.Tensor:
        """(B, V) logits -> (B,) tokens, each row with its job's temperature, top-p and draw."""
        tokens = torch.empty(len(jobs), dtype=torch.long, device=logits.device)
        uniforms = self._uniforms(jobs).to(logits.device)
        groups: dict[tuple[float, float], list[int]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault((job.temperature, job.top_p), []).append(i)
        for (temperature, top_p), idx in groups.items():
            tokens[idx], _ = sample_tokens(logits[idx], temperature, top_p, None, uniforms[idx])
        return tokens

    def _deliver(self, jobs: list[Job], tokens: torch.Tensor) -> None:
        for job, tok in zip(jobs, tokens.tolist()):
            if job.done:
                continue
            job.tokens.append(tok)
            job.news.set()
            if tok in self.eos:
                self._end(job, "stop")
            elif len(job.tokens) >= job.max_tokens:
                self._end(job, "length")
            elif job.cancelled:
                self._end(job, "cancelled")

    def _rearrange(self, admit: list[Job], evict: list[Job]) -> None:
        """Prefill the admitted jobs and relayout the batch: admitted rows join; ended and evicted rows leave."""
        batch = self._batch
        parts = []
        if batch is not None:
            keep = [i for i, j in enumerate(batch.rows) if not j.done and j not in evict]
            if not admit and not evict and 4 * (len(batch.rows) - len(keep)) < len(batch.rows) and keep:
                return  # few rows ended: computing them a while costs less than a copy of the cache
            parts.append((batch, keep))
        if admit:
            new, logits = prefill(self.model, [j.prompt + j.tokens for j in admit], self.pad_id, admit)
            self.stats.prefills += 1
            for job in admit:
                job.running_since = self.stats.steps
                if job.admitted_step is None:
                    job.admitted_step = self.stats.steps
                    self.stats.admitted += 1
            new.last = self._sample(logits, admit)
            self._deliver(admit, new.last)
            parts.append((new, [i for i, j in enumerate(admit) if not j.done]))
        merged = relayout(parts)
        self.stats.relayouts += 1
        with self._cond:
            self._batch = merged

    def _step(self) -> None:
        batch = self._batch
        for job in batch.rows:
            if job.cancelled:
                self._end(job, "cancelled")
        if all(j.done for j in batch.rows):
            with self._cond:
                self._batch = None
            return
        logits = batch.step()
        with self._cond:
            self.stats.steps += 1
        batch.last = self._sample(logits, batch.rows)  # each row feeds its new token at the next step
        self._deliver(batch.rows, batch.last)

    def _fail(self, jobs: list[Job], error: Exception) -> None:
        for job in jobs:
            self._end(job, "error", f"generation failed: {type(error).__name__}: {error}")

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                plan = self._plan()
                if plan is None:
                    break
                admit, evict = plan
                try:
                    self._rearrange(admit, evict)
                    if self._batch is not None:
                        self._step()
                except Exception as e:  # noqa: BLE001 - every job in flight gets the error, the loop goes on
                    print(f"rlmt serve: generation failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
                    self._fail(admit + (self._batch.rows if self._batch is not None else []), e)
                    with self._cond:
                        self._batch = None
        with self._cond:
            jobs = list(self._waiting) + (self._batch.rows if self._batch is not None else [])
            self._waiting.clear()
            self._batch = None
        self._fail(jobs, RuntimeError("the server shut down"))
