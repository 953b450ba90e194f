from pathlib import Path

import pytest

from kp_utils.config import ConfigError, config_from_dict, load_config

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


def test_params_adapter_sweep_accepted(tmp_path):
    text = MINIMAL + (
        "  lora_rank: [1, 4]\n"
        "  lora_alpha: [2, 8]\n"
        "  target_modules: [[down_proj], [down_proj, up_proj]]\n"
        "  layers: [[0, 1], null]\n"
    )
    train = load_config(write(tmp_path, text)).train
    assert train.lora_rank == [1, 4]
    assert train.lora_alpha == [2.0, 8.0]
    assert all(isinstance(alpha, float) for alpha in train.lora_alpha)
    assert train.target_modules == [["down_proj"], ["down_proj", "up_proj"]]
    assert train.layers == [[0, 1], None]


def test_params_alpha_per_rank_accepted(tmp_path):
    train = load_config(write(tmp_path, MINIMAL + "  lora_alpha_per_rank: 2\n")).train
    assert train.lora_alpha_per_rank == 2.0
    assert isinstance(train.lora_alpha_per_rank, float)


def test_params_alpha_both_keys_raises(tmp_path):
    text = MINIMAL + "  lora_alpha: 4\n  lora_alpha_per_rank: 2\n"
    with pytest.raises(ConfigError, match=r"train.lora_alpha \(4\) and train.lora_alpha_per_rank"):
        load_config(write(tmp_path, text))


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("lora_rank: 0", r"train.lora_rank must be an int >= 1 .*got 0"),
        ("lora_rank: [1, 0]", r"train.lora_rank must be an int >= 1 .*got \[1, 0\]"),
        ("lora_rank: []", r"train.lora_rank must be an int >= 1 .*got \[\]"),
        ("lora_alpha: 0", r"train.lora_alpha must be a number > 0 .*got 0.0"),
        ("lora_alpha: [2, -1]", r"train.lora_alpha must be a number > 0 .*got \[2.0, -1.0\]"),
        ("lora_alpha_per_rank: 0", r"train.lora_alpha_per_rank must be > 0 or null, got 0.0"),
        ("target_modules: []", r"train.target_modules must be a non-empty list .*got \[\]"),
        ("target_modules: ['']", r"train.target_modules must be a non-empty list .*got \[''\]"),
        ("target_modules: [[down_proj], []]", r"train.target_modules must be .*\[\]\]"),
        ("layers: []", r"train.layers must be null, a non-empty list .*got \[\]"),
        ("layers: [-1]", r"train.layers must be null, a non-empty list .*got \[-1\]"),
        ("layers: [[0], [-2]]", r"train.layers must be null, .*got \[\[0\], \[-2\]\]"),
        ("layers: [[0], []]", r"train.layers must be null, .*got \[\[0\], \[\]\]"),
    ],
)
def test_params_bad_adapter_axis_raises(tmp_path, line, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, MINIMAL + f"  {line}\n"))


@pytest.mark.parametrize(
    "line",
    ["target_modules: [down_proj, [up_proj]]", "layers: [0, [1]]", "lora_rank: [1, 2.5]"],
)
def test_params_mixed_adapter_axis_raises(tmp_path, line):
    key = line.split(":")[0]
    with pytest.raises(ConfigError, match=f"key 'train.{key}' must be"):
        load_config(write(tmp_path, MINIMAL + f"  {line}\n"))


def test_params_capacity_reliability_range(tmp_path):
    text = MINIMAL + "analysis:\n  capacity_min_reliability: 1.5\n"
    with pytest.raises(ConfigError, match="analysis.capacity_min_reliability must lie in"):
        load_config(write(tmp_path, text))


def test_params_executor_defaults_local(tmp_path):
    executor = load_config(write(tmp_path, MINIMAL)).executor
    assert executor.kind == "local"
    assert executor.address is None
    assert executor.cpus_per_cell == 1
    assert executor.gpus_per_cell == 0.0
    assert executor.max_retries == 2


def test_params_executor_ray_section_loads(tmp_path):
    text = MINIMAL + "executor:\n  kind: ray\n  address: ray://head:10001\n  gpus_per_cell: 1\n"
    executor = load_config(write(tmp_path, text)).executor
    assert executor.kind == "ray"
    assert executor.address == "ray://head:10001"
    assert executor.gpus_per_cell == 1.0


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ("kind: dask", r"'executor.kind' must be one of \('local', 'ray'\), got 'dask'"),
        ("cpus_per_cell: 0", "executor.cpus_per_cell must be >= 1, got 0"),
        ("cpus_per_cell: 1.5", r"'executor.cpus_per_cell' must be int"),
        ("gpus_per_cell: -1", r"executor.gpus_per_cell must be >= 0, got -1.0"),
        ("max_retries: -1", "executor.max_retries must be >= 0, got -1"),
        ("address: ''", "executor.address must be a Ray address"),
        ("local_num_cpus: 2\n  cpus_per_cell: 4", r"executor.local_num_cpus \(2\) must be null"),
        ("retries: 3", r"unknown key\(s\) \['retries'\] in section 'executor'"),
    ],
)
def test_params_bad_executor_raises(tmp_path, lines, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, MINIMAL + f"executor:\n  {lines}\n"))


def test_params_ray_numbered_gpu_raises(tmp_path):
    text = MINIMAL + "model:\n  device: cuda:1\nexecutor:\n  kind: ray\n  gpus_per_cell: 1\n"
    with pytest.raises(ConfigError, match="model.device 'cuda:1' cannot be used with"):
        load_config(write(tmp_path, text))


def test_params_ray_cuda_without_gpus_raises(tmp_path):
    text = MINIMAL + "model:\n  device: cuda\nexecutor:\n  kind: ray\n"
    with pytest.raises(ConfigError, match="needs executor.gpus_per_cell > 0"):
        load_config(write(tmp_path, text))


def test_config_from_dict_round_trip(tmp_path):
    config = load_config(write(tmp_path, MINIMAL + "executor:\n  kind: ray\n"))
    assert config_from_dict(config.to_dict()) == config


def test_config_from_dict_checks_types(tmp_path):
    data = load_config(write(tmp_path, MINIMAL)).to_dict()
    data["executor"]["max_retries"] = "two"
    with pytest.raises(ConfigError, match="'executor.max_retries' must be int"):
        config_from_dict(data)


def test_params_epoch_eval_every_zero_raises(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("study: {name: x, seed: 0}\ntrain: {n_unknown: [1], epoch_eval_every: 0}\n")
    with pytest.raises(ConfigError, match="train.epoch_eval_every must be >= 1, got 0"):
        load_config(str(path))
