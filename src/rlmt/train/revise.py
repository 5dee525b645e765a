"""GRAPE's optional critique-revise step (``grape.revise``).

After a rollout is scored, the lowest-scored response of each prompt group is shown back to the policy with
the criteria it fell short of (the item's criterion, its score, and the critic's reasoning when the critic
wrote one), and the policy writes one revision. The revision is scored with the same rubric *alongside its
group* (phi_j is the group's mean confidence including the revision; cached critiques cost nothing) and
kept only if it beats the response it revises. Kept revisions become return-weighted demonstrations: the
loop's demonstration NLL (``pg.nll_coef``, weights exp(R / ``pg.nll_tau``)) trains on them.

Kept revisions live in the update state (token ids and rewards, JSON), so checkpoints carry them and a
resumed run is exact. Only the last ``MAX_KEPT`` are kept. A revision's draws are keyed by (seed, step,
global group index, -1) (:func:`rlmt.rollout.keyed_uniforms`); on several ranks each rank revises its own
groups and the kept revisions are gathered in group order, so every rank holds the one-process state.
"""

from __future__ import annotations

import math

import torch

from rlmt.data import SFTExample, encode_prompt
from rlmt.objectives.grape import grape_aggregate
from rlmt.rollout import SamplingParams, generate
from rlmt.train.experience import Demonstrations, UpdateContext

MAX_KEPT = 256


def revision_messages(prompt: str | list, response: str, item_details: dict, criteria: dict[str, str],
                      max_items: int = 3) -> list[dict]:
    """The chat asking for a revision: the original turn, the response, then feedback on its weakest items."""
    scored = [(d["score"], k, d) for k, d in item_details.items() if d.get("score") is not None]
    scored.sort(key=lambda t: t[0])
    weak = [t for t in scored if t[0] < 0.5][:max_items] or scored[:1]
    lines = []
    for s, key, d in weak:
        why = d.get("reasoning", "")
        why = f": {why}" if why and not why.startswith(("digit distribution", "guard:")) else ""
        lines.append(f"- {criteria.get(key, key)} (score {s:.1f} of 1){why}")
    messages = list(prompt) if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    feedback = ("A reviewer checked your answer against these criteria and found it lacking:\n" + "\n".join(lines)
                + "\nWrite an improved answer to the original request. Reply with the improved answer only.")
    return messages + [{"role": "assistant", "content": response}, {"role": "user", "content": feedback}]


def revise_lowest(policy, tokenizer, fmt, rows: list[dict], texts: list[str], scores: list[float | None],
                  details: list[dict], source, group_size: int, params: SamplingParams,
                  generator: torch.Generator | None, autocast: torch.dtype | None = None,
                  key: tuple[int, int, int] | None = None) -> tuple[list[dict], dict[str, float]]:
    """Revise each group's lowest-scored response; -> (kept [{prompt_ids, completion_ids, reward}], metrics).

    ``source`` is the run's :class:`rlmt.grape.scorer.RubricReward`; the revision is scored with
    ``score_matrix`` (no oversight statistics) and aggregated with its group. ``key`` = (seed, step, global
    index of the first group): group g's revision is drawn with the key (seed, step, first + g, -1);
    without it, from ``generator``. ``revise/gains`` (a list) is returned for the caller to reduce.
    """
    criteria = {it.key: it.criterion for it in source.items}
    picks = []
    for g in range(len(texts) // group_size):
        idx = [i for i in range(g * group_size, (g + 1) * group_size) if scores[i] is not None]
        if idx:
            picks.append(min(idx, key=lambda i: scores[i]))
    if not picks:
        return [], {"revise/attempts": 0.0}
    prompts = [encode_prompt(tokenizer, fmt, revision_messages(rows[i]["prompt"], texts[i], details[i]["items"],
                                                               criteria)) for i in picks]
    one = SamplingParams(1, params.temperature, params.top_p, params.max_new_tokens, params.stop)
    keys = None if key is None else [(key[0], key[1], key[2] + i // group_size, -1) for i in picks]
    out = generate(policy, tokenizer, prompts, one, generator, autocast, keys)
    kept, gains = [], []
    for k, i in enumerate(picks):
        g0 = (i // group_size) * group_size
        group = list(range(g0, g0 + group_size))
        S, C, _ = source.score_matrix([rows[j] for j in group] + [rows[i]], [texts[j] for j in group] + [out.texts[k]])
        R, _ = grape_aggregate(S, C, source.weights)
        r_old, r_new = float(R[group.index(i)]), float(R[-1])
        if not (math.isfinite(r_new) and math.isfinite(r_old)):
            continue
        gains.append(r_new - r_old)
        if r_new > r_old:
            n = int(out.response_lengths[k])
            kept.append({"prompt_ids": encode_prompt(tokenizer, fmt, rows[i]["prompt"]),
                         "completion_ids": out.response_ids[k, :n].tolist(), "reward": r_new})
    metrics = {"revise/attempts": float(len(picks)), "revise/kept": float(len(kept)), "revise/gains": gains}
    return kept, metrics


def revision_demonstrations(state: dict, base=None):
    """Demonstrations = the run's demonstration file (``base``, may be None) + kept revisions in ``state``."""
    revs = state.get("revisions", [])
    examples = list(base.examples) if base is not None else []
    rewards = base.rewards.tolist() if base is not None and base.rewards is not None else [0.0] * len(examples)
    examples += [SFTExample(r["prompt_ids"], r["completion_ids"]) for r in revs]
    rewards += [r["reward"] for r in revs]
    return Demonstrations(examples, torch.tensor(rewards)) if examples else None


def revise_step(ctx: UpdateContext, base_demos: Demonstrations | None, tokenizer, fmt, rows: list[dict], batch,
                scored, source, params: SamplingParams, key: tuple[int, int, int]) -> dict[str, float]:
    """One loop step of critique-revise: revise (draws keyed by ``key`` = (seed, step, global index of this
    rank's first group)), keep the improvements in ``ctx.state`` (every rank's, in group order), refresh
    ``ctx.demos``."""
    kept, metrics = revise_lowest(ctx.policy, tokenizer, fmt, rows, batch.texts, scored.scores, scored.details,
                                  source, params.num_samples, params, None, ctx.autocast, key)
    parts = ctx.world.all_gather_object((kept, metrics.get("revise/attempts", 0.0), metrics.pop("revise/gains", [])))
    kept = [k for part in parts for k in part[0]]
    gains = [g for part in parts for g in part[2]]
    metrics = {"revise/attempts": float(sum(part[1] for part in parts)), "revise/kept": float(len(kept)),
               "revise/gain_mean": sum(gains) / len(gains) if gains else 0.0}
    ctx.state["revisions"] = (ctx.state.get("revisions", []) + kept)[-MAX_KEPT:]
    ctx.demos = revision_demonstrations(ctx.state, base_demos)
    metrics["revise/pool"] = float(len(ctx.state["revisions"]))
    return metrics
