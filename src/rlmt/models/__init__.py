"""Models: loading policies (any transformers causal-LM directory, the embedded SmolLM2-135M-Instruct, tiny
random models), the scalar heads (value, reward, process), the trained reward models, and the frozen
reference of KL-regularized methods.

- :mod:`rlmt.models.loading`: ``load_model`` and the names it understands, ``save_final``;
- :mod:`rlmt.models.heads`: ``ValueHead``, ``RewardHead``, ``ProcessHead``;
- :mod:`rlmt.models.reward_model`, :mod:`rlmt.models.process_reward_model`: trained reward models, saved and loaded;
- :mod:`rlmt.models.reference`: ``frozen_reference`` and the :class:`Reference` the online loop holds.
"""

from rlmt.models.heads import ProcessHead, RewardHead, ValueHead
from rlmt.models.loading import (EMBEDDED, LoadedModel, ModelError, cache_dir, embedded_gguf_path, embedded_model_dir,
                                 is_tiny, load_model, pick_device, resolve_model_path, save_final,
                                 save_pretrained_atomic, tiny_random_model, tiny_tokenizer, warm_up_vector_math)
from rlmt.models.reference import Reference, frozen_reference

__all__ = ["EMBEDDED", "LoadedModel", "ModelError", "ProcessHead", "Reference", "RewardHead", "ValueHead", "cache_dir",
           "embedded_gguf_path", "embedded_model_dir", "frozen_reference", "is_tiny", "load_model", "pick_device",
           "resolve_model_path", "save_final", "save_pretrained_atomic", "tiny_random_model", "tiny_tokenizer",
           "warm_up_vector_math"]
