"""Shared fixtures: the embedded tokenizer and a tiny randomly initialised Llama model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from kp_utils.config import load_config
from kp_utils.models import materialise_embedded
from kp_utils.runner import run_study

EMBEDDED = "smollm2-135m-instruct"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def ci_run(tmp_path_factory):
    """Run the ci study once per session into a temporary folder and return its config."""
    folder = tmp_path_factory.mktemp("ci_study")
    params = yaml.safe_load((ROOT / "params" / "ci.yaml").read_text())
    params["study"]["run_root"] = str(folder / "runs")
    params["study"]["figures_root"] = str(folder / "figures")
    path = folder / "ci.yaml"
    path.write_text(yaml.safe_dump(params))
    run_study(path)
    return load_config(path)


@pytest.fixture(scope="session")
def embedded_dir():
    """Folder of the dequantised embedded model (dequantised on first use, then cached)."""
    return materialise_embedded(EMBEDDED)


@pytest.fixture(scope="session")
def tokenizer(embedded_dir):
    """The embedded model's tokenizer, padding on the left as the loader sets it."""
    loaded = AutoTokenizer.from_pretrained(embedded_dir)
    loaded.padding_side = "left"
    return loaded


def build_tiny_llama(vocab_size: int, seed: int = 0, **overrides) -> LlamaForCausalLM:
    """Build a 2-layer Llama with hidden size 32: random weights, fixed by `seed`.

    `overrides` are further LlamaConfig fields; the rest keep LlamaConfig's defaults.
    """
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        **overrides,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture()
def tiny_model(tokenizer):
    """A tiny random Llama over the embedded tokenizer's vocabulary."""
    return build_tiny_llama(len(tokenizer), max_position_embeddings=512, tie_word_embeddings=True)
