"""The rollout engine: G samples for each of a batch of prompts in one batched, KV-cached pass.

The prompts are prefilled once each and the cache is then repeated G times, so the prefill costs P tokens
per prompt, not G x P. Each decode step computes the output projection for the last position only
(``logits_to_keep=1``). Rows that have finished (EOS or a stop string) are dropped from the batch (and from
the cache) once enough of them have finished, so they stop costing compute. The cache is written in place into
buffers sized for prompt + ``max_new_tokens`` (transformers' ``DynamicCache`` re-copies the whole cache with
``torch.cat`` at every step), and tokens are drawn by inverse CDF with one uniform per row (``torch.multinomial``
draws one exponential per vocabulary entry: ~50 ms at 32 x 49152 on a 2-core CPU, a quarter of a decode step).

The log-prob returned for each sampled token is log softmax(logits / T) at that token (T = the sampling
temperature; 1 for greedy), before top-p truncation: the same number a fresh forward pass over the sequence
computes with :func:`rlmt.rollout.logprobs.token_logprobs` at the same temperature, so it serves as pi_old.

The forward passes go through a decoder (:mod:`rlmt.rollout.decode`): the model's own forward, or, when the rollout
samples from bfloat16 weights (``model.autocast``), a functional decoder for Llama-family models.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from rlmt.rollout.decode import functional_dtype, make_decoder
from rlmt.rollout.logprobs import position_ids_from_mask
from rlmt.rollout.precision import sampling_weights


@dataclass(frozen=True)
class SamplingParams:
    """How to sample: G per prompt, temperature (0 = greedy), nucleus mass, length and stop strings."""

    num_samples: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    stop: tuple[str, ...] = ()


@dataclass
class RolloutBatch:
    """N = prompts x G sequences, laid out as [left-padded prompt | right-padded response].

    Shapes: ``input_ids``/``attention_mask`` (N, P + T); ``response_ids``/``response_mask``/``logprobs``
    (N, T); ``prompt_index`` (N,) maps each sequence to its prompt (samples of a prompt are contiguous).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    prompt_len: int
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    logprobs: torch.Tensor
    prompt_index: torch.Tensor
    texts: list[str]
    finished: torch.Tensor
    stats: dict[str, float] = field(default_factory=dict)

    @property
    def response_lengths(self) -> torch.Tensor:
        return self.response_mask.sum(-1)


def left_pad(prompts: list[list[int]], pad_id: int, width: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists -> ((B, P) ids left-padded with ``pad_id``, (B, P) 0/1 mask); P = the longest, or
    ``width`` when larger."""
    P = max([len(p) for p in prompts] + [width])
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), P), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, P - len(p):] = 1
    return ids, mask


def sample_keys(seed: int, step: int, prompts: Sequence[int], num_samples: int) -> list[tuple[int, ...]]:
    """The key of each of the ``len(prompts) * num_samples`` samples of a rollout, prompt-major:
    (seed, step, prompt index, sample index). ``prompts`` are the prompts' positions in the *global* step
    (over all ranks), so a sample's key, and with it its randomness, does not depend on the rank, the number
    of ranks or how the prompts were batched."""
    return [(seed, step, int(p), g) for p in prompts for g in range(num_samples)]


def keyed_uniforms(keys: Sequence[tuple[int, ...]], length: int) -> torch.Tensor:
    """(len(keys), length) float64 uniforms in [0, 1): row i from a generator seeded by a 63-bit hash of
    ``keys[i]`` alone. The sampler draws token t of sample i with ``u[i, t]``."""
    out = torch.empty((len(keys), length), dtype=torch.float64)
    gen = torch.Generator()
    for i, key in enumerate(keys):
        digest = hashlib.blake2b(repr(tuple(int(k) for k in key)).encode(), digest_size=8).digest()
        gen.manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))
        out[i] = torch.rand(length, dtype=torch.float64, generator=gen)
    return out


def sample_tokens(logits: torch.Tensor, temperature: float, top_p: float,
                  generator: torch.Generator | None, uniforms: torch.Tensor | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (n, V) -> (tokens (n,), log softmax(logits / T) at the tokens (n,)); T = 0 is greedy.

    Sampling is by inverse CDF: token i is drawn when u ~ U[0, 1) falls in [cdf[i-1], cdf[i]), with the
    cumulative sum taken in float64 so tokens of tiny probability keep their exact share. ``uniforms`` (n,)
    float64 gives each row's u; otherwise they are drawn from ``generator``.
    """
    logits = logits.float()
    if temperature == 0:
        tokens = logits.argmax(-1)
        return tokens, torch.log_softmax(logits, -1).gather(-1, tokens[:, None]).squeeze(-1)
    logp = torch.log_softmax(logits / temperature if temperature != 1 else logits, -1)  # (n, V)
    probs, order = logp.exp(), None
    if top_p < 1.0:
        probs, order = probs.sort(-1, descending=True)
        probs = probs.masked_fill(probs.cumsum(-1) - probs > top_p, 0.0)  # smallest prefix with mass >= top_p
    cdf = probs.cumsum(-1, dtype=torch.float64)  # (n, V)
    if uniforms is None:
        uniforms = torch.rand(len(cdf), dtype=torch.float64, generator=generator, device=cdf.device)
    u = uniforms.to(cdf.device, torch.float64)[:, None] * cdf[:, -1:]
    tokens = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[1] - 1)  # (n, 1); skips zero-mass tokens
    if order is not None:
        tokens = order.gather(-1, tokens)
    tokens = tokens.squeeze(-1)
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)


def eos_ids(model, tokenizer) -> list[int]:
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for e in gen_eos if isinstance(gen_eos, list) else [gen_eos]:
        if e is not None:
            ids.add(int(e))
    return sorted(ids)


@torch.no_grad()
def generate(model: torch.nn.Module, tokenizer, prompts: list[list[int]], params: SamplingParams,
             generator: torch.Generator | None = None, autocast: torch.dtype | None = None,
             keys: Sequence[tuple[int, ...]] | None = None) -> RolloutBatch:
    """Sample ``params.num_samples`` responses for each prompt (token ids) in one batched pass. With
    ``autocast`` (``model.autocast``) it samples from a copy of the weights in that dtype (the functional
    decoder's own, :mod:`rlmt.rollout.decode`, or else :func:`rlmt.rollout.precision.sampling_weights`).

    ``keys`` (one per sample, prompt-major: :func:`sample_keys`) make each sample's draws a function of its
    key alone (:func:`keyed_uniforms`), whatever else shares the batch; without them the draws come from
    ``generator`` in row order."""
    if keys is not None and len(keys) != len(prompts) * params.num_samples:
        raise ValueError(f"{len(keys)} sample keys for {len(prompts)} prompts x {params.num_samples} samples")
    if any(type(p).__name__ == "DTensor" for p in model.parameters()):
        autocast = None  # FSDP2-sharded layers (model.parallel=fsdp) are reached through forward only; their
        # mixed-precision policy computes in model.autocast's dtype
    if functional_dtype(model, autocast) is not None:
        return _generate(model, tokenizer, prompts, params, generator, autocast, keys)
    with sampling_weights(model, autocast):
        return _generate(model, tokenizer, prompts, params, generator, None, keys)


def _generate(model: torch.nn.Module, tokenizer, prompts: list[list[int]], params: SamplingParams,
              generator: torch.Generator | None, autocast: torch.dtype | None,
              keys: Sequence[tuple[int, ...]] | None = None) -> RolloutBatch:
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    G, T = params.num_samples, params.max_new_tokens
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = torch.tensor(eos_ids(model, tokenizer), dtype=torch.long, device=device)
    prompt_ids, prompt_mask = left_pad(prompts, pad_id)
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
    P = prompt_ids.shape[1]

    decoder = make_decoder(model, P + T, autocast)  # rlmt.rollout.decode: the model's forward, or a functional Llama decoder
    logits = decoder.prefill(prompt_ids, prompt_mask, position_ids_from_mask(prompt_mask))  # (B0, V)
    if G > 1:
        decoder.repeat_interleave(G)
        logits = logits.repeat_interleave(G, 0)
    N = len(prompts) * G
    full_prompt_mask = prompt_mask.repeat_interleave(G, 0)  # (N, P)
    # attention mask of the active rows; generated positions are always attended, so it is allocated once
    mask = torch.cat([full_prompt_mask, full_prompt_mask.new_ones((N, T))], dim=1)
    next_pos = full_prompt_mask.sum(-1)  # (N,) position id of the next token
    tokens = torch.full((N, T), pad_id, dtype=torch.long, device=device)
    logps = torch.zeros((N, T), dtype=torch.float32, device=device)
    lengths = torch.zeros(N, dtype=torch.long, device=device)
    finished = torch.zeros(N, dtype=torch.bool, device=device)
    rows = torch.arange(N, device=device)  # original row of each active row
    alive = torch.ones(N, dtype=torch.bool, device=device)  # active rows still generating
    stop = tuple(params.stop)
    stop_window = max((len(s) for s in stop), default=0) + 8  # tokens decoded to look for a stop string
    decode_steps = 0
    table = keyed_uniforms(keys, T).to(device) if keys is not None and params.temperature > 0 else None  # (N, T)
    for t in range(T):
        tok, lp = sample_tokens(logits, params.temperature, params.top_p, generator,
                                None if table is None else table[rows, t])
        live_rows = rows[alive]
        tokens[live_rows, t] = tok[alive]
        logps[live_rows, t] = lp[alive]
        lengths[live_rows] = t + 1
        done = alive & torch.isin(tok, eos)
        if stop:
            for j in alive.nonzero().flatten().tolist():
                r = int(rows[j])
                tail = tokenizer.decode(tokens[r, max(0, t + 1 - stop_window):t + 1])
                if any(s in tail for s in stop):
                    done[j] = True
        finished[rows[done]] = True
        alive &= ~done
        n_alive = int(alive.sum())
        if n_alive == 0 or t == T - 1:
            break
        if len(rows) - n_alive >= max(1, len(rows) // 8):  # drop finished rows from the batch and the cache
            keep = alive.nonzero().flatten()
            decoder.select(keep)
            rows, mask, next_pos, tok = rows[keep], mask[keep], next_pos[keep], tok[keep]
            alive = torch.ones(len(rows), dtype=torch.bool, device=device)
        logits = decoder.step(tok, mask[:, :P + t + 1], next_pos)
        next_pos = next_pos + 1
        decode_steps += 1

    Tmax = int(lengths.max()) if N else 0
    tokens, logps = tokens[:, :Tmax], logps[:, :Tmax]
    response_mask = torch.arange(Tmax, device=device)[None, :] < lengths[:, None]
    tokens = tokens.masked_fill(~response_mask, pad_id)
    logps = logps.masked_fill(~response_mask, 0.0)
    texts = []
    for i in range(N):
        text = tokenizer.decode(tokens[i, :lengths[i]], skip_special_tokens=True)
        for s in stop:
            if s in text:
                text = text[:text.index(s) + len(s)]
        texts.append(text)
    if was_training:
        model.train()
    seconds = time.perf_counter() - t0
    n_tokens = int(lengths.sum())
    return RolloutBatch(
        input_ids=torch.cat([prompt_ids.repeat_interleave(G, 0), tokens], 1),
        attention_mask=torch.cat([full_prompt_mask, response_mask.long()], 1),
        prompt_len=P,
        response_ids=tokens,
        response_mask=response_mask,
        logprobs=logps,
        prompt_index=torch.arange(len(prompts), device=device).repeat_interleave(G),
        texts=texts,
        finished=finished,
        stats={"rollout/seconds": seconds, "rollout/tokens": n_tokens,
               "rollout/tokens_per_s": n_tokens / max(seconds, 1e-9), "rollout/decode_steps": decode_steps + 1},
    )


def concat_batches(batches: list[RolloutBatch], pad_id: int) -> RolloutBatch:
    """Several rollouts as one: prompts left-padded to the longest, responses right-padded to the longest,
    ``prompt_index`` offset so it counts prompts across batches; ``stats`` summed (tokens/s recomputed).
    One batch is returned as it is."""
    if len(batches) == 1:
        return batches[0]
    P = max(b.prompt_len for b in batches)
    T = max(b.response_ids.shape[1] for b in batches)

    def pad(x: torch.Tensor, left: int, right: int, value) -> torch.Tensor:
        return torch.nn.functional.pad(x, (left, right), value=value)

    parts, offset = [], 0
    for b in batches:
        dp, dt = P - b.prompt_len, T - b.response_ids.shape[1]
        prompt = pad(b.input_ids[:, :b.prompt_len], dp, 0, pad_id)
        prompt_mask = pad(b.attention_mask[:, :b.prompt_len], dp, 0, 0)
        response = pad(b.response_ids, 0, dt, pad_id)
        response_mask = pad(b.response_mask, 0, dt, False)
        parts.append((torch.cat([prompt, response], 1), torch.cat([prompt_mask, response_mask.long()], 1), response,
                      response_mask, pad(b.logprobs, 0, dt, 0.0), b.prompt_index + offset))
        offset += int(b.prompt_index.max()) + 1 if len(b.prompt_index) else 0
    cat = [torch.cat(xs) for xs in zip(*parts)]
    stats = {k: sum(b.stats.get(k, 0.0) for b in batches) for k in ("rollout/seconds", "rollout/tokens",
                                                                      "rollout/decode_steps")}
    stats["rollout/tokens_per_s"] = stats["rollout/tokens"] / max(stats["rollout/seconds"], 1e-9)
    return RolloutBatch(cat[0], cat[1], P, cat[2], cat[3], cat[4], cat[5], [t for b in batches for t in b.texts],
                        torch.cat([b.finished for b in batches]), stats)
