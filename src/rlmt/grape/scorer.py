"""GRAPE steps 3-4 as a reward source: score every (response, rubric item), then combine with confidences.

For a batch of responses (rows carry ``prompt`` and ``category``):

1. verifiable items run first, through the registered reward sources (confidence = the item's, default 1);
   a score outside [0, 1] (after the item's ``transform``) or a source's ``None`` is missing;
2. a judged item whose ``gated_by`` item failed (score < 0.5) is skipped when ``gate_on_verifiable`` is set:
   missing, counted as gated, and no critic call is spent on it; with ``guard`` on, a response that
   addresses the grader (:mod:`rlmt.chat.guard`) fails its judged items (score 0, confidence 1, no call);
3. the remaining judged items go to the critic in one batch (cached);
4. :func:`rlmt.objectives.grape.grape_aggregate` combines them per group of responses to the same prompt:
   R_i = sum_j w_j phi_j s_ij / sum_j w_j phi_j with phi_j the group's mean confidence of item j.

A response with no usable item is unscored (None), never 0. Each call returns per-item statistics as
``rubric/<category.item>/{confidence,score_mean,score_std,missing}`` metrics and keeps run-long statistics
(:class:`rlmt.grape.oversight.Oversight`) that ``finish(run_dir)`` writes as the rubric report.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import torch

from rlmt.data import Row
from rlmt.grape.critic import CachedCritic, CritiqueTask, build_critic
from rlmt.chat.guard import injection_findings
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
        findings = [injection_findings(r) if self.guard else [] for r in responses]
        for i, f in enumerate(findings):
            if f:
                details[i]["guard"] = f
        tasks, where = [], []
        for j, item in enumerate(self.items):  # 2. gates, guard, 3. judged items
            if item.flow != "judged":
                continue
            for i in range(N):
                if cats[i] != item.category:
                    continue
                if self.gate and item.gated_by:
                    g = S[i, self.col[f"{item.category}.{item.gated_by}"]]
                    if not (g >= 0.5):  # failed or missing gate
                        details[i]["items"][item.key] = {"score": None, "confidence": None, "gated": True}
                        continue
                if findings[i]:
                    S[i, j], C[i, j] = 0.0, 1.0
                    details[i]["items"][item.key] = {"score": 0.0, "confidence": 1.0,
                                                     "reasoning": f"guard: the response addresses the grader "
                                                                  f"({', '.join(findings[i])})"}
                    continue
                tasks.append(CritiqueTask(item.key, item.criterion, question_text(rows[i].get("question") or
                                                                                  rows[i]["prompt"]),
                                          responses[i], item.scale))
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
        R, _ = grape_aggregate(S, C, self.weights, ids)
        scores = [None if not math.isfinite(float(r)) else float(r) for r in R]
        for i, s in enumerate(scores):
            details[i]["reward"] = s
        applicable = torch.tensor([[it.category == d["category"] for it in self.items] for d in details])
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
        return RewardResult(scores, details, metrics=metrics)

    def finish(self, run_dir: Path) -> None:
        """Write ``rubric_report.json`` and ``rubric_report.md`` (flagged items first) into ``run_dir``."""
        extra = self.critic.stats.as_metrics() if self.critic is not None else {}
        self.oversight.write(Path(run_dir), extra)
