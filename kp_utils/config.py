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
    lora_rank: int = 1
    lora_alpha: float = 2.0
    lora_dropout: float = 0.1
    target_modules: list[str] = field(default_factory=lambda: list(PAPER_TARGET_MODULES))
    layers: list[int] | None = None  # None adapts every layer
    learning_rate: float = 1e-3
    n_epochs: int = 10
    batch_size: int = 16
    weight_decay: float = 0.0
    loss_on_reply_only: bool = False  # False: loss over the whole sequence
    max_length: int = 128  # tokens per training example; longer ones are truncated
    epoch_eval_n_prompts: int | None = None  # prompts for per-epoch reliability; None: all


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


@dataclass(frozen=True)
class StudyConfig:
    """A whole study: the sections of notebooks 01 to 04 plus the study and model sections."""

    study: StudySection
    model: ModelSection
    data: DataSection
    train: TrainSection
    eval: EvalSection
    analysis: AnalysisSection
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


SECTIONS = {
    "study": StudySection,
    "model": ModelSection,
    "data": DataSection,
    "train": TrainSection,
    "eval": EvalSection,
    "analysis": AnalysisSection,
}
CHOICES = {
    ("model", "prompt_style"): ("chat", "plain"),
    ("model", "dtype"): ("auto", "float32", "bfloat16", "float16"),
    ("data", "external_mode"): ("extend", "replace"),
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
    values = {k: float(v) if hints[k] is float else v for k, v in raw.items()}
    return cls(**values)


def _require(condition: bool, source: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{source}: {message}")


def _check_cross_fields(config: StudyConfig, source: str) -> None:
    _check_train_fields(config.train, source)
    _check_data_fields(config.data, source)
    _check_paths_and_scale(config, source)
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
    _require(train.lora_rank >= 1, source, f"train.lora_rank must be >= 1, got {train.lora_rank}")
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
        train.learning_rate > 0,
        source,
        f"train.learning_rate must be > 0, got {train.learning_rate}",
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
    config = StudyConfig(
        **sections, source_path=source, project_root=str(find_project_root(path.parent))
    )
    _check_cross_fields(config, source)
    return config
