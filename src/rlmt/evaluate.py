"""Evaluation: scoring a model on prompts with a reward source (mean reward and pass@1 from K samples per
prompt), and the before/after evaluation of an online run (``eval-before.json``, ``eval-after.json``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from rlmt.data import PromptFormat, Row, SourceOptions, encode_prompt, load_rows
from rlmt.records import progress_bar, write_atomic
from rlmt.rewards import RewardSource, reward_source_for, score_checked
from rlmt.rollout import RolloutBatch, SamplingParams, generate, weights_shared


@dataclass
class ScoredSamples:
    """Responses of a set of prompts with their rewards; ``rows[i]`` is the row of ``texts[i]``."""

    rows: list[dict]
    prompt_ids: list[list[int]]
    texts: list[str]
    response_ids: list[list[int]]
    finished: list[bool]
    scores: list[float | None]
    details: list[dict]
    stats: dict[str, float]


@weights_shared()  # the decoder's copy of the weights made once for all the batches
def sample_and_score(model, tokenizer, fmt: PromptFormat, rows: Sequence[Row], source: RewardSource,
                     params: SamplingParams, generator: torch.Generator, batch_prompts: int,
                     invalid_as_none: bool = False, progress=None, autocast=None) -> ScoredSamples:
    """Sample ``params.num_samples`` responses per row (batched ``batch_prompts`` prompts at a time), score them;
    ``autocast``: the model's forward dtype (``LoadedModel.autocast``)."""
    out = ScoredSamples([], [], [], [], [], [], [], {"rollout/seconds": 0.0, "rollout/tokens": 0.0})
    for start in range(0, len(rows), batch_prompts):
        chunk = rows[start:start + batch_prompts]
        ids = [encode_prompt(tokenizer, fmt, r.data["prompt"]) for r in chunk]
        batch: RolloutBatch = generate(model, tokenizer, ids, params, generator, autocast)
        rep_rows = [chunk[int(i)].data for i in batch.prompt_index]
        result = score_checked(source, rep_rows, batch.texts, invalid_as_none=invalid_as_none)
        lengths = batch.response_lengths.tolist()
        out.rows += rep_rows
        out.prompt_ids += [ids[int(i)] for i in batch.prompt_index]
        out.texts += batch.texts
        out.response_ids += [batch.response_ids[i, :n].tolist() for i, n in enumerate(lengths)]
        out.finished += batch.finished.tolist()
        out.scores += result.scores
        out.details += result.details
        out.stats["rollout/seconds"] += batch.stats["rollout/seconds"]
        out.stats["rollout/tokens"] += batch.stats["rollout/tokens"]
        if progress is not None:
            progress(len(chunk))
    out.stats["rollout/tokens_per_s"] = out.stats["rollout/tokens"] / max(out.stats["rollout/seconds"], 1e-9)
    return out


def summarize(samples: ScoredSamples, num_samples: int, pass_threshold: float) -> dict[str, float]:
    """reward/mean over scored responses; pass@1 = mean over prompts of the fraction of K samples passing
    (the unbiased pass@1 estimate); pass@K = fraction of prompts with at least one passing sample."""
    scored = [s for s in samples.scores if s is not None]
    n_prompts = len(samples.scores) // num_samples
    per_prompt = [samples.scores[i * num_samples:(i + 1) * num_samples] for i in range(n_prompts)]
    passes = [[s is not None and s >= pass_threshold for s in group] for group in per_prompt]
    lengths = [len(r) for r in samples.response_ids]
    return {
        "reward/mean": sum(scored) / len(scored) if scored else float("nan"),
        "pass@1": sum(sum(p) / len(p) for p in passes) / max(1, n_prompts),
        f"pass@{num_samples}": sum(any(p) for p in passes) / max(1, n_prompts),
        "unscored": float(len(samples.scores) - len(scored)),
        "response_length/mean": sum(lengths) / max(1, len(lengths)),
        "prompts": float(n_prompts),
        **samples.stats,
    }


def evaluate(model, tokenizer, fmt: PromptFormat, rows: Sequence[Row], source: RewardSource, num_samples: int,
             temperature: float, max_new_tokens: int, seed: int, batch_prompts: int = 8,
             pass_threshold: float = 1.0, top_p: float = 1.0, stop: Sequence[str] = (),
             invalid_as_none: bool = False, autocast=None, progress: bool = False,
             label: str = "eval") -> tuple[dict[str, float], ScoredSamples]:
    """Sample K responses per prompt at ``temperature`` and return (metrics, samples); ``progress``: a bar
    named ``label`` counting the prompts done (:func:`rlmt.records.progress_bar`)."""
    params = SamplingParams(num_samples=num_samples, temperature=temperature, top_p=top_p,
                            max_new_tokens=max_new_tokens, stop=tuple(stop))
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    with progress_bar(len(rows), label, "prompt", progress) as bar:
        samples = sample_and_score(model, tokenizer, fmt, rows, source, params, gen, batch_prompts, invalid_as_none,
                                   progress=bar.update, autocast=autocast)
    return summarize(samples, num_samples, pass_threshold), samples


def evaluate_run(cfg, lm, fmt: PromptFormat, tag: str, run_dir: Path, source_name: str | None = None) -> dict[str, float]:
    """Evaluate ``lm`` on ``data.eval`` as configured (``eval.*``), with a fresh instance of the run's reward
    source (``source_name``: the method's own, else ``reward.source``); writes ``eval-{tag}.json`` and the
    scored samples ``eval-{tag}.jsonl`` into ``run_dir``. Adds ``reward/{category}/mean`` where the source
    reports categories. A bar ``eval {tag}`` counts the prompts unless ``run.progress`` is false."""
    rows = load_rows(cfg.data.eval, "prompt", cfg.data.on_invalid, cfg.eval.max_prompts,
                     SourceOptions.of(cfg.data, "eval")).rows
    source = reward_source_for(cfg, source_name)
    if hasattr(source, "prepare_rows"):
        rows = source.prepare_rows(rows)
    metrics, samples = evaluate(lm.model, lm.tokenizer, fmt, rows, source, cfg.eval.num_samples,
                                cfg.eval.temperature, cfg.eval.max_new_tokens, cfg.run.seed + 7919,
                                cfg.rollout.batch_prompts, cfg.reward.pass_threshold, stop=cfg.rollout.stop,
                                invalid_as_none=cfg.reward.invalid_as_none, autocast=lm.autocast,
                                progress=cfg.run.progress, label=f"eval {tag}")
    by_category: dict[str, list[float]] = {}
    for s, d in zip(samples.scores, samples.details):
        if s is not None and "category" in d:
            by_category.setdefault(d["category"], []).append(s)
    metrics.update({f"reward/{c}/mean": sum(v) / len(v) for c, v in sorted(by_category.items())})
    write_samples(Path(run_dir) / f"eval-{tag}.jsonl", samples)
    write_atomic(Path(run_dir) / f"eval-{tag}.json", json.dumps(metrics, indent=1))
    return metrics


def write_samples(path: Path, samples: ScoredSamples) -> None:
    """One JSON line per scored response: prompt, response, reward, details."""
    lines = [json.dumps({"prompt": r.get("prompt"), "response": t, "reward": s, "details": d}, default=str)
             for r, t, s, d in zip(samples.rows, samples.texts, samples.scores, samples.details)]
    write_atomic(path, "".join(line + "\n" for line in lines))
