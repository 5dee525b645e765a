"""Chunked and prompt-shared log-probs equal a plain full forward (values and gradients)."""

import copy

import pytest
import torch

from rlmt.data import PromptFormat, encode_prompt
from rlmt.logprobs import grouped_response_logprobs, token_logprobs
from rlmt.models import load_model
from rlmt.rollout import SamplingParams, generate


@pytest.fixture(scope="module")
def setup():
    lm = load_model("tiny-random")
    fmt = PromptFormat()
    prompts = [encode_prompt(lm.tokenizer, fmt, p) for p in ("hi", "a longer prompt here", "mid one")]
    batch = generate(lm.model, lm.tokenizer, prompts, SamplingParams(3, 1.0, max_new_tokens=7),
                     torch.Generator().manual_seed(0))
    return lm, batch


def _plain(model, batch):
    pos = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(batch.input_ids, attention_mask=batch.attention_mask, position_ids=pos).logits
    lp = torch.log_softmax(logits.float() / 0.8, -1)[:, batch.prompt_len - 1:-1]
    return lp.gather(-1, batch.response_ids[:, :, None]).squeeze(-1) * batch.response_mask


def _grads(model, fn):
    model = copy.deepcopy(model)
    out = fn(model)
    (out * torch.arange(1, out.shape[1] + 1)).sum().backward()  # a position-dependent scalar
    return out.detach(), [p.grad.clone() for p in model.parameters()]




@pytest.mark.parametrize("chunk", [1024, 5])
def test_token_and_grouped_logprobs_equal_plain_forward(setup, chunk):
    lm, b = setup
    target = torch.zeros_like(b.attention_mask, dtype=torch.bool)
    target[:, b.prompt_len:] = b.response_mask
    ref, ref_g = _grads(lm.model, lambda m: _plain(m, b))
    tok, tok_g = _grads(lm.model, lambda m: token_logprobs(m, b.input_ids, b.attention_mask, target, 0.8,
                                                           chunk_tokens=chunk)[:, b.prompt_len:])
    P = b.prompt_len
    grp, grp_g = _grads(lm.model, lambda m: grouped_response_logprobs(
        m, b.input_ids[::3, :P], b.attention_mask[::3, :P], b.response_ids, b.response_mask, 3, 0.8, chunk))
    assert torch.allclose(tok, ref, atol=1e-5) and torch.allclose(grp, ref, atol=1e-5)
    for a, c, d in zip(ref_g, tok_g, grp_g):
        assert torch.allclose(a, c, atol=1e-5, rtol=1e-4) and torch.allclose(a, d, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("checkpointing,bucket_rows", [(True, 0), (False, 2), (True, 4)])
def test_grouped_logprobs_under_checkpointing_and_length_buckets(setup, checkpointing, bucket_rows):
    """The prompt KV is shared under gradient checkpointing too (replay-safe caches), and length buckets
    trim padding without changing values or gradients."""
    lm, b = setup
    P = b.prompt_len
    ref, ref_g = _grads(lm.model, lambda m: _plain(m, b))

    def grouped(m):
        if checkpointing:
            m.gradient_checkpointing_enable()
            m.train()
        return grouped_response_logprobs(m, b.input_ids[::3, :P], b.attention_mask[::3, :P], b.response_ids,
                                         b.response_mask, 3, 0.8, 5, bucket_rows=bucket_rows)

    grp, grp_g = _grads(lm.model, grouped)
    assert torch.allclose(grp, ref, atol=1e-5)
    for a, d in zip(ref_g, grp_g):
        assert torch.allclose(a, d, atol=1e-5, rtol=1e-4)


def test_length_buckets_cover_rows_longest_first():
    from rlmt.logprobs import length_buckets

    lengths = torch.tensor([3, 7, 1, 7, 5])
    buckets = length_buckets(lengths, 2)
    assert [b.tolist() for b in buckets] == [[1, 3], [4, 0], [2]]
    assert [b.tolist() for b in length_buckets(lengths, 0)] == [[0, 1, 2, 3, 4]]
