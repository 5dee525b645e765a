"""DPO/IPO/cDPO: the losses against hand-computed values, the step's invariants (accumulation, one forward
for chosen + rejected), the reference computed once, and an end-to-end tiny-model run with resume."""

import copy
import json
import math

import pytest
import torch

from rlmt.config import DPOConfig, load_config
from rlmt.data import SFTExample
from rlmt.models import load_model
from rlmt.objectives.preference import LOSSES, cdpo_loss, dpo_loss, ipo_loss
from rlmt.records import read_metrics
from rlmt.train import dpo as dpo_mod
from rlmt.rollout.logprobs import token_logprobs
from rlmt.data import PreferencePair, collate_pairs
from rlmt.train.dpo import dpo_update, preference_loss
from rlmt.train.runner import train
from rlmt.data import collate_sft

T = torch.tensor


def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


# ----------------------------------------------------------------------------------------------- the math


def test_dpo_loss_hand_computed():
    # beta=0.1, pc=-1, pr=-2, rc=-1.5, rr=-1.5:
    #   chosen log-ratio = -1 - (-1.5) = 0.5; rejected = -2 - (-1.5) = -0.5; h = 1.0
    #   loss = -log sigmoid(0.1 * 1) = -log(0.52498) = 0.64440
    #   rewards: chosen 0.05, rejected -0.05, margin 0.1, accuracy 1
    loss, m = dpo_loss(T([-1.0]), T([-2.0]), T([-1.5]), T([-1.5]), beta=0.1)
    assert float(loss) == pytest.approx(-math.log(_sigmoid(0.1)), rel=1e-6)
    assert float(loss) == pytest.approx(0.644397, abs=1e-5)
    assert m["rewards/chosen"] == pytest.approx(0.05)
    assert m["rewards/rejected"] == pytest.approx(-0.05)
    assert m["rewards/margin"] == pytest.approx(0.1)
    assert m["rewards/accuracy"] == 1.0
    # two pairs; pair 2: pc=-3, pr=-1, rc=-2, rr=-2 -> chosen ratio -1, rejected ratio 1, h = -2
    #   loss_2 = -log sigmoid(-0.2) = 0.79814; mean = (0.64440 + 0.79814) / 2 = 0.72127; accuracy 1/2
    loss, m = dpo_loss(T([-1.0, -3.0]), T([-2.0, -1.0]), T([-1.5, -2.0]), T([-1.5, -2.0]), beta=0.1)
    assert float(loss) == pytest.approx((-math.log(_sigmoid(0.1)) - math.log(_sigmoid(-0.2))) / 2, rel=1e-6)
    assert m["rewards/accuracy"] == 0.5
    # normalizer: the sum over pairs divided by the step's pair count (here 4)
    loss4, _ = dpo_loss(T([-1.0, -3.0]), T([-2.0, -1.0]), T([-1.5, -2.0]), T([-1.5, -2.0]), beta=0.1, normalizer=4)
    assert float(loss4) == pytest.approx(float(loss) / 2, rel=1e-6)


def test_ipo_loss_hand_computed():
    # same pair, h = 1; beta = 0.1 -> target 1 / (2 * 0.1) = 5; loss = (1 - 5)^2 = 16
    loss, _ = ipo_loss(T([-1.0]), T([-2.0]), T([-1.5]), T([-1.5]), beta=0.1)
    assert float(loss) == pytest.approx(16.0)
    # beta = 0.5 -> target 1 -> loss 0 (h already at the target margin)
    loss, _ = ipo_loss(T([-1.0]), T([-2.0]), T([-1.5]), T([-1.5]), beta=0.5)
    assert float(loss) == pytest.approx(0.0)


def test_cdpo_hand_computed_and_eps0_is_dpo():
    args = (T([-1.0, -3.0]), T([-2.0, -1.0]), T([-1.5, -2.0]), T([-1.5, -2.0]))
    eps0 = float(cdpo_loss(*args, beta=0.1, label_smoothing=0.0)[0])
    assert eps0 == pytest.approx(float(dpo_loss(*args, beta=0.1)[0]))
    # h = 1, beta = 0.1, eps = 0.2: 0.8 * -log sigmoid(0.1) + 0.2 * -log sigmoid(-0.1)
    #   = 0.8 * 0.64440 + 0.2 * 0.74440 = 0.66440
    loss, _ = cdpo_loss(T([-1.0]), T([-2.0]), T([-1.5]), T([-1.5]), beta=0.1, label_smoothing=0.2)
    assert float(loss) == pytest.approx(0.8 * 0.644397 + 0.2 * 0.744397, abs=1e-5)
    # eps = 0.5: both labels equally likely -> symmetric, its gradient in h vanishes at h = 0
    h = torch.zeros(1, requires_grad=True)
    cdpo_loss(h, T([0.0]), T([0.0]), T([0.0]), beta=0.1, label_smoothing=0.5)[0].backward()
    assert float(h.grad) == pytest.approx(0.0, abs=1e-7)


def test_gradient_sign_raising_chosen_lowers_loss():
    pc = T([-1.0, -3.0], requires_grad=True)
    pr = T([-2.0, -1.0], requires_grad=True)
    for name in ("dpo", "cdpo"):
        pc.grad = pr.grad = None
        LOSSES[name](pc, pr, T([-1.5, -2.0]), T([-1.5, -2.0]), beta=0.1)[0].backward()
        assert (pc.grad < 0).all() and (pr.grad > 0).all(), name  # descent raises chosen, lowers rejected
    # dLoss/dpc for one pair = -beta * sigmoid(-beta h) / B: h = 1 -> -0.1 * sigmoid(-0.1) / 2 = -0.023752
    pc.grad = None
    dpo_loss(pc, pr, T([-1.5, -2.0]), T([-1.5, -2.0]), beta=0.1)[0].backward()
    assert float(pc.grad[0]) == pytest.approx(-0.1 * _sigmoid(-0.1) / 2, rel=1e-5)


def test_preference_loss_binds_config():
    f = preference_loss(DPOConfig(loss="cdpo", beta=0.1, label_smoothing=0.2))
    loss, _ = f(T([-1.0]), T([-2.0]), T([-1.5]), T([-1.5]))
    assert float(loss) == pytest.approx(0.8 * 0.644397 + 0.2 * 0.744397, abs=1e-5)


# ------------------------------------------------------------------------------------- the step, tiny model


@pytest.fixture(scope="module")
def lm():
    return load_model("tiny-random")


def sequence_logprobs(model, batch):
    """The plain reference: (2B, L) full rows -> (2B,) summed completion log-probs."""
    return token_logprobs(model, batch.input_ids, batch.attention_mask, batch.target_mask).sum(-1)


def _pairs(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda k: torch.randint(0, 250, (k,), generator=g).tolist()  # noqa: E731
    return [PreferencePair(r(3 + i % 3), r(2 + i % 4), r(4 - i % 3)) for i in range(n)]


def test_chosen_and_rejected_in_one_forward_equal_two(lm):
    pairs = _pairs()
    with torch.no_grad():
        both = sequence_logprobs(lm.model, collate_pairs(pairs, 256))  # (8,)
        chosen = collate_sft([SFTExample(p.prompt_ids, p.chosen_ids) for p in pairs], 256)
        rejected = collate_sft([SFTExample(p.prompt_ids, p.rejected_ids) for p in pairs], 256)
        chosen, rejected = sequence_logprobs(lm.model, chosen), sequence_logprobs(lm.model, rejected)
    assert torch.allclose(both, torch.cat([chosen, rejected]), atol=1e-5)
    assert (both < 0).all()


def _update(model, pairs, ref, batch_size):
    """One DPO step with SGD (lr 1): the update is exactly -gradient."""
    model = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    mbs = [(pairs[i:i + batch_size], ref[i:i + batch_size]) for i in range(0, len(pairs), batch_size)]
    metrics = dpo_update(model, mbs, preference_loss(DPOConfig(beta=0.5)), opt, sched, 0.0, 256, "cpu")
    return model, metrics


def test_accumulation_4x1_equals_1x4(lm):
    pairs = _pairs()
    ref = torch.randn(4, 2, generator=torch.Generator().manual_seed(1)) * 2 - 10  # a reference away from pi
    m4, a = _update(lm.model, pairs, ref, batch_size=4)
    m1, b = _update(lm.model, pairs, ref, batch_size=1)
    for k in ("loss", "rewards/chosen", "rewards/margin", "rewards/accuracy", "grad_norm"):
        assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), k
    for (n, p4), p1 in zip(m4.named_parameters(), m1.parameters()):
        assert torch.allclose(p4, p1, atol=1e-6, rtol=1e-4), n
    assert sum(float((p - p0).detach().abs().sum()) for p, p0 in zip(m4.parameters(), lm.model.parameters())) > 1e-4


# --------------------------------------------------------------------------------------------- end to end


def _write(path, n):
    rows = [{"prompt": f"Say {i}", "chosen": f"{i} {i * 7}", "rejected": f"no {i}"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(tmp_path, *extra):
    return load_config(None, ["algorithm=dpo", "model.name=tiny-random", f"run.output_dir={tmp_path / 'run'}",
                              f"data.train={_write(tmp_path / 'train.jsonl', 8)}",
                              f"data.eval={_write(tmp_path / 'eval.jsonl', 3)}", "optim.batch_size=2",
                              "optim.grad_accum=2", "optim.lr=1e-3", "run.save_every=1", "run.progress=false",
                              "run.eval_before_after=true", *extra])


def test_train_end_to_end_and_resume_reuses_reference(tmp_path, monkeypatch):
    calls = []
    real = dpo_mod.pair_logprobs
    monkeypatch.setattr(dpo_mod, "pair_logprobs", lambda *a, **k: calls.append(len(a[1])) or real(*a, **k))
    run = train(_cfg(tmp_path, "optim.max_steps=3"))
    assert (run / "final").is_dir() and (run / "reference_logps.pt").exists()
    assert [p.name for p in sorted((run / "checkpoints").iterdir())]  # checkpoints were written
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(k in rows[0] for k in ("loss", "rewards/accuracy", "rewards/margin", "lr", "grad_norm"))
    # step 1: the policy is the reference, so every margin is 0 and the DPO loss is log 2
    assert rows[0]["loss"] == pytest.approx(math.log(2), rel=1e-4)
    before = json.loads((run / "eval-before.json").read_text())
    after = json.loads((run / "eval-after.json").read_text())
    # before training the policy is the reference: every margin is exactly 0, a tie counted half
    assert before["preference_ties"] == 1.0 and before["preference_accuracy"] == 0.5
    assert before["rewards/margin"] == 0.0 and 0.0 <= after["preference_accuracy"] <= 1.0
    # reference: train (8) + eval (3) once; then eval before and after (3 each)
    assert calls == [8, 3, 3, 3]

    calls.clear()
    run = train(_cfg(tmp_path, "optim.max_steps=5", "run.resume=true"))
    assert calls == [3]  # reference reloaded, only the eval-after pass runs
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4, 5]


def test_likelihood_accuracy_is_the_models_own_preference_by_hand(monkeypatch):
    pol = torch.tensor([[-2.0, -3.0], [-6.0, -4.0], [-6.0, -4.0]])  # summed log-probs (chosen, rejected)
    monkeypatch.setattr(dpo_mod, "pair_logprobs", lambda *a, **k: pol)
    pairs = [dpo_mod.PreferencePair([1], [5, 6], [7]), dpo_mod.PreferencePair([1], [5, 6, 7], [8]),
             dpo_mod.PreferencePair([1], [5, 6, 7], [8, 9])]
    ref = torch.zeros(3, 2)
    out = dpo_mod.preference_accuracy(None, pairs, ref, beta=0.1, batch_size=2, pad_id=0, device="cpu")
    assert out["likelihood_accuracy"] == pytest.approx(1 / 3)  # only pair 0: -2 > -3
    # per token: pair 0 -1 vs -3 (yes); pair 1 -2 vs -4 (yes); pair 2 -2 vs -2 (tie: no)
    assert out["likelihood_accuracy_per_token"] == pytest.approx(2 / 3)
    assert out["preference_accuracy"] == pytest.approx(1 / 3)  # h = pol margin with a zero reference
    assert out["preference_ties"] == 0.0


def test_preference_accuracy_counts_a_tied_margin_half(monkeypatch):
    pol = torch.tensor([[-2.0, -3.0], [-5.0, -4.0], [-4.0, -4.0], [-1.0, -1.0]])  # h = 1, -1, 0, 0 (zero ref)
    monkeypatch.setattr(dpo_mod, "pair_logprobs", lambda *a, **k: pol)
    pairs = [dpo_mod.PreferencePair([1], [5], [7])] * 4
    out = dpo_mod.preference_accuracy(None, pairs, torch.zeros(4, 2), beta=0.1, batch_size=2, pad_id=0, device="cpu")
    assert out["preference_accuracy"] == pytest.approx((1 + 0 + 0.5 + 0.5) / 4)
    assert out["preference_ties"] == 0.5


@pytest.mark.parametrize("checkpointing", [False, True])
def test_pair_logprobs_share_the_prompt_and_equal_full_sequences(lm, checkpointing):
    """Chosen and rejected attend to one pass over their prompt: same values and gradient as full rows."""
    pairs = _pairs()

    def grads(fn):
        m = copy.deepcopy(lm.model)
        if checkpointing:
            m.gradient_checkpointing_enable()
        m.train()
        out = fn(m)  # (4, 2)
        (out * torch.tensor([1.0, -2.0])).sum().backward()
        return out.detach(), [p.grad.clone() for p in m.parameters()]

    full, full_g = grads(lambda m: sequence_logprobs(m, collate_pairs(pairs, 256)).view(2, -1).T)
    shared, shared_g = grads(lambda m: dpo_mod.pair_sequence_logprobs(m, pairs, 256, "cpu"))
    assert torch.allclose(shared, full, atol=1e-5)
    for a, b in zip(full_g, shared_g):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
