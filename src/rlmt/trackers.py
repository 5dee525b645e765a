"""Experiment trackers beside ``metrics.jsonl``: TensorBoard, Weights & Biases, MLflow (``run.trackers``).

Each is driven through its own library, imported when a run opens it, on rank 0 only (the other ranks'
recorder writes nothing). At the start every tracker gets the resolved config, flattened to dotted keys
(:func:`flat_params`: ``optim.lr``, ``stages.0.algorithm``), as the run's parameters (W&B ``config``, MLflow
params, TensorBoard's text summary ``config``); then each step's numeric metrics at that step.

Where they write, unless ``run.tracker_args`` says otherwise:

- ``tensorboard``: ``<run.output_dir>/tensorboard``.
- ``wandb``: ``wandb.init(project="rlmt", name=<run directory name>, dir=<run.output_dir>, config=...)``,
  each of the three only where ``WANDB_PROJECT``, ``WANDB_NAME``, ``WANDB_DIR`` is unset;
  ``run.tracker_args.wandb`` is passed to ``wandb.init`` as is (``mode: offline``, ``project``, ``entity``,
  ``tags``, ...), and the user's other ``WANDB_*`` variables (``WANDB_MODE=offline``) apply as W&B documents
  them. Offline runs land in ``<run.output_dir>/wandb/offline-run-*`` (``wandb sync`` uploads them).
- ``mlflow``: a run in experiment ``run.tracker_args.mlflow.experiment_name``, else ``MLFLOW_EXPERIMENT_NAME``,
  else ``rlmt``, of the tracking URI ``run.tracker_args.mlflow.tracking_uri``, else ``MLFLOW_TRACKING_URI``,
  else a file store ``<run.output_dir>/mlruns``. MLflow 3 keeps its file store in
  maintenance mode and refuses to open one unless ``MLFLOW_ALLOW_FILE_STORE=true``: opening a ``file:`` store,
  rlmt sets that variable when it is unset (reading the store back, ``mlflow ui`` included, needs it too).
  Other keys: ``run_name`` (default: the run directory's name), ``tags``.

A resumed run is a new tracker run (named like the first, tagged ``rlmt.resumed_from_step``) whose metrics start
after the checkpoint's step.
"""

from __future__ import annotations

import inspect
import json
import os
import time
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Protocol

from rlmt.config.sections import ConfigError

PACKAGES = {  # tracker (rlmt.config.sections.TRACKER_SETTINGS): (the module it needs, the rlmt extra installing it)
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow"),
}


def tracker_names(run: Any) -> tuple[str, ...]:
    """The trackers a run opens: ``run.trackers``, and ``tensorboard`` when ``run.tensorboard`` is true."""
    names = tuple(run.trackers)
    return names + ("tensorboard",) if run.tensorboard and "tensorboard" not in names else names


def check_trackers(run: Any) -> None:
    """A :class:`ConfigError` naming ``run.trackers`` and the extra to install when a tracker's package is not
    installed, or naming ``run.tracker_args.wandb`` when it holds what ``wandb.init`` does not take. Needs no
    model: a run calls it before anything loads."""
    for name in tracker_names(run):
        module, extra = PACKAGES[name]
        if find_spec(module) is None:
            via = "run.trackers" if name in run.trackers else "run.tensorboard=true"
            raise ConfigError(f"{via}: the {name} tracker needs the {module} package: pip install 'rlmt[{extra}]'")
    wandb_args = run.tracker_args.get("wandb") or {}
    if "wandb" in run.trackers and wandb_args:
        import wandb

        known = set(inspect.signature(wandb.init).parameters) - {"config"}
        unknown = sorted(set(wandb_args) - known)
        if unknown:
            raise ConfigError(f"run.tracker_args.wandb: {unknown} are not arguments of wandb.init "
                              f"(wandb {wandb.__version__}); config is the run's own")


def flat_params(config: dict, prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 1e-5}, "stages": [{"algorithm": "sft"}]}`` -> ``{"optim.lr": 1e-5,
    "stages.0.algorithm": "sft"}``: mappings, and lists of mappings, become dotted keys; other lists stay
    values."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            value = {str(i): v for i, v in enumerate(value)}
        if isinstance(value, dict) and value:
            out.update(flat_params(value, name + "."))
        else:
            out[name] = value
    return out


class Tracker(Protocol):
    """An open tracker run: ``log`` a step's numbers, ``close`` at the end."""

    def log(self, step: int, values: dict[str, float]) -> None: ...

    def close(self) -> None: ...


class TensorBoard:
    """A ``SummaryWriter``: a scalar per metric, the config as the text summary ``config``."""

    def __init__(self, run_dir: Path, params: dict[str, Any], args: dict[str, Any], resume_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(args.get("log_dir", run_dir / "tensorboard")))
        self.writer.add_text("config", "\n".join(f"    {k}: {json.dumps(v)}" for k, v in params.items()),
                             resume_step or 0)

    def log(self, step: int, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        self.writer.close()


class WandB:
    """A ``wandb.init`` run: the config as its ``config``, each step's metrics with ``run.log(..., step=)``."""

    def __init__(self, run_dir: Path, params: dict[str, Any], args: dict[str, Any], resume_step: int | None):
        import wandb

        defaults = {"project": ("WANDB_PROJECT", "rlmt"), "name": ("WANDB_NAME", run_dir.name),
                    "dir": ("WANDB_DIR", str(run_dir))}  # where the user's variable is unset
        kwargs = {k: v for k, (env, v) in defaults.items() if not os.environ.get(env)} | args
        if kwargs.get("dir"):
            Path(kwargs["dir"]).mkdir(parents=True, exist_ok=True)
        config = {**params, **({"rlmt.resumed_from_step": resume_step} if resume_step is not None else {})}
        self.run = wandb.init(**kwargs, config=config)

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class MLflow:
    """An MLflow run through ``MlflowClient`` (no global active run): the config as params, metrics by step."""

    # MLflow's names: alphanumerics, _ - . / and spaces; values of params up to 6000 characters
    _NAME_OK = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-./ ")

    def __init__(self, run_dir: Path, params: dict[str, Any], args: dict[str, Any], resume_step: int | None):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = args.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI") or (run_dir / "mlruns").resolve().as_uri()
        if uri.startswith("file:") or "://" not in uri:
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # see the module docstring
        self.client = MlflowClient(uri)
        name = args.get("experiment_name") or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "rlmt"
        found = self.client.get_experiment_by_name(name)
        experiment = found.experiment_id if found is not None else self.client.create_experiment(name)
        tags = {str(k): str(v) for k, v in (args.get("tags") or {}).items()}
        if resume_step is not None:
            tags["rlmt.resumed_from_step"] = str(resume_step)
        self.run_id = self.client.create_run(experiment, run_name=args.get("run_name", run_dir.name),
                                             tags=tags).info.run_id
        self.client.log_batch(self.run_id, params=[Param(self._name(k), self._value(v)) for k, v in params.items()])

    @classmethod
    def _name(cls, key: str) -> str:
        return "".join(c if c in cls._NAME_OK else "_" for c in key)

    @staticmethod
    def _value(v: Any) -> str:
        text = v if isinstance(v, str) else json.dumps(v)
        return text if len(text) <= 6000 else text[:5997] + "..."

    def log(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(self._name(k), v, now, step) for k, v in values.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


_OPEN = {"tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow}


def open_trackers(names: tuple[str, ...] | list[str], args: dict[str, Any], run_dir: Path, config: dict,
                  resume_step: int | None) -> list[Tracker]:
    """Start each named tracker's run with ``args[name]`` and the flattened ``config`` as its parameters (each has
    ``log(step, values)`` and ``close()``: what :class:`rlmt.records.RunRecorder` drives)."""
    params = flat_params(config)
    return [_OPEN[name](Path(run_dir), params, dict((args or {}).get(name) or {}), resume_step) for name in names]
