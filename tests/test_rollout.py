"""Rollout engine: sampling log-probs equal a fresh forward pass; seeds reproduce; EOS, stop strings, top-p."""

import pytest
import torch

from rlmt.data import PromptFormat, encode_prompt
from rlmt.rollout.logprobs import token_logprobs
from rlmt.models import load_model
from rlmt.rollout import SamplingParams, generate, sample_tokens


@pytest.fixture(scope="module")
def lm():
    return load_model("tiny-random")


def _prompts(tok, n=3):
    fmt = PromptFormat()
    return [encode_prompt(tok, fmt, "add " + "1" * (i * 3 + 1)) for i in range(n)]  # different lengths


def _fresh_logprobs(model, batch, temperature):
    target = torch.zeros_like(batch.attention_mask, dtype=torch.bool)
    target[:, batch.prompt_len:] = batch.response_mask
    with torch.no_grad():
        lp = token_logprobs(model, batch.input_ids, batch.attention_mask, target, temperature=temperature)
    return lp[:, batch.prompt_len:]


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9), (0.0, 1.0)])
def test_sampling_logprobs_equal_fresh_forward(lm, temperature, top_p):
    params = SamplingParams(num_samples=4, temperature=temperature, top_p=top_p, max_new_tokens=12)
    batch = generate(lm.model, lm.tokenizer, _prompts(lm.tokenizer), params, torch.Generator().manual_seed(0))
    assert batch.input_ids.shape[0] == 12 and batch.response_ids.shape == batch.logprobs.shape
    fresh = _fresh_logprobs(lm.model, batch, temperature if temperature > 0 else 1.0)
    assert torch.allclose(fresh, batch.logprobs, atol=1e-4), (fresh - batch.logprobs).abs().max()
    assert (batch.logprobs[~batch.response_mask] == 0).all()
    assert (batch.logprobs[batch.response_mask] <= 0).all()


def test_seed_reproduces_and_differs(lm):
    params = SamplingParams(num_samples=4, temperature=1.0, max_new_tokens=10)
    a = generate(lm.model, lm.tokenizer, _prompts(lm.tokenizer), params, torch.Generator().manual_seed(1))
    b = generate(lm.model, lm.tokenizer, _prompts(lm.tokenizer), params, torch.Generator().manual_seed(1))
    c = generate(lm.model, lm.tokenizer, _prompts(lm.tokenizer), params, torch.Generator().manual_seed(2))
    assert torch.equal(a.response_ids, b.response_ids) and a.texts == b.texts
    assert not torch.equal(a.response_ids, c.response_ids)


def test_greedy_matches_hf_generate(lm):
    """Greedy decoding of a single prompt equals transformers' own greedy generate."""
    prompt = _prompts(lm.tokenizer, 1)[0]
    batch = generate(lm.model, lm.tokenizer, [prompt], SamplingParams(1, 0.0, max_new_tokens=10))
    ref = lm.model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False,
                            eos_token_id=lm.tokenizer.eos_token_id, pad_token_id=lm.tokenizer.pad_token_id)
    n = int(batch.response_lengths[0])
    assert batch.response_ids[0, :n].tolist() == ref[0, len(prompt):len(prompt) + n].tolist()


def test_eos_ends_a_row_and_is_kept_in_the_mask(lm):
    """Bias the head so EOS is always sampled after the first token: every response has length <= 2."""
    model = lm.model
    eos = lm.tokenizer.eos_token_id
    batch0 = generate(model, lm.tokenizer, _prompts(lm.tokenizer), SamplingParams(2, 1.0, max_new_tokens=6),
                      torch.Generator().manual_seed(0))
    head = model.get_output_embeddings()
    saved = head.weight.data.clone()
    try:
        # make EOS dominate: point its output row along the mean final hidden state
        with torch.no_grad():
            h = model.get_decoder()(batch0.input_ids, attention_mask=batch0.attention_mask).last_hidden_state
            mean = h.reshape(-1, h.shape[-1]).mean(0)
            head.weight.data[eos] = 100 * mean / mean.norm() ** 2
        batch = generate(model, lm.tokenizer, _prompts(lm.tokenizer), SamplingParams(2, 1.0, max_new_tokens=6),
                         torch.Generator().manual_seed(0))
    finally:
        head.weight.data.copy_(saved)
    lengths = batch.response_lengths
    assert batch.finished.all()
    for i, n in enumerate(lengths.tolist()):
        assert batch.response_ids[i, n - 1] == eos  # the EOS is the last response token, and is scored
        assert batch.response_mask[i, :n].all() and not batch.response_mask[i, n:].any()


def test_stop_string_truncates_text(lm):
    params = SamplingParams(num_samples=4, temperature=1.0, max_new_tokens=20, stop=("a",))
    batch = generate(lm.model, lm.tokenizer, _prompts(lm.tokenizer), params, torch.Generator().manual_seed(3))
    for text, done in zip(batch.texts, batch.finished.tolist()):
        if "a" in text:
            assert text.endswith("a") and text.count("a") == 1
            assert done


def test_top_p_keeps_smallest_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    seen = {int(sample_tokens(logits, 1.0, 0.7, g)[0]) for _ in range(300)}
    assert seen == {0, 1}  # 0.5 < 0.7 <= 0.5 + 0.3: tokens 0 and 1 only
    tok, lp = sample_tokens(logits, 1.0, 0.7, g)
    assert torch.allclose(lp, torch.log(torch.tensor([0.5, 0.3]))[tok])  # unfiltered log-prob is returned


@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
def test_a_cache_kept_across_turns_samples_as_the_whole_context_would(autocast):
    """TurnDecoder: rows keep their cache between turns (rows of different openings, one with a block of its
    own at the first turn, one dropped after it, blocks of different lengths); every turn draws the tokens, with
    the log-probs, of generating from the whole context so far. bfloat16 goes through the functional decoder."""
    from rlmt.models import load_model
    from rlmt.rollout.turns import TurnDecoder

    lm = load_model("tiny-random")
    openings, G = [[5, 6, 7, 8], [9, 10]], 2
    params = SamplingParams(1, 1.0, 1.0, 6, ("xq",))
    dec = TurnDecoder(lm.model, lm.tokenizer, params, autocast)
    context = {r: list(openings[r // G]) for r in range(4)}
    blocks = {0: [], 1: [11, 12], 2: [], 3: [13]}
    with dec.session():
        dec.open(openings, G)
        for turn, rows in enumerate([[0, 1, 2, 3], [0, 1, 3], [1, 3]]):
            keys = [(0, 1, r, turn) for r in rows]
            out = dec.turn(rows, [blocks[r] for r in rows], keys)
            for r, key, (toks, logps, text) in zip(rows, keys, out):
                context[r] += blocks[r]
                whole = generate(lm.model, lm.tokenizer, [context[r]], params, None, autocast, [key])
                n = int(whole.response_lengths[0])
                assert toks == whole.response_ids[0, :n].tolist() and text == whole.texts[0]
                torch.testing.assert_close(torch.tensor(logps), whole.logprobs[0, :n],
                                           atol=1e-5 if autocast is None else 2e-2, rtol=0)
                context[r] += toks
                # the next reply, of a length of its own; in float32 long enough that the cache must grow
                blocks[r] = [14 + turn] * (r + 1) * (25 if autocast is None else 1)
    assert autocast is not None or dec.capacity > 4 + 2 * 6 + 64


@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
def test_growing_a_decoders_cache_changes_nothing(autocast):
    """A cache grown mid-sequence gives the logits of one allocated large from the start, bit for bit."""
    from rlmt.models import load_model
    from rlmt.rollout.decode import make_decoder

    lm = load_model("tiny-random")
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    mask, pos = torch.ones_like(ids), torch.arange(5)[None]
    out = []
    for capacity in (64, 6):
        dec = make_decoder(lm.model, capacity, autocast)
        logits = [dec.prefill(ids, mask, pos)]
        dec.grow(64)
        for t in range(3):
            logits.append(dec.step(torch.tensor([10 + t]), torch.ones((1, 6 + t), dtype=torch.long),
                                   torch.tensor([5 + t])))
        out.append(torch.stack(logits))
    assert torch.equal(out[0], out[1])
