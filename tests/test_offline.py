"""The offline loop, whole runs of every task: batch 1 x accumulation 4 == batch 4 x accumulation 1 (final
weights, heads and the logged metrics), the split-invariance each task's normalizer promises."""

from pathlib import Path

import pytest
import torch

from rlmt.config import load_config
from rlmt.records import read_metrics
from rlmt.train.runner import train

DATA = Path(__file__).resolve().parents[1] / "examples" / "data"

TASKS = {
    "sft": ["algorithm=sft", f"data.train={DATA / 'addition-sft.jsonl'}"],
    "sft-packed": ["algorithm=sft", f"data.train={DATA / 'addition-sft.jsonl'}", "sft.packing=true",
                   "sft.pack_length=128"],
    "dpo": ["algorithm=dpo", f"data.train={DATA / 'addition-pref-train.jsonl'}"],
    "reward_model": ["algorithm=reward_model", f"data.train={DATA / 'addition-pref-train.jsonl'}"],
    "process_reward_model": ["algorithm=process_reward_model", f"data.train={DATA / 'steps-train.jsonl'}"],
}
# the per-unit means each task logs (weighted over micro-batches, they equal the whole step's)
MEANS = {"dpo": ["rewards/accuracy", "rewards/margin", "rewards/chosen"],
         "reward_model": ["rewards/accuracy", "rewards/margin", "rewards/chosen"],
         "process_reward_model": ["step_accuracy"]}


def _initial_weights() -> dict[str, torch.Tensor]:
    from rlmt.models import load_model

    return load_model("tiny-random").model.state_dict()  # run.seed 0: the weights every run starts from


def _final(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    weights = load_file(run / "final" / "model.safetensors")
    for head in sorted((run / "final").glob("*_head.pt")):
        weights.update({f"{head.stem}.{k}": v for k, v in torch.load(head).items()})
    return weights


def _run(tmp_path: Path, task: str, batch_size: int, grad_accum: int) -> Path:
    # AdamW's eps is large so that its first steps are ~ lr * g (an SGD-like step): with eps 1e-8 the update
    # is ~ lr * sign(g), which turns float noise in near-zero gradients into differences of up to 2 lr.
    out = tmp_path / f"{task}-{batch_size}x{grad_accum}"
    train(load_config(None, [*TASKS[task], "model.name=tiny-random", f"run.output_dir={out}", "data.limit=8",
                             f"optim.batch_size={batch_size}", f"optim.grad_accum={grad_accum}", "optim.max_steps=2",
                             "optim.lr=0.5", "optim.eps=1.0", "optim.max_grad_norm=0", "run.progress=false",
                             "runtime.threads=1"]))
    return out


@pytest.mark.parametrize("task", sorted(TASKS))
def test_accumulation_1x4_equals_4x1(tmp_path, task):
    accumulated, whole = _run(tmp_path, task, 1, 4), _run(tmp_path, task, 4, 1)
    a, b = _final(accumulated), _final(whole)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=0), k
    start = _initial_weights()
    assert max(float((a[k] - start[k]).abs().max()) for k in a if k in start) > 1e-3  # the weights did move
    ma, mb = read_metrics(accumulated), read_metrics(whole)
    assert [r["step"] for r in ma] == [r["step"] for r in mb] == [1, 2]
    for ra, rb in zip(ma, mb):
        for k in ["loss", "grad_norm", *MEANS.get(task, [])]:
            # step 2 runs at weights that differ by the float order of step 1's sums, moved by lr 0.5: on an
            # AVX2 CPU the reward model's grad_norm then differs by 1.5e-5 relative
            assert ra[k] == pytest.approx(rb[k], rel=1e-4, abs=1e-6), k

