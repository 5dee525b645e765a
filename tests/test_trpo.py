"""TRPO on a tiny model: the accepted step keeps the exact KL bound and improves the surrogate (both recomputed
independently), the Fisher-vector product is the derivative of the KL gradient, conjugate gradient solves
an SPD system, the trust region scales the step, and a rejected step restores the parameters bit for bit."""

import copy

import pytest
import torch

import rlmt.train.trpo as trpo
from rlmt.config import load_config
from rlmt.data import PromptFormat, encode_prompt
from rlmt.models import load_model
from rlmt.records import read_metrics
from rlmt.rollout import SamplingParams, generate
from rlmt.train.estimators import advantages_for
from rlmt.train.experience import Experience, UpdateContext
from rlmt.train.methods import METHODS, update_step
from rlmt.train.runner import train
from rlmt.train.session import apply_lora

REWARDS = torch.tensor([1.0, 0, 0, 1, 0, 0, 0, 1, 1, 0.5, 0, 0])


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny-model products are latency-bound: on these 2-core machines 2 threads made them ~10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def lm():
    return load_model("tiny-random")


@pytest.fixture(scope="module")
def rollout(lm):
    fmt = PromptFormat()
    prompts = [encode_prompt(lm.tokenizer, fmt, p) for p in ("hello", "what is 2+2", "say a word")]
    return generate(lm.model, lm.tokenizer, prompts, SamplingParams(4, 1.0, max_new_tokens=6),
                    torch.Generator().manual_seed(0))


def _setup(lm, rollout, rewards=REWARDS, **kw):
    over = {"algorithm": "trpo", "model.name": "tiny-random", "pg.beta": 0, "rollout.num_samples": 4,
            "optim.batch_size": 12, "trpo.cg_iters": 4, **kw}
    cfg = load_config(None, [f"{k}={v}" for k, v in over.items()])
    model = copy.deepcopy(lm.model)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    ctx = UpdateContext(model, None, model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), cfg, {}, None,
                        METHODS["trpo"])
    return ctx, Experience(rollout, rewards, rollout.response_mask.clone(), None, 4, 1.0)


def _independent_logp(model, batch):
    """(N, T, V) log pi at the response positions from a plain full forward."""
    pos = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(batch.input_ids, attention_mask=batch.attention_mask, position_ids=pos).logits
    logits = logits if logits.dtype == torch.float64 else logits.float()
    return torch.log_softmax(logits, -1)[:, batch.prompt_len - 1:-1]


def _kl(old, new, mask):
    """Mean over response tokens of the exact KL(pi_old || pi_new) over the vocabulary."""
    return ((old.exp() * (old - new)).sum(-1) * mask).sum() / mask.sum()


def _surrogate(logp, old, batch, adv):
    tok = lambda x: x.gather(-1, batch.response_ids[..., None]).squeeze(-1)  # noqa: E731
    m = batch.response_mask.float()
    return ((tok(logp) - tok(old)).exp() * adv[:, None] * m).sum() / m.sum()


def test_accepted_step_keeps_kl_bound_and_improves_surrogate(lm, rollout):
    ctx, exp = _setup(lm, rollout, **{"trpo.max_kl": 0.01, "optim.batch_size": 8})  # 2 micro-batches
    with torch.no_grad():
        old = _independent_logp(ctx.policy, rollout)
    metrics = update_step(ctx, exp)
    assert metrics["trpo/accepted"] == 1.0 and metrics["skipped_steps"] == 0.0
    with torch.no_grad():
        new = _independent_logp(ctx.policy, rollout)
    kl = float(_kl(old, new, rollout.response_mask))
    assert 0.0 < kl <= 0.01
    assert kl == pytest.approx(metrics["trpo/kl"], rel=1e-3)
    adv, _ = advantages_for(REWARDS, 4, ctx.cfg.pg, None)
    before, after = float(_surrogate(old, old, rollout, adv)), float(_surrogate(new, old, rollout, adv))
    assert after - before > 0
    assert metrics["trpo/surrogate_gain"] == pytest.approx(after - before, rel=1e-3)
    assert metrics["loss"] == pytest.approx(-after, rel=1e-4)
    assert metrics["lr"] == 0.0 and metrics["grad_norm"] > 0


@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_fisher_vector_product_is_derivative_of_kl_gradient(lm, rollout, fraction):
    """F v against a finite difference of the KL gradient; with trpo.fisher_fraction 0.5 the KL is the mean
    over samples 0 and 2 of each group of 4 only."""
    ctx, exp = _setup(lm, rollout, **{"optim.batch_size": 8, "trpo.fisher_fraction": fraction})
    ctx.policy.double()
    prob = trpo.TrustRegionProblem(ctx, exp, torch.ones(12, dtype=torch.float64))
    prob.surrogate_gradient()  # records pi_old
    theta = trpo.flat_params(prob.params)
    v = torch.randn(theta.shape, generator=torch.Generator().manual_seed(1), dtype=theta.dtype)
    fv = prob.fisher_vector_product(v, damping=0.0)
    with torch.no_grad():
        old = _independent_logp(ctx.policy, rollout)

    chosen = (torch.arange(12) % 4) % round(1 / fraction) == 0
    mask = rollout.response_mask * chosen[:, None]

    def kl_grad(t):
        trpo.set_flat_params(prob.params, t)
        kl = _kl(old, _independent_logp(ctx.policy, rollout), mask)
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(kl, prob.params, materialize_grads=True)])

    eps = 1e-4  # float64 model; its RMSNorm still rounds through float32, so agreement is ~1e-4, not 1e-8
    fd = (kl_grad(theta + eps * v) - kl_grad(theta - eps * v)) / (2 * eps)
    trpo.set_flat_params(prob.params, theta)
    assert float((fv - fd).norm() / fd.norm()) < 1e-3
    assert float(v @ fv) > 0  # positive definite along v
    damped = prob.fisher_vector_product(v, damping=0.1)
    assert torch.allclose(damped, fv + 0.1 * v)


def test_conjugate_gradient_solves_spd_system():
    A = torch.tensor([[4.0, 1.0], [1.0, 3.0]])
    x, residual, ax = trpo.conjugate_gradient(lambda v: A @ v, torch.tensor([1.0, 2.0]), iters=2)
    assert torch.allclose(ax, A @ x)  # F x from the carried residual
    assert torch.allclose(x, torch.tensor([1 / 11, 7 / 11]))  # (4*1 + 7) / 11 = 1, (1 + 21) / 11 = 2
    assert residual < 1e-5
    # one iteration is steepest descent: alpha = b.b / b.Ab = 5 / 20, x = b / 4, r = b - A b / 4 = (-1/2, 1/4)
    x1, r1, ax1 = trpo.conjugate_gradient(lambda v: A @ v, torch.tensor([1.0, 2.0]), iters=1)
    assert torch.allclose(x1, torch.tensor([0.25, 0.5])) and r1 == pytest.approx(0.3125 ** 0.5)
    assert torch.allclose(ax1, A @ x1)
    x_nan, _, _ = trpo.conjugate_gradient(lambda v: v * float("nan"), torch.tensor([1.0, 2.0]), iters=2)
    assert torch.isnan(x_nan).all()


def test_trust_region_size_scales_the_step(lm, rollout):
    out = {}
    for max_kl in (1e-4, 1e-2):
        ctx, exp = _setup(lm, rollout, **{"trpo.max_kl": max_kl})
        out[max_kl] = update_step(ctx, exp)
        assert out[max_kl]["trpo/accepted"] == 1.0 and out[max_kl]["trpo/kl"] <= max_kl
    small, large = out[1e-4], out[1e-2]
    assert small["trpo/step_norm"] < large["trpo/step_norm"]
    # in the quadratic regime KL ~ step^2: 100x the region gives ~10x the step and ~100x the KL
    norm_ratio = (large["trpo/step_norm"] / large["trpo/step_fraction"]) / (
        small["trpo/step_norm"] / small["trpo/step_fraction"])
    assert norm_ratio == pytest.approx(10.0, rel=1e-3)
    expected = 100 * (large["trpo/step_fraction"] / small["trpo/step_fraction"]) ** 2
    assert 0.5 * expected < large["trpo/kl"] / small["trpo/kl"] < 2 * expected


def test_lora_step_moves_only_the_adapters(lm, rollout):
    ctx, exp = _setup(lm, rollout, **{"model.lora.r": 4, "trpo.max_kl": 0.01})
    ctx.policy = apply_lora(ctx.policy, ctx.cfg.model)
    before = {k: v.clone() for k, v in ctx.policy.state_dict().items()}
    metrics = update_step(ctx, exp)
    assert metrics["trpo/accepted"] == 1.0 and 0 < metrics["trpo/kl"] <= 0.01
    moved = [k for k, v in ctx.policy.state_dict().items() if not torch.equal(v, before[k])]
    assert moved and all("lora_" in k for k in moved)


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("case", ["no_backtrack_steps", "zero_advantages", "no_improvement", "nan_fisher"])
def test_rejected_step_restores_parameters_exactly(lm, rollout, monkeypatch, case):
    kw = {"trpo.backtrack_steps": 0} if case == "no_backtrack_steps" else {"trpo.backtrack_steps": 3}
    ctx, exp = _setup(lm, rollout, torch.zeros(12) if case == "zero_advantages" else REWARDS, **kw)
    tried = []
    if case == "no_improvement":  # the real line search, told the old surrogate was unbeatable
        real = trpo.line_search
        monkeypatch.setattr(trpo, "line_search", lambda ev, *a: real(lambda t: tried.append(1) or ev(t), a[0], a[1],
                                                                      float("inf"), *a[3:]))
    if case == "nan_fisher":
        monkeypatch.setattr(trpo.TrustRegionProblem, "fisher_vector_product", lambda self, v, d: v * float("nan"))
    before = _params(ctx.policy)
    metrics = update_step(ctx, exp)
    assert metrics["trpo/accepted"] == 0.0 and metrics["trpo/kl"] == 0.0
    assert metrics["skipped_steps"] == (1.0 if case == "nan_fisher" else 0.0)
    assert all(torch.equal(a, b) for a, b in zip(before, _params(ctx.policy)))
    if case == "no_improvement":
        assert len(tried) == 3  # the trials moved the parameters; the restore undid them
    if case == "zero_advantages":
        assert metrics["grad_norm"] == 0.0


def test_line_search_takes_first_acceptable_fraction():
    calls = []

    def evaluate(theta):
        calls.append(float(theta[0]))
        return {"kl": float(theta[0]) ** 2, "surrogate": float(theta[0])}

    frac, ev = trpo.line_search(evaluate, torch.zeros(1), torch.ones(1), 0.0, max_kl=0.1, steps=5, ratio=0.5)
    assert calls == [1.0, 0.5, 0.25] and frac == 0.25 and ev["kl"] == 0.0625


def test_end_to_end_from_config(tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(f'{{"prompt": "say {w}"}}\n' for w in ("a", "b", "c", "d")))
    yaml_path = tmp_path / "cfg.yaml"
    yaml_path.write_text(f"""
algorithm: trpo
model: {{name: tiny-random}}
data: {{train: {data}}}
rollout: {{num_samples: 4, batch_prompts: 2, max_new_tokens: 6, temperature: 1.0}}
reward: {{source: regex, args: {{pattern: "[a-m]"}}}}
trpo: {{max_kl: 0.02, cg_iters: 5}}
optim: {{max_steps: 2, batch_size: 4}}
run: {{output_dir: {tmp_path / 'run'}, progress: false}}
""")
    run = train(load_config(yaml_path))
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["skipped_steps"] == 0 and r["trpo/kl"] <= 0.02 and r["trpo/accepted"] in (0.0, 1.0)
        assert "loss" in r and "approx_kl" in r and "kl" in r  # pg.beta > 0 by default: KL to the reference
    assert (run / "final" / "config.json").exists()
