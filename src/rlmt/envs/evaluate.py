"""Evaluating a policy in an environment: K episodes per held-out row, success = return >= the pass threshold.

``eval-{tag}.json`` holds pass@1 (the mean over rows of the fraction of K episodes that pass), reward/mean (the
mean return) and the ``env/*`` figures; ``eval-{tag}.jsonl`` every episode's full transcript and return.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

from rlmt.data import PromptFormat, SourceOptions, load_rows
from rlmt.envs.base import check_env_fields, env_factory
from rlmt.envs.episodes import EpisodeBatch, run_episodes
from rlmt.envs.render import Renderer, tool_instructions
from rlmt.envs.tools import toolbox_for
from rlmt.records import progress_bar, write_atomic
from rlmt.rollout import SamplingParams, weights_shared

TOOL_STOP = "</tool_call>"


def env_parts(cfg, tokenizer, fmt: PromptFormat):
    """(make_env, renderer, extra stop strings) of the run's environment and tools."""
    toolbox = toolbox_for(cfg)
    make_env = env_factory(cfg, toolbox)
    schemas = toolbox.schemas
    try:
        renderer = Renderer(tokenizer, fmt, schemas, tool_instructions(schemas) if schemas else None)
    except ValueError as e:
        from rlmt.config import ConfigError

        raise ConfigError(f"env.source: {e}") from e
    return make_env, renderer, (TOOL_STOP,) if schemas else ()


def env_seed(seed: int, step: int, prompt: int) -> int:
    """The environment seed of a group: a function of (run seed, step, global prompt index)."""
    return (seed * 1_000_003 + step) * 1_000_033 + prompt


def summarize_episodes(eb: EpisodeBatch, K: int, pass_threshold: float) -> dict[str, float]:
    r = eb.returns.cpu()
    passed = (torch.nan_to_num(r, nan=-float("inf")) >= pass_threshold).float().reshape(-1, K)
    ok = torch.isfinite(r)
    return {"pass@1": float(passed.mean()) if len(r) else 0.0,
            f"pass@{K}": float(passed.amax(-1).mean()) if len(r) else 0.0,
            "reward/mean": float(r[ok].mean()) if ok.any() else float("nan"),
            "unscored": float((~ok).sum()), "prompts": float(len(r) // K),
            "response_length/mean": float(eb.batch.response_mask.sum(-1).float().mean()),
            **eb.metrics(), **eb.batch.stats}


@weights_shared()  # one copy of the weights for all the batches
def evaluate_env(cfg, lm, fmt: PromptFormat, rows: Sequence[dict], K: int, temperature: float,
                 max_new_tokens: int, seed: int, label: str = "eval") -> tuple[dict[str, float], EpisodeBatch]:
    """K episodes of each row, ``rollout.batch_prompts`` rows at a time (a bar ``label`` counts the rows unless
    ``run.progress`` is false); each episode keyed by (seed, row index, sample index), whatever the batching."""
    make_env, renderer, stop = env_parts(cfg, lm.tokenizer, fmt)
    params = SamplingParams(K, temperature, cfg.rollout.top_p, max_new_tokens, tuple(cfg.rollout.stop))
    parts, n = [], cfg.rollout.batch_prompts
    with progress_bar(len(rows), label, "prompt", cfg.run.progress) as bar:
        for start in range(0, len(rows), n):
            idx = range(start, min(start + n, len(rows)))
            parts.append(run_episodes(lm.model, lm.tokenizer, renderer, make_env, [rows[p] for p in idx],
                                      [env_seed(seed, -1, p) for p in idx], params,
                                      [(seed, -1, p, g) for p in idx for g in range(K)], cfg.env.max_turns,
                                      cfg.env.max_total_tokens, n, lm.autocast, stop, cfg.env.step_workers))
            bar.update(len(idx))
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else (lm.tokenizer.eos_token_id or 0)
    eb = EpisodeBatch.concat(parts, pad)
    return summarize_episodes(eb, K, cfg.reward.pass_threshold), eb


def score_episodes(eb: EpisodeBatch, rows: Sequence[dict], source, invalid_as_none: bool = False) -> dict[str, float]:
    """Replace the episodes' returns by ``source``'s scores of their final answers (a method with a reward
    source of its own: GRAPE's rubric); an episode whose environment failed stays unscored. Returns the
    source's step metrics."""
    from rlmt.rewards import score_checked

    K = len(eb.episodes) // max(1, len(rows))
    result = score_checked(source, [rows[i // K] for i in range(len(eb.episodes))], eb.batch.texts,
                           invalid_as_none=invalid_as_none)
    eb.returns = torch.tensor([float("nan") if s is None or ep.error else float(s)
                               for s, ep in zip(result.scores, eb.episodes)], device=eb.returns.device)
    return result.metrics


def evaluate_env_run(cfg, lm, fmt: PromptFormat, tag: str, run_dir: Path,
                     source_name: str | None = None) -> dict[str, float]:
    """The before/after evaluation of an environment run on ``data.eval`` (``eval.*`` settings); with
    ``source_name`` (the method's own reward source) that source scores each episode's final answer."""
    held = load_rows(cfg.data.eval, "prompt", cfg.data.on_invalid, cfg.eval.max_prompts,
                     SourceOptions.of(cfg.data, "eval"))
    loaded = check_env_fields(cfg, held.rows, held)
    source = None
    if source_name:
        from rlmt.rewards import reward_source_for

        source = reward_source_for(cfg, source_name)
        loaded = source.prepare_rows(loaded) if hasattr(source, "prepare_rows") else loaded
    rows = [r.data for r in loaded]
    metrics, eb = evaluate_env(cfg, lm, fmt, rows, cfg.eval.num_samples, cfg.eval.temperature,
                               cfg.eval.max_new_tokens, cfg.run.seed + 7919, f"eval {tag}")
    if source is not None:
        extra = score_episodes(eb, rows, source, cfg.reward.invalid_as_none)
        metrics = {**summarize_episodes(eb, cfg.eval.num_samples, cfg.reward.pass_threshold), **extra}
    write_episodes(Path(run_dir) / f"eval-{tag}.jsonl", eb, [rows[i // cfg.eval.num_samples]
                                                               for i in range(len(eb.episodes))])
    write_atomic(Path(run_dir) / f"eval-{tag}.json", json.dumps(metrics, indent=1))
    return metrics


def write_episodes(path: Path, eb: EpisodeBatch, rows: Sequence[dict]) -> None:
    """One JSON line per episode: the prompt, the final response, the return, and the whole transcript."""
    lines = []
    for row, ep, r, text in zip(rows, eb.episodes, eb.returns.tolist(), eb.batch.texts):
        lines.append(json.dumps({"prompt": row.get("prompt"), "response": text,
                                 "reward": None if r != r else r,
                                 "details": {"turns": len(ep.turn_ends), "truncated": ep.truncated,
                                             "error": ep.error, "tool_calls": ep.tool_calls,
                                             "tool_errors": ep.tool_errors, "transcript": ep.transcript}},
                                default=str))
    write_atomic(path, "".join(line + "\n" for line in lines))
