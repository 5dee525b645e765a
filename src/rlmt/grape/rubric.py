"""GRAPE rubric files: categories, each with a system prompt and weighted items scored by a verifier or a critic.

```yaml
scale: [0, 10]                    # default declared scale of judged items (normalised to [0, 1])
categories:
  math:
    system_prompt: "Solve the problem. End with 'The answer is N.'"
    items:
      - id: answer                 # unique within the category; metrics use "math.answer"
        criterion: "The final answer is correct."
        weight: 3                  # w_j > 0
        flow: verifiable           # scored by a reward source from rlmt.rewards.REGISTRY, confidence 1
        verifier: math_answer
        args: {}
      - id: explanation
        criterion: "The explanation shows the addition step by step."
        weight: 1
        flow: judged               # scored by the critic: reasoning, score on `scale`, confidence
        gated_by: answer           # optional: skipped (missing) when `answer` failed (score < 0.5)
```

Verifiable items may use any registered source, including a trained reward model
(``verifier: reward_model``); ``transform: sigmoid`` maps an unbounded score into [0, 1] and ``confidence``
sets the fixed confidence such an item carries (default 1). Errors name the file and the item's path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class RubricError(ValueError):
    """The rubric file is invalid; the message names the file and the field at fault."""


@dataclass(frozen=True)
class RubricItem:
    id: str  # unique within its category
    criterion: str  # the text the critic grades against (also shown in reports)
    weight: float  # w_j > 0
    flow: str  # "verifiable" | "judged"
    category: str = ""  # the category this item belongs to
    verifier: str = ""  # verifiable: a name in rlmt.rewards.REGISTRY
    args: dict = field(default_factory=dict)  # verifiable: the source's keyword arguments
    transform: str = "none"  # verifiable: "none" (score must be in [0, 1]), "sigmoid" or "clip"
    confidence: float = 1.0  # verifiable: the fixed confidence of its scores
    gated_by: str = ""  # id of an item in the same category; when it fails (< 0.5) this one is skipped
    scale: tuple[float, float] = (0.0, 10.0)  # judged: the declared score scale, normalised to [0, 1]

    @property
    def key(self) -> str:
        """The item's run-wide name: ``category.id``."""
        return f"{self.category}.{self.id}"


@dataclass(frozen=True)
class Category:
    name: str
    system_prompt: str
    items: tuple[RubricItem, ...]


@dataclass(frozen=True)
class Rubric:
    categories: dict[str, Category]
    path: str = ""

    @property
    def items(self) -> list[RubricItem]:
        """Every item of every category, in file order (the columns of the score matrix)."""
        return [it for c in self.categories.values() for it in c.items]

    def category_of(self, row: dict, where: str = "row") -> Category:
        name = row.get("category")
        if name is None and len(self.categories) == 1:
            return next(iter(self.categories.values()))
        if name not in self.categories:
            raise RubricError(f"{where}: field 'category': {name!r} is not a category of rubric {self.path} "
                              f"(known: {sorted(self.categories)})")
        return self.categories[name]


_ITEM_KEYS = {"id", "criterion", "weight", "flow", "verifier", "args", "transform", "confidence", "gated_by", "scale"}


def _scale(value: Any, where: str) -> tuple[float, float]:
    ok = (isinstance(value, (list, tuple)) and len(value) == 2
          and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value) and value[0] < value[1])
    if not ok:
        raise RubricError(f"{where}: scale must be [low, high] numbers with low < high, got {value!r}")
    return float(value[0]), float(value[1])


def _item(raw: Any, category: str, default_scale: tuple[float, float], where: str) -> RubricItem:
    from rlmt.rewards import REGISTRY

    if not isinstance(raw, dict):
        raise RubricError(f"{where}: an item must be a mapping, got {raw!r}")
    unknown = set(raw) - _ITEM_KEYS
    if unknown:
        raise RubricError(f"{where}: unknown field(s) {sorted(unknown)} (known: {sorted(_ITEM_KEYS)})")
    for key in ("id", "criterion", "flow"):
        if not isinstance(raw.get(key), str) or not raw[key].strip():
            raise RubricError(f"{where}.{key}: required, a non-empty string")
    if "." in raw["id"] or "/" in raw["id"]:
        raise RubricError(f"{where}.id: {raw['id']!r} may not contain '.' or '/'")
    weight = raw.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
        raise RubricError(f"{where}.weight: must be a number > 0, got {weight!r}")
    flow = raw["flow"]
    if flow not in ("verifiable", "judged"):
        raise RubricError(f"{where}.flow: must be 'verifiable' or 'judged', got {flow!r}")
    kwargs: dict[str, Any] = {}
    if flow == "verifiable":
        verifier = raw.get("verifier")
        if verifier not in REGISTRY:
            raise RubricError(f"{where}.verifier: {verifier!r} is not a reward source (known: {sorted(REGISTRY)})")
        args = raw.get("args", {}) or {}
        if not isinstance(args, dict):
            raise RubricError(f"{where}.args: must be a mapping, got {args!r}")
        transform = raw.get("transform", "none")
        if transform not in ("none", "sigmoid", "clip"):
            raise RubricError(f"{where}.transform: must be 'none', 'sigmoid' or 'clip', got {transform!r}")
        conf = raw.get("confidence", 1.0)
        if isinstance(conf, bool) or not isinstance(conf, (int, float)) or not 0 < conf <= 1:
            raise RubricError(f"{where}.confidence: must be in (0, 1], got {conf!r}")
        kwargs.update(verifier=verifier, args=args, transform=transform, confidence=float(conf))
    else:
        for key in ("verifier", "args", "transform", "confidence"):
            if key in raw:
                raise RubricError(f"{where}.{key}: only verifiable items take {key!r}")
        kwargs["scale"] = _scale(raw["scale"], f"{where}.scale") if "scale" in raw else default_scale
    gate = raw.get("gated_by", "")
    if not isinstance(gate, str):
        raise RubricError(f"{where}.gated_by: must be an item id, got {gate!r}")
    return RubricItem(id=raw["id"], criterion=raw["criterion"].strip(), weight=float(weight), flow=flow,
                      category=category, gated_by=gate, **kwargs)


def parse_rubric(data: Any, path: str = "<rubric>") -> Rubric:
    """Validate a loaded rubric mapping (see the module doc) into a :class:`Rubric`."""
    if not isinstance(data, dict) or not isinstance(data.get("categories"), dict) or not data["categories"]:
        raise RubricError(f"{path}: categories: required, a non-empty mapping of category name -> category")
    unknown = set(data) - {"scale", "categories"}
    if unknown:
        raise RubricError(f"{path}: unknown top-level field(s) {sorted(unknown)} (known: ['categories', 'scale'])")
    default_scale = _scale(data["scale"], f"{path}: scale") if "scale" in data else (0.0, 10.0)
    categories = {}
    for name, raw in data["categories"].items():
        where = f"{path}: categories.{name}"
        if not isinstance(raw, dict):
            raise RubricError(f"{where}: must be a mapping with system_prompt and items")
        unknown = set(raw) - {"system_prompt", "items"}
        if unknown:
            raise RubricError(f"{where}: unknown field(s) {sorted(unknown)} (known: ['items', 'system_prompt'])")
        system = raw.get("system_prompt", "")
        if not isinstance(system, str):
            raise RubricError(f"{where}.system_prompt: must be a string")
        raw_items = raw.get("items")
        if not isinstance(raw_items, list) or not raw_items:
            raise RubricError(f"{where}.items: required, a non-empty list")
        items = [_item(it, str(name), default_scale, f"{where}.items[{i}]") for i, it in enumerate(raw_items)]
        ids = [it.id for it in items]
        for i, it in enumerate(items):
            if it.id in ids[:i]:
                raise RubricError(f"{where}.items[{i}].id: {it.id!r} is used by more than one item")
            if it.gated_by:
                if it.gated_by not in ids or it.gated_by == it.id:
                    raise RubricError(f"{where}.items[{i}].gated_by: {it.gated_by!r} is not another item of "
                                      f"category {name!r}")
                if items[ids.index(it.gated_by)].flow != "verifiable":
                    raise RubricError(f"{where}.items[{i}].gated_by: gate {it.gated_by!r} must be a verifiable item")
        categories[str(name)] = Category(str(name), system, tuple(items))
    return Rubric(categories, path)


def load_rubric(path: str | Path) -> Rubric:
    """Read and validate a rubric YAML file."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise RubricError(f"rubric file {path} does not exist") from None
    except yaml.YAMLError as e:
        raise RubricError(f"{path}: invalid YAML: {e}") from e
    return parse_rubric(data, str(path))
