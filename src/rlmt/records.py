"""A run directory: resolved config, ``metrics.jsonl``, the trackers (``run.trackers``), a progress bar with ETA, and at
the end ``summary.json`` (steps, measured wall and training time).

On resume from step k, ``metrics.jsonl`` is rewritten (atomically) to the rows with ``step <= k``, so the
file of a resumed run equals the file of an uninterrupted one (up to the ``time/`` keys).

Time is measured, never summed from step times: each row's ``time/elapsed_s`` is the wall time from the
recorder's start (after the model load, before the evaluation that precedes training) to the row; a resumed
run continues from the last kept row's value, so the time a kill lost after its checkpoint is not counted.
``summary.json`` holds the last step, the same clock read at :meth:`RunRecorder.close` (``wall_s``; on resume
it includes ``resumed_at_s``, the time recorded up to the checkpoint), and this session's time from its first
training step to its last (``training_s``) and its wall-clock start and end (UTC, ISO 8601).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import yaml


def as_made_by_mkdir(directory: Path) -> Path:
    """Give a directory from ``tempfile.mkdtemp`` (mode 0700) the mode ``mkdir`` would have given it
    (0777 less the umask), before it is renamed into place as an output the user's group may read."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(directory, 0o777 & ~mask)
    return directory


def as_made_by_umask(directory: Path) -> Path:
    """Give ``directory`` and everything under it the modes ``mkdir`` and ``open`` would have given them under
    the umask (0777 / 0666 less it): writers that go through a private temporary file (safetensors,
    ``mkdtemp``) leave 0600 / 0700 behind."""
    mask = os.umask(0)
    os.umask(mask)
    for path in [directory, *Path(directory).rglob("*")]:
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)
    return directory


def save_pretrained_quietly(model: Any, directory: Path, **kwargs) -> None:
    """``model.save_pretrained(directory, **kwargs)`` without transformers' "Writing model shards" progress bar,
    which would otherwise interleave with the training bar at every checkpoint. A peft model saves its adapters
    only: the vocabulary is never resized here, and peft's check for that would look the base model's config up
    on the hub at every save."""
    from transformers.utils import logging as hf_logging

    if getattr(model, "peft_config", None):
        kwargs.setdefault("save_embedding_layers", False)
    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(directory, **kwargs)
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _scalars(row: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a metrics row, ``step`` left out: what the trackers plot."""
    return {k: float(v) for k, v in row.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def _jsonable(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def progress_bar(total: int, desc: str, unit: str, enabled: bool = True, leave: bool | None = None):
    """A tqdm bar on stderr in the style of the training bar, counting ``total`` ``unit``s (a no-op when not
    ``enabled``: ``run.progress: false``). Every update is drawn (the units are whole batches of prompts or
    steps, seconds apart). ``leave=None``: kept when it is the only bar, cleared when it sits under another
    (an evaluation inside a training run, whose result the recorder prints as a line)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, file=sys.stderr, disable=not enabled,
                leave=leave, mininterval=0, miniters=1)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class RunRecorder:
    """Writes the records of one run; ``log(step, metrics)`` appends one JSON object per step."""

    def __init__(self, run_dir: str | Path, config: dict, resume_step: int | None = None,
                 trackers: Sequence[Any] = (), log_every: int = 1, total_steps: int | None = None,
                 progress: bool = True):
        self.dir = Path(run_dir)
        self._t0, self._t_steps, self._steps, self._evals = time.perf_counter(), None, 0, {}
        self._t_last = None  # when the last step was logged
        self._started, self._elapsed0 = _now(), 0.0  # this session's start; the time before it (resumed)
        self.dir.mkdir(parents=True, exist_ok=True)
        write_atomic(self.dir / "config.yaml", yaml.safe_dump(config, sort_keys=False))
        self.metrics_path = self.dir / "metrics.jsonl"
        kept = []
        if resume_step is not None and self.metrics_path.exists():
            for line in self.metrics_path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a kill
                    continue
                if row.get("step", math.inf) <= resume_step:
                    kept.append(line)
                    if isinstance(row.get("time/elapsed_s"), (int, float)):
                        self._elapsed0 = float(row["time/elapsed_s"])
        write_atomic(self.metrics_path, "".join(line + "\n" for line in kept))
        self._file = open(self.metrics_path, "a")
        self.log_every = max(1, log_every)
        self._trackers = list(trackers)  # open TensorBoard, W&B, MLflow runs (rlmt.trackers.open_trackers)
        self._bar = None
        if progress and total_steps:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=resume_step or 0, desc="train", unit="step",
                             dynamic_ncols=True, file=sys.stderr)
        self._last_step = resume_step or 0

    def start_steps(self) -> None:
        """The training steps begin now: the progress bar's rate and ETA count from here, not from before the
        model load and the evaluation that precede the first step."""
        self._t_steps = time.perf_counter()
        if self._bar is not None:
            self._bar.start_t = self._bar.last_print_t = self._bar._time()
            self._bar.refresh()

    def evaluation(self, tag: str, figures: dict[str, float], shown: str) -> None:
        """A before/after evaluation's figures: a line now (``shown``), and the summary at :meth:`close`."""
        self._evals[tag] = figures
        self.note(f"eval {tag}: {shown}")

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        self._steps += 1
        if self._t_steps is None:
            self._t_steps = self._t0
        self._last_step, self._t_last = step, time.perf_counter()
        row = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}, "time/elapsed_s": self.elapsed()}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._trackers:
            values = _scalars(row)
            for tracker in self._trackers:
                tracker.log(step, values)
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix({k: row[k] for k in ("loss", "reward/mean") if isinstance(row.get(k), float)})
            if self._bar.n >= self._bar.total:  # closed now: its last rate is the steps', not the evaluation's after
                self._bar.close()
        elif step % self.log_every == 0:
            shown = {k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in row.items() if not k.startswith("time/")}
            print(json.dumps(shown), file=sys.stderr)

    def note(self, text: str) -> None:
        """A line for the human (kept out of metrics.jsonl)."""
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr)

    def elapsed(self) -> float:
        """Seconds of the run's wall time so far (see the module docstring)."""
        return self._elapsed0 + time.perf_counter() - self._t0

    def _training_s(self) -> float:
        """This session's seconds from :meth:`start_steps` to the last step logged."""
        return self._t_last - self._t_steps if self._t_last is not None and self._t_steps is not None else 0.0

    def summary(self) -> str:
        """One line: the steps this process ran, their time and the run's, and each figure evaluated before
        and after (``pass@1``, ``accuracy``, ...)."""
        wall, training = time.perf_counter() - self._t0, self._training_s()
        line = f"run: {self._steps} steps in {training / 60:.1f} min of training, {wall / 60:.1f} min in all"
        before, after = self._evals.get("before", {}), self._evals.get("after", {})
        shared = [k for k in after if k in before and isinstance(after[k], (int, float))][:3]
        if shared:
            line += "; " + ", ".join(f"{k} {before[k]:.3f} -> {after[k]:.3f}" for k in shared)
        elif after:
            line += "; after: " + ", ".join(f"{k} {v:.3f}" for k, v in list(after.items())[:3]
                                           if isinstance(v, (int, float)))
        return line

    def close(self) -> None:
        """Close the files and bar, write ``summary.json`` and print :meth:`summary`."""
        self._file.close()
        write_atomic(self.dir / "summary.json", json.dumps({
            "steps": self._last_step, "wall_s": self.elapsed(), "resumed_at_s": self._elapsed0,
            "training_s": self._training_s(), "started": self._started, "ended": _now()}, indent=1) + "\n")
        for tracker in self._trackers:
            tracker.close()
        if self._bar is not None:
            self._bar.close()
        print(self.summary(), file=sys.stderr, flush=True)


class QuietRecorder:
    """The recorder of a rank other than 0 on several processes: rank 0 writes the one record of the run."""

    def start_steps(self) -> None:
        pass

    def evaluation(self, tag: str, figures: dict[str, float], shown: str) -> None:
        pass

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        pass

    def note(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The rows of ``RUN_DIR/metrics.jsonl`` (a file path works too); lines cut by a kill are skipped."""
    path = Path(run_dir)
    path = path if path.suffix == ".jsonl" else path / "metrics.jsonl"
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows
