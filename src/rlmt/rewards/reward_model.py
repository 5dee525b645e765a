"""A trained outcome reward model as a reward source (``reward.source: reward_model``).

Each row's ``prompt`` is formatted as the reward model was trained (its own tokenizer's chat template and
system prompt, read from ``reward_model.json``), the response is encoded like a training completion (its
tokens, then the end-of-turn token, truncated to the training's ``max_completion_tokens``), and prompt +
response is scored in batches. With ``normalize`` (and statistics stored at training time) the score is the
z-score ``(r - mean_train) / std_train``; ``details[i]["raw_score"]`` always holds the raw r.
"""

from __future__ import annotations

from typing import Sequence

from rlmt.data import encode_completion, encode_prompt, split_sft_row
from rlmt.rewards.base import RewardResult


class RewardModelReward:
    """Scores responses with the reward model in directory ``path`` (a ``final/`` of ``algorithm: reward_model``).

    ``batch_size``: sequences per forward pass. ``normalize``: return z-scores when the model stores its
    train-set mean/std (trained with ``rm.normalize``), raw scores otherwise. ``device``: 'auto', 'cpu', 'cuda'.
    """

    name = "reward_model"

    def __init__(self, path: str, batch_size: int = 16, normalize: bool = True, device: str = "auto"):
        from rlmt.models.reward_model import load_reward_model

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.path, self.batch_size, self.normalize = path, batch_size, normalize
        self.model = load_reward_model(path, device=device)
        self.z_scores = normalize and self.model.score_mean is not None and self.model.score_std is not None

    def score(self, rows: Sequence[dict], responses: Sequence[str]) -> RewardResult:
        rm, tok = self.model, self.model.tokenizer
        # prompt rows have ``prompt``; SFT rows (e.g. scored demonstrations) may have ``messages`` instead
        prompts = [encode_prompt(tok, rm.prompt_format, row["prompt"] if "prompt" in row else split_sft_row(row)[0])
                   for row in rows]
        limit = rm.max_completion_tokens or 10**9
        completions = [encode_completion(tok, text, limit) for text in responses]
        raw = rm.score(prompts, completions, self.batch_size).tolist()
        scores = [(r - rm.score_mean) / rm.score_std for r in raw] if self.z_scores else list(raw)
        return RewardResult(scores, [{"raw_score": r} for r in raw])
