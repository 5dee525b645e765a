"""Decoders for the rollout: the KV-cached forward passes :func:`rlmt.rollout.generate` drives.

Two implementations of one small interface (``prefill``, ``step``, ``repeat_interleave``, ``select``):

- :class:`ModuleDecoder` calls the model's own ``forward`` with a cache written in place. Any causal LM.
- :class:`LlamaDecoder`, a functional decoder for the Llama family (Llama, Mistral, Qwen2, SmolLM), used when
  the rollout samples from bfloat16 weights (:func:`rlmt.precision.sampling_weights`). There a 135M model's
  decode step is mostly per-op overhead, not arithmetic: at 32 rows its ~210 bfloat16 GEMMs take ~27 ms of
  a ~80 ms module step. The functional form skips the modules, cache objects and mask building, and folds
  GQA into the query axis instead of expanding the cache. Measured on SmolLM2-135M in bfloat16 (2-core
  AMX CPU, median of 4 x 10 steps): 71 vs 84 ms a step at 32 rows, 56 vs 64 ms at 12. In float32 the
  GEMMs dominate and it gained ~3% (2026-12-01), so float32 keeps the module path.

Same math as transformers' Llama: RMSNorm statistics in float32, the model's own rotary module, SDPA with
the default 1/sqrt(d) scale. Mask convention: prompts are left padded; ``key_mask`` (B, L) is 1 on real
tokens. A padded query attends to itself only, so its discarded output stays finite and its cached keys and
values never become NaN; real queries never see padded keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlmt.logprobs import cache_kwarg

LLAMA_FAMILY = frozenset({"llama", "mistral", "qwen2"})


class ModuleDecoder:
    """Any causal LM: ``model.forward`` with a cache that writes keys/values in place."""

    def __init__(self, model: torch.nn.Module, capacity: int):
        self.model, self.cache = model, preallocated_cache(model.config.num_hidden_layers, capacity)
        self.ck = cache_kwarg(model)

    def _run(self, ids: torch.Tensor, key_mask: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=ids, attention_mask=key_mask, position_ids=pos, **{self.ck: self.cache},
                         use_cache=True, logits_to_keep=1)
        return out.logits[:, -1]

    def prefill(self, ids: torch.Tensor, key_mask: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """(B, P) prompt ids, mask, positions -> (B, V) logits of the next token."""
        return self._run(ids, key_mask, pos)

    def step(self, tok: torch.Tensor, key_mask: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """(B,) tokens, (B, L) mask of every cached key and the new one, (B,) positions -> (B, V) logits."""
        return self._run(tok[:, None], key_mask, pos[:, None])

    def repeat_interleave(self, g: int) -> None:
        self.cache.batch_repeat_interleave(g)

    def select(self, rows: torch.Tensor) -> None:
        self.cache.batch_select_indices(rows)


def preallocated_cache(num_layers: int, capacity: int):
    """A transformers ``Cache`` whose layers write new keys/values in place into (B, kv_heads, capacity, hs)
    buffers and hand attention a view of the filled prefix, instead of growing by ``torch.cat``."""
    from transformers.cache_utils import Cache, DynamicLayer

    class PreallocatedLayer(DynamicLayer):
        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                B, H, _, hs = key_states.shape
                self.key_buf = key_states.new_empty((B, H, capacity, hs))
                self.value_buf = value_states.new_empty((B, H, capacity, hs))
                self.length, self.is_initialized = 0, True
            n = key_states.shape[-2]
            self.key_buf[:, :, self.length:self.length + n] = key_states
            self.value_buf[:, :, self.length:self.length + n] = value_states
            self.length += n
            return self._views()

        def _views(self):
            self.keys, self.values = self.key_buf[:, :, :self.length], self.value_buf[:, :, :self.length]
            return self.keys, self.values

        def batch_repeat_interleave(self, repeats: int) -> None:
            self.key_buf = self.key_buf.repeat_interleave(repeats, 0)
            self.value_buf = self.value_buf.repeat_interleave(repeats, 0)
            self._views()

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            self.key_buf, self.value_buf = self.key_buf[indices], self.value_buf[indices]
            self._views()

    return Cache(layers=[PreallocatedLayer() for _ in range(num_layers)])


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = w * x / sqrt(mean(x^2) + eps), the statistic in float32 (as transformers' LlamaRMSNorm)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, halves convention: x * cos + rotate_half(x) * sin. x (B, h, S, d); cos/sin (B, 1, S, d)."""
    x1, x2 = x.chunk(2, -1)
    return x * cos + torch.cat((-x2, x1), -1) * sin


class LlamaDecoder:
    """Functional KV-cached decode for the Llama family (see the module doc). It reads the model's weights
    when made, so make one per rollout."""

    def __init__(self, model: torch.nn.Module, capacity: int):
        cfg = model.config
        self.H, self.KV = cfg.num_attention_heads, cfg.num_key_value_heads
        self.hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.H
        self.capacity, self.rotary = capacity, model.model.rotary_emb
        self.layers = []
        for layer in model.model.layers:
            a, mlp = layer.self_attn, layer.mlp
            self.layers.append((layer.input_layernorm, a.q_proj, a.k_proj, a.v_proj, a.o_proj,
                                layer.post_attention_layernorm, mlp.gate_proj, mlp.up_proj, mlp.down_proj))
        self.embed, self.norm, self.head = model.model.embed_tokens, model.model.norm, model.get_output_embeddings()
        self.k: list[torch.Tensor] = []  # per layer (B, KV, capacity, hd)
        self.v: list[torch.Tensor] = []
        self.length = 0

    @staticmethod
    def supports(model: torch.nn.Module) -> bool:
        """Whether ``model`` is a plain Llama-family causal LM this decoder reproduces exactly."""
        cfg = getattr(model, "config", None)
        if cfg is None or getattr(cfg, "model_type", None) not in LLAMA_FAMILY or getattr(model, "peft_config", None):
            return False
        if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
            return False  # a window this decoder does not apply
        if getattr(cfg, "hidden_act", "silu") != "silu" or getattr(cfg, "mlp_bias", False):
            return False
        inner = getattr(model, "model", None)
        return inner is not None and hasattr(inner, "rotary_emb") and all(
            hasattr(layer, "self_attn") and hasattr(layer.self_attn, "q_proj") for layer in inner.layers)

    def _layers(self, x: torch.Tensor, pos: torch.Tensor, attend, write) -> torch.Tensor:
        """x (B, S, D) -> (B, S, D) after all layers; ``attend(i, q)`` -> (B, H, S, hd) attention output of
        layer i; ``write(i, k, v)`` stores its new keys/values (B, KV, S, hd)."""
        B, S, _ = x.shape
        cos, sin = self.rotary(x, pos)  # (B, S, hd)
        cos, sin = cos[:, None], sin[:, None]
        for i, (ln1, q_proj, k_proj, v_proj, o_proj, ln2, gate, up, down) in enumerate(self.layers):
            h = _rms_norm(x, ln1.weight, ln1.variance_epsilon)
            q = F.linear(h, q_proj.weight, q_proj.bias).reshape(B, S, self.H, self.hd).transpose(1, 2)
            k = F.linear(h, k_proj.weight, k_proj.bias).reshape(B, S, self.KV, self.hd).transpose(1, 2)
            v = F.linear(h, v_proj.weight, v_proj.bias).reshape(B, S, self.KV, self.hd).transpose(1, 2)
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
            write(i, k, v)
            o = attend(i, q).transpose(1, 2).reshape(B, S, self.H * self.hd)
            x = x + F.linear(o, o_proj.weight, o_proj.bias)
            h = _rms_norm(x, ln2.weight, ln2.variance_epsilon)
            x = x + F.linear(F.silu(F.linear(h, gate.weight)) * F.linear(h, up.weight), down.weight)
        return x

    def _logits(self, x_last: torch.Tensor) -> torch.Tensor:
        """(B, D) last hidden state -> (B, V) logits."""
        return self.head(_rms_norm(x_last, self.norm.weight, self.norm.variance_epsilon))

    def prefill(self, ids: torch.Tensor, key_mask: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        B, P = ids.shape
        eye = torch.eye(P, dtype=torch.bool, device=ids.device)
        allowed = ((eye.cumsum(0).bool() & key_mask.bool()[:, None, :]) | eye)[:, None]  # (B, 1, P, P) causal
        rep = self.H // self.KV

        def write(i, k, v):
            self.k.append(k.new_empty((B, self.KV, self.capacity, self.hd)))
            self.v.append(v.new_empty((B, self.KV, self.capacity, self.hd)))
            self.k[i][:, :, :P], self.v[i][:, :, :P] = k, v

        def attend(i, q):
            k, v = self.k[i][:, :, :P], self.v[i][:, :, :P]
            return F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                                  attn_mask=allowed)

        x = self._layers(self.embed(ids), pos, attend, write)
        self.length = P
        return self._logits(x[:, -1])

    def step(self, tok: torch.Tensor, key_mask: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        B = tok.shape[0]
        t, L = self.length, self.length + 1
        rep = self.H // self.KV
        mask = key_mask[:, None, None, :].bool()  # (B, 1, 1, L)

        def write(i, k, v):
            self.k[i][:, :, t:L], self.v[i][:, :, t:L] = k, v

        def attend(i, q):
            # GQA without expanding the cache: the rep query heads of kv head j (heads j*rep .. j*rep+rep-1,
            # as transformers' repeat_kv pairs them) become rep query positions against that kv head
            qg = q.reshape(B, self.KV, rep, self.hd)
            o = F.scaled_dot_product_attention(qg, self.k[i][:, :, :L], self.v[i][:, :, :L], attn_mask=mask)
            return o.reshape(B, self.H, 1, self.hd)

        x = self._layers(self.embed(tok[:, None]), pos[:, None], attend, write)
        self.length = L
        return self._logits(x[:, -1])

    def repeat_interleave(self, g: int) -> None:
        self.k = [k.repeat_interleave(g, 0) for k in self.k]
        self.v = [v.repeat_interleave(g, 0) for v in self.v]

    def select(self, rows: torch.Tensor) -> None:
        self.k = [k[rows] for k in self.k]
        self.v = [v[rows] for v in self.v]


def make_decoder(model: torch.nn.Module, capacity: int) -> ModuleDecoder | LlamaDecoder:
    """The functional decoder for a supported Llama-family model whose weights are bfloat16 (the rollout's
    sampling copy), else the module's own forward."""
    low = next(model.parameters()).dtype in (torch.bfloat16, torch.float16)
    return (LlamaDecoder if low and LlamaDecoder.supports(model) else ModuleDecoder)(model, capacity)
