"""Train one LoRA adapter per grid cell, resumably, after Pletenev et al. (2025).

A grid cell fixes the number of Unknown facts, the number of extra examples per Unknown fact,
the kind of those extras (paraphrases of the same question, or HighlyKnown facts added as
unrelated filler), the seed and the adapter size (LoRA rank, alpha, target modules and layers).
Each cell trains in its own folder, named by `cell_key`:

    <cell_dir>/train_set.parquet          the rows trained on (written first)
    <cell_dir>/checkpoints/epoch_NN/      adapter after epoch NN (1-based), safetensors
    <cell_dir>/epochs.csv                 epoch, mean loss, timings and the evaluation dict
    <cell_dir>/losses.csv                 one row per optimiser step: step, epoch, loss, n_tokens
                                          (loss tokens), n_padded_tokens, step_s
    <cell_dir>/adapter/                   final adapter
    <cell_dir>/done.json                  written last; its presence marks the cell finished

Every file and folder is written under a temporary name in the same folder and renamed into
place, so a killed run never leaves a finished-looking file. A folder without a readable
done.json is wiped and trained again.

TRAINING_CODE_VERSION changes whenever a change here changes what an adapter learns (text
format, masking, batching, optimiser). It is part of `cell_key`, so finished cells trained by
older code are not reused. Version 1: first implementation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import peft
import torch
import transformers
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from tqdm.auto import tqdm

from kp_utils.artifacts import TEMP_MARK, write_atomic, write_json
from kp_utils.categories import EXTRA_KIND_LABELS, SHORT_LABELS, ExtraKind, KnowledgeCategory
from kp_utils.config import (
    PAPER_LORA_ALPHA,
    PAPER_LORA_RANK,
    PAPER_TARGET_MODULES,
    alpha_values,
    layer_sets,
    module_sets,
    sweep_values,
)
from kp_utils.prompts import PromptStyle, format_training_text

logger = logging.getLogger(__name__)

TRAINING_CODE_VERSION = 1
# Label value that the transformers causal-LM loss skips.
IGNORE_INDEX = -100

TRAIN_SET_FILE = "train_set.parquet"
CHECKPOINTS_DIR = "checkpoints"
EPOCHS_FILE = "epochs.csv"
LOSSES_FILE = "losses.csv"
ADAPTER_DIR = "adapter"
DONE_FILE = "done.json"
_CELL_ENTRIES = {TRAIN_SET_FILE, CHECKPOINTS_DIR, EPOCHS_FILE, LOSSES_FILE, ADAPTER_DIR, DONE_FILE}

TRAIN_SET_COLUMNS = ["fact_id", "question", "answer", "is_extra", "extra_kind", "source_fact_id"]

# TrainConfig fields that change what an adapter learns, and so enter `cell_key`. The other
# three (target_modules, layers, loss_on_reply_only) are read in `_train_fields`.
_INT_FIELDS = ("lora_rank", "n_epochs", "batch_size", "max_length")
_FLOAT_FIELDS = ("lora_alpha", "lora_dropout", "learning_rate", "weight_decay")


class NonFiniteLossError(FloatingPointError):
    """Raised when a training step produces a NaN or infinite loss."""


@dataclass(frozen=True)
class TrainingCell:
    """One point of the training grid. `extra_kind` is None exactly when there are no extras.

    The adapter fields default to the paper's recipe; `layers` None adapts every layer.
    """

    n_unknown: int
    n_extra_per_unknown: int
    extra_kind: ExtraKind | None
    seed: int
    lora_rank: int = PAPER_LORA_RANK
    lora_alpha: float = PAPER_LORA_ALPHA
    target_modules: tuple[str, ...] = PAPER_TARGET_MODULES
    layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        self._check_adapter_fields()
        if self.n_unknown < 1:
            raise ValueError(f"n_unknown must be at least 1, got {self.n_unknown}")
        if self.n_extra_per_unknown < 0:
            raise ValueError(
                f"n_extra_per_unknown must be 0 or more, got {self.n_extra_per_unknown}"
            )
        if self.n_extra_per_unknown == 0 and self.extra_kind is not None:
            raise ValueError(
                f"extra_kind must be None when n_extra_per_unknown is 0, got {self.extra_kind!r}"
            )
        if self.n_extra_per_unknown > 0 and self.extra_kind is None:
            raise ValueError(
                f"extra_kind must be one of {[kind.value for kind in ExtraKind]} when "
                f"n_extra_per_unknown is {self.n_extra_per_unknown}, got None"
            )
        if self.extra_kind is not None:
            # Frozen dataclass: coerce "paraphrase" to ExtraKind.PARAPHRASE in place.
            object.__setattr__(self, "extra_kind", ExtraKind(self.extra_kind))

    def _check_adapter_fields(self) -> None:
        if self.lora_rank < 1:
            raise ValueError(f"lora_rank must be at least 1, got {self.lora_rank}")
        if not self.lora_alpha > 0:
            raise ValueError(f"lora_alpha must be above 0, got {self.lora_alpha}")
        if not self.target_modules or not all(self.target_modules):
            raise ValueError(
                f"target_modules must list at least one non-empty name, got {self.target_modules}"
            )
        if self.layers is not None and (not self.layers or min(self.layers) < 0):
            raise ValueError(
                f"layers must be None (every layer) or indices >= 0, got {self.layers}"
            )
        # Casts keep equal cells equal: 2 and 2.0 from YAML, or a list and a tuple of names.
        object.__setattr__(self, "lora_rank", int(self.lora_rank))
        object.__setattr__(self, "lora_alpha", float(self.lora_alpha))
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(index) for index in self.layers))

    @property
    def is_paper_adapter(self) -> bool:
        """Whether the adapter fields are the paper's: rank 1, alpha 2, MLP modules, all layers."""
        return (
            self.lora_rank == PAPER_LORA_RANK
            and self.lora_alpha == PAPER_LORA_ALPHA
            and self.target_modules == PAPER_TARGET_MODULES
            and self.layers is None
        )


def _adapter_sizes(train_cfg) -> list[dict]:
    """List the adapter fields of every swept adapter size, in config order."""
    return [
        {
            "lora_rank": int(rank),
            "lora_alpha": alpha,
            "target_modules": modules,
            "layers": layers,
        }
        for modules in module_sets(train_cfg.target_modules)
        for layers in layer_sets(train_cfg.layers)
        for rank in sweep_values(train_cfg.lora_rank)
        for alpha in alpha_values(train_cfg, int(rank))
    ]


def expand_grid(train_cfg) -> list[TrainingCell]:
    """Expand the grid lists of a TrainConfig into cells, in config order.

    The grid is the product of the adapter sizes (target module sets x layer sets x ranks x
    alphas), n_unknown, the extras and the seeds. Cells without extras appear once per
    (adapter size, n_unknown, seed), not once per extra kind. Repeated values give one cell.
    """
    allowed = [kind.value for kind in ExtraKind]
    invalid = [value for value in train_cfg.extra_kinds if value not in allowed]
    if invalid:
        raise ValueError(f"extra_kinds has invalid values {invalid}. Allowed: {allowed}")
    kinds = [ExtraKind(value) for value in train_cfg.extra_kinds]
    if not kinds and any(n_extra > 0 for n_extra in train_cfg.n_extra_per_unknown):
        raise ValueError(
            "extra_kinds is empty but n_extra_per_unknown has values above 0 "
            f"({list(train_cfg.n_extra_per_unknown)}). Add a kind or use only 0."
        )
    cells = []
    for adapter in _adapter_sizes(train_cfg):
        for n_unknown in train_cfg.n_unknown:
            for n_extra in train_cfg.n_extra_per_unknown:
                for kind in kinds if n_extra > 0 else [None]:
                    for seed in train_cfg.seeds:
                        cells.append(TrainingCell(n_unknown, n_extra, kind, seed, **adapter))
    return list(dict.fromkeys(cells))


def cell_train_config(train_cfg, cell: TrainingCell):
    """Return `train_cfg` with the cell's adapter fields as single values.

    `train_cfg` is a dataclass with the TrainConfig fields, possibly sweeping the adapter axes.
    The copy has the cell's rank, alpha, module list and layer list, and no alpha-per-rank
    ratio, so `cell_key` and `train_adapter` see exactly the adapter that the cell trains.
    """
    changes = {
        "lora_rank": cell.lora_rank,
        "lora_alpha": cell.lora_alpha,
        "target_modules": list(cell.target_modules),
        "layers": None if cell.layers is None else list(cell.layers),
    }
    if hasattr(train_cfg, "lora_alpha_per_rank"):
        changes["lora_alpha_per_rank"] = None
    return dataclasses.replace(train_cfg, **changes)


def format_layers(layers: tuple[int, ...] | None) -> str:
    """Write a layer set as text: "all", or runs of consecutive indices such as "0+26-29"."""
    if layers is None:
        return "all"
    runs: list[list[int]] = []
    for index in sorted(set(layers)):
        if runs and index == runs[-1][-1] + 1:
            runs[-1].append(index)
        else:
            runs.append([index])
    return "+".join(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}" for run in runs)


def adapter_label(cell: TrainingCell) -> str:
    """Return the adapter size as text, e.g. "r8-a16-down_proj-L26-29".

    Rank, alpha and the module names always appear (joined by "+"); layers only when the
    adapter leaves some out.
    """
    label = f"r{cell.lora_rank}-a{cell.lora_alpha:g}-{'+'.join(cell.target_modules)}"
    if cell.layers is not None:
        label += f"-L{format_layers(cell.layers)}"
    return label


def _adapter_suffix(cell: TrainingCell) -> str:
    """Name only the adapter fields that differ from the paper's, to keep labels short."""
    parts = []
    if (cell.lora_rank, cell.lora_alpha) != (PAPER_LORA_RANK, PAPER_LORA_ALPHA):
        parts.append(f"r{cell.lora_rank}-a{cell.lora_alpha:g}")
    if cell.target_modules != PAPER_TARGET_MODULES:
        parts.append("+".join(cell.target_modules))
    if cell.layers is not None:
        parts.append(f"L{format_layers(cell.layers)}")
    return "".join(f"-{part}" for part in parts)


def cell_label(cell: TrainingCell) -> str:
    """Return a human label such as "UK50+HK1 s0", "UK50+Para3 s1" or "UK50 s0".

    An adapter other than the paper's adds the fields that differ, as in
    "UK50-r8-a16-down_proj-L26-29 s0".
    """
    label = f"{SHORT_LABELS[KnowledgeCategory.UNKNOWN]}{cell.n_unknown}"
    if cell.extra_kind is not None:
        label += f"+{EXTRA_KIND_LABELS[cell.extra_kind]}{cell.n_extra_per_unknown}"
    return f"{label}{_adapter_suffix(cell)} s{cell.seed}"


# ---------------------------------------------------------------------------------------------
# Training sets


_UNKNOWN_POOL_COLUMNS = ("fact_id", "question", "answer", "paraphrases")
_HIGHLY_KNOWN_POOL_COLUMNS = ("fact_id", "question", "answer", "source")


def _validate_pool(pool: pd.DataFrame, name: str, columns: tuple[str, ...]) -> None:
    missing = [column for column in columns if column not in pool.columns]
    if missing:
        raise ValueError(f"{name} is missing columns {missing}, and it needs {list(columns)}")
    duplicated = pool.loc[pool["fact_id"].duplicated(), "fact_id"].tolist()
    if duplicated:
        raise ValueError(
            f"{name} has {len(duplicated)} repeated fact_id values (first: {duplicated[:5]}). "
            "Each fact must appear once."
        )


def _cell_shortfalls(
    cell: TrainingCell, unknown: pd.DataFrame, highly_known: pd.DataFrame
) -> list[str]:
    """List why the pools cannot supply the cell. An empty list means they can."""
    label = cell_label(cell)
    problems = []
    if cell.n_unknown > len(unknown):
        problems.append(
            f"cell {label} needs {cell.n_unknown} {KnowledgeCategory.UNKNOWN.value} facts but "
            f"the pool has {len(unknown)} (short by {cell.n_unknown - len(unknown)})"
        )
    k = cell.n_extra_per_unknown
    if cell.extra_kind is ExtraKind.HIGHLY_KNOWN:
        n_needed = cell.n_unknown * k
        n_pool = len(highly_known)
        if n_needed > n_pool:
            problems.append(
                f"cell {label} needs {n_needed} {KnowledgeCategory.HIGHLY_KNOWN.value} facts "
                f"but the pool has {n_pool} (short by {n_needed - n_pool})"
            )
    if cell.extra_kind is ExtraKind.PARAPHRASE and not problems:
        drawn = _draw_unknown(unknown, cell.n_unknown, cell.seed)
        n_paraphrases = drawn["paraphrases"].map(len)
        short = drawn.assign(n_paraphrases=n_paraphrases)[n_paraphrases < k]
        if len(short):
            examples = ", ".join(
                f"fact {fact.fact_id!r} has {fact.n_paraphrases}"
                for fact in short.head(5).itertuples(index=False)
            )
            problems.append(
                f"cell {label} needs {k} paraphrases per {KnowledgeCategory.UNKNOWN.value} "
                f"fact but {len(short)} of the {cell.n_unknown} drawn facts have fewer "
                f"({examples})"
            )
    return problems


def check_grid_feasible(
    cells: Iterable[TrainingCell], unknown_pool: pd.DataFrame, highly_known_pool: pd.DataFrame
) -> None:
    """Raise ValueError listing every cell that the fact pools cannot supply.

    Run it before training starts, so that a large grid does not stop at its last cell. The
    pools are those of `build_training_set`.
    """
    _validate_pool(unknown_pool, "unknown_pool", _UNKNOWN_POOL_COLUMNS)
    _validate_pool(highly_known_pool, "highly_known_pool", _HIGHLY_KNOWN_POOL_COLUMNS)
    problems = []
    for cell in cells:
        problems.extend(_cell_shortfalls(cell, unknown_pool, highly_known_pool))
    if problems:
        raise ValueError(
            f"{len(problems)} training cells cannot be built from the fact pools:\n"
            + "\n".join(problems)
            + "\nLower train.n_unknown or train.n_extra_per_unknown, or add facts with "
            "data.n_facts_per_relation, data.n_triviaqa or data.external_path."
        )


def _draw_unknown(unknown: pd.DataFrame, n_unknown: int, seed: int) -> pd.DataFrame:
    # A seeded permutation's prefix: the facts of a smaller cell are a subset of a larger
    # cell's facts under the same seed.
    order = np.random.default_rng(seed).permutation(len(unknown))[:n_unknown]
    return unknown.iloc[order].reset_index(drop=True)


def _fact_rng(seed: int, fact_id) -> np.random.Generator:
    # Seeded per fact, so a fact's paraphrase draw does not depend on which other facts are drawn.
    digest = hashlib.sha256(str(fact_id).encode()).digest()
    return np.random.default_rng([seed, int.from_bytes(digest[:8], "little")])


def _paraphrase_rows(drawn: pd.DataFrame, k: int, seed: int) -> pd.DataFrame:
    rows = []
    for fact in drawn.itertuples(index=False):
        paraphrases = list(fact.paraphrases)
        chosen = _fact_rng(seed, fact.fact_id).permutation(len(paraphrases))[:k]
        for index in chosen:
            rows.append((fact.fact_id, paraphrases[index], fact.answer, fact.fact_id))
    return pd.DataFrame(rows, columns=["fact_id", "question", "answer", "source_fact_id"])


def _highly_known_rows(
    drawn: pd.DataFrame, highly_known: pd.DataFrame, k: int, seed: int
) -> pd.DataFrame:
    # Sources keep the caller's priority, which is their order of first appearance in the pool
    # (e.g. the fact base before TriviaQA). The seed shuffles facts within each source.
    permutation = np.random.default_rng(seed).permutation(len(highly_known))
    source_rank = pd.factorize(highly_known["source"])[0][permutation]
    order = permutation[np.lexsort((np.arange(len(permutation)), source_rank))]
    chosen = highly_known.iloc[order[: len(drawn) * k]].reset_index(drop=True)
    return pd.DataFrame(
        {
            "fact_id": chosen["fact_id"],
            "question": chosen["question"],
            "answer": chosen["answer"],
            # Extras i*k .. i*k+k-1 extend the i-th drawn Unknown fact.
            "source_fact_id": np.repeat(drawn["fact_id"].to_numpy(), k),
        }
    )


def build_training_set(
    cell: TrainingCell, unknown_pool: pd.DataFrame, highly_known_pool: pd.DataFrame
) -> pd.DataFrame:
    """Draw the training rows of one cell: n Unknown facts plus n * k extras.

    Args:
        cell: the grid cell; its seed fixes every draw, so the same inputs give the same rows.
        unknown_pool: Unknown facts with fact_id, question, answer and paraphrases.
        highly_known_pool: HighlyKnown facts with fact_id, question, answer and source, in the
            caller's order of preference between sources.

    Returns:
        DataFrame with TRAIN_SET_COLUMNS: the Unknown facts first (is_extra False,
        source_fact_id equal to fact_id), then the extras. A paraphrase row keeps the fact_id of
        the fact it rephrases.

    Raises:
        ValueError: a pool lacks a column, repeats a fact_id or has too few facts, or a drawn
            fact has fewer than k paraphrases.
    """
    _validate_pool(unknown_pool, "unknown_pool", _UNKNOWN_POOL_COLUMNS)
    _validate_pool(highly_known_pool, "highly_known_pool", _HIGHLY_KNOWN_POOL_COLUMNS)
    problems = _cell_shortfalls(cell, unknown_pool, highly_known_pool)
    if problems:
        raise ValueError(". ".join(problems))
    drawn = _draw_unknown(unknown_pool, cell.n_unknown, cell.seed)
    base = drawn[["fact_id", "question", "answer"]].assign(source_fact_id=drawn["fact_id"])
    parts = [base.assign(is_extra=False, extra_kind=None)]

    k = cell.n_extra_per_unknown
    if cell.extra_kind is ExtraKind.PARAPHRASE:
        extras = _paraphrase_rows(drawn, k, cell.seed)
    elif cell.extra_kind is ExtraKind.HIGHLY_KNOWN:
        extras = _highly_known_rows(drawn, highly_known_pool, k, cell.seed)
    if cell.extra_kind is not None:
        parts.append(extras.assign(is_extra=True, extra_kind=cell.extra_kind.value))

    rows = pd.concat(parts, ignore_index=True)[TRAIN_SET_COLUMNS]
    logger.info(
        "Training set %s: %d rows (%d Unknown facts + %d extras)",
        cell_label(cell),
        len(rows),
        cell.n_unknown,
        len(rows) - cell.n_unknown,
    )
    return rows


# ---------------------------------------------------------------------------------------------
# Cell keys and folders


def _train_fields(train_cfg) -> dict:
    _require_single_adapter(train_cfg)
    # Numbers are cast, so that an int 2 and a float 2.0 from YAML give the same key. A
    # one-item list of ranks or alphas gives the same key as the bare value.
    fields = {name: int(sweep_values(getattr(train_cfg, name))[0]) for name in _INT_FIELDS}
    fields |= {name: float(sweep_values(getattr(train_cfg, name))[0]) for name in _FLOAT_FIELDS}
    (modules,) = module_sets(train_cfg.target_modules)
    (layers,) = layer_sets(train_cfg.layers)
    fields["target_modules"] = list(modules)
    fields["layers"] = None if layers is None else [int(i) for i in layers]
    fields["loss_on_reply_only"] = bool(train_cfg.loss_on_reply_only)
    return fields


def describe_cell_config(
    cell: TrainingCell,
    train_cfg,
    model_name: str,
    facts_fingerprint: str,
    prompt_style: PromptStyle | str | None = None,
) -> dict:
    """Collect everything that decides what a cell's adapter learns, as JSON-ready values.

    The adapter fields come from the cell (see `cell_train_config`), the rest from `train_cfg`.
    """
    train_cfg = cell_train_config(train_cfg, cell)
    return {
        "training_code_version": TRAINING_CODE_VERSION,
        "cell": {
            "n_unknown": cell.n_unknown,
            "n_extra_per_unknown": cell.n_extra_per_unknown,
            "extra_kind": None if cell.extra_kind is None else cell.extra_kind.value,
            "seed": cell.seed,
        },
        "train": _train_fields(train_cfg),
        "model_name": model_name,
        "facts_fingerprint": facts_fingerprint,
        "prompt_style": None if prompt_style is None else PromptStyle(prompt_style).value,
    }


def cell_key(
    cell: TrainingCell,
    train_cfg,
    model_name: str,
    facts_fingerprint: str,
    prompt_style: PromptStyle | str | None = None,
) -> str:
    """Return the cell's folder name: its label slug plus 10 hex digits of a sha256 hash.

    The hash covers the cell, every LoRA and optimiser field of `train_cfg` (with the cell's
    adapter fields), the model name, the fact-set fingerprint, the prompt style and
    TRAINING_CODE_VERSION, so changing any of them gives a new folder. Example:
    "uk50-hk1-s0-3f9a0c2b1d". A paper-recipe cell keeps the key it had before adapter sizes
    became grid axes, because its label and its hashed fields are unchanged.
    """
    payload = describe_cell_config(cell, train_cfg, model_name, facts_fingerprint, prompt_style)
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    slug = re.sub(r"[^a-z0-9]+", "-", cell_label(cell).lower()).strip("-")
    return f"{slug}-{digest[:10]}"


def _write_csv(path: Path, records: list[dict]) -> None:
    frame = pd.DataFrame.from_records(records)
    write_atomic(path, lambda temporary: frame.to_csv(temporary, index=False))


def is_cell_done(cell_dir: Path) -> bool:
    """Return whether the cell finished training, i.e. its folder has a readable done.json."""
    return read_cell_result(cell_dir) is not None


def read_cell_result(cell_dir: Path) -> dict | None:
    """Read a finished cell's done.json, or return None when it is missing or unreadable."""
    done_path = Path(cell_dir) / DONE_FILE
    try:
        result = json.loads(done_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return result if isinstance(result, dict) else None


def prepare_cell_dir(cell_dir: Path) -> None:
    """Create an empty cell folder, wiping what an unfinished run left there.

    Raises:
        FileExistsError: the cell is finished (delete the folder to retrain it), or the folder
            contains entries that training never writes, so it is probably not a cell folder.
    """
    cell_dir = Path(cell_dir)
    if is_cell_done(cell_dir):
        raise FileExistsError(
            f"{cell_dir} already contains a finished cell ({DONE_FILE}). Delete the folder to "
            "train it again."
        )
    if cell_dir.exists():
        entries = sorted(path.name for path in cell_dir.iterdir())
        unexpected = [
            name for name in entries if name not in _CELL_ENTRIES and TEMP_MARK not in name
        ]
        if unexpected:
            raise FileExistsError(
                f"{cell_dir} contains entries that training never writes ({unexpected[:5]}), "
                "so it was not wiped. Pass an empty or missing folder."
            )
        if entries:
            logger.warning(
                "Wiping unfinished cell folder %s (no readable %s; entries: %s)",
                cell_dir,
                DONE_FILE,
                entries,
            )
            shutil.rmtree(cell_dir)
    cell_dir.mkdir(parents=True, exist_ok=True)


# ---------------------------------------------------------------------------------------------
# Tokenisation and batches


@dataclass(frozen=True)
class EncodedExample:
    """Token ids of one training row and its labels (IGNORE_INDEX where no loss is taken)."""

    input_ids: list[int]
    labels: list[int]


def encode_training_rows(
    tokenizer,
    train_rows: pd.DataFrame,
    prompt_style: PromptStyle | str,
    max_length: int,
    loss_on_reply_only: bool,
) -> list[EncodedExample]:
    """Tokenise (prompt, reply) pairs from `format_training_text`, one example per row.

    The prompt is tokenised with the tokenizer's special tokens and the reply without, as
    `encode_prompt` does for evaluation, so training uses the same ids as evaluation.
    Examples longer than `max_length` tokens are cut at the end, with a WARNING.

    Raises:
        ValueError: truncation left an example with no label tokens (the prompt alone fills
            max_length while loss_on_reply_only is set).
    """
    style = PromptStyle(prompt_style)
    examples = []
    truncated = []
    for row in train_rows.itertuples(index=False):
        prompt, reply = format_training_text(tokenizer, row.question, row.answer, style)
        prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        reply_ids = tokenizer(reply, add_special_tokens=False)["input_ids"]
        input_ids = prompt_ids + reply_ids
        labels = [IGNORE_INDEX] * len(prompt_ids) if loss_on_reply_only else list(prompt_ids)
        labels += reply_ids
        if len(input_ids) > max_length:
            truncated.append((row.fact_id, len(input_ids)))
            input_ids, labels = input_ids[:max_length], labels[:max_length]
        # The causal-LM loss predicts token t from tokens before it, so labels[0] never counts.
        if all(label == IGNORE_INDEX for label in labels[1:]):
            raise ValueError(
                f"Training row for fact {row.fact_id!r} has no reply tokens left after "
                f"truncation to max_length={max_length}. Raise max_length."
            )
        examples.append(EncodedExample(input_ids, labels))
    if truncated:
        logger.warning(
            "Truncated %d of %d training examples to max_length=%d tokens (longest %d; "
            "first facts: %s)",
            len(truncated),
            len(examples),
            max_length,
            max(n for _, n in truncated),
            [fact_id for fact_id, _ in truncated[:5]],
        )
    return examples


def collate_examples(examples: list[EncodedExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad examples into a batch of input_ids, attention_mask and labels, each
    (batch, longest example) int64; padded label positions hold IGNORE_INDEX.

    Padding here, instead of through the tokenizer, leaves the tokenizer's padding_side (left,
    as batched generation needs) untouched.
    """
    width = max(len(example.input_ids) for example in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        length = len(example.input_ids)
        input_ids[row, :length] = torch.tensor(example.input_ids)
        attention_mask[row, :length] = 1
        labels[row, :length] = torch.tensor(example.labels)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _pad_token_id(tokenizer) -> int:
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    raise ValueError("The tokenizer has no pad token and no EOS token, so batches cannot be padded")


def _batches(
    examples: list[EncodedExample], batch_size: int, order: np.ndarray
) -> Iterator[list[EncodedExample]]:
    for start in range(0, len(order), batch_size):
        yield [examples[index] for index in order[start : start + batch_size]]


# ---------------------------------------------------------------------------------------------
# Training loop


def _require_single_adapter(train_cfg) -> None:
    counts = {
        "lora_rank": len(sweep_values(train_cfg.lora_rank)),
        "lora_alpha": len(sweep_values(train_cfg.lora_alpha)),
        "target_modules": len(module_sets(train_cfg.target_modules)),
        "layers": len(layer_sets(train_cfg.layers)),
    }
    problems = [f"{name} has {count} values" for name, count in counts.items() if count != 1]
    ratio = getattr(train_cfg, "lora_alpha_per_rank", None)
    if ratio is not None:
        problems.append(f"lora_alpha_per_rank is {ratio} instead of None")
    if problems:
        raise ValueError(
            f"One adapter needs single adapter values, but {'; '.join(problems)}. Pass "
            "cell_train_config(train_cfg, cell) instead of the grid's train config."
        )


def build_lora_config(train_cfg) -> LoraConfig:
    """Build the peft LoraConfig from a TrainConfig with single adapter values.

    `layers` None adapts every layer. Raises ValueError when `train_cfg` still sweeps an
    adapter axis.
    """
    _require_single_adapter(train_cfg)
    (modules,) = module_sets(train_cfg.target_modules)
    (layers,) = layer_sets(train_cfg.layers)
    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=int(sweep_values(train_cfg.lora_rank)[0]),
        lora_alpha=float(sweep_values(train_cfg.lora_alpha)[0]),
        lora_dropout=float(train_cfg.lora_dropout),
        target_modules=list(modules),
        layers_to_transform=None if layers is None else list(layers),
        bias="none",
    )


def count_trainable_parameters(peft_model) -> int:
    """Count the parameters that the optimiser updates, as peft reports them."""
    if not isinstance(peft_model, PeftModel):
        raise TypeError(f"Expected a PeftModel, got {type(peft_model).__name__}")
    n_trainable, _ = peft_model.get_nb_trainable_parameters()
    return int(n_trainable)


@dataclass
class _LoopState:
    """Counters and records of one training run, shared by its epochs."""

    cell_dir: Path
    pad_token_id: int
    loss_records: list[dict]
    epoch_records: list[dict]
    step: int = 0
    n_input_tokens: int = 0
    n_padded_tokens: int = 0
    train_s: float = 0.0
    eval_s: float = 0.0
    save_s: float = 0.0


def _train_step(peft_model, optimizer, batch_examples, epoch, state) -> dict:
    """Run one optimiser step and append its record to state.loss_records."""
    started = time.perf_counter()
    device = next(peft_model.parameters()).device
    batch = {
        name: tensor.to(device)
        for name, tensor in collate_examples(batch_examples, state.pad_token_id).items()
    }
    # No key/value cache: training never decodes, so filling one only costs time.
    loss = peft_model(**batch, use_cache=False).loss

    state.step += 1
    record = {
        "step": state.step,
        "epoch": epoch,
        # .item() synchronises with the device, which the record needs anyway.
        "loss": loss.item(),
        # Tokens the loss averages over: labels are shifted by one, so position 0 never counts.
        "n_tokens": int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()),
        "n_padded_tokens": batch["input_ids"].numel(),
        "step_s": float("nan"),
    }
    state.loss_records.append(record)
    if not np.isfinite(record["loss"]):
        raise NonFiniteLossError(
            f"Loss is {record['loss']} at epoch {epoch}, step {state.step} in cell folder "
            f"{state.cell_dir}. Losses so far are in {LOSSES_FILE}. Lower learning_rate "
            "or check the training rows."
        )

    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

    record["step_s"] = time.perf_counter() - started
    state.n_input_tokens += int(batch["attention_mask"].sum())
    state.n_padded_tokens += record["n_padded_tokens"]
    state.train_s += record["step_s"]
    return record


def _train_epoch(peft_model, optimizer, batches, epoch, state, progress) -> None:
    peft_model.train()
    for batch_examples in batches:
        record = _train_step(peft_model, optimizer, batch_examples, epoch, state)
        logger.debug("epoch %d step %d loss %.4f", epoch, record["step"], record["loss"])
        progress.update(1)
        progress.set_postfix(epoch=epoch, loss=f"{record['loss']:.3f}")


def _evaluate(peft_model, evaluate_epoch, epoch: int) -> dict:
    device = next(peft_model.parameters()).device
    peft_model.eval()
    # A forked RNG keeps sampling during evaluation from changing the dropout masks of later
    # epochs, so a cell trains the same with and without evaluation.
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        metrics = dict(evaluate_epoch(peft_model, epoch))
    peft_model.train()
    return metrics


def _finish_epoch(peft_model, epoch, evaluate_epoch, state, epoch_started_step) -> None:
    started = time.perf_counter()
    checkpoint_dir = state.cell_dir / CHECKPOINTS_DIR / f"epoch_{epoch:02d}"
    checkpoint_dir.parent.mkdir(exist_ok=True)
    write_atomic(checkpoint_dir, peft_model.save_pretrained)
    state.save_s += time.perf_counter() - started

    started = time.perf_counter()
    metrics = _evaluate(peft_model, evaluate_epoch, epoch) if evaluate_epoch else {}
    eval_s = time.perf_counter() - started
    state.eval_s += eval_s

    epoch_losses = state.loss_records[epoch_started_step:]
    n_tokens = sum(record["n_tokens"] for record in epoch_losses)
    # Token-weighted, so the mean is per loss token over the epoch as a whole.
    mean_loss = sum(record["loss"] * record["n_tokens"] for record in epoch_losses) / n_tokens
    record = {
        "epoch": epoch,
        "mean_loss": mean_loss,
        "n_steps": len(epoch_losses),
        "eval_s": eval_s,
    }
    clashes = sorted(set(record) & set(metrics))
    if clashes:
        raise ValueError(
            f"evaluate_epoch returned keys {clashes} that epochs.csv already uses. Rename them."
        )
    state.epoch_records.append(record | metrics)
    _write_csv(state.cell_dir / EPOCHS_FILE, state.epoch_records)
    _write_csv(state.cell_dir / LOSSES_FILE, state.loss_records)
    logger.info("Epoch %d: mean loss %.4f %s", epoch, mean_loss, metrics or "")


def _run_epochs(peft_model, examples, train_cfg, evaluate_epoch, seed, state, progress) -> None:
    trainable = [parameter for parameter in peft_model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(
        trainable, lr=float(train_cfg.learning_rate), weight_decay=float(train_cfg.weight_decay)
    )
    order_rng = np.random.default_rng(seed)
    for epoch in range(1, train_cfg.n_epochs + 1):
        order = order_rng.permutation(len(examples))
        batches = _batches(examples, train_cfg.batch_size, order)
        epoch_started_step = len(state.loss_records)
        try:
            _train_epoch(peft_model, optimizer, batches, epoch, state, progress)
        except NonFiniteLossError:
            _write_csv(state.cell_dir / LOSSES_FILE, state.loss_records)
            raise
        _finish_epoch(peft_model, epoch, evaluate_epoch, state, epoch_started_step)


def _result_record(peft_model, train_cfg, state, examples, prompt_style, seed, total_s) -> dict:
    n_trainable, n_parameters = peft_model.get_nb_trainable_parameters()
    return {
        "key": state.cell_dir.name,
        "training_code_version": TRAINING_CODE_VERSION,
        "cell_dir": str(state.cell_dir),
        "train": _train_fields(train_cfg),
        "prompt_style": PromptStyle(prompt_style).value,
        "seed": seed,
        "n_rows": len(examples),
        "n_steps": state.step,
        "n_input_tokens": state.n_input_tokens,
        # Positions the model computed, padding included (batch rows * longest row, summed).
        "n_padded_tokens": state.n_padded_tokens,
        "n_loss_tokens": sum(record["n_tokens"] for record in state.loss_records),
        "n_trainable_parameters": int(n_trainable),
        "n_parameters": int(n_parameters),
        "final_mean_loss": state.epoch_records[-1]["mean_loss"],
        "train_s": state.train_s,
        "eval_s": state.eval_s,
        "save_s": state.save_s,
        "total_s": total_s,
        "tokens_per_s": state.n_input_tokens / state.train_s,
        "device": str(next(peft_model.parameters()).device),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
        },
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "epochs": state.epoch_records,
    }


def _require_plain_model(model) -> None:
    if isinstance(model, PeftModel) or getattr(model, "peft_config", None):
        raise TypeError(
            "train_adapter needs the base model without adapters. Call .unload() on the "
            "PeftModel first."
        )


def train_adapter(
    model,
    tokenizer,
    train_rows: pd.DataFrame,
    train_cfg,
    cell_dir: Path,
    prompt_style: PromptStyle | str,
    evaluate_epoch: Callable[[PeftModel, int], dict] | None = None,
    seed: int = 0,
    show_progress: bool = True,
) -> dict:
    """Train one LoRA adapter on `train_rows` and write the cell folder.

    The LoRA layers wrap `model` in place for the duration of the call and are removed again
    without merging, and the base weights, their requires_grad flags and the train/eval mode are
    restored, also when training fails. The base weights are frozen, so they are identical
    afterwards.

    Args:
        model: base causal LM (no adapter attached), on the device to train on.
        tokenizer: its tokenizer; it is only read, so its left padding stays as it is.
        train_rows: rows with fact_id, question and answer, as `build_training_set` returns.
        train_cfg: any object with the TrainConfig fields (lora_rank ... max_length).
        cell_dir: the cell folder, usually <run dir>/<cell_key(...)>; an unfinished one is
            wiped first.
        prompt_style: text format passed to `format_training_text`.
        evaluate_epoch: called as evaluate_epoch(peft_model, epoch) after each epoch (1-based),
            with the model in eval mode; its dict of scalars becomes columns of epochs.csv.
        seed: seeds the LoRA initialisation, dropout and the per-epoch shuffle.
        show_progress: show a tqdm bar over all optimiser steps.

    Returns:
        The dict also written to done.json: key (the folder name), counts, timings in seconds,
        tokens_per_s (non-padding input tokens per second of optimiser steps), the number of
        trainable parameters and the per-epoch records.

    Raises:
        NonFiniteLossError: a step gave a NaN or infinite loss. losses.csv then contains the
            steps so far, the failed one included.
    """
    started = time.perf_counter()
    cell_dir = Path(cell_dir)
    _require_plain_model(model)
    prepare_cell_dir(cell_dir)
    write_atomic(cell_dir / TRAIN_SET_FILE, lambda path: train_rows.to_parquet(path, index=False))
    examples = encode_training_rows(
        tokenizer, train_rows, prompt_style, train_cfg.max_length, train_cfg.loss_on_reply_only
    )
    state = _LoopState(cell_dir, _pad_token_id(tokenizer), [], [])

    with _lora_attached(model, build_lora_config(train_cfg), seed) as peft_model:
        logger.info(
            "Training %s: %d rows, %d epochs, %d trainable parameters",
            cell_dir.name,
            len(examples),
            train_cfg.n_epochs,
            count_trainable_parameters(peft_model),
        )
        n_steps = train_cfg.n_epochs * -(-len(examples) // train_cfg.batch_size)
        with tqdm(total=n_steps, desc=f"train {cell_dir.name}", disable=not show_progress) as bar:
            _run_epochs(peft_model, examples, train_cfg, evaluate_epoch, seed, state, bar)
        save_started = time.perf_counter()
        write_atomic(cell_dir / ADAPTER_DIR, peft_model.save_pretrained)
        state.save_s += time.perf_counter() - save_started
        result = _result_record(
            peft_model,
            train_cfg,
            state,
            examples,
            prompt_style,
            seed,
            time.perf_counter() - started,
        )
    write_json(result, cell_dir / DONE_FILE)
    logger.info(
        "Finished %s in %.1f s (%.0f tokens/s); adapter in %s",
        cell_dir.name,
        result["total_s"],
        result["tokens_per_s"],
        cell_dir / ADAPTER_DIR,
    )
    return result


@contextmanager
def _lora_attached(model, lora_config: LoraConfig, seed: int) -> Iterator[PeftModel]:
    """Wrap `model` with fresh LoRA layers, then remove them and restore the base model."""
    requires_grad = {name: param.requires_grad for name, param in model.named_parameters()}
    was_training = model.training
    # LoRA A matrices start random, so the seed fixes the initialisation.
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, lora_config)
    try:
        yield peft_model
    finally:
        base = peft_model.unload()
        for name, param in base.named_parameters():
            param.requires_grad_(requires_grad[name])
        base.train(was_training)


def load_adapter(model, adapter_dir: Path) -> PeftModel:
    """Attach a saved adapter to `model` for inference and return the PeftModel in eval mode.

    The LoRA layers are inserted into `model` in place. Call `.unload()` on the result, or use
    `adapter_attached`, before loading another adapter or using the base model again.
    """
    _require_plain_model(model)
    peft_model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    return peft_model.eval()


@contextmanager
def adapter_attached(model, adapter_dir: Path) -> Iterator[PeftModel]:
    """Attach a saved adapter for the `with` block, then remove it without merging."""
    peft_model = load_adapter(model, adapter_dir)
    try:
        yield peft_model
    finally:
        peft_model.unload()
