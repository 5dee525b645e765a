"""PPO on a tiny model: the value head starts at 0, GAE matches a hand loop, the update equals an
independently computed gradient, is accumulation-invariant, trains the value head, and runs and resumes
end to end from a config."""

import copy
import math
import shutil

import pytest
import torch

from rlmt.config import load_config
from rlmt.data import PromptFormat, encode_prompt
from rlmt.models import load_model
from rlmt.objectives import gae
from rlmt.records import read_metrics
from rlmt.rollout import SamplingParams, generate
from rlmt.train.experience import Experience, UpdateContext
from rlmt.train.methods import METHODS, update_step
from rlmt.train.ppo import make_value_head, response_logprobs_and_values
from rlmt.train.runner import train

G = 4


@pytest.fixture(scope="module")
def lm():
    return load_model("tiny-random")


@pytest.fixture(scope="module")
def rollout(lm):
    prompts = [encode_prompt(lm.tokenizer, PromptFormat(), p) for p in ("hello", "what is 2+2", "say a word")]
    return generate(lm.model, lm.tokenizer, prompts, SamplingParams(G, 1.0, max_new_tokens=6),
                    torch.Generator().manual_seed(0))


def _cfg(**kw):
    over = ["algorithm=ppo", "model.name=tiny-random", "optim.max_grad_norm=0", f"rollout.num_samples={G}",
            "rollout.max_new_tokens=6", "pg.aggregation=token_mean"]
    return load_config(None, over + [f"{k}={v}" for k, v in kw.items()])


REWARDS = torch.tensor([1.0, 0, float("nan"), 1, 0, 0, 0, 0, 1, 1, 1, 0])


def _experience(batch, beta, rewards=REWARDS):
    mask = batch.response_mask & torch.isfinite(rewards)[:, None]
    ref = None
    if beta > 0:  # a reference that differs from pi_old, so the KL term is not zero
        noise = 0.3 * torch.randn(batch.logprobs.shape, generator=torch.Generator().manual_seed(1))
        ref = torch.where(batch.response_mask, batch.logprobs + noise, torch.zeros_like(noise))
    return Experience(batch, rewards, mask, ref, G, 1.0)


def _sgd_ppo(model, cfg, exp, lr=1.0):
    """One ppo_update with plain SGD on copies; returns (policy, head, deltas of policy and head, metrics)."""
    policy = copy.deepcopy(model)
    head = make_value_head(policy, cfg)
    trainable = torch.nn.ModuleList([policy, head])
    before = [p.detach().clone() for p in trainable.parameters()]
    opt = torch.optim.SGD(trainable.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    metrics = update_step(UpdateContext(policy, head, trainable, opt, sched, cfg, {}, None, METHODS["ppo"]), exp)
    return policy, head, [p.detach() - b for p, b in zip(trainable.parameters(), before)], metrics


def _gae_loop(rewards, values, mask, gamma, lam):
    """GAE by hand, one row at a time over its response tokens."""
    adv = torch.zeros_like(values)
    for b in range(values.shape[0]):
        ts = [t for t in range(values.shape[1]) if mask[b, t]]
        next_v, next_a = 0.0, 0.0
        for t in reversed(ts):
            delta = float(rewards[b, t]) + gamma * next_v - float(values[b, t])
            next_a = delta + gamma * lam * next_a
            adv[b, t], next_v = next_a, float(values[b, t])
    return adv, torch.where(mask, adv + values, torch.zeros_like(adv))


def _token_rewards(exp, beta):
    """r_t = -beta * (log pi_old - log pi_ref) on every token, plus the score on the last, by hand."""
    r = torch.zeros_like(exp.batch.logprobs)
    for b in range(r.shape[0]):
        ts = exp.mask[b].nonzero().flatten().tolist()
        for t in ts:
            if exp.ref_logprobs is not None:
                r[b, t] = -beta * (exp.batch.logprobs[b, t] - exp.ref_logprobs[b, t])
        if ts:
            r[b, ts[-1]] += exp.rewards[b]
    return r


def test_value_head_starts_at_zero_and_gae_with_zero_values_is_reward_to_go(lm, rollout):
    cfg = _cfg()
    head = make_value_head(lm.model, cfg)
    with torch.no_grad():
        lp, values = response_logprobs_and_values(lm.model, head, rollout, torch.arange(3), G, 1.0)
    assert torch.all(values == 0)
    m = rollout.response_mask
    assert torch.allclose(lp[m], rollout.logprobs[m], atol=1e-5)  # same log-probs as the sampler's
    rewards = torch.randn(m.shape, generator=torch.Generator().manual_seed(2))
    gamma = 0.9
    adv, ret = gae(rewards, values, m, gamma, lam=1.0)
    for b in range(m.shape[0]):
        n = int(m[b].sum())
        for t in range(n):  # with V = 0 and lam = 1: A_t = R_t = sum_{k >= t} gamma^(k-t) r_k
            to_go = sum(gamma ** (k - t) * float(rewards[b, k]) for k in range(t, n))
            assert float(adv[b, t]) == pytest.approx(to_go, abs=1e-5)
            assert float(ret[b, t]) == pytest.approx(to_go, abs=1e-5)
    v = torch.randn(m.shape, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(gae(rewards, v, m, 0.95, 0.9)[0], _gae_loop(rewards, v, m, 0.95, 0.9)[0], atol=1e-5)


def test_update_moves_the_value_head_toward_the_returns(lm, rollout):
    cfg = _cfg(**{"ppo.vf_coef": 1.0, "ppo.value_clip": "null", "optim.batch_size": 12})
    exp = _experience(rollout, beta=0.0)
    policy, head, _, metrics = _sgd_ppo(lm.model, cfg, exp, lr=1e-3)
    m = exp.mask
    returns = _gae_loop(_token_rewards(exp, 0.0), torch.zeros(m.shape), m, cfg.ppo.gamma, cfg.ppo.lam)[1]
    with torch.no_grad():
        _, values = response_logprobs_and_values(policy, head, rollout, torch.arange(3), G, 1.0)
    before = 0.5 * (returns[m] ** 2).mean()  # values started at 0
    after = 0.5 * ((values[m] - returns[m]) ** 2).mean()
    assert metrics["value_loss"] == pytest.approx(float(before), rel=1e-5)
    assert float(after) < float(before)
    assert abs(float(head.linear.bias.detach())) > 0


@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_first_step_equals_independent_gradient(lm, rollout, beta):
    cfg = _cfg(**{"optim.batch_size": 12, "pg.beta": beta, "ppo.vf_coef": 0.5, "ppo.gamma": 0.9})
    exp = _experience(rollout, beta)
    _, _, delta, metrics = _sgd_ppo(lm.model, cfg, exp)
    model = copy.deepcopy(lm.model)
    b = rollout
    pos = (b.attention_mask.cumsum(-1) - 1).clamp(min=0)
    out = model(b.input_ids, attention_mask=b.attention_mask, position_ids=pos)
    logp = torch.log_softmax(out.logits.float(), -1)[:, b.prompt_len - 1:-1]
    lp = logp.gather(-1, b.response_ids[:, :, None]).squeeze(-1)
    h = model.get_decoder()(b.input_ids, attention_mask=b.attention_mask, position_ids=pos).last_hidden_state
    h = h[:, b.prompt_len - 1:-1].detach()  # (N, T, H) the states before each response token
    m = exp.mask
    adv, ret = _gae_loop(_token_rewards(exp, beta), torch.zeros(m.shape), m, 0.9, cfg.ppo.lam)
    a = adv[m]
    a = (a - a.mean()) / torch.sqrt(a.var(unbiased=False) + 1e-8)  # whitened over the scored tokens
    ratio = torch.exp(lp[m] - b.logprobs[m])  # == 1 at the first step
    loss = -(a * ratio).sum() / m.sum()
    loss.backward()
    policy_delta, (dw, db) = delta[:-2], delta[-2:]
    for d, p in zip(policy_delta, model.parameters()):  # the zero head sends no gradient into the trunk
        assert torch.allclose(d, -p.grad, atol=1e-6, rtol=1e-4)
    # value loss 1/2 (V - R)^2 at V = 0: d/dw = -(R h) / n, d/db = -R / n, times vf_coef
    assert torch.allclose(dw.flatten(), 0.5 * (ret[m][:, None] * h[m]).sum(0) / m.sum(), atol=1e-6)
    assert float(db) == pytest.approx(0.5 * float(ret[m].sum() / m.sum()), abs=1e-6)
    assert metrics["policy_loss"] == pytest.approx(float(loss), abs=1e-6)
    assert metrics["ratio_mean"] == pytest.approx(1.0, abs=1e-4) and metrics["clip_frac"] == 0.0
    assert metrics["explained_variance"] <= 0.0 or math.isnan(metrics["explained_variance"])  # V_old = 0
    if beta > 0:
        kl = ((b.logprobs - exp.ref_logprobs)[m]).mean()
        assert metrics["kl"] == pytest.approx(float(kl), abs=1e-6)


@pytest.mark.parametrize("epochs,minibatches", [(1, 1), (2, 3)])
def test_update_is_accumulation_invariant(lm, rollout, epochs, minibatches):
    deltas = []
    for batch_size in (12, G):
        cfg = _cfg(**{"optim.batch_size": batch_size, "pg.epochs": epochs, "pg.minibatches": minibatches,
                      "pg.beta": 0.1, "pg.aggregation": "seq_mean"})
        _, _, delta, _ = _sgd_ppo(lm.model, cfg, _experience(rollout, 0.1), lr=0.1)
        deltas.append(delta)
    for d1, d2 in zip(*deltas):
        assert torch.allclose(d1, d2, atol=1e-6, rtol=1e-4)


def test_lora_and_gradient_checkpointing_give_the_same_logprobs_and_values(lm, rollout):
    from rlmt.train.session import apply_lora

    cfg = _cfg(**{"model.lora.r": 4, "optim.batch_size": 12})
    head = make_value_head(lm.model, cfg)
    torch.nn.init.normal_(head.linear.weight, generator=torch.Generator().manual_seed(4))
    groups = torch.arange(3)
    with torch.no_grad():
        lp, v = response_logprobs_and_values(lm.model, head, rollout, groups, G, 1.0)
        ckpt = copy.deepcopy(lm.model)
        (getattr(ckpt, "activation_checkpointing_enable", None) or ckpt.gradient_checkpointing_enable)()
        ckpt.train()
        assert ckpt.is_activation_checkpointing  # the full-sequence path, no KV cache
        lp_c, v_c = response_logprobs_and_values(ckpt, head, rollout, groups, G, 1.0)
        lora = apply_lora(copy.deepcopy(lm.model), cfg.model)  # LoRA B = 0: the same function
        lp_l, v_l = response_logprobs_and_values(lora, head, rollout, groups, G, 1.0)
    m = rollout.response_mask
    for other_lp, other_v in ((lp_c, v_c), (lp_l, v_l)):
        assert torch.allclose(lp, other_lp, atol=1e-5) and torch.allclose(v[m], other_v[m], atol=1e-4)
    lora_head = make_value_head(lora, cfg)
    trainable = torch.nn.ModuleList([lora, lora_head])
    frozen = {k: p.detach().clone() for k, p in lora.named_parameters() if not p.requires_grad}
    opt = torch.optim.SGD([p for p in trainable.parameters() if p.requires_grad], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    update_step(UpdateContext(lora, lora_head, trainable, opt, sched, cfg, {}, None, METHODS["ppo"]),
                _experience(rollout, 0.0))
    assert float(lora_head.linear.bias.detach()) != 0.0
    assert all(torch.equal(p, frozen[k]) for k, p in lora.named_parameters() if k in frozen)


def _prompt_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(f'{{"prompt": "word {i}"}}\n' for i in range(4)))
    return path


def test_end_to_end_and_resume(tmp_path):
    yaml_path = tmp_path / "cfg.yaml"
    run_dir = tmp_path / "run"
    yaml_path.write_text(f"""
algorithm: ppo
model: {{name: tiny-random}}
data: {{train: {_prompt_file(tmp_path)}}}
rollout: {{num_samples: 2, batch_prompts: 2, max_new_tokens: 6, temperature: 1.0}}
reward: {{source: regex, args: {{pattern: "[a-m]"}}}}
pg: {{epochs: 2, minibatches: 2, beta: 0.05}}
ppo: {{gamma: 1.0, lam: 0.95}}
optim: {{max_steps: 3, lr: 1.0e-3, batch_size: 2}}
run: {{output_dir: {run_dir}, progress: false, save_every: 1, keep_checkpoints: 3}}
""")
    train(load_config(yaml_path))
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        for key in ("loss", "policy_loss", "value_loss", "approx_kl", "clip_frac", "explained_variance", "kl",
                    "advantage/abs_mean", "value/mean", "skipped_steps", "grad_norm", "lr"):
            assert key in r, key
        ev = r["explained_variance"]
        assert ev is None or math.isnan(ev) or math.isfinite(ev)
        assert r["skipped_steps"] == 0
    assert rows[0]["value/mean"] == 0.0 and rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # pi_old == pi_ref
    for step in (1, 2, 3):
        assert (run_dir / "checkpoints" / f"step-{step}" / "critic.pt").exists()
    critic = torch.load(run_dir / "checkpoints" / "step-3" / "critic.pt", weights_only=True)
    assert critic["linear.weight"].abs().sum() > 0  # the head trained

    shutil.rmtree(run_dir / "final")
    shutil.rmtree(run_dir / "checkpoints" / "step-3")
    train(load_config(yaml_path, ["run.resume=true"]))
    resumed = read_metrics(run_dir)
    assert [r["step"] for r in resumed] == [1, 2, 3]
    drop = ("time/", "rollout/seconds", "rollout/tokens_per_s")
    same = [{k: v for k, v in r.items() if not k.startswith(drop)} for r in (rows[-1], resumed[-1])]
    assert same[0] == same[1]


def test_critic_lr_is_the_value_heads_own_parameter_group(lm):
    """ppo.critic_lr: the head's parameters form their own AdamW group at that LR, on the same schedule."""
    from rlmt.config import OptimConfig
    from rlmt.train.optim import build_optimizer

    policy = copy.deepcopy(lm.model)
    head = make_value_head(policy)
    trainable = torch.nn.ModuleList([policy, head])
    opt, sched = build_optimizer(trainable, OptimConfig(lr=1e-3, warmup_steps=2), 10, group_lrs=[(head, 0.5)])
    policy_group, head_group = opt.param_groups
    assert {id(p) for p in head_group["params"]} == {id(p) for p in head.parameters()}
    assert not {id(p) for p in policy_group["params"]} & {id(p) for p in head.parameters()}
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-3 / 2, 0.5 / 2])  # warmup step 1 of 2
    opt.step()
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-3, 0.5])
