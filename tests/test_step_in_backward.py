"""optim.step_in_backward: the per-parameter update inside backward equals the ordinary AdamW step."""

import copy
import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlmt.config import ConfigError, OptimConfig, load_config
from rlmt.models import load_model
from rlmt.train.optim import build_optimizer, guarded_step
from rlmt.train.runner import train


def _loss(model, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 250, (3, 9), generator=g)
    return model(input_ids=ids, labels=ids).loss


def _steps(model, in_backward: bool, n=3, weight_decay=0.01):
    model = copy.deepcopy(model)
    cfg = OptimConfig(lr=1e-2, weight_decay=weight_decay, max_grad_norm=0.0, step_in_backward=in_backward,
                      warmup_steps=2, schedule="linear")
    opt, sched = build_optimizer(model, cfg, total_steps=n)
    metrics = []
    for s in range(n):
        _loss(model, s).backward()
        if in_backward:  # the hooks applied the update and freed every gradient during backward
            assert all(p.grad is None for p in model.parameters())
        metrics.append(guarded_step(model, opt, sched, 0.0))
    return model, opt, metrics


def test_in_backward_equals_ordinary_adamw_step():
    lm = load_model("tiny-random")
    a, opt_a, met_a = _steps(lm.model, False)
    b, opt_b, met_b = _steps(lm.model, True)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(pa, pb, atol=1e-6, rtol=1e-5), n
    moved = sum(float((p - p0).detach().abs().sum()) for p, p0 in zip(b.parameters(), lm.model.parameters()))
    assert moved > 1e-3
    # same optimizer state (so checkpoints are interchangeable), same metrics
    sa, sb = opt_a.state_dict(), opt_b.state_dict()
    assert sa["state"].keys() == sb["state"].keys()
    for k in sa["state"]:
        assert torch.allclose(sa["state"][k]["exp_avg_sq"], sb["state"][k]["exp_avg_sq"], rtol=1e-5, atol=1e-12)
        assert float(sa["state"][k]["step"]) == float(sb["state"][k]["step"]) == 3
    for x, y in zip(met_a, met_b):
        assert x["lr"] == y["lr"] and x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4)
        assert y["skipped_steps"] == 0 and y["skipped_params"] == 0


def test_non_finite_gradient_skips_that_parameter_only():
    lm = load_model("tiny-random")
    model = copy.deepcopy(lm.model)
    opt, sched = build_optimizer(model, OptimConfig(lr=1e-2, max_grad_norm=0.0, step_in_backward=True), 1)
    bad = model.model.layers[0].mlp.down_proj.weight
    bad.register_hook(lambda g: torch.full_like(g, float("nan")))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _loss(model, 0).backward()
    m = guarded_step(model, opt, sched, 0.0)
    assert m["skipped_params"] == 1 and m["skipped_steps"] == 1 and math.isnan(m["grad_norm"])
    after = dict(model.named_parameters())
    assert torch.equal(after["model.layers.0.mlp.down_proj.weight"], before["model.layers.0.mlp.down_proj.weight"])
    assert not torch.equal(after["model.layers.1.mlp.down_proj.weight"], before["model.layers.1.mlp.down_proj.weight"])
    assert bad.grad is None


@pytest.mark.parametrize("extra,key", [
    (["optim.max_grad_norm=1.0"], "optim.max_grad_norm"),
    (["optim.max_grad_norm=0", "optim.grad_accum=2"], "optim.grad_accum"),
    (["optim.max_grad_norm=0", "algorithm=grpo", "optim.batch_size=8"], "optim.batch_size"),
    (["optim.max_grad_norm=0", "algorithm=trpo", "optim.batch_size=64"], "optim.step_in_backward"),
])
def test_config_refuses_what_it_cannot_do(extra, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, ["optim.step_in_backward=true", *extra])


def _weights(run):
    return AutoModelForCausalLM.from_pretrained(run / "final").state_dict()


def _prompts(tmp_path):
    rows = [{"prompt": f"Write a word with letter {c}", "answer": c} for c in "abcdefgh"]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _pairs(tmp_path):
    rows = [{"prompt": f"Say {i}", "chosen": f"{i} {i * 7}", "rejected": f"no {i}"} for i in range(8)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("algorithm", ["grpo", "dpo"])
def test_training_run_in_backward_equals_ordinary_run(tmp_path, algorithm):
    """Whole runs from a config (gradient checkpointing on, so the prompt-shared forward is replayed in
    backward too): the same final weights with and without the step in backward."""
    if algorithm == "grpo":
        base = [f"data.train={_prompts(tmp_path)}", "reward.source=regex", "reward.args={pattern: '[a-m]'}",
                "rollout.num_samples=4", "rollout.batch_prompts=2", "rollout.max_new_tokens=6", "optim.batch_size=8",
                "pg.beta=0.04"]
    else:
        base = [f"data.train={_pairs(tmp_path)}", "optim.batch_size=4"]
    base += [f"algorithm={algorithm}", "model.name=tiny-random", "optim.max_steps=3", "optim.lr=1e-3",
             "optim.max_grad_norm=0", "model.gradient_checkpointing=true", "run.progress=false"]
    a = train(load_config(None, base + [f"run.output_dir={tmp_path / 'a'}"]))
    b = train(load_config(None, base + [f"run.output_dir={tmp_path / 'b'}", "optim.step_in_backward=true"]))
    wa, wb = _weights(a), _weights(b)
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-6, rtol=1e-5), k
    init = load_model("tiny-random").model.state_dict()
    assert any(not torch.allclose(wb[k], init[k]) for k in wb)
