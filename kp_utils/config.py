"""Study configuration: one YAML file describes a whole study, one section per notebook.

`load_config` reads the file with `yaml.safe_load` and builds frozen dataclasses. Every section
and key must be known, and every field without a default must be present. Every value must have
the annotated type, and errors name the file, the key and the expected type. Defaults live only in
the dataclasses below. Relative paths in the file are resolved against the project root (see
`find_project_root`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from kp_utils.categories import ExtraKind

PAPER_TARGET_MODULES = ("down_proj", "gate_proj", "up_proj")
PAPER_LORA_RANK = 1
PAPER_LORA_ALPHA = 2.0
EXTRA_KIND_VALUES = tuple(kind.value for kind in ExtraKind)


@dataclass(frozen=True)
class StudySection:
    """Names, seed and output roots of the study."""

    name: str  # run folder is <run_root>/<name>, figures go to <figures_root>/<name>
    seed: int  # global seed for sampling facts, exemplars and benchmark subsets
    run_root: str = "runs"
    figures_root: str = "figures"
    show_progress: bool = True  # tqdm bars on long loops


@dataclass(frozen=True)
class ModelSection:
    """The model under study."""

    name_or_path: str = "embedded:smollm2-135m-instruct"  # "embedded:<name>", folder or hub id
    prompt_style: str = "chat"  # "chat" uses the chat template; "plain" is for base models
    device: str = "auto"  # "auto" picks CUDA when present
    dtype: str = "auto"  # "auto" is bfloat16 on CUDA and float32 on the CPU
    trust_remote_code: bool = False


@dataclass(frozen=True)
class DataSection:
    """Notebook 01: the fact base and the base model's knowledge categories."""

    relations: list[str] | None = None  # None keeps every relation of the embedded fact base
    n_facts_per_relation: int | None = None  # None keeps all; a cap logs a WARNING
    n_triviaqa: int = 0  # TriviaQA questions added as a second pool
    external_path: str | None = None  # CSV, JSONL or parquet with question/answer columns
    external_mode: str = "extend"  # "extend" the embedded base or "replace" it
    external_question_column: str = "question"
    external_answer_column: str = "answer"
    external_aliases_column: str | None = None  # a list, a JSON list or "a|b|c"; None: answer only
    external_relation_column: str | None = None  # None puts every row in relation "external"
    skip_invalid_rows: bool = False  # skip bad rows of the external file instead of failing
    n_heldout_templates: int = 1
    n_prompts: int = 10  # few-shot prompts per question (Pletenev et al., 2025: 10)
    n_shots: int = 4  # exemplars per prompt
    max_new_tokens: int = 32
    batch_size: int = 32
    # Sampled replies per prompt for questions no greedy prompt gets right; one of them being
    # right makes the question WeaklyKnown. 0 turns WeaklyKnown off; Gekhman et al. (2024) use 16.
    weakly_known_samples: int = 0
    sampling_temperature: float = 0.5  # Gekhman et al. (2024) sample at temperature 0.5
    sampling_top_k: int = 40  # each sampled token comes from the 40 most probable ones


@dataclass(frozen=True)
class TrainSection:
    """Notebook 02: the grid of adapters and the LoRA recipe (defaults from the paper)."""

    n_unknown: list[int]
    n_extra_per_unknown: list[int] = field(default_factory=lambda: [0])
    extra_kinds: list[str] = field(default_factory=lambda: list(EXTRA_KIND_VALUES))
    seeds: list[int] = field(default_factory=lambda: [0])
    # The adapter axes below take one value or a list of values to sweep; `expand_grid`
    # crosses them with n_unknown, the extras and the seeds.
    lora_rank: int | list[int] = 1
    lora_alpha: float | list[float] = 2.0
    # When set, alpha is this ratio times each rank, and lora_alpha must be left out.
    lora_alpha_per_rank: float | None = None
    lora_dropout: float = 0.1
    # One list of module names, or a list of such lists to sweep.
    target_modules: list[str] | list[list[str]] = field(
        default_factory=lambda: list(PAPER_TARGET_MODULES)
    )
    # One list of layer indices, or a list of lists (null inside one: every layer) to sweep.
    layers: list[int] | list[list[int] | None] | None = None  # None adapts every layer
    learning_rate: float = 1e-3
    n_epochs: int = 10
    batch_size: int = 16
    weight_decay: float = 0.0
    loss_on_reply_only: bool = False  # False: loss over the whole sequence
    max_length: int = 128  # tokens per training example; longer ones are truncated
    epoch_eval_n_prompts: int | None = None  # prompts for per-epoch reliability; None: all
    # Per-epoch reliability every this many epochs and after the last; 1 measures every epoch.
    epoch_eval_every: int = 1


@dataclass(frozen=True)
class EvalSection:
    """Notebook 03: per-adapter measures and benchmarks."""

    explode_ratio: float = 5.0  # an answer "explodes" when given this many times more than base
    explode_min_count: int = 5
    mmlu_n_questions: int | None = None  # None scores all 14,042 test questions
    truthfulqa_source: str = "../shared/data/truthfulqa"  # CSV path, folder or hub dataset
    truthfulqa_n_questions: int | None = None
    arc_subsets: list[str] = field(default_factory=lambda: ["ARC-Easy", "ARC-Challenge"])
    arc_n_questions: int | None = None
    mmlu_n_shots: int = 5
    n_bootstrap: int = 1000
    batch_size: int = 16
    # NOTE: the embedded 135M model scores at chance on MMLU, so on the CPU study MMLU cannot
    # show harm; TruthfulQA and ARC-Easy can. Set a benchmark's n_questions to 0 to skip it.


@dataclass(frozen=True)
class AnalysisSection:
    """Notebook 04: figures and tables."""

    figure_formats: list[str] = field(default_factory=lambda: ["png", "pdf"])
    # An adapter size has learned n facts when its reliability on them, averaged over seeds,
    # reaches this share. The capacity threshold is the largest such n (see kp_utils.capacity).
    capacity_min_reliability: float = 0.95
    # Params files of other studies whose results join this one in the two-model comparison
    # (Figure 5 of Pletenev et al., 2025). Run their notebooks 01-03 first.
    compare_with: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ExecutorSection:
    """Notebook 02: where the grid cells run. Leaving the section out keeps the local executor."""

    # "local" trains the cells one after another in the notebook's process, and notebook 03
    # evaluates them. "ray" sends each cell to a Ray cluster as one task that trains and then
    # evaluates it, so notebook 03 only collects the results.
    kind: str = "local"
    # Ray cluster to join, e.g. "ray://head:10001" or "10.0.0.5:6379". None: $RAY_ADDRESS, and
    # when that is unset too, a Ray instance started on this machine.
    address: str | None = None
    cpus_per_cell: int = 1  # CPUs a cell task requests; also its torch thread count
    gpus_per_cell: float = 0.0  # GPUs a cell task requests; a fraction lets tasks share a GPU
    max_retries: int = 2  # retries of a failed cell task, on any error, before it is reported
    local_num_cpus: int | None = None  # CPUs of a Ray instance started here; None: all


@dataclass(frozen=True)
class StudyConfig:
    """A whole study: the sections of notebooks 01 to 04, the study, model and executor."""

    study: StudySection
    model: ModelSection
    data: DataSection
    train: TrainSection
    eval: EvalSection
    analysis: AnalysisSection
    executor: ExecutorSection = field(default_factory=ExecutorSection)
    source_path: str = ""  # the params file this was read from
    project_root: str = ""

    @property
    def run_dir(self) -> Path:
        """Folder holding this study's executed notebooks and artifacts."""
        return Path(self.project_root) / self.study.run_root / self.study.name

    @property
    def figures_dir(self) -> Path:
        """Folder receiving this study's figures and tables."""
        return Path(self.project_root) / self.study.figures_root / self.study.name

    def resolve_path(self, path: str) -> Path:
        """Resolve a path from the params file against the project root."""
        candidate = Path(path).expanduser()
        return candidate if candidate.is_absolute() else Path(self.project_root) / candidate

    def to_dict(self) -> dict:
        """Return the resolved configuration as plain data, for logs and run records."""
        return dataclasses.asdict(self)

    def fingerprint(self, *sections: str) -> str:
        """Hash the named sections, so outputs can name exactly the settings they depend on."""
        payload = {name: dataclasses.asdict(getattr(self, name)) for name in sections}
        text = json.dumps(payload, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def sweep_values(value) -> list:
    """Return the values of a field that takes one value or a list to sweep, as a list."""
    return list(value) if isinstance(value, (list, tuple)) else [value]


def module_sets(target_modules) -> list[tuple[str, ...]]:
    """Return the module sets of `train.target_modules`: one list of names, or a list of lists."""
    if all(isinstance(name, str) for name in target_modules):
        return [tuple(target_modules)]
    return [tuple(names) for names in target_modules]


def layer_sets(layers) -> list[tuple[int, ...] | None]:
    """Return the layer sets of `train.layers`, where None in the result means every layer."""
    if layers is None:
        return [None]
    if all(isinstance(index, int) for index in layers):
        return [tuple(layers)]
    return [None if indices is None else tuple(indices) for indices in layers]


def alpha_values(train, rank: int) -> list[float]:
    """Return the LoRA alphas paired with `rank`: ratio x rank, or the lora_alpha values."""
    ratio = getattr(train, "lora_alpha_per_rank", None)
    if ratio is not None:
        return [float(ratio) * rank]
    return [float(alpha) for alpha in sweep_values(train.lora_alpha)]


SECTIONS = {
    "study": StudySection,
    "model": ModelSection,
    "data": DataSection,
    "train": TrainSection,
    "eval": EvalSection,
    "analysis": AnalysisSection,
    "executor": ExecutorSection,
}
CHOICES = {
    ("model", "prompt_style"): ("chat", "plain"),
    ("model", "dtype"): ("auto", "float32", "bfloat16", "float16"),
    ("data", "external_mode"): ("extend", "replace"),
    ("executor", "kind"): ("local", "ray"),
}


class ConfigError(ValueError):
    """A params file that is malformed, has unknown or missing keys, or contains invalid values."""


def _type_name(annotation) -> str:
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _matches(value, annotation) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, option) for option in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        return isinstance(value, list) and all(_matches(item, item_type) for item in value)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


def _build_section(name: str, cls, raw, source: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: section '{name}' must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(
            f"{source}: unknown key(s) {unknown} in section '{name}'; allowed: {sorted(fields)}"
        )
    for key, spec in fields.items():
        has_default = not (
            spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING
        )
        if key not in raw and not has_default:
            raise ConfigError(
                f"{source}: missing key '{name}.{key}' (expected {_type_name(hints[key])})"
            )
        if key in raw and not _matches(raw[key], hints[key]):
            raise ConfigError(
                f"{source}: key '{name}.{key}' must be {_type_name(hints[key])}, "
                f"got {raw[key]!r} ({type(raw[key]).__name__})"
            )
        allowed = CHOICES.get((name, key))
        if allowed and key in raw and raw[key] not in allowed:
            raise ConfigError(
                f"{source}: key '{name}.{key}' must be one of {allowed}, got {raw[key]!r}"
            )
    values = {key: _cast_floats(value, hints[key]) for key, value in raw.items()}
    return cls(**values)


def _cast_floats(value, annotation):
    """Turn YAML ints into floats where `annotation` is float, inside lists too.

    So an alpha written as 2 and one written as 2.0 load as the same value.
    """
    if annotation is float:
        return float(value)
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        matching = [arg for arg in typing.get_args(annotation) if _matches(value, arg)]
        return _cast_floats(value, matching[0]) if matching else value
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        return [_cast_floats(item, item_type) for item in value]
    return value


def _require(condition: bool, source: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{source}: {message}")


def _check_cross_fields(config: StudyConfig, source: str) -> None:
    _check_train_fields(config.train, source)
    _check_data_fields(config.data, source)
    _check_paths_and_scale(config, source)
    _check_executor_fields(config, source)
    _require(
        config.eval.explode_ratio > 1,
        source,
        f"eval.explode_ratio must be > 1, got {config.eval.explode_ratio}",
    )
    bad_formats = sorted(set(config.analysis.figure_formats) - {"png", "pdf", "svg"})
    _require(
        not bad_formats,
        source,
        f"analysis.figure_formats has {bad_formats}; allowed: png, pdf, svg",
    )
    _require(
        0 < config.analysis.capacity_min_reliability <= 1,
        source,
        "analysis.capacity_min_reliability must lie in (0, 1], "
        f"got {config.analysis.capacity_min_reliability}",
    )


def _check_train_fields(train: TrainSection, source: str) -> None:
    _require(bool(train.n_unknown), source, "train.n_unknown must list at least one count")
    _require(
        all(n >= 1 for n in train.n_unknown),
        source,
        f"train.n_unknown must be positive, got {train.n_unknown}",
    )
    _require(
        all(k >= 0 for k in train.n_extra_per_unknown),
        source,
        f"train.n_extra_per_unknown must be >= 0, got {train.n_extra_per_unknown}",
    )
    bad_kinds = sorted(set(train.extra_kinds) - set(EXTRA_KIND_VALUES))
    _require(
        not bad_kinds,
        source,
        f"train.extra_kinds has {bad_kinds}; allowed: {list(EXTRA_KIND_VALUES)}",
    )
    _require(bool(train.seeds), source, "train.seeds must list at least one seed")
    _check_adapter_axes(train, source)
    _require(
        0 <= train.lora_dropout < 1,
        source,
        f"train.lora_dropout must lie in [0, 1), got {train.lora_dropout}",
    )
    _require(
        train.n_epochs >= 1 and train.batch_size >= 1,
        source,
        "train.n_epochs and train.batch_size must be >= 1",
    )
    _require(
        train.epoch_eval_every >= 1,
        source,
        f"train.epoch_eval_every must be >= 1, got {train.epoch_eval_every}",
    )
    _require(
        train.learning_rate > 0,
        source,
        f"train.learning_rate must be > 0, got {train.learning_rate}",
    )


def _check_adapter_axes(train: TrainSection, source: str) -> None:
    ranks, alphas = sweep_values(train.lora_rank), sweep_values(train.lora_alpha)
    _require(
        bool(ranks) and all(rank >= 1 for rank in ranks),
        source,
        f"train.lora_rank must be an int >= 1 or a non-empty list of them, got {train.lora_rank}",
    )
    _require(
        bool(alphas) and all(alpha > 0 for alpha in alphas),
        source,
        f"train.lora_alpha must be a number > 0 or a non-empty list of them, "
        f"got {train.lora_alpha}",
    )
    _require(
        train.lora_alpha_per_rank is None or train.lora_alpha_per_rank > 0,
        source,
        f"train.lora_alpha_per_rank must be > 0 or null, got {train.lora_alpha_per_rank}",
    )
    modules = module_sets(train.target_modules)
    _require(
        all(names and all(name.strip() for name in names) for names in modules),
        source,
        "train.target_modules must be a non-empty list of non-empty module names, or a list of "
        f"such lists, got {train.target_modules}",
    )
    layers = layer_sets(train.layers)
    _require(
        all(indices is None or (indices and min(indices) >= 0) for indices in layers),
        source,
        "train.layers must be null, a non-empty list of layer indices >= 0, or a list of such "
        f"lists (null inside it: every layer), got {train.layers}",
    )


def _check_alpha_keys(raw_train: dict, source: str) -> None:
    # Both keys set would leave one silently unused, since the ratio decides every alpha.
    _require(
        not ("lora_alpha" in raw_train and raw_train.get("lora_alpha_per_rank") is not None),
        source,
        f"train.lora_alpha ({raw_train.get('lora_alpha')}) and train.lora_alpha_per_rank "
        f"({raw_train.get('lora_alpha_per_rank')}) are both set; keep one: lora_alpha_per_rank "
        "sets alpha = ratio x rank for every rank",
    )


def _check_executor_fields(config: StudyConfig, source: str) -> None:
    executor = config.executor
    _require(
        executor.address is None or executor.address.strip() != "",
        source,
        "executor.address must be a Ray address such as 'ray://head:10001', or null",
    )
    _require(
        executor.cpus_per_cell >= 1,
        source,
        f"executor.cpus_per_cell must be >= 1, got {executor.cpus_per_cell}",
    )
    _require(
        executor.gpus_per_cell >= 0,
        source,
        f"executor.gpus_per_cell must be >= 0, got {executor.gpus_per_cell}",
    )
    _require(
        executor.max_retries >= 0,
        source,
        f"executor.max_retries must be >= 0, got {executor.max_retries}",
    )
    # A Ray instance smaller than one task would leave every task waiting forever.
    _require(
        executor.local_num_cpus is None or executor.local_num_cpus >= executor.cpus_per_cell,
        source,
        f"executor.local_num_cpus ({executor.local_num_cpus}) must be null or at least "
        f"executor.cpus_per_cell ({executor.cpus_per_cell})",
    )
    if executor.kind != "ray":
        return
    # Ray shows a task only the GPUs it requested, renumbered from cuda:0.
    _require(
        re.fullmatch(r"cuda:\d+", config.model.device) is None,
        source,
        f"model.device {config.model.device!r} cannot be used with executor.kind 'ray', which "
        "assigns the GPUs itself; use auto or cuda",
    )
    _require(
        config.model.device != "cuda" or executor.gpus_per_cell > 0,
        source,
        "model.device 'cuda' with executor.kind 'ray' needs executor.gpus_per_cell > 0, "
        "because Ray hides the GPUs from tasks that request none",
    )


def _check_data_fields(data: DataSection, source: str) -> None:
    from kp_utils.facts import list_relations  # deferred: facts imports pandas and the wheels

    unknown_relations = sorted(set(data.relations or []) - set(list_relations()))
    _require(
        not unknown_relations,
        source,
        f"data.relations has unknown {unknown_relations}; available: {list_relations()}",
    )
    _require(
        data.n_facts_per_relation is None or data.n_facts_per_relation >= 1,
        source,
        f"data.n_facts_per_relation must be >= 1 or null, got {data.n_facts_per_relation}",
    )
    _require(data.n_triviaqa >= 0, source, f"data.n_triviaqa must be >= 0, got {data.n_triviaqa}")
    _require(data.n_prompts >= 1, source, f"data.n_prompts must be >= 1, got {data.n_prompts}")
    _require(data.n_shots >= 0, source, f"data.n_shots must be >= 0, got {data.n_shots}")
    _require(
        data.n_heldout_templates >= 1,
        source,
        f"data.n_heldout_templates must be >= 1, got {data.n_heldout_templates}",
    )
    _require(
        data.external_mode == "extend" or data.external_path is not None,
        source,
        "data.external_mode 'replace' needs data.external_path",
    )
    _require(
        data.weakly_known_samples >= 0,
        source,
        f"data.weakly_known_samples must be >= 0 (0 turns WeaklyKnown off), "
        f"got {data.weakly_known_samples}",
    )
    _require(
        data.sampling_temperature > 0,
        source,
        f"data.sampling_temperature must be > 0, got {data.sampling_temperature}",
    )
    _require(
        data.sampling_top_k >= 1,
        source,
        f"data.sampling_top_k must be >= 1, got {data.sampling_top_k}",
    )


def _check_paths_and_scale(config: StudyConfig, source: str) -> None:
    model, data, train = config.model, config.data, config.train
    _require(
        re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", model.device) is not None,
        source,
        f"model.device must be auto, cpu, mps, cuda or cuda:N, got {model.device!r}",
    )
    for other in config.analysis.compare_with:
        _require(
            config.resolve_path(other).is_file(),
            source,
            f"analysis.compare_with names {other!r}, but {config.resolve_path(other)} "
            "is not a file",
        )
    if data.external_path is not None:
        external = config.resolve_path(data.external_path)
        _require(external.is_file(), source, f"data.external_path not found: {external}")
    if data.external_path is None and data.n_facts_per_relation is not None:
        # An upper bound only: the base model's labels decide the real Unknown pool in stage 02.
        from kp_utils.facts import list_relations

        n_relations = len(data.relations or list_relations())
        max_facts = n_relations * data.n_facts_per_relation
        _require(
            max(train.n_unknown) <= max_facts,
            source,
            f"train.n_unknown asks for {max(train.n_unknown)} Unknown facts, but "
            f"{n_relations} relations x data.n_facts_per_relation {data.n_facts_per_relation} "
            f"give at most {max_facts} facts. Raise data.n_facts_per_relation or lower "
            "train.n_unknown.",
        )


PACKAGE_ROOT = Path(__file__).resolve().parent.parent


def find_project_root(start: Path) -> Path:
    """Return the nearest folder at or above `start` holding pyproject.toml.

    A params file outside any project (say, in a temporary folder) resolves its paths against
    the checkout that contains this package instead.
    """
    for folder in [start, *start.parents]:
        if (folder / "pyproject.toml").exists():
            return folder
    return PACKAGE_ROOT


def load_config(params_path: str | Path) -> StudyConfig:
    """Read, validate and freeze a study's params file.

    Raises:
        FileNotFoundError: the file does not exist.
        ConfigError: bad YAML, unknown or missing sections and keys, wrong types, or invalid
            combinations. The message names the file and the key.
    """
    path = Path(params_path).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"Params file not found: {path}")
    source = str(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ConfigError(f"{source}: invalid YAML: {error}") from error
    _require(isinstance(raw, dict), source, "the file must hold a mapping of sections")
    unknown = sorted(set(raw) - set(SECTIONS))
    _require(not unknown, source, f"unknown section(s) {unknown}; allowed: {list(SECTIONS)}")
    for required in ("study", "train"):
        _require(required in raw, source, f"missing section '{required}'")
    sections = {
        name: _build_section(name, cls, raw.get(name) or {}, source)
        for name, cls in SECTIONS.items()
    }
    _check_alpha_keys(raw["train"], source)
    config = StudyConfig(
        **sections, source_path=source, project_root=str(find_project_root(path.parent))
    )
    _check_cross_fields(config, source)
    return config


def config_from_dict(data: dict) -> StudyConfig:
    """Rebuild a config from the output of `StudyConfig.to_dict`, e.g. on a Ray worker.

    Each section's keys and types are checked again. The cross-field checks are not, because
    they ran when the params file was loaded and some of them look for files that only the
    machine that loaded it may have.
    """
    source = data.get("source_path") or "config dict"
    sections = {
        name: _build_section(name, cls, data.get(name) or {}, source)
        for name, cls in SECTIONS.items()
    }
    return StudyConfig(
        **sections,
        source_path=data.get("source_path", ""),
        project_root=data.get("project_root", ""),
    )
