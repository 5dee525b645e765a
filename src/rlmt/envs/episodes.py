"""Multi-turn rollouts: G episodes per row, played turn by turn in batches, as one :class:`RolloutBatch`.

Each ``batch_prompts`` rows' G episodes share a decoder whose cache lives across turns
(:class:`rlmt.rollout.turns.TurnDecoder`): a row's opening is prefilled once and copied to its G episodes,
and each later turn computes only the episode's new tokens (the environment's reply) on top of its own
cache before sampling. Episodes that end drop out between turns.
Episodes that end drop out. Every sampled token is drawn with the key (seed, step, global prompt index, sample
index, turn) (:func:`rlmt.rollout.keyed_uniforms`), so an episode does not depend on the batch it shared, the
rank it ran on or the number of ranks.

The batch an update sees, per episode (row i of N = prompts x G):

    input_ids      [opening (left-padded) | turn 1 | env reply 1 | turn 2 | ... ]  (right-padded)
    attention_mask 1 on every real token: the model attends to the environment's tokens
    response_mask  1 on sampled tokens only: the loss, the KL and the advantages see the policy's turns
    logprobs       the sampler's log-probs on sampled tokens (pi_old), 0 elsewhere

so the packed training pass (:func:`rlmt.rollout.logprobs.grouped_response_logprobs`) scores exactly the sampled
tokens in the context they were sampled in.
"""

from __future__ import annotations

import contextlib
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from rlmt.envs.base import Environment, Step
from rlmt.envs.render import Renderer
from rlmt.rollout import RolloutBatch, SamplingParams, concat_batches, weights_shared
from rlmt.rollout.engine import left_pad
from rlmt.rollout.turns import TurnDecoder


@dataclass
class Episode:
    """One episode's tokens after its opening and what happened in it."""

    env: Environment | None
    opening: list[int]
    ids: list[int] = field(default_factory=list)
    sampled: list[bool] = field(default_factory=list)  # True where the policy sampled the token
    logps: list[float] = field(default_factory=list)
    turn_ends: list[int] = field(default_factory=list)  # index in ids of each turn's last sampled token
    turn_rewards: list[float] = field(default_factory=list)
    transcript: list[dict] = field(default_factory=list)  # the messages, for the records
    truncation_reward: float | None = 0.0
    done: bool = False
    truncated: bool = False
    error: str | None = None
    tool_calls: int = 0
    tool_errors: int = 0
    figures: dict[str, float] = field(default_factory=dict)  # Step.info["metrics"], the latest of each

    @property
    def running(self) -> bool:
        return not (self.done or self.truncated or self.error)

    @property
    def episode_return(self) -> float:
        """The sum of the turn rewards (+ the truncation reward); NaN when unscored."""
        if self.error is not None or (self.truncated and self.truncation_reward is None):
            return float("nan")
        return float(sum(self.turn_rewards)) + (float(self.truncation_reward) if self.truncated else 0.0)


@dataclass
class EpisodeBatch:
    """The episodes of a rollout and the batch the update trains on (see the module docstring)."""

    batch: RolloutBatch
    episodes: list[Episode]
    returns: torch.Tensor  # (N,) episode returns, NaN where unscored
    turn_rewards: torch.Tensor  # (N, T) each turn's reward on its last sampled token (the truncation reward
    # on the last one)

    def dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(final (N,), dense (N, T)): the last turn's reward with the truncation reward, and every earlier
        turn's reward on its last token, so ``final + dense.sum(-1) == returns`` (for PPO and REINFORCE)."""
        dense = self.turn_rewards.clone()
        final = torch.full_like(self.returns, float("nan"))
        for i, ep in enumerate(self.episodes):
            if ep.turn_ends and torch.isfinite(self.returns[i]):
                last = ep.turn_ends[-1]
                final[i] = dense[i, last]
                dense[i, last] = 0.0
            elif torch.isfinite(self.returns[i]):
                final[i] = self.returns[i]
        return final, dense

    @staticmethod
    def concat(parts: list["EpisodeBatch"], pad_id: int) -> "EpisodeBatch":
        """Several batches of whole groups as one (:func:`rlmt.rollout.concat_batches`)."""
        if len(parts) == 1:
            return parts[0]
        batch = concat_batches([p.batch for p in parts], pad_id)
        T = batch.response_ids.shape[1]
        rewards = torch.cat([torch.nn.functional.pad(p.turn_rewards, (0, T - p.turn_rewards.shape[1])) for p in parts])
        return EpisodeBatch(batch, [e for p in parts for e in p.episodes], torch.cat([p.returns for p in parts]),
                            rewards)

    def metrics(self) -> dict[str, float]:
        eps, r = self.episodes, self.returns
        ok = torch.isfinite(r)
        return {"env/turns_mean": sum(len(e.turn_ends) for e in eps) / max(1, len(eps)),
                "env/tool_calls": float(sum(e.tool_calls for e in eps)),
                "env/tool_errors": float(sum(e.tool_errors for e in eps)),
                "env/truncated": float(sum(e.truncated for e in eps)),
                "env/errors": float(sum(e.error is not None for e in eps)),
                "env/return_mean": float(r[ok].mean()) if ok.any() else float("nan"),
                **{f"env/{k}": sum(v) / len(v) for k, v in _figures(eps).items()}}


def _figures(eps: list[Episode]) -> dict[str, list[float]]:
    """An environment's own figures (``Step.info["metrics"]``), each over the episodes that report it."""
    out: dict[str, list[float]] = {}
    for e in eps:
        for k, v in e.figures.items():
            out.setdefault(k, []).append(v)
    return out


@weights_shared()  # one copy of the weights for all the batches' decoders
def run_episodes(policy, tokenizer, renderer: Renderer, make_env: Callable[[], Environment], rows: Sequence[dict],
                 env_seeds: Sequence[int], params: SamplingParams, keys: Sequence[tuple[int, ...]], max_turns: int,
                 max_total_tokens: int, batch_prompts: int, autocast: torch.dtype | None = None,
                 stop: Sequence[str] = (), workers: int = 1) -> EpisodeBatch:
    """Play ``params.num_samples`` (G) episodes of each row; ``keys`` (:func:`rlmt.rollout.sample_keys`, one per
    episode, prompt-major) key each episode's draws, with the turn appended; ``env_seeds`` (one per row) seed
    ``reset``; ``stop`` strings end a turn besides ``rollout.stop`` (the tool-call closer).

    Each turn every running episode samples, then every one steps (``workers`` ``step`` calls at once, on
    threads, for an environment class that declares ``thread_safe``: a tool call waits on its own process,
    so one slow call does not hold the others up; each episode's environment is its own object, so results
    do not depend on ``workers``), then environments that couple episodes (a class with a
    ``settle(envs, steps)`` classmethod, e.g. a debate's two sides) settle the turn's steps together, then
    the replies are appended."""
    G = params.num_samples
    if len(keys) != len(rows) * G or len(env_seeds) != len(rows):
        raise ValueError(f"{len(keys)} keys and {len(env_seeds)} seeds for {len(rows)} rows x {G} episodes")
    turn_params = SamplingParams(1, params.temperature, params.top_p, params.max_new_tokens,
                                 tuple(params.stop) + tuple(s for s in stop if s not in params.stop))
    t0, sampled_tokens = time.perf_counter(), 0
    flat = [ep for row, seed in zip(rows, env_seeds) for ep in _open(make_env, renderer, row, seed, G)]
    for ep in flat:
        if ep.error is None and len(ep.ids) >= max_total_tokens:  # an opening of its own past the budget
            ep.error = f"the episode's own opening is {len(ep.ids)} tokens, env.max_total_tokens allows fewer"
    chunks = [list(range(c, min(c + batch_prompts, len(rows)))) for c in range(0, len(rows), batch_prompts)]
    decoders = [TurnDecoder(policy, tokenizer, turn_params, autocast) for _ in chunks]
    given = [0] * len(flat)  # how many of an episode's tokens its decoder has been handed
    safe = all(getattr(type(ep.env), "thread_safe", False) for ep in flat if ep.env is not None)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rlmt-env") if workers > 1 and safe else None
    with decoders[0].session() if decoders else contextlib.nullcontext(), _shut_down_after(pool):
        for chunk, dec in zip(chunks, decoders):  # each group's opening prefilled once, its cache copied G times
            dec.open([flat[p * G].opening for p in chunk], G)
        for turn in range(max_turns):
            live = [i for i, ep in enumerate(flat) if ep.running]
            if not live:
                break
            turns: dict[int, tuple[list[int], list[float], str]] = {}
            for chunk, dec in zip(chunks, decoders):  # each running episode's cache continues with its new tokens
                first, mine = chunk[0] * G, [i for i in live if chunk[0] <= i // G <= chunk[-1]]
                if mine:
                    out = dec.turn([i - first for i in mine], [flat[i].ids[given[i]:] for i in mine],
                                   [keys[i] + (turn,) for i in mine])
                    turns.update(zip(mine, out))
            played = []  # (index, the turn's text) of the episodes whose environment steps on it now
            for i in live:
                toks, logps, text = turns[i]
                sampled_tokens += max(0, min(len(toks), max_total_tokens - len(flat[i].ids)))
                if _append(flat[i], toks, logps, text, renderer, max_total_tokens):
                    played.append((i, text))
                given[i] = len(flat[i].ids)
            results = (pool.map(lambda it: _step(flat[it[0]], it[1]), played) if pool and len(played) > 1
                       else (_step(flat[i], text) for i, text in played))
            steps = {i: step for (i, _), step in zip(played, results) if step is not None}
            _settle(flat, steps)
            for i, step in steps.items():
                _reply(flat[i], step, turns[i][0], renderer, turn + 1 >= max_turns, max_total_tokens)
    for ep in flat:  # still running after max_turns
        if ep.running:
            _truncate(ep)
    seconds = time.perf_counter() - t0
    return _as_batch(flat, G, tokenizer, next(policy.parameters()).device,
                     {"rollout/seconds": seconds, "rollout/tokens": float(sampled_tokens),
                      "rollout/tokens_per_s": sampled_tokens / max(seconds, 1e-9)})


def _open(make_env, renderer: Renderer, row: dict, seed: int, G: int) -> list[Episode]:
    """The G episodes of a row, reset. Their common token prefix is the group's prompt (computed once in the
    packed pass); what differs (a debater's side) starts each episode as context. An environment class with a
    ``bind_group(envs)`` classmethod sees the group's environments before they reset (to pair them up). An
    environment that raises leaves its episode unscored."""
    envs = [make_env() for _ in range(G)]
    if hasattr(type(envs[0]), "bind_group"):
        type(envs[0]).bind_group(envs)
    opened: list[tuple[Environment | None, list[int], list[dict], str | None]] = []
    for env in envs:
        try:
            messages = env.reset(row, seed)
            opened.append((env, renderer.opening(messages), renderer.with_system(messages), None))
        except Exception as e:  # noqa: BLE001 - counted, the episode unscored
            prompt = row.get("prompt", "")
            fallback = renderer.opening(prompt if isinstance(prompt, list) else [{"role": "user",
                                                                                   "content": str(prompt)}])
            opened.append((None, fallback, [], f"reset raised {type(e).__name__}: {e}"))
    prefix = opened[0][1]
    for _, ids, _, _ in opened[1:]:
        n = next((k for k, (a, b) in enumerate(zip(prefix, ids)) if a != b), min(len(prefix), len(ids)))
        prefix = prefix[:n]
    if not prefix:
        raise ValueError("the openings of a group share no first token; a group needs a common prompt")
    out = []
    for env, ids, transcript, error in opened:
        rest = ids[len(prefix):]
        out.append(Episode(env, prefix, list(rest), [False] * len(rest), [0.0] * len(rest), transcript=transcript,
                           error=error))
    return out


@contextlib.contextmanager
def _shut_down_after(pool: ThreadPoolExecutor | None):
    """The pool, shut down at the end; on an interrupt or error the steps not yet started are cancelled."""
    try:
        yield
    except BaseException:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        raise
    if pool is not None:
        pool.shutdown(wait=True)


def _append(ep: Episode, toks: list[int], logps: list[float], text: str, renderer: Renderer,
            max_total_tokens: int) -> bool:
    """Append a sampled turn, cut to the episode's token budget; whether its environment steps on it (False:
    the budget ran out inside the turn, and the episode is truncated)."""
    n = max(0, min(len(toks), max_total_tokens - len(ep.ids)))
    ep.ids += toks[:n]
    ep.sampled += [True] * n
    ep.logps += logps[:n]
    if n:
        ep.turn_ends.append(len(ep.ids) - 1)
    if n < len(toks):
        text = renderer.tok.decode(toks[:n], skip_special_tokens=True)
    ep.transcript.append({"role": "assistant", "content": text})
    if n < len(toks):
        ep.turn_rewards.append(0.0)
        _truncate(ep)
        return False
    return True


def _step(ep: Episode, text: str) -> Step | None:
    """The environment's step on the turn's text; None when it raised (the episode unscored). Touches this
    episode only, so steps of different episodes may run on different threads."""
    try:
        return checked_step(ep.env.step(text))
    except Exception as e:  # noqa: BLE001 - counted, the episode unscored
        ep.error = f"step raised {type(e).__name__}: {e}"
        return None


def checked_step(step) -> Step:
    """An environment's step as a :class:`Step` with checked fields (a ``(messages, reward, done, info)`` tuple
    is accepted); a TypeError or ValueError naming the field otherwise."""
    if isinstance(step, tuple) and len(step) == 4:
        step = Step(*step)
    if not isinstance(step, Step):
        raise TypeError(f"step() returned {type(step).__name__}, not a Step")
    if not isinstance(step.messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in step.messages):
        raise TypeError("Step.messages must be a list of {role: str, content: str}")
    reward = None if step.reward is None else float(step.reward)
    info = step.info if isinstance(step.info, dict) else {}
    return Step(step.messages, reward, bool(step.done), info)


def _settle(flat: list[Episode], steps: dict[int, Step]) -> None:
    """Let environment classes with a ``settle(envs, steps) -> steps`` classmethod complete this turn's steps
    together (every episode of theirs has stepped); a class that raises leaves those episodes unscored."""
    by_class: dict[type, list[int]] = {}
    for i in steps:
        if hasattr(type(flat[i].env), "settle"):
            by_class.setdefault(type(flat[i].env), []).append(i)
    for cls, idx in by_class.items():
        try:
            settled = cls.settle([flat[i].env for i in idx], [steps[i] for i in idx])
            if len(settled) != len(idx):
                raise ValueError(f"settle returned {len(settled)} steps for {len(idx)}")
        except Exception as e:  # noqa: BLE001 - counted, the episodes unscored
            for i in idx:
                flat[i].error = f"settle raised {type(e).__name__}: {e}"
                del steps[i]
            continue
        steps.update(zip(idx, settled))


def _reply(ep: Episode, step: Step, toks: list[int], renderer: Renderer, last_turn: bool,
           max_total_tokens: int) -> None:
    """Record the step's reward and counts; append the environment's reply, or end the episode. Anything the
    environment returned that cannot be used (a count that is not a number, a message the chat template
    refuses) leaves the episode unscored."""
    try:
        counts = (int(step.info.get("tool_calls", 0)), int(step.info.get("tool_errors", 0)),
                  {str(k): float(v) for k, v in (step.info.get("metrics") or {}).items()})
        reply = [] if step.done or last_turn else renderer.continuation(step.messages, toks[-1] if toks else None)
    except Exception as e:  # noqa: BLE001 - counted, the episode unscored
        ep.error = f"the environment's step could not be used: {type(e).__name__}: {e}"
        return
    ep.turn_rewards.append(0.0 if step.reward is None else step.reward)
    ep.tool_calls += counts[0]
    ep.tool_errors += counts[1]
    ep.figures.update(counts[2])
    ep.transcript += list(step.messages)
    if step.done:
        ep.done = True
        return
    if last_turn:
        _truncate(ep)
        return
    if len(ep.ids) + len(reply) >= max_total_tokens:  # no room left for another turn
        _truncate(ep)
        return
    ep.ids += reply
    ep.sampled += [False] * len(reply)
    ep.logps += [0.0] * len(reply)


def _truncate(ep: Episode) -> None:
    ep.truncated = True
    try:
        ep.truncation_reward = ep.env.truncated()
    except Exception as e:  # noqa: BLE001 - counted, the episode unscored
        ep.error = f"truncated raised {type(e).__name__}: {e}"


def _as_batch(flat: list[Episode], G: int, tokenizer, device: torch.device, stats: dict[str, float]) -> EpisodeBatch:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    N = len(flat)
    prompt_ids, prompt_mask = left_pad([ep.opening for ep in flat], pad)
    T = max(1, max(len(ep.ids) for ep in flat))
    ids = torch.full((N, T), pad, dtype=torch.long)
    real = torch.zeros((N, T), dtype=torch.long)
    sampled = torch.zeros((N, T), dtype=torch.bool)
    logps = torch.zeros((N, T), dtype=torch.float32)
    turn_rewards = torch.zeros((N, T), dtype=torch.float32)
    for i, ep in enumerate(flat):
        n = len(ep.ids)
        if n:
            ids[i, :n] = torch.tensor(ep.ids)
            real[i, :n] = 1
            sampled[i, :n] = torch.tensor(ep.sampled)
            logps[i, :n] = torch.tensor(ep.logps)
        for end, r in zip(ep.turn_ends, ep.turn_rewards):
            turn_rewards[i, end] += r
        if ep.truncated and ep.truncation_reward is not None and ep.turn_ends:
            turn_rewards[i, ep.turn_ends[-1]] += float(ep.truncation_reward)
    returns = torch.tensor([ep.episode_return for ep in flat], dtype=torch.float32)
    texts = [next((m["content"] for m in reversed(ep.transcript) if m.get("role") == "assistant"), "")
             for ep in flat]
    batch = RolloutBatch(input_ids=torch.cat([prompt_ids, ids], 1).to(device),
                         attention_mask=torch.cat([prompt_mask, real], 1).to(device), prompt_len=prompt_ids.shape[1],
                         response_ids=ids.to(device), response_mask=sampled.to(device), logprobs=logps.to(device),
                         prompt_index=torch.arange(N // G).repeat_interleave(G).to(device), texts=texts,
                         finished=torch.tensor([ep.done for ep in flat]).to(device), stats=stats)
    dense = torch.where(sampled, turn_rewards, torch.zeros_like(turn_rewards))
    return EpisodeBatch(batch, flat, returns.to(device), dense.to(device))
