"""GRAPE step 7: per-item statistics for the humans who own the rubric.

Every scoring call reports, per item j over the responses it applied to:
``rubric/<item>/confidence`` (mean c_ij over scored responses), ``score_mean``, ``score_std`` and
``missing`` (share of applicable responses with no score: unparseable critique, failed call, gated). Over the
whole run the same figures are accumulated, and :meth:`Oversight.write` flags items whose mean confidence
is below ``low_confidence``, whose scores barely vary (std < ``min_score_std``: no signal for a
group-relative advantage), or that are missing more often than not, with example critiques (the
lowest-confidence ones) for each flagged item.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from rlmt.records import write_atomic


@dataclass
class ItemTotals:
    applicable: int = 0
    scored: int = 0
    gated: int = 0
    conf_sum: float = 0.0
    score_sum: float = 0.0
    score_sq_sum: float = 0.0
    examples: list = field(default_factory=list)  # (confidence, example dict), lowest confidence kept

    def summary(self) -> dict:
        n = self.scored
        mean = self.score_sum / n if n else float("nan")
        var = max(0.0, self.score_sq_sum / n - mean * mean) if n else float("nan")
        return {"applicable": self.applicable, "scored": n, "gated": self.gated,
                "missing_rate": (self.applicable - n) / self.applicable if self.applicable else float("nan"),
                "mean_confidence": self.conf_sum / n if n else float("nan"),
                "score_mean": mean, "score_std": math.sqrt(var) if n else float("nan")}


class Oversight:
    def __init__(self, keys: list[str], criteria: dict[str, str], low_confidence: float = 0.5,
                 min_score_std: float = 0.02, examples_per_item: int = 3):
        self.keys, self.criteria = keys, criteria
        self.low_confidence, self.min_score_std, self.k = low_confidence, min_score_std, examples_per_item
        self.totals = {k: ItemTotals() for k in keys}

    def update(self, S: torch.Tensor, C: torch.Tensor, applicable: torch.Tensor, gated: torch.Tensor,
               rows: Sequence[dict], responses: Sequence[str], details: Sequence[dict]) -> dict[str, float]:
        """Add one batch: S, C (N, J) with NaN = missing; applicable, gated (N, J) bool. -> step metrics."""
        metrics: dict[str, float] = {}
        present = torch.isfinite(S) & torch.isfinite(C)
        for j, key in enumerate(self.keys):
            app = applicable[:, j]
            if not app.any():
                continue
            ok = present[:, j] & app
            s, c = S[ok, j], C[ok, j]
            t = self.totals[key]
            t.applicable += int(app.sum())
            t.scored += int(ok.sum())
            t.gated += int((gated[:, j] & app).sum())
            t.conf_sum += float(c.sum())
            t.score_sum += float(s.sum())
            t.score_sq_sum += float((s * s).sum())
            metrics[f"rubric/{key}/missing"] = 1 - float(ok.sum()) / float(app.sum())
            if ok.any():
                metrics[f"rubric/{key}/confidence"] = float(c.mean())
                metrics[f"rubric/{key}/score_mean"] = float(s.mean())
                metrics[f"rubric/{key}/score_std"] = float(s.std(unbiased=False))
            for i in torch.nonzero(app).flatten().tolist():
                d = details[i]["items"].get(key, {})
                conf = d.get("confidence")
                rank = conf if conf is not None else -1.0  # missing critiques are the most instructive
                t.examples.append((rank, {
                    "question": str(rows[i].get("question") or rows[i].get("prompt"))[:300],
                    "response": responses[i][:400], "score": d.get("score"), "confidence": conf,
                    "reasoning": str(d.get("reasoning", ""))[:500], "error": d.get("error"),
                    "gated": bool(d.get("gated"))}))
            t.examples.sort(key=lambda e: e[0])
            del t.examples[self.k:]
        return metrics

    def absorb(self, totals: dict[str, ItemTotals]) -> None:
        """Add another process's totals (a rank's share of the run) to these: sums, and the lowest-confidence
        examples of both."""
        for key, other in totals.items():
            t = self.totals[key]
            t.applicable += other.applicable
            t.scored += other.scored
            t.gated += other.gated
            t.conf_sum += other.conf_sum
            t.score_sum += other.score_sum
            t.score_sq_sum += other.score_sq_sum
            t.examples = sorted(t.examples + other.examples, key=lambda e: e[0])[:self.k]

    def flags(self, summary: dict) -> list[str]:
        out = []
        if summary["scored"] == 0:
            if summary["gated"] == summary["applicable"]:
                return ["always gated (its gate item never passed)"]
            return ["never scored"]
        if summary["mean_confidence"] < self.low_confidence:
            out.append(f"low confidence ({summary['mean_confidence']:.2f} < {self.low_confidence})")
        if summary["score_std"] < self.min_score_std:
            out.append(f"no variance (score std {summary['score_std']:.3f} < {self.min_score_std})")
        scored_or_gated = summary["scored"] + summary["gated"]
        if summary["applicable"] and (summary["applicable"] - scored_or_gated) / summary["applicable"] > 0.5:
            out.append("missing more often than not (critiques did not parse)")
        return out

    def report(self, extra: dict | None = None) -> dict:
        items = []
        for key in self.keys:
            s = self.totals[key].summary()
            if not s["applicable"]:
                continue
            items.append({"item": key, "criterion": self.criteria[key], **s, "flags": self.flags(s),
                          "examples": [e for _, e in self.totals[key].examples]})
        items.sort(key=lambda it: (not it["flags"], it["item"]))
        return {"items": items, "flagged": [it["item"] for it in items if it["flags"]], **(extra or {})}

    def write(self, run_dir: Path, extra: dict | None = None) -> dict:
        rep = self.report(extra)
        write_atomic(run_dir / "rubric_report.json", json.dumps(rep, indent=1, default=str))
        lines = ["# Rubric report", "",
                 "Items flagged for the humans who own the rubric: low critic confidence, no score variance, or "
                 "often missing. Rewrite the criterion, split it, or make it verifiable.", ""]
        lines += ["| item | flags | mean confidence | score mean | score std | missing | gated |",
                  "|---|---|---|---|---|---|---|"]
        for it in rep["items"]:
            lines.append(f"| {it['item']} | {'; '.join(it['flags']) or 'ok'} | {it['mean_confidence']:.2f} | "
                         f"{it['score_mean']:.2f} | {it['score_std']:.3f} | {it['missing_rate']:.0%} | {it['gated']} |")
        for it in rep["items"]:
            if not it["flags"]:
                continue
            lines += ["", f"## {it['item']}: {it['criterion']}", ""]
            for e in it["examples"]:
                lines.append(f"- score {e['score']}, confidence {e['confidence']}"
                             f"{', error: ' + str(e['error']) if e['error'] else ''}{', gated' if e['gated'] else ''}")
                lines.append(f"  - question: {json.dumps(e['question'])}")
                lines.append(f"  - response: {json.dumps(e['response'])}")
                if e["reasoning"]:
                    lines.append(f"  - critique: {json.dumps(e['reasoning'])}")
        if extra:
            lines += ["", "Critic: " + ", ".join(f"{k} {v:g}" for k, v in extra.items())]
        write_atomic(run_dir / "rubric_report.md", "\n".join(lines) + "\n")
        return rep
