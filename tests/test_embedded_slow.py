"""Real-model checks on the embedded SmolLM2-135M-Instruct (marked slow: `make test-slow`)."""

import pytest
import torch

from rlmt.data import PromptFormat, encode_prompt
from rlmt.logprobs import token_logprobs
from rlmt.models import load_model
from rlmt.rewards import build_reward_source
from rlmt.rollout import SamplingParams, generate

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol():
    return load_model("smollm2-135m-instruct")


def test_embedded_model_answers_greedily(smol):
    fmt = PromptFormat()
    prompts = [encode_prompt(smol.tokenizer, fmt, f"What is {a} + {b}? Reply with only the number.")
               for a, b in [(23, 4), (51, 7), (60, 2), (35, 3)]]
    batch = generate(smol.model, smol.tokenizer, prompts, SamplingParams(1, 0.0, max_new_tokens=12))
    rows = [{"answer": 27}, {"answer": 58}, {"answer": 62}, {"answer": 38}]
    scores = build_reward_source("math_answer").score(rows, batch.texts).scores
    assert sum(scores) >= 1, batch.texts  # greedy gets ~31% of these; all-wrong means a broken pipeline
    assert batch.finished.any()  # a short answer ends with <|im_end|>


def test_embedded_sampling_logprobs_match_forward(smol):
    fmt = PromptFormat()
    prompts = [encode_prompt(smol.tokenizer, fmt, "Name a colour."), encode_prompt(smol.tokenizer, fmt, "Hi")]
    batch = generate(smol.model, smol.tokenizer, prompts, SamplingParams(4, 1.0, max_new_tokens=16),
                     torch.Generator().manual_seed(0))
    target = torch.zeros_like(batch.attention_mask, dtype=torch.bool)
    target[:, batch.prompt_len:] = batch.response_mask
    with torch.no_grad():
        lp = token_logprobs(smol.model, batch.input_ids, batch.attention_mask, target)[:, batch.prompt_len:]
    assert torch.allclose(lp, batch.logprobs, atol=2e-4)
