"""Everything that runs the policy forward: sampling (the engine and its decoders), per-token log-probs of
given tokens (packed prompt groups, chunked output layer), packed attention and mixed precision.

- :mod:`rlmt.rollout.engine`: ``generate`` (G samples per prompt, KV-cached), ``SamplingParams``, ``RolloutBatch``;
- :mod:`rlmt.rollout.decode`: the decoders the engine drives (the model's forward, a functional Llama decoder);
- :mod:`rlmt.rollout.logprobs`: log pi(y_t | ...) of given tokens, the prompt of a group computed once;
- :mod:`rlmt.rollout.attention`: packed prompt-group attention without an (L, L) mask;
- :mod:`rlmt.rollout.precision`: bfloat16 autocast for forward passes, float32 weights and log-probs.
"""

from rlmt.rollout.decode import weights_shared
from rlmt.rollout.engine import (RolloutBatch, SamplingParams, concat_batches, generate, keyed_uniforms, left_pad,
                                sample_keys, sample_tokens)

__all__ = ["RolloutBatch", "SamplingParams", "concat_batches", "generate", "keyed_uniforms", "left_pad", "sample_keys",
           "sample_tokens", "weights_shared"]
