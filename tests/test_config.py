from pathlib import Path

import pytest

from kp_utils.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent
MINIMAL = "study:\n  name: t\n  seed: 1\ntrain:\n  n_unknown: [1]\n"


def write(tmp_path, text):
    path = tmp_path / "study.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("path", sorted((ROOT / "params").glob("*.yaml")), ids=lambda p: p.name)
def test_params_files_all_validate(path):
    config = load_config(path)
    assert config.study.name == path.stem


def test_params_minimal_uses_paper_defaults(tmp_path):
    config = load_config(write(tmp_path, MINIMAL))
    assert config.train.lora_rank == 1
    assert config.train.lora_alpha == 2.0
    assert config.train.target_modules == ["down_proj", "gate_proj", "up_proj"]
    assert config.data.n_prompts == 10


def test_params_unknown_key_raises(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['lora_rnak'\] in section 'train'"):
        load_config(write(tmp_path, MINIMAL + "  lora_rnak: 2\n"))


def test_params_unknown_section_raises(tmp_path):
    with pytest.raises(ConfigError, match="unknown section"):
        load_config(write(tmp_path, MINIMAL + "trainer: {}\n"))


def test_params_missing_seed_raises(tmp_path):
    with pytest.raises(ConfigError, match=r"missing key 'study.seed' \(expected int\)"):
        load_config(write(tmp_path, "study:\n  name: t\ntrain:\n  n_unknown: [1]\n"))


def test_params_wrong_type_names_file_key_type(tmp_path):
    path = write(tmp_path, MINIMAL + "  n_epochs: ten\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert str(path) in message
    assert "'train.n_epochs' must be int" in message


def test_params_bool_is_not_int(tmp_path):
    with pytest.raises(ConfigError, match="train.batch_size"):
        load_config(write(tmp_path, MINIMAL + "  batch_size: true\n"))


def test_params_int_accepted_as_float(tmp_path):
    config = load_config(write(tmp_path, MINIMAL + "  learning_rate: 1\n"))
    assert isinstance(config.train.learning_rate, float)


def test_params_bad_extra_kind_raises(tmp_path):
    with pytest.raises(ConfigError, match=r"extra_kinds has \['synonym'\]"):
        load_config(write(tmp_path, MINIMAL + "  extra_kinds: [synonym]\n"))


def test_params_bad_choice_raises(tmp_path):
    with pytest.raises(ConfigError, match="prompt_style' must be one of"):
        load_config(write(tmp_path, MINIMAL + "model:\n  prompt_style: xml\n"))


def test_params_invalid_yaml_raises(tmp_path):
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(write(tmp_path, "study: [unclosed\n"))


def test_params_missing_file_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="Params file not found"):
        load_config(tmp_path / "absent.yaml")


def test_run_dir_derived_from_name(tmp_path):
    config = load_config(write(tmp_path, MINIMAL))
    assert config.run_dir == Path(config.project_root) / "runs" / "t"
    assert config.figures_dir == Path(config.project_root) / "figures" / "t"


def test_fingerprint_tracks_section_changes(tmp_path):
    first = load_config(write(tmp_path, MINIMAL))
    second = load_config(write(tmp_path, MINIMAL + "  n_epochs: 3\n"))
    assert first.fingerprint("data") == second.fingerprint("data")
    assert first.fingerprint("train") != second.fingerprint("train")


def test_params_weakly_known_off_by_default(tmp_path):
    config = load_config(write(tmp_path, MINIMAL))
    assert config.data.weakly_known_samples == 0
    assert config.data.sampling_temperature == 0.5
    assert config.data.sampling_top_k == 40


def test_params_weakly_known_samples_accepted(tmp_path):
    text = MINIMAL + "data:\n  weakly_known_samples: 16\n  sampling_temperature: 1\n"
    config = load_config(write(tmp_path, text))
    assert config.data.weakly_known_samples == 16
    assert isinstance(config.data.sampling_temperature, float)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("weakly_known_samples: -1", r"data.weakly_known_samples must be >= 0 .*got -1"),
        ("sampling_temperature: 0", r"data.sampling_temperature must be > 0, got 0.0"),
        ("sampling_temperature: -0.5", r"data.sampling_temperature must be > 0, got -0.5"),
        ("sampling_top_k: 0", r"data.sampling_top_k must be >= 1, got 0"),
    ],
)
def test_params_bad_sampling_raises(tmp_path, line, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, MINIMAL + f"data:\n  {line}\n"))


def test_params_unknown_relation_raises(tmp_path):
    with pytest.raises(ConfigError, match=r"data.relations has unknown \['country_capitol'\]"):
        load_config(write(tmp_path, MINIMAL + "data:\n  relations: [country_capitol]\n"))


def test_params_negative_cap_raises(tmp_path):
    with pytest.raises(ConfigError, match="data.n_facts_per_relation must be >= 1"):
        load_config(write(tmp_path, MINIMAL + "data:\n  n_facts_per_relation: -3\n"))


def test_params_bad_device_raises(tmp_path):
    with pytest.raises(ConfigError, match="model.device must be auto, cpu, mps, cuda"):
        load_config(write(tmp_path, MINIMAL + "model:\n  device: gpu\n"))


def test_params_cuda_index_accepted(tmp_path):
    assert load_config(write(tmp_path, MINIMAL + "model:\n  device: cuda:1\n")).model.device == (
        "cuda:1"
    )


def test_params_missing_external_file_raises(tmp_path):
    with pytest.raises(ConfigError, match="data.external_path not found"):
        load_config(write(tmp_path, MINIMAL + f"data:\n  external_path: {tmp_path}/none.csv\n"))


def test_params_grid_beyond_fact_cap_raises(tmp_path):
    text = MINIMAL.replace("[1]", "[5000]") + "data:\n  n_facts_per_relation: 4\n"
    with pytest.raises(ConfigError, match="asks for 5000 Unknown facts"):
        load_config(write(tmp_path, text))
