"""``rlmt train``: ``algorithm`` -> the loop that runs it; rejection sampling, with checkpoints and exact resume.

Resume is exact because every source of randomness is either restored from the checkpoint (RNG states) or
a pure function of (seed, step / round): the data order of SFT step s, the prompts and the sampling
generator of rejection round r. A round's kept set and metrics are saved before its SFT starts.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import torch

from rlmt.checkpoint import load_checkpoint, save_checkpoint
from rlmt.config import Config, to_dict
from rlmt.data import Row, SFTExample, check_prompt_lengths, load_rows
from rlmt.evaluate import ScoredSamples, evaluate, sample_and_score, summarize
from rlmt.records import RunRecorder, write_atomic
from rlmt.rewards import build_reward_source, reward_source_for
from rlmt.rollout import SamplingParams
from rlmt.train.optim import build_optimizer
from rlmt.train.session import resume_checkpoint, start_run
from rlmt.models import save_final
from rlmt.train.sft import examples_per_step, sft_update, step_indices, train_sft
from rlmt.data import make_micro_batches


def _eval_metrics(cfg: Config, lm, fmt, tag: str, run_dir: Path) -> dict[str, float]:
    rows = load_rows(cfg.data.eval, "prompt", cfg.data.on_invalid, cfg.eval.max_prompts).rows
    source = reward_source_for(cfg)
    if hasattr(source, "prepare_rows"):
        rows = source.prepare_rows(rows)
    metrics, samples = evaluate(lm.model, lm.tokenizer, fmt, rows, source, cfg.eval.num_samples,
                                cfg.eval.temperature, cfg.eval.max_new_tokens, cfg.run.seed + 7919,
                                cfg.rollout.batch_prompts, cfg.reward.pass_threshold, stop=cfg.rollout.stop,
                                invalid_as_none=cfg.reward.invalid_as_none)
    by_category: dict[str, list[float]] = {}
    for s, d in zip(samples.scores, samples.details):
        if s is not None and "category" in d:
            by_category.setdefault(d["category"], []).append(s)
    metrics.update({f"reward/{c}/mean": sum(v) / len(v) for c, v in sorted(by_category.items())})
    write_samples(run_dir / f"eval-{tag}.jsonl", samples)
    write_atomic(run_dir / f"eval-{tag}.json", json.dumps(metrics, indent=1))
    return metrics


def write_samples(path: Path, samples: ScoredSamples) -> None:
    lines = [json.dumps({"prompt": r.get("prompt"), "response": t, "reward": s, "details": d}, default=str)
             for r, t, s, d in zip(samples.rows, samples.texts, samples.scores, samples.details)]
    write_atomic(path, "".join(line + "\n" for line in lines))


def train(cfg: Config) -> Path:
    """Run ``cfg.algorithm`` and return the run directory."""
    return ALGORITHMS[cfg.algorithm](cfg)


# ------------------------------------------------------------------------------------- rejection sampling


def select_kept(samples: ScoredSamples, num_samples: int, keep_top_k: int, threshold: float | None,
                dedupe: bool) -> list[int]:
    """Indices of the responses to keep: per prompt, the best ``keep_top_k`` (0: all) of those scored at or
    above ``threshold``; ties keep the earlier sample; with ``dedupe`` identical texts count once."""
    kept = []
    for p in range(len(samples.scores) // num_samples):
        idx = range(p * num_samples, (p + 1) * num_samples)
        cands = [i for i in idx if samples.scores[i] is not None
                 and (threshold is None or samples.scores[i] >= threshold)]
        cands.sort(key=lambda i: -samples.scores[i])  # stable: ties keep sample order
        seen, chosen = set(), []
        for i in cands:
            if dedupe and samples.texts[i] in seen:
                continue
            seen.add(samples.texts[i])
            chosen.append(i)
        kept += chosen[:keep_top_k] if keep_top_k > 0 else chosen
    return kept


def round_prompts(rows: list[Row], per_round: int, seed: int, round_index: int) -> list[Row]:
    if per_round <= 0 or per_round >= len(rows):
        return rows
    g = torch.Generator().manual_seed(seed * 7_919 + round_index)
    return [rows[int(i)] for i in torch.randperm(len(rows), generator=g)[:per_round]]


def _run_round(cfg: Config, lm, fmt, rows: list[Row], source, r: int, note: Callable[[str], None],
               ) -> tuple[list[SFTExample], dict]:
    params = SamplingParams(cfg.rollout.num_samples, cfg.rollout.temperature, cfg.rollout.top_p,
                            cfg.rollout.max_new_tokens, tuple(cfg.rollout.stop))
    gen = torch.Generator(device=next(lm.model.parameters()).device).manual_seed(cfg.run.seed * 104_729 + r)
    prompts = round_prompts(rows, cfg.rejection.prompts_per_round, cfg.run.seed, r)
    samples = sample_and_score(lm.model, lm.tokenizer, fmt, prompts, source, params, gen,
                               cfg.rollout.batch_prompts, cfg.reward.invalid_as_none)
    keep = select_kept(samples, cfg.rollout.num_samples, cfg.rejection.keep_top_k, cfg.rejection.threshold,
                       cfg.rejection.dedupe)
    summary = summarize(samples, cfg.rollout.num_samples, cfg.reward.pass_threshold)
    kept_rewards = [samples.scores[i] for i in keep]
    metrics = {
        "round": r,
        "reward/mean": summary["reward/mean"],
        "pass_rate": summary["pass@1"],
        "kept/count": float(len(keep)),
        "kept/reward_mean": sum(kept_rewards) / len(kept_rewards) if kept_rewards else float("nan"),
        "kept/prompts": float(len({samples.prompt_ids[i].__repr__() for i in keep})),
        "rollout/tokens_per_s": summary["rollout/tokens_per_s"],
        "rollout/seconds": summary["rollout/seconds"],
    }
    kept = [{"prompt_ids": samples.prompt_ids[i], "completion_ids": samples.response_ids[i],
             "response": samples.texts[i], "reward": samples.scores[i]} for i in keep]
    note(f"round {r}: reward/mean {metrics['reward/mean']:.3f}  pass_rate {metrics['pass_rate']:.3f}  "
         f"kept {len(keep)} (reward {metrics['kept/reward_mean']:.3f})  {summary['rollout/tokens_per_s']:.0f} tok/s")
    return kept, metrics


def train_rejection(cfg: Config) -> Path:
    """R rounds of: sample G per prompt, score, keep the best, SFT on the kept set."""
    run_dir, lm, fmt = start_run(cfg)
    report = load_rows(cfg.data.train, "prompt", cfg.data.on_invalid, cfg.data.limit)
    rows = check_prompt_lengths(report.rows, lm.tokenizer, fmt, cfg.data.max_prompt_tokens, cfg.data.on_invalid, report)
    source = build_reward_source(cfg.reward.source, cfg.reward.args)
    per_step = examples_per_step(cfg)
    n_round = cfg.rejection.prompts_per_round or len(rows)
    est_kept = n_round * (cfg.rejection.keep_top_k or cfg.rollout.num_samples)
    est_total = cfg.optim.max_steps or cfg.rejection.rounds * max(1, math.ceil(cfg.rejection.sft_epochs * est_kept / per_step))
    opt, sched = build_optimizer(lm.model, cfg.optim, est_total)
    ckpt = resume_checkpoint(cfg)
    state = load_checkpoint(ckpt, lm.model, opt, sched) if ckpt else {"step": 0, "round": 0, "round_step": 0}
    rec = RunRecorder(run_dir, to_dict(cfg), state["step"] if ckpt else None, cfg.run.tensorboard,
                      cfg.run.log_every, None, cfg.run.progress)
    if cfg.run.eval_before_after and cfg.data.eval and not ckpt:
        before = _eval_metrics(cfg, lm, fmt, "before", run_dir)
        rec.note(f"eval before: {json.dumps({k: round(v, 4) for k, v in before.items()})}")
    device = next(lm.model.parameters()).device
    step = state["step"]
    for r in range(state["round"], cfg.rejection.rounds):
        kept_path = run_dir / "rounds" / f"round-{r}.jsonl"
        metrics_path = kept_path.with_suffix(".metrics.json")
        if kept_path.exists():  # resumed mid-round: the kept set and its metrics were saved before its SFT began
            kept = [json.loads(line) for line in kept_path.read_text().splitlines()]
            round_metrics = json.loads(metrics_path.read_text())
        else:
            kept, round_metrics = _run_round(cfg, lm, fmt, rows, source, r, rec.note)
            kept_path.parent.mkdir(exist_ok=True)
            write_atomic(metrics_path, json.dumps(round_metrics))  # first: the kept file marks the round done
            write_atomic(kept_path, "".join(json.dumps(k) + "\n" for k in kept))
        examples = [SFTExample(k["prompt_ids"], k["completion_ids"]) for k in kept]
        n_steps = math.ceil(cfg.rejection.sft_epochs * len(examples) / per_step) if examples else 0
        first = state["round_step"] if r == state["round"] else 0
        if not examples:
            rec.note(f"round {r}: nothing kept; no update this round")
        for s in range(first, n_steps):
            idx = step_indices(s, per_step, len(examples), cfg.run.seed + r, cfg.data.shuffle)
            mbs = make_micro_batches([examples[i] for i in idx], cfg.optim.batch_size, lm.tokenizer.pad_token_id)
            metrics = sft_update(lm.model, mbs, opt, sched, cfg.optim.max_grad_norm, device)
            step += 1
            rec.log(step, {**(round_metrics if s == 0 else {"round": r}), **metrics})
            last = s + 1 == n_steps
            if cfg.run.save_every and step % cfg.run.save_every == 0:
                nxt = {"round": r + 1, "round_step": 0} if last else {"round": r, "round_step": s + 1}
                save_checkpoint(run_dir, step, lm.model, opt, sched, nxt, cfg.run.keep_checkpoints)
    save_checkpoint(run_dir, step, lm.model, opt, sched, {"round": cfg.rejection.rounds, "round_step": 0},
                    cfg.run.keep_checkpoints)
    save_final(lm.model, lm.tokenizer, run_dir)
    if cfg.run.eval_before_after and cfg.data.eval:
        after = _eval_metrics(cfg, lm, fmt, "after", run_dir)
        rec.note(f"eval after: {json.dumps({k: round(v, 4) for k, v in after.items()})}")
    rec.close()
    return run_dir


def _online(cfg: Config) -> Path:
    from rlmt.train.online import train_online

    return train_online(cfg)


def _dpo(cfg: Config) -> Path:
    from rlmt.train.dpo import train_dpo

    return train_dpo(cfg)


def _reward_model(cfg: Config) -> Path:
    from rlmt.train.reward_model import train_reward_model

    return train_reward_model(cfg)


def _pipeline(cfg: Config) -> Path:
    from rlmt.train.pipeline import train_pipeline

    return train_pipeline(cfg)


def _process_reward_model(cfg: Config) -> Path:
    from rlmt.train.process_reward_model import train_process_reward_model

    return train_process_reward_model(cfg)


ALGORITHMS: dict[str, Callable[[Config], Path]] = {
    "sft": train_sft,
    "rejection_sampling": train_rejection,
    "reinforce": _online,
    "grpo": _online,
    "ppo": _online,
    "trpo": _online,
    "grape": _online,
    "dpo": _dpo,
    "process_reward_model": _process_reward_model,
    "reward_model": _reward_model,
    "pipeline": _pipeline,
}
