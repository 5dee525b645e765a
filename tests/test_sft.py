"""SFT invariants: gradient accumulation 1x8 == 8x1, prompt tokens carry zero loss, packing == no packing."""

import copy

import pytest
import torch

from rlmt.config import OptimConfig
from rlmt.data import SFTExample
from rlmt.rollout.logprobs import token_logprobs
from rlmt.models import load_model
from rlmt.train.optim import build_optimizer, lr_factor
from rlmt.data import collate_sft, make_micro_batches, pack_sft
from rlmt.train.sft import sft_update


@pytest.fixture(scope="module")
def lm():
    return load_model("tiny-random")


def _examples(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p = torch.randint(0, 250, (3 + i % 4,), generator=g).tolist()
        c = torch.randint(0, 250, (2 + (i * 3) % 5,), generator=g).tolist()
        out.append(SFTExample(p, c))
    return out


def _update(model, examples, batch_size, packing=False):
    """One SFT step with plain SGD (lr 1): the update is exactly -gradient, so comparing weights compares
    gradients (Adam would turn float noise in near-zero gradients into +-lr sign flips)."""
    model = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    mbs = make_micro_batches(examples, batch_size, pad_id=256, packing=packing, pack_length=24)
    metrics = sft_update(model, mbs, opt, sched, 0.0, "cpu")
    return model, metrics


@pytest.mark.parametrize("packing", [False, True])
def test_accumulation_1x8_equals_8x1(lm, packing):
    ex = _examples()
    m1, a = _update(lm.model, ex, batch_size=8, packing=packing)
    m8, b = _update(lm.model, ex, batch_size=1, packing=packing)
    m2, c = _update(lm.model, ex, batch_size=3, packing=packing)  # uneven split 3+3+2
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) == pytest.approx(c["loss"], rel=1e-5)
    assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    for (n, p1), p8, p2 in zip(m1.named_parameters(), m8.parameters(), m2.parameters()):
        assert torch.allclose(p1, p8, atol=1e-6, rtol=1e-4), n
        assert torch.allclose(p1, p2, atol=1e-6, rtol=1e-4), n
    moved = sum(float((p - p0).detach().abs().sum()) for p, p0 in zip(m1.parameters(), lm.model.parameters()))
    assert moved > 1e-3  # the step did change the weights


def test_loss_is_per_token_mean_of_completion_nll(lm):
    ex = _examples(4)
    batch = collate_sft(ex, pad_id=256)
    with torch.no_grad():
        logits = lm.model(batch.input_ids, attention_mask=batch.attention_mask).logits
    logp = torch.log_softmax(logits.float(), -1)
    nll, count = 0.0, 0
    for i, e in enumerate(ex):  # independent formula: loop over completion tokens only
        for j, tok in enumerate(e.completion_ids):
            pos = len(e.prompt_ids) + j
            nll -= float(logp[i, pos - 1, tok])
            count += 1
    _, metrics = _update(lm.model, ex, batch_size=4)
    assert metrics["loss"] == pytest.approx(nll / count, rel=1e-5)
    assert metrics["tokens"] == count


def test_prompt_tokens_get_zero_gradient(lm):
    """Changing prompt *targets* cannot change the loss: the gradient w.r.t. prompt-position log-probs is 0."""
    ex = _examples(2)
    batch = collate_sft(ex, pad_id=256)
    lp = token_logprobs(lm.model, batch.input_ids, batch.attention_mask, torch.ones_like(batch.target_mask))
    lp.retain_grad()
    from rlmt.objectives.policy import nll_loss

    loss, _ = nll_loss(lp, batch.target_mask, aggregation="token_mean")
    loss.backward()
    prompt_positions = ~batch.target_mask
    assert (lp.grad[prompt_positions] == 0).all()
    assert (lp.grad[batch.target_mask] != 0).all()
    lm.model.zero_grad(set_to_none=True)


def test_packed_logprobs_equal_unpacked(lm):
    ex = _examples(5)
    plain = collate_sft(ex, 256)
    packed = pack_sft(ex, 256, pack_length=30)
    assert packed.input_ids.shape[0] < len(ex)
    with torch.no_grad():
        a = token_logprobs(lm.model, plain.input_ids, plain.attention_mask, plain.target_mask)
        b = token_logprobs(lm.model, packed.input_ids, packed.attention_mask, packed.target_mask,
                           position_ids=packed.position_ids)
    assert torch.allclose(a[plain.target_mask], b[packed.target_mask], atol=1e-5)


def test_lr_schedule():
    assert [lr_factor(s, 2, 10, "constant") for s in range(3)] == [0.5, 1.0, 1.0]
    assert lr_factor(2, 2, 10, "linear") == 1.0 and lr_factor(6, 2, 10, "linear") == pytest.approx(0.5)
    assert lr_factor(6, 2, 10, "cosine") == pytest.approx(0.5) and lr_factor(10, 2, 10, "cosine") == pytest.approx(0.0)


def test_non_finite_gradient_skips_the_step(lm):
    model = copy.deepcopy(lm.model)
    opt, sched = build_optimizer(model, OptimConfig(lr=1e-2), 10)
    before = [p.detach().clone() for p in model.parameters()]
    mbs = make_micro_batches(_examples(2), 2, 256)
    model.get_output_embeddings().weight.register_hook(lambda g: g * float("nan"))
    metrics = sft_update(model, mbs, opt, sched, 1.0, "cpu")
    assert metrics["skipped_steps"] == 1.0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_heldout_nll_is_the_per_token_mean_over_all_completions(lm):
    """SFT's held-out figure against a per-token loop over each example alone, with batches that split the
    examples unevenly; the model is left in the mode it was in."""
    import math

    from rlmt.train.sft import heldout_nll

    ex = _examples(5, seed=3)
    nll, count = 0.0, 0
    with torch.no_grad():
        for e in ex:
            ids = torch.tensor([e.prompt_ids + e.completion_ids])
            logp = torch.log_softmax(lm.model(ids).logits.float(), -1)
            for j, tok in enumerate(e.completion_ids):
                nll -= float(logp[0, len(e.prompt_ids) + j - 1, tok])
                count += 1
    lm.model.train()
    got = heldout_nll(lm.model, ex, 2, 256, "cpu")
    assert lm.model.training
    lm.model.eval()
    assert got["tokens"] == count
    assert got["nll"] == pytest.approx(nll / count, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
