"""Decoders for the rollout: the KV-cached forward passes :func:`rlmt.rollout.generate` drives.

Two implementations of one small interface (``prefill``, ``extend``, ``step``, ``repeat_interleave``, ``select``):

- :class:`ModuleDecoder` calls the model's own ``forward`` with a cache written in place. Any causal LM.
- :class:`LlamaDecoder`, a functional decoder for the Llama family (Llama, Mistral, Qwen2, SmolLM), used when
  the rollout samples in bfloat16 or float16 (a model that autocasts, :mod:`rlmt.rollout.precision`, or one
  loaded in that dtype), and in float32 on a CPU where oneDNN prepacks float32 weights. In bfloat16 a 135M
  model's decode step is mostly per-op overhead, not arithmetic: at 32 rows its ~210 bfloat16 GEMMs take
  ~27 ms of a ~80 ms module step. The functional form skips the modules, cache objects and mask building, and
  folds GQA into the query axis instead of expanding the cache. Measured on SmolLM2-135M in bfloat16 (2-core
  AMX CPU, median of 4 x 10 steps): 71 vs 84 ms a step at 32 rows, 56 vs 64 ms at 12.

  It holds its own copy of the weights in the sampling dtype, made once per rollout from the model's (the
  model is not touched). On a CPU with oneDNN the copy is prepacked in oneDNN's blocked layout
  (:func:`_packing`): the default GEMM re-lays an unpacked weight out on every call, and at a rollout's few
  rows that costs more than the product. bfloat16 per call (SmolLM2-135M shapes, 2-core AMX): 32 rows
  157 -> 122 us (576 x 1536), 8 rows 74 -> 37 us, the output layer 4.7 -> 1.7 ms, bit-identical. float32
  (2-core AMD EPYC, 2026-12-07): 32 rows 392 -> 276 us (1536 x 576), 8 rows 178 -> 84 us, the output layer
  (49152 x 576) 23.8 -> 9.7 ms at 32 rows and 16.5 -> 4.4 ms at 8, equal to ``F.linear`` within float32
  rounding (oneDNN sums in another order); the whole rollout ran 1.69x faster than through the module's
  forward (``benchmarks/rollout_throughput.py --module-forward``). Copying and packing the weights takes
  ~0.3-1 s for this model, so a rollout or evaluation in several batches makes the copy once
  (:func:`weights_shared`).

Same math as transformers' Llama: RMSNorm statistics in float32, the model's own rotary module, SDPA with
the default 1/sqrt(d) scale. Mask convention: prompts are left padded; ``key_mask`` (B, L) is 1 on real
tokens. A padded query attends to itself only, so its discarded output stays finite and its cached keys and
values never become NaN; real queries never see padded keys.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from typing import Callable

import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook

from rlmt.rollout.logprobs import cache_kwarg

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

    def extend(self, ids: torch.Tensor, key_mask: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """(B, S) more tokens after the cached ones (left-padded: padding marked 0 in ``key_mask``), (B, L + S)
        mask of every cached key and the new ones, (B, S) positions -> (B, V) logits after the last."""
        return self._run(ids, key_mask, pos)

    def repeat_interleave(self, g: int) -> None:
        self.cache.batch_repeat_interleave(g)

    def grow(self, capacity: int) -> None:
        """Room for ``capacity`` cache slots (copies what is cached)."""
        for layer in self.cache.layers:
            layer.grow(capacity)

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

        def grow(self, size: int) -> None:
            if not self.is_initialized or size <= self.key_buf.shape[2]:
                return
            B, H, _, hs = self.key_buf.shape
            k, v = self.key_buf.new_empty((B, H, size, hs)), self.value_buf.new_empty((B, H, size, hs))
            n = self.length
            k[:, :, :n], v[:, :, :n] = self.key_buf[:, :, :n], self.value_buf[:, :, :n]
            self.key_buf, self.value_buf = k, v
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


@functools.cache
def _packing(dtype: torch.dtype) -> bool:
    """Whether oneDNN can prepack CPU weights of ``dtype`` for its linear op, checked once per process on a
    small product against ``F.linear`` (any failure means no): bit-identical in bfloat16; in float32 within
    rounding, since oneDNN's float32 kernels sum in another order than the default GEMM."""
    if dtype not in (torch.bfloat16, torch.float32) or not torch.backends.mkldnn.is_available():
        return False
    try:
        g = torch.Generator().manual_seed(0)
        w = torch.randn(48, 40, generator=g).to(dtype)
        x = torch.randn(5, 40, generator=g).to(dtype)
        y = torch.ops.mkldnn._linear_pointwise(x, torch.ops.mkldnn._reorder_linear_weight(w, 32), None, "none",
                                               [], "")
        ref = F.linear(x, w)
        return bool(torch.equal(y, ref) if dtype == torch.bfloat16 else torch.allclose(y, ref, rtol=1e-5, atol=1e-5))
    except (RuntimeError, AttributeError):
        return False


def _linear_of(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype
               ) -> Callable[[torch.Tensor], torch.Tensor]:
    """x (..., in) -> (..., out) = x W^T + b with W and b copied to ``dtype`` now (prepacked where :func:`_packing`)."""
    w = weight.detach().to(dtype)
    b = bias.detach().to(dtype) if bias is not None else None
    if w.device.type == "cpu" and _packing(dtype):
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 32)  # 32: a batch-size hint; any row count works
        del w
        return lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")
    return lambda x: F.linear(x, w, b)


_shared: dict | None = None  # while weights_shared() is open: (id(model), dtype) -> (model ref, fingerprint, weights)


@contextlib.contextmanager
def weights_shared():
    """Decoders made inside this scope share one copy of a model's weights (:class:`LlamaDecoder`'s, cast and
    prepacked) for as long as the model is unchanged, so a rollout or an evaluation in several batches copies
    them once, not once a batch. The copy is freed when the outermost scope closes (nested scopes are the outer
    one), and while it is held it costs the memory of the linear layers once more.

    Unchanged means the same storage, no in-place update since (each parameter's version counter), and no
    optimizer step since (a step of any ``torch.optim`` optimizer drops every shared copy: fused optimizers
    leave version counters as they are). A write through ``param.data`` is not seen: do not make one inside
    a scope."""
    global _shared
    if _shared is not None:
        yield
        return
    hook = register_optimizer_step_post_hook(lambda *_: _forget())
    _shared = {}
    try:
        yield
    finally:
        _shared = None
        hook.remove()


def _forget() -> None:
    shared = _shared
    if shared is not None:
        shared.clear()


def _weights_of(model: torch.nn.Module, dtype: torch.dtype) -> tuple[list, tuple, Callable]:
    """(per-layer weights, final norm, output layer) of ``model`` in ``dtype``: the shared copy where
    :func:`weights_shared` holds an unchanged one, else made now."""
    shared = _shared  # read once: a scope may close on another thread
    fingerprint = tuple((p.data_ptr(), p._version) for p in model.parameters())
    key = (id(model), dtype)
    entry = shared.get(key) if shared is not None else None
    if entry is not None and entry[0]() is model and entry[1] == fingerprint:
        return entry[2]

    def lin(m):
        return _linear_of(m.weight, m.bias, dtype)

    def norm(m):
        return m.weight.detach().to(dtype), m.variance_epsilon

    layers = []
    for layer in model.model.layers:
        a, mlp = layer.self_attn, layer.mlp
        layers.append((norm(layer.input_layernorm), lin(a.q_proj), lin(a.k_proj), lin(a.v_proj), lin(a.o_proj),
                       norm(layer.post_attention_layernorm), lin(mlp.gate_proj), lin(mlp.up_proj),
                       lin(mlp.down_proj)))
    weights = (layers, norm(model.model.norm), lin(model.get_output_embeddings()))
    if shared is not None:
        shared[key] = (weakref.ref(model), fingerprint, weights)  # replaces a stale copy of this model
    return weights


class LlamaDecoder:
    """Functional KV-cached decode for the Llama family (see the module doc), in ``dtype`` (default: the
    model's). It copies the model's weights when made (once for all the decoders made inside
    :func:`weights_shared` while the model is unchanged), so make one per rollout."""

    def __init__(self, model: torch.nn.Module, capacity: int, dtype: torch.dtype | None = None):
        cfg = model.config
        self.dtype = dtype = dtype or next(model.parameters()).dtype
        self.H, self.KV = cfg.num_attention_heads, cfg.num_key_value_heads
        self.hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.H
        self.capacity, self.rotary = capacity, model.model.rotary_emb
        self.layers, self.norm, self.head = _weights_of(model, dtype)
        self.embed = model.model.embed_tokens.weight  # rows looked up, then cast: the rows of a cast table
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
            h = _rms_norm(x, *ln1)
            q = q_proj(h).reshape(B, S, self.H, self.hd).transpose(1, 2)
            k = k_proj(h).reshape(B, S, self.KV, self.hd).transpose(1, 2)
            v = v_proj(h).reshape(B, S, self.KV, self.hd).transpose(1, 2)
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
            write(i, k, v)
            o = attend(i, q).transpose(1, 2).reshape(B, S, self.H * self.hd)
            x = x + o_proj(o)
            h = _rms_norm(x, *ln2)
            x = x + down(F.silu(gate(h)) * up(h))
        return x

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.embed).to(self.dtype)

    def _logits(self, x_last: torch.Tensor) -> torch.Tensor:
        """(B, D) last hidden state -> (B, V) logits."""
        return self.head(_rms_norm(x_last, *self.norm))

    def prefill(self, ids: torch.Tensor, key_mask: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        self.k, self.v, self.length = [], [], 0
        return self.extend(ids, key_mask, pos)

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

        x = self._layers(self._embed(tok[:, None]), pos[:, None], attend, write)
        self.length = L
        return self._logits(x[:, -1])

    def extend(self, ids: torch.Tensor, key_mask: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        B, S = ids.shape
        t, L = self.length, self.length + S
        idx = torch.arange(L, device=ids.device)
        causal = idx[None, :] <= idx[t:, None]  # (S, L): new token s sees keys up to its own slot t + s
        own = idx[None, :] == idx[t:, None]
        allowed = ((causal[None] & key_mask.bool()[:, None, :]) | own[None])[:, None]  # (B, 1, S, L)
        rep = self.H // self.KV

        def write(i, k, v):
            if len(self.k) <= i:  # the first pass (prefill): this layer's buffers
                self.k.append(k.new_empty((B, self.KV, self.capacity, self.hd)))
                self.v.append(v.new_empty((B, self.KV, self.capacity, self.hd)))
            self.k[i][:, :, t:L], self.v[i][:, :, t:L] = k, v

        def attend(i, q):
            k, v = self.k[i][:, :, :L], self.v[i][:, :, :L]
            return F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                                  attn_mask=allowed)

        x = self._layers(self._embed(ids), pos, attend, write)
        self.length = L
        return self._logits(x[:, -1])

    def grow(self, capacity: int) -> None:
        """Room for ``capacity`` cache slots (copies what is cached)."""
        if capacity <= self.capacity:
            return
        n = self.length

        def bigger(x: torch.Tensor) -> torch.Tensor:
            out = x.new_empty((*x.shape[:2], capacity, x.shape[3]))
            out[:, :, :n] = x[:, :, :n]
            return out

        self.k, self.v, self.capacity = [bigger(k) for k in self.k], [bigger(v) for v in self.v], capacity

    def repeat_interleave(self, g: int) -> None:
        self.k = [k.repeat_interleave(g, 0) for k in self.k]
        self.v = [v.repeat_interleave(g, 0) for v in self.v]

    def select(self, rows: torch.Tensor) -> None:
        self.k = [k[rows] for k in self.k]
        self.v = [v[rows] for v in self.v]


def functional_dtype(model: torch.nn.Module, autocast: torch.dtype | None = None) -> torch.dtype | None:
    """The dtype :class:`LlamaDecoder` samples ``model`` in, or None when the rollout uses the module's forward:
    bfloat16/float16 (``autocast``, else the weights') for a model it supports, and float32 on a CPU where
    oneDNN prepacks float32 weights (:func:`_packing`)."""
    if not LlamaDecoder.supports(model) or any(type(p).__name__ == "DTensor" for p in model.parameters()):
        return None  # FSDP2-sharded layers are reached through their forward only
    weight = next(model.parameters())
    dtype = autocast or weight.dtype
    if dtype in (torch.bfloat16, torch.float16):
        return dtype
    if dtype == torch.float32 and weight.device.type == "cpu" and _packing(torch.float32):
        return dtype
    return None


def make_decoder(model: torch.nn.Module, capacity: int, autocast: torch.dtype | None = None,
                 ) -> ModuleDecoder | LlamaDecoder:
    """The functional decoder, with its own copy of the weights, where :func:`functional_dtype` gives one,
    else the module's own forward."""
    dtype = functional_dtype(model, autocast)
    return LlamaDecoder(model, capacity, dtype) if dtype is not None else ModuleDecoder(model, capacity)
