"""GRAPE steps 3-4 as a reward source: score every (response, rubric item), then combine with confidences.

For a batch of responses (rows carry ``prompt`` and ``category``):

1. verifiable items run first, through the registered reward sources (confidence = the item's, default 1),
   on the response as written; a score outside [0, 1] (after the item's ``transform``) or a source's ``None``
   is missing;
2. with ``guard`` on, each response is screened (:func:`rlmt.chat.guard.screen`): spans aimed at the grader
   are cut and the critic sees what is left; a response with no content left (``:``, "Let me think step by
   step.") fails its judged items (score 0, confidence 1, no call);
3. a judged item whose ``gated_by`` item failed (score < 0.5) is skipped when ``gate_on_verifiable`` is set
   (no critic call is spent on it); the remaining judged items go to the critic in one batch (cached);
4. :func:`missing_counts_as_zero`, then :func:`rlmt.objectives.grape.grape_aggregate` per group of responses
   to the same prompt: R_i = sum_j w_j phi_j s_ij / sum_j w_j phi_j, phi_j the group's mean confidence of item j.

**Missing items count against the response.** An item that applies to a response but has no score (the
critique did not parse, the call failed, the gate failed, the verifier gave None) counts as s_ij = 0 at the
item's full group weight w_j phi_j, where phi_j stays the mean confidence of the responses that do have it
(1 when none in the group has it). Dropping the item instead (the earlier rule) let a response gain by making
the critic fail: with a mixed rubric, an attack whose judged items did not parse kept only its verifiable 1.0
against 0.78 for its clean twin. With the item at 0, R_i is non-decreasing in every s_ij at fixed weights, so
a response can never score above what it would have scored had the critic answered. An outage that takes an
item out for a whole group lowers every member by the same factor (the denominator is shared), which leaves
GRPO's normalised advantages unchanged. A response is unscored (None, never 0) only when nothing at all was
scored in its group, or when its only items carry zero weight. Details keep the missing item as missing
(``score`` None, with its ``error``) and mark ``counted_as: 0.0``; oversight counts it as missing.

Each call returns per-item statistics as ``rubric/<category.item>/{confidence,score_mean,score_std,missing}``
metrics and keeps run-long statistics (:class:`rlmt.grape.oversight.Oversight`) that ``finish(run_dir)``
writes as the rubric report; ``guard/flagged`` and ``guard/content_free`` count screened responses, and
``reward/missing_as_zero`` the missing entries counted as 0.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import torch

from rlmt.data import Row
from rlmt.grape.critic import CachedCritic, CritiqueTask, build_critic
from rlmt.chat.guard import Screened, screen
from rlmt.grape.oversight import Oversight
from rlmt.grape.rubric import Rubric, RubricItem, load_rubric
from rlmt.objectives.grape import grape_aggregate
from rlmt.rewards.base import RewardResult, score_checked


def question_text(prompt: str | list) -> str:
    """The user's question: the prompt text, or the last user message of a chat prompt."""
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    return users[-1] if users else "\n".join(m["content"] for m in prompt)


def _transform(value: float | None, how: str) -> float | None:
    if value is None:
        return None
    if how == "sigmoid":
        return 1 / (1 + math.exp(-value))
    if how == "clip":
        return min(1.0, max(0.0, value))
    return value if 0.0 <= value <= 1.0 else None


def missing_counts_as_zero(S: torch.Tensor, C: torch.Tensor, applicable: torch.Tensor,
                           ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fill the missing entries that apply: scores, confidences (N, J) with NaN = missing, applicable (N, J)
    bool, group ids (N,) -> (S, C) copies where each missing applicable (i, j) has s = 0 and c = the mean
    confidence of the present (i', j) in i's group (1 if none), so that phi_j is unchanged and the item keeps
    its full weight. Groups with no present entry at all are left as they are (unscored)."""
    S, C = S.clone(), C.clone()
    present = torch.isfinite(S) & torch.isfinite(C)
    for g in torch.unique(ids).tolist():
        rows = ids == g
        if not present[rows].any():
            continue
        for j in range(S.shape[1]):
            have = rows & present[:, j]
            fill = float(C[have, j].mean()) if have.any() else 1.0
            hole = rows & applicable[:, j] & ~present[:, j]
            S[hole, j], C[hole, j] = 0.0, fill
    return S, C


class RubricReward:
    """The GRAPE reward source. ``critic`` is a :class:`CachedCritic` or a spec for :func:`build_critic`."""

    name = "rubric"

    def __init__(self, rubric: str | Rubric, critic: dict | CachedCritic | None = None, critic_mode: str = "json",
                 gate_on_verifiable: bool = True, low_confidence: float = 0.5, min_score_std: float = 0.02,
                 guard: bool = True, nonce_key: str | None = None):
        self.rubric = rubric if isinstance(rubric, Rubric) else load_rubric(rubric)
        self.items: list[RubricItem] = self.rubric.items
        self.col = {it.key: j for j, it in enumerate(self.items)}
        needs_critic = any(it.flow == "judged" for it in self.items)
        if isinstance(critic, CachedCritic) or critic is None and not needs_critic:
            self.critic = critic
        else:
            self.critic = build_critic(critic or {}, critic_mode, nonce_key)
        self.gate, self.guard = gate_on_verifiable, guard
        self.weights = torch.tensor([it.weight for it in self.items], dtype=torch.float64)
        self.oversight = Oversight([it.key for it in self.items], {it.key: it.criterion for it in self.items},
                                   low_confidence, min_score_std)
        self._sources: dict[str, object] = {}

    # ------------------------------------------------------------------ rows

    def prepare_rows(self, rows: Sequence[Row]) -> list[Row]:
        """Give each row its category's system prompt: ``prompt`` becomes [system, user] chat messages
        (the original text is kept as ``question``). Unknown categories fail here, naming file and line."""
        out = []
        for r in rows:
            cat = self.rubric.category_of(r.data, f"{r.file}:{r.line}")
            data = dict(r.data)
            q = question_text(data["prompt"])
            data["question"] = q
            if cat.system_prompt:
                data["prompt"] = [{"role": "system", "content": cat.system_prompt}, {"role": "user", "content": q}]
            data["category"] = cat.name
            out.append(Row(data, r.file, r.line))
        return out

    # ------------------------------------------------------------------ scoring

    def _source(self, item: RubricItem):
        from rlmt.rewards import build_reward_source

        key = json.dumps([item.verifier, item.args], sort_keys=True)
        if key not in self._sources:
            self._sources[key] = build_reward_source(item.verifier, item.args)
        return self._sources[key]

    def score_matrix(self, rows: Sequence[dict], responses: Sequence[str]):
        """-> (scores (N, J), confidences (N, J)) with NaN for missing, and per-response item details."""
        N, J = len(responses), len(self.items)
        S = torch.full((N, J), float("nan"), dtype=torch.float64)
        C = torch.full((N, J), float("nan"), dtype=torch.float64)
        cats = [self.rubric.category_of(r, f"row {i}").name for i, r in enumerate(rows)]
        details: list[dict] = [{"category": c, "items": {}} for c in cats]
        for j, item in enumerate(self.items):  # 1. verifiable items
            if item.flow != "verifiable":
                continue
            idx = [i for i in range(N) if cats[i] == item.category]
            if not idx:
                continue
            res = score_checked(self._source(item), [rows[i] for i in idx], [responses[i] for i in idx],
                                invalid_as_none=True)
            for k, i in enumerate(idx):
                s = _transform(res.scores[k], item.transform)
                d = {"score": s, "confidence": item.confidence if s is not None else None}
                if s is None:
                    d["error"] = res.details[k].get("error", f"score {res.scores[k]!r} not in [0, 1]")
                else:
                    S[i, j], C[i, j] = s, item.confidence
                details[i]["items"][item.key] = d
        screened = [screen(r, question_text(rows[i].get("question") or rows[i]["prompt"])) if self.guard
                    else Screened(r, (), False) for i, r in enumerate(responses)]
        for i, sc in enumerate(screened):
            if sc.kinds:
                details[i]["guard"] = sc.kinds
            if sc.text != responses[i]:
                details[i]["screened"] = sc.text
        tasks, where = [], []
        for j, item in enumerate(self.items):  # 2. guard, 3. gates and judged items
            if item.flow != "judged":
                continue
            for i in range(N):
                if cats[i] != item.category:
                    continue
                if screened[i].content_free:
                    S[i, j], C[i, j] = 0.0, 1.0
                    details[i]["items"][item.key] = {"score": 0.0, "confidence": 1.0,
                                                     "reasoning": "guard: nothing to grade (content-free response)"}
                    continue
                if self.gate and item.gated_by:
                    g = S[i, self.col[f"{item.category}.{item.gated_by}"]]
                    if not (g >= 0.5):  # failed or missing gate
                        details[i]["items"][item.key] = {"score": None, "confidence": None, "gated": True}
                        continue
                tasks.append(CritiqueTask(item.key, item.criterion, question_text(rows[i].get("question") or
                                                                                  rows[i]["prompt"]),
                                          screened[i].text, item.scale))
                where.append((i, j))
        critiques = self.critic.critique(tasks) if tasks else []
        for (i, j), c in zip(where, critiques):
            d = {"score": c.score, "confidence": c.confidence, "reasoning": c.reasoning, "cached": c.cached}
            if c.score is None or c.confidence is None:
                d["error"] = c.error
            else:
                S[i, j], C[i, j] = c.score, c.confidence
            details[i]["items"][self.items[j].key] = d
        return S, C, details

    def score(self, rows: Sequence[dict], responses: Sequence[str]) -> RewardResult:
        S, C, details = self.score_matrix(rows, responses)
        keys = [json.dumps([r.get("category"), r.get("question") or r.get("prompt")], sort_keys=True, default=str)
                for r in rows]
        ids = torch.tensor([sorted(set(keys)).index(k) for k in keys])
        applicable = torch.tensor([[it.category == d["category"] for it in self.items] for d in details])
        S_full, C_full = missing_counts_as_zero(S, C, applicable, ids)
        for i, j in (torch.isfinite(S_full) & ~torch.isfinite(S)).nonzero().tolist():
            details[i]["items"].setdefault(self.items[j].key, {"score": None, "confidence": None})["counted_as"] = 0.0
        R, _ = grape_aggregate(S_full, C_full, self.weights, ids)
        scores = [None if not math.isfinite(float(r)) else float(r) for r in R]
        for i, s in enumerate(scores):
            details[i]["reward"] = s
        gated = torch.tensor([[bool(d["items"].get(it.key, {}).get("gated")) for it in self.items] for d in details])
        metrics = self.oversight.update(S, C, applicable, gated, rows, responses, details)
        for cat in sorted({d["category"] for d in details}):
            vals = [s for s, d in zip(scores, details) if d["category"] == cat and s is not None]
            if vals:
                metrics[f"reward/{cat}/mean"] = sum(vals) / len(vals)
        if self.critic is not None:
            metrics.update(self.critic.stats.as_metrics())
        if self.guard:
            metrics["guard/flagged"] = float(sum(bool(d.get("guard")) for d in details))
            metrics["guard/content_free"] = float(sum("content_free" in d.get("guard", []) for d in details))
        metrics["reward/missing_as_zero"] = float((torch.isfinite(S_full) & ~torch.isfinite(S)).sum())
        return RewardResult(scores, details, metrics=metrics)

    def records(self) -> tuple:
        """What :meth:`finish` reports, as plain data: the oversight totals and the critic's counters (a rank
        sends its share to rank 0, which :meth:`absorb` s it before writing the report)."""
        return self.oversight.totals, (vars(self.critic.stats).copy() if self.critic is not None else {})

    def absorb(self, records: tuple) -> None:
        """Add another rank's :meth:`records` to this process's."""
        totals, stats = records
        self.oversight.absorb(totals)
        if self.critic is not None:
            for k, v in stats.items():
                setattr(self.critic.stats, k, getattr(self.critic.stats, k) + v)

    def finish(self, run_dir: Path) -> None:
        """Write ``rubric_report.json`` and ``rubric_report.md`` (flagged items first) into ``run_dir``."""
        extra = self.critic.stats.as_metrics() if self.critic is not None else {}
        self.oversight.write(Path(run_dir), extra)
