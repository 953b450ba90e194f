"""Tests for kp_utils.training on hand-written facts and a tiny random Llama."""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field

import pandas as pd
import pytest
import torch
from peft import PeftModel
from transformers import AutoTokenizer

from kp_utils.models import materialise_embedded
from kp_utils.prompts import PromptStyle, format_training_text
from kp_utils.training import (
    IGNORE_INDEX,
    ExtraKind,
    NonFiniteLossError,
    TrainingCell,
    adapter_label,
    build_lora_config,
    build_training_set,
    cell_key,
    cell_label,
    cell_train_config,
    check_grid_feasible,
    collate_examples,
    count_trainable_parameters,
    encode_training_rows,
    expand_grid,
    format_layers,
    is_cell_done,
    load_adapter,
    prepare_cell_dir,
    train_adapter,
)

from .conftest import build_tiny_llama


@dataclass(frozen=True)
class FakeTrainConfig:
    """Stand-in with the TrainConfig fields, tuned so the tiny model learns in a few steps."""

    n_unknown: list[int] = field(default_factory=lambda: [2])
    n_extra_per_unknown: list[int] = field(default_factory=lambda: [0])
    extra_kinds: list[str] = field(default_factory=lambda: ["paraphrase", "highly_known"])
    seeds: list[int] = field(default_factory=lambda: [0])
    lora_rank: int | list[int] = 1
    lora_alpha: float | list[float] = 2.0
    lora_alpha_per_rank: float | None = None
    lora_dropout: float = 0.1
    target_modules: list = field(default_factory=lambda: ["down_proj", "gate_proj", "up_proj"])
    layers: list | None = None
    learning_rate: float = 3e-2
    n_epochs: int = 4
    batch_size: int = 2
    weight_decay: float = 0.0
    loss_on_reply_only: bool = False
    max_length: int = 128


def _fact(fact_id, question, answer, paraphrases=(), source="facts"):
    return {
        "fact_id": fact_id,
        "subject": fact_id,
        "relation": "r",
        "domain": "d",
        "question": question,
        "answer": answer,
        "aliases": [answer],
        "paraphrases": list(paraphrases),
        "heldout_questions": [],
        "source": source,
    }


@pytest.fixture
def unknown_pool() -> pd.DataFrame:
    return pd.DataFrame(
        [
            _fact(
                "u1",
                "Who founded Arvel?",
                "Mira Tolk",
                [
                    "Arvel was founded by whom?",
                    "Name the founder of Arvel.",
                    "Which person founded Arvel?",
                ],
            ),
            _fact(
                "u2",
                "Where is Brenn Hall?",
                "Osk",
                [
                    "In which town is Brenn Hall?",
                    "Brenn Hall stands where?",
                    "Name the town of Brenn Hall.",
                ],
            ),
            _fact(
                "u3",
                "When did Caldo open?",
                "1911",
                [
                    "In what year did Caldo open?",
                    "Caldo opened in which year?",
                    "Give the opening year of Caldo.",
                ],
            ),
            _fact(
                "u4",
                "What does Dunmar make?",
                "Rope",
                [
                    "Which product does Dunmar make?",
                    "Dunmar produces what?",
                    "Name what Dunmar makes.",
                ],
            ),
            _fact(
                "u5",
                "Who painted Elsewater?",
                "Ines Vaar",
                [
                    "Elsewater was painted by whom?",
                    "Name the painter of Elsewater.",
                    "Which artist painted Elsewater?",
                ],
            ),
        ]
    )


@pytest.fixture
def highly_known_pool() -> pd.DataFrame:
    base = [_fact(f"h{i}", f"What is {i} plus one?", str(i + 1)) for i in range(4)]
    trivia = [
        _fact(f"t{i}", f"What is {i} times two?", str(2 * i), source="triviaqa") for i in range(4)
    ]
    return pd.DataFrame(base + trivia)


@pytest.fixture(scope="module")
def tokenizer():
    loaded = AutoTokenizer.from_pretrained(materialise_embedded("smollm2-135m-instruct"))
    # Same settings as kp_utils.models.load_model.
    loaded.padding_side = "left"
    return loaded


@pytest.fixture
def tiny_model(tokenizer):
    return build_tiny_llama(len(tokenizer))


@pytest.fixture
def train_rows() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "fact_id": ["u1", "u2", "u3", "u4"],
            "question": [
                "Who founded Arvel?",
                "Where is Brenn Hall?",
                "When did Caldo open?",
                "What does Dunmar make?",
            ],
            "answer": ["Mira Tolk", "Osk", "1911", "Rope"],
        }
    )


def _train(model, tokenizer, rows, cell_dir, config=None, **kwargs) -> dict:
    return train_adapter(
        model,
        tokenizer,
        rows,
        config or FakeTrainConfig(),
        cell_dir,
        PromptStyle.CHAT,
        show_progress=False,
        **kwargs,
    )


def _probe_ids(tokenizer) -> torch.Tensor:
    return tokenizer("Question: Who founded Arvel?", return_tensors="pt")["input_ids"]


# --- Grid and labels -------------------------------------------------------------------------


def test_expand_grid_counts():
    config = FakeTrainConfig(n_unknown=[10, 50], n_extra_per_unknown=[0, 1, 3], seeds=[0, 1])
    cells = expand_grid(config)
    # Per n_unknown: (1 cell without extras + 2 extra counts * 2 kinds) * 2 seeds = 10.
    assert len(cells) == 20
    assert sum(cell.extra_kind is None for cell in cells) == 4
    assert sum(cell.extra_kind is ExtraKind.HIGHLY_KNOWN for cell in cells) == 8


def test_expand_grid_zero_extras_once():
    cells = expand_grid(FakeTrainConfig(n_unknown=[10], n_extra_per_unknown=[0], seeds=[0]))
    assert cells == [TrainingCell(10, 0, None, 0)]


def test_expand_grid_unknown_kind_raises():
    with pytest.raises(ValueError, match=r"extra_kinds has invalid values \['synonym'\]"):
        expand_grid(FakeTrainConfig(n_extra_per_unknown=[1], extra_kinds=["synonym"]))


def test_training_cell_kind_without_extras_raises():
    with pytest.raises(ValueError, match="extra_kind must be None"):
        TrainingCell(10, 0, ExtraKind.PARAPHRASE, 0)


def test_training_cell_string_kind_coerced():
    assert TrainingCell(10, 1, "highly_known", 0).extra_kind is ExtraKind.HIGHLY_KNOWN


def test_cell_label_formats():
    assert cell_label(TrainingCell(50, 1, ExtraKind.HIGHLY_KNOWN, 0)) == "UK50+HK1 s0"
    assert cell_label(TrainingCell(50, 3, ExtraKind.PARAPHRASE, 1)) == "UK50+Para3 s1"
    assert cell_label(TrainingCell(50, 0, None, 2)) == "UK50 s2"


def test_cell_label_adapter_suffix():
    cell = TrainingCell(50, 0, None, 0, 8, 16.0, ("down_proj",), (26, 27, 28, 29))
    assert cell_label(cell) == "UK50-r8-a16-down_proj-L26-29 s0"
    assert cell_label(TrainingCell(50, 0, None, 1, lora_rank=4, lora_alpha=8)) == "UK50-r4-a8 s1"
    layers_only = TrainingCell(5, 1, ExtraKind.PARAPHRASE, 0, layers=(0,))
    assert cell_label(layers_only) == "UK5+Para1-L0 s0"


def test_adapter_label_always_full():
    assert adapter_label(TrainingCell(5, 0, None, 0)) == "r1-a2-down_proj+gate_proj+up_proj"
    cell = TrainingCell(5, 0, None, 0, 2, 0.5, ("down_proj",), (0, 1))
    assert adapter_label(cell) == "r2-a0.5-down_proj-L0-1"


def test_format_layers_runs():
    assert format_layers(None) == "all"
    assert format_layers((3,)) == "3"
    assert format_layers((29, 26, 27, 28)) == "26-29"
    assert format_layers((0, 5, 6, 9)) == "0+5-6+9"


@pytest.mark.parametrize(
    ("adapter", "message"),
    [
        ({"lora_rank": 0}, "lora_rank must be at least 1, got 0"),
        ({"lora_alpha": 0.0}, "lora_alpha must be above 0, got 0.0"),
        ({"target_modules": ()}, "target_modules must list at least one"),
        ({"target_modules": ("down_proj", "")}, "target_modules must list at least one"),
        ({"layers": ()}, r"layers must be None \(every layer\) or indices >= 0"),
        ({"layers": (-1,)}, r"layers must be None \(every layer\) or indices >= 0"),
    ],
)
def test_training_cell_bad_adapter_raises(adapter, message):
    with pytest.raises(ValueError, match=message):
        TrainingCell(5, 0, None, 0, **adapter)


def test_training_cell_adapter_fields_cast():
    cell = TrainingCell(5, 0, None, 0, lora_alpha=2, target_modules=["down_proj"], layers=[1])
    assert cell == TrainingCell(
        5, 0, None, 0, lora_alpha=2.0, target_modules=("down_proj",), layers=(1,)
    )
    assert isinstance(cell.lora_alpha, float)


def test_expand_grid_adapter_product():
    config = FakeTrainConfig(
        n_unknown=[2, 8],
        seeds=[0, 1],
        lora_rank=[1, 4],
        lora_alpha=[2.0, 8.0],
        target_modules=[["down_proj"], ["down_proj", "up_proj"]],
        layers=[[0], None],
    )
    cells = expand_grid(config)
    # 2 module sets x 2 layer sets x 2 ranks x 2 alphas = 16 adapters, x 2 n_unknown x 2 seeds.
    assert len(cells) == 64
    assert len({(c.lora_rank, c.lora_alpha, c.target_modules, c.layers) for c in cells}) == 16
    assert {c.layers for c in cells} == {(0,), None}


def test_expand_grid_alpha_per_rank():
    config = FakeTrainConfig(lora_rank=[1, 4, 16], lora_alpha=99.0, lora_alpha_per_rank=2.0)
    cells = expand_grid(config)
    assert [(c.lora_rank, c.lora_alpha) for c in cells] == [(1, 2.0), (4, 8.0), (16, 32.0)]


def test_expand_grid_adapter_duplicates_dropped():
    config = FakeTrainConfig(
        lora_rank=[4, 4], lora_alpha=[8, 8.0], target_modules=[["down_proj"], ["down_proj"]]
    )
    assert expand_grid(config) == [TrainingCell(2, 0, None, 0, 4, 8.0, ("down_proj",))]


def test_expand_grid_single_adapter_paper():
    # A config without sweeps gives the paper's adapter on every cell.
    assert all(cell.is_paper_adapter for cell in expand_grid(FakeTrainConfig(n_unknown=[1, 5])))


def test_cell_train_config_single_values():
    config = FakeTrainConfig(
        lora_rank=[1, 4], lora_alpha_per_rank=2.0, target_modules=[["down_proj"]], layers=[[1]]
    )
    cell = TrainingCell(2, 0, None, 0, 4, 8.0, ("down_proj",), (1,))
    resolved = cell_train_config(config, cell)
    assert resolved.lora_rank == 4
    assert resolved.lora_alpha == 8.0
    assert resolved.lora_alpha_per_rank is None
    assert resolved.target_modules == ["down_proj"]
    assert resolved.layers == [1]
    assert resolved.n_epochs == config.n_epochs


def test_lora_config_swept_raises():
    with pytest.raises(ValueError, match=r"lora_rank has 2 values.*cell_train_config"):
        build_lora_config(FakeTrainConfig(lora_rank=[1, 4]))


def test_lora_config_from_cell():
    config = FakeTrainConfig(target_modules=[["down_proj"], ["up_proj"]], layers=[[1], None])
    cell = TrainingCell(2, 0, None, 0, 4, 8.0, ("up_proj",), (1,))
    lora = build_lora_config(cell_train_config(config, cell))
    assert (lora.r, lora.lora_alpha) == (4, 8.0)
    assert lora.target_modules == {"up_proj"}
    assert lora.layers_to_transform == [1]


# --- Training sets ---------------------------------------------------------------------------


def test_training_set_same_seed_same_rows(unknown_pool, highly_known_pool):
    cell = TrainingCell(3, 2, ExtraKind.PARAPHRASE, 7)
    first = build_training_set(cell, unknown_pool, highly_known_pool)
    second = build_training_set(cell, unknown_pool, highly_known_pool)
    pd.testing.assert_frame_equal(first, second)


def test_training_set_seed_changes_draw(unknown_pool, highly_known_pool):
    drawn = {
        tuple(
            build_training_set(TrainingCell(3, 0, None, seed), unknown_pool, highly_known_pool)[
                "fact_id"
            ]
        )
        for seed in range(5)
    }
    assert len(drawn) > 1


def test_training_set_smaller_cell_nested(unknown_pool, highly_known_pool):
    small = build_training_set(TrainingCell(2, 0, None, 3), unknown_pool, highly_known_pool)
    large = build_training_set(TrainingCell(4, 0, None, 3), unknown_pool, highly_known_pool)
    assert set(small["fact_id"]) <= set(large["fact_id"])


def test_training_set_paraphrase_composition(unknown_pool, highly_known_pool):
    rows = build_training_set(
        TrainingCell(3, 2, ExtraKind.PARAPHRASE, 0), unknown_pool, highly_known_pool
    )
    extras = rows[rows["is_extra"]]
    facts = unknown_pool.set_index("fact_id")
    assert len(rows) == 3 + 3 * 2
    assert len(extras) == 6
    assert set(extras["extra_kind"]) == {ExtraKind.PARAPHRASE.value}
    assert (extras["fact_id"] == extras["source_fact_id"]).all()
    assert extras.groupby("source_fact_id")["question"].nunique().tolist() == [2, 2, 2]
    for extra in extras.itertuples():
        assert extra.question in facts.loc[extra.source_fact_id, "paraphrases"]
        assert extra.answer == facts.loc[extra.source_fact_id, "answer"]


def test_training_set_unknown_rows_marked(unknown_pool, highly_known_pool):
    rows = build_training_set(
        TrainingCell(3, 1, ExtraKind.HIGHLY_KNOWN, 0), unknown_pool, highly_known_pool
    )
    originals = rows[~rows["is_extra"]]
    assert len(originals) == 3
    assert originals["extra_kind"].isna().all()
    assert (originals["fact_id"] == originals["source_fact_id"]).all()
    assert set(originals["fact_id"]) <= set(unknown_pool["fact_id"])


def test_training_set_highly_known_composition(unknown_pool, highly_known_pool):
    rows = build_training_set(
        TrainingCell(2, 2, ExtraKind.HIGHLY_KNOWN, 0), unknown_pool, highly_known_pool
    )
    extras = rows[rows["is_extra"]]
    originals = rows[~rows["is_extra"]]
    assert len(rows) == 2 + 2 * 2
    assert extras["fact_id"].nunique() == 4
    # 4 extras fit in the 4 facts of the first source, so TriviaQA stays unused.
    assert set(extras["fact_id"]) == {"h0", "h1", "h2", "h3"}
    assert extras["source_fact_id"].value_counts().tolist() == [2, 2]
    assert set(extras["source_fact_id"]) == set(originals["fact_id"])
    assert set(extras["extra_kind"]) == {ExtraKind.HIGHLY_KNOWN.value}


def test_training_set_highly_known_spills_to_next_source(unknown_pool, highly_known_pool):
    rows = build_training_set(
        TrainingCell(3, 2, ExtraKind.HIGHLY_KNOWN, 0), unknown_pool, highly_known_pool
    )
    extras = rows[rows["is_extra"]]
    assert {"h0", "h1", "h2", "h3"} <= set(extras["fact_id"])
    assert extras["fact_id"].str.startswith("t").sum() == 2


def test_training_set_highly_known_shortfall_message(unknown_pool, highly_known_pool):
    cell = TrainingCell(3, 3, ExtraKind.HIGHLY_KNOWN, 0)
    # 3 Unknown facts * 3 extras = 9 needed, and the pool has 8.
    expected = "cell UK3+HK3 s0 needs 9 HighlyKnown facts but the pool has 8 (short by 1)"
    with pytest.raises(ValueError) as raised:
        build_training_set(cell, unknown_pool, highly_known_pool)
    assert expected in str(raised.value)


def test_training_set_unknown_shortfall_message(unknown_pool, highly_known_pool):
    expected = "cell UK7 s0 needs 7 Unknown facts but the pool has 5 (short by 2)"
    with pytest.raises(ValueError) as raised:
        build_training_set(TrainingCell(7, 0, None, 0), unknown_pool, highly_known_pool)
    assert expected in str(raised.value)


def test_training_set_few_paraphrases_raises(unknown_pool, highly_known_pool):
    pool = unknown_pool.copy()
    pool["paraphrases"] = pool["paraphrases"].map(lambda items: items[:1])
    with pytest.raises(ValueError) as raised:
        build_training_set(TrainingCell(5, 2, ExtraKind.PARAPHRASE, 0), pool, highly_known_pool)
    assert "needs 2 paraphrases per Unknown fact" in str(raised.value)
    assert "5 of the 5 drawn facts have fewer" in str(raised.value)
    assert "fact 'u1' has 1" in str(raised.value)


def test_training_set_repeated_fact_id_raises(unknown_pool, highly_known_pool):
    pool = pd.concat([highly_known_pool, highly_known_pool.head(1)], ignore_index=True)
    with pytest.raises(ValueError, match=r"highly_known_pool has 1 repeated fact_id .*'h0'"):
        build_training_set(TrainingCell(2, 1, ExtraKind.HIGHLY_KNOWN, 0), unknown_pool, pool)


def test_training_set_missing_column_raises(unknown_pool, highly_known_pool):
    pool = highly_known_pool.drop(columns=["source"])
    with pytest.raises(ValueError, match=r"highly_known_pool is missing columns \['source'\]"):
        build_training_set(TrainingCell(2, 1, ExtraKind.HIGHLY_KNOWN, 0), unknown_pool, pool)


def test_grid_feasible_lists_every_cell(unknown_pool, highly_known_pool):
    cells = [
        TrainingCell(2, 1, ExtraKind.HIGHLY_KNOWN, 0),
        TrainingCell(5, 2, ExtraKind.HIGHLY_KNOWN, 0),
        TrainingCell(6, 0, None, 1),
    ]
    with pytest.raises(ValueError) as raised:
        check_grid_feasible(cells, unknown_pool, highly_known_pool)
    assert "2 training cells cannot be built" in str(raised.value)
    assert "cell UK5+HK2 s0 needs 10 HighlyKnown facts" in str(raised.value)
    assert "cell UK6 s1 needs 6 Unknown facts" in str(raised.value)


def test_grid_feasible_passes(unknown_pool, highly_known_pool):
    cells = expand_grid(FakeTrainConfig(n_unknown=[2, 4], n_extra_per_unknown=[0, 2]))
    assert check_grid_feasible(cells, unknown_pool, highly_known_pool) is None


# --- Cell keys -------------------------------------------------------------------------------

CELL = TrainingCell(50, 1, ExtraKind.HIGHLY_KNOWN, 0)


def test_cell_key_stable():
    first = cell_key(CELL, FakeTrainConfig(), "embedded:smollm2", "abc123", PromptStyle.CHAT)
    second = cell_key(
        TrainingCell(50, 1, "highly_known", 0),
        FakeTrainConfig(lora_alpha=2, lora_rank=1.0),
        "embedded:smollm2",
        "abc123",
        "chat",
    )
    assert first == second


def test_cell_key_starts_with_label_slug():
    key = cell_key(CELL, FakeTrainConfig(), "embedded:smollm2", "abc123")
    assert key.startswith("uk50-hk1-s0-")
    assert len(key) == len("uk50-hk1-s0-") + 10


@pytest.mark.parametrize(
    "change",
    [
        {"lora_dropout": 0.0},
        {"learning_rate": 1e-4},
        {"n_epochs": 5},
        {"batch_size": 8},
        {"weight_decay": 0.01},
        {"loss_on_reply_only": True},
        {"max_length": 64},
    ],
)
def test_cell_key_changes_with_field(change):
    base = cell_key(CELL, FakeTrainConfig(), "embedded:smollm2", "abc123")
    changed = cell_key(
        CELL, dataclasses.replace(FakeTrainConfig(), **change), "embedded:smollm2", "abc123"
    )
    assert changed != base


def _adapter_cell(**adapter) -> TrainingCell:
    return TrainingCell(50, 1, ExtraKind.HIGHLY_KNOWN, 0, **adapter)


@pytest.mark.parametrize(
    "adapter",
    [
        {"lora_rank": 2},
        {"lora_alpha": 4.0},
        {"target_modules": ("down_proj",)},
        {"layers": (0,)},
    ],
)
def test_cell_key_changes_with_adapter(adapter):
    base = cell_key(CELL, FakeTrainConfig(), "embedded:smollm2", "abc123")
    changed = cell_key(_adapter_cell(**adapter), FakeTrainConfig(), "embedded:smollm2", "abc123")
    assert changed != base


def test_cell_key_adapter_from_cell():
    # The cell decides the adapter, so a config sweeping ranks gives the key of its cells.
    cell = _adapter_cell(lora_rank=4, lora_alpha=8.0)
    swept = FakeTrainConfig(lora_rank=[1, 4], lora_alpha_per_rank=2.0)
    single = FakeTrainConfig(lora_rank=4, lora_alpha=8)
    key = cell_key(cell, swept, "embedded:smollm2", "abc123")
    assert key == cell_key(cell, single, "embedded:smollm2", "abc123")
    assert key == cell_key(cell, cell_train_config(swept, cell), "embedded:smollm2", "abc123")


def test_cell_key_paper_adapter_unchanged():
    # A cell with the paper's adapter keeps the slug it had before adapter axes existed.
    key = cell_key(CELL, FakeTrainConfig(lora_rank=[1]), "embedded:smollm2", "abc123")
    assert key == cell_key(CELL, FakeTrainConfig(), "embedded:smollm2", "abc123")
    assert key.startswith("uk50-hk1-s0-")


def test_cell_key_adapter_slug():
    cell = _adapter_cell(lora_rank=8, lora_alpha=16, target_modules=("down_proj",), layers=(2, 3))
    key = cell_key(cell, FakeTrainConfig(), "embedded:smollm2", "abc123")
    assert key.startswith("uk50-hk1-r8-a16-down-proj-l2-3-s0-")


def test_cell_key_ignores_grid_lists():
    base = cell_key(CELL, FakeTrainConfig(), "embedded:smollm2", "abc123")
    other_grid = FakeTrainConfig(n_unknown=[50, 100], seeds=[0, 1, 2])
    assert cell_key(CELL, other_grid, "embedded:smollm2", "abc123") == base


def test_cell_key_changes_with_context():
    base = cell_key(CELL, FakeTrainConfig(), "embedded:smollm2", "abc123", "chat")
    variants = [
        cell_key(CELL, FakeTrainConfig(), "other-model", "abc123", "chat"),
        cell_key(CELL, FakeTrainConfig(), "embedded:smollm2", "abc124", "chat"),
        cell_key(CELL, FakeTrainConfig(), "embedded:smollm2", "abc123", "plain"),
        cell_key(
            TrainingCell(50, 1, ExtraKind.HIGHLY_KNOWN, 1),
            FakeTrainConfig(),
            "embedded:smollm2",
            "abc123",
            "chat",
        ),
        cell_key(
            TrainingCell(50, 1, ExtraKind.PARAPHRASE, 0),
            FakeTrainConfig(),
            "embedded:smollm2",
            "abc123",
            "chat",
        ),
    ]
    assert len(set(variants)) == len(variants)
    assert base not in variants


# --- Tokenisation ----------------------------------------------------------------------------


def test_encode_reply_only_masks_prompt(tokenizer, train_rows):
    examples = encode_training_rows(tokenizer, train_rows, "chat", 128, loss_on_reply_only=True)
    prompt, _ = format_training_text(tokenizer, "Who founded Arvel?", "Mira Tolk", PromptStyle.CHAT)
    n_prompt = len(tokenizer(prompt)["input_ids"])
    batch = collate_examples(examples, tokenizer.pad_token_id)
    labels, input_ids = batch["labels"][0], batch["input_ids"][0]
    length = len(examples[0].input_ids)
    assert (labels[:n_prompt] == IGNORE_INDEX).all()
    assert torch.equal(labels[n_prompt:length], input_ids[n_prompt:length])
    assert n_prompt < length


def test_encode_whole_sequence_labels(tokenizer, train_rows):
    examples = encode_training_rows(tokenizer, train_rows, "chat", 128, loss_on_reply_only=False)
    assert all(example.labels == example.input_ids for example in examples)


def test_collate_pads_right(tokenizer, train_rows):
    examples = encode_training_rows(tokenizer, train_rows, "plain", 128, False)
    batch = collate_examples(examples, tokenizer.pad_token_id)
    lengths = [len(example.input_ids) for example in examples]
    shortest = lengths.index(min(lengths))
    assert batch["input_ids"].shape == (4, max(lengths))
    assert batch["attention_mask"][shortest, : min(lengths)].all()
    assert not batch["attention_mask"][shortest, min(lengths) :].any()
    assert (batch["labels"][shortest, min(lengths) :] == IGNORE_INDEX).all()
    assert (batch["input_ids"][shortest, min(lengths) :] == tokenizer.pad_token_id).all()


def test_encode_truncation_warns(tokenizer, train_rows, caplog):
    with caplog.at_level(logging.WARNING, logger="kp_utils.training"):
        examples = encode_training_rows(tokenizer, train_rows, "chat", 20, False)
    assert max(len(example.input_ids) for example in examples) == 20
    assert "Truncated 4 of 4 training examples to max_length=20" in caplog.text


def test_encode_reply_truncated_away_raises(tokenizer, train_rows):
    with pytest.raises(ValueError, match="no reply tokens left"):
        encode_training_rows(tokenizer, train_rows, "chat", 20, loss_on_reply_only=True)


# --- Training runs ---------------------------------------------------------------------------


def test_train_loss_decreases(tiny_model, tokenizer, train_rows, tmp_path):
    result = _train(tiny_model, tokenizer, train_rows, tmp_path / "cell")
    losses = [epoch["mean_loss"] for epoch in result["epochs"]]
    assert losses[-1] < losses[0]


def test_train_writes_cell_files(tiny_model, tokenizer, train_rows, tmp_path):
    cell_dir = tmp_path / "cell"
    _train(tiny_model, tokenizer, train_rows, cell_dir)
    epochs = pd.read_csv(cell_dir / "epochs.csv")
    checkpoints = sorted(path.name for path in (cell_dir / "checkpoints").iterdir())
    assert epochs["epoch"].tolist() == [1, 2, 3, 4]
    assert checkpoints == ["epoch_01", "epoch_02", "epoch_03", "epoch_04"]
    assert (cell_dir / "checkpoints" / "epoch_04" / "adapter_model.safetensors").exists()
    assert (cell_dir / "adapter" / "adapter_model.safetensors").exists()
    losses = pd.read_csv(cell_dir / "losses.csv")
    # 4 rows in batches of 2 for 4 epochs = 8 optimiser steps.
    assert len(losses) == 8
    assert list(losses.columns) == [
        "step",
        "epoch",
        "loss",
        "n_tokens",
        "n_padded_tokens",
        "step_s",
    ]
    assert (losses["step_s"] > 0).all()
    pd.testing.assert_frame_equal(pd.read_parquet(cell_dir / "train_set.parquet"), train_rows)
    assert not [path for path in cell_dir.rglob("*") if ".tmp-" in path.name]


def test_train_done_json_contents(tiny_model, tokenizer, train_rows, tmp_path):
    cell_dir = tmp_path / "uk4-s0-0123456789"
    result = _train(tiny_model, tokenizer, train_rows, cell_dir)
    done = json.loads((cell_dir / "done.json").read_text())
    assert done["key"] == "uk4-s0-0123456789"
    # Per layer: gate and up (32 -> 64) have A 1x32 + B 64x1 = 96 each, down (64 -> 32) has
    # A 1x64 + B 32x1 = 96, so 288 per layer and 576 for 2 layers.
    assert done["n_trainable_parameters"] == 576
    assert done["n_steps"] == 8
    assert done["tokens_per_s"] > 0
    assert done["final_mean_loss"] == result["epochs"][-1]["mean_loss"]


def test_train_layers_limit_parameters(tiny_model, tokenizer, train_rows, tmp_path):
    config = FakeTrainConfig(layers=[1], n_epochs=1)
    result = _train(tiny_model, tokenizer, train_rows, tmp_path / "cell", config)
    assert result["n_trainable_parameters"] == 288


def test_train_rank_sets_trainable_count(tiny_model, tokenizer, train_rows, tmp_path):
    config = FakeTrainConfig(lora_rank=[1, 4], target_modules=["down_proj"], n_epochs=1)
    counts = {}
    for cell in expand_grid(config):
        result = _train(
            tiny_model,
            tokenizer,
            train_rows,
            tmp_path / cell_label(cell),
            cell_train_config(config, cell),
        )
        counts[cell.lora_rank] = result["n_trainable_parameters"]
    # down_proj maps 64 -> 32: A is r x 64 and B is 32 x r, so 96 r per layer, 192 r for the
    # 2 layers of the tiny model: 192 at rank 1 and 768 at rank 4.
    assert counts == {1: 192, 4: 768}


def test_train_records_evaluation(tiny_model, tokenizer, train_rows, tmp_path):
    calls = []

    def evaluate(model, epoch):
        calls.append((epoch, model.training))
        return {"reliability": epoch / 10}

    _train(tiny_model, tokenizer, train_rows, tmp_path / "cell", evaluate_epoch=evaluate)
    epochs = pd.read_csv(tmp_path / "cell" / "epochs.csv")
    assert calls == [(1, False), (2, False), (3, False), (4, False)]
    assert epochs["reliability"].tolist() == [0.1, 0.2, 0.3, 0.4]


def test_train_same_seed_same_losses(tiny_model, tokenizer, train_rows, tmp_path):
    def evaluate_with_sampling(model, epoch):
        # Draws from the global RNG, as sampled generation would.
        return {"noise": float(torch.rand(1))}

    _train(tiny_model, tokenizer, train_rows, tmp_path / "a", seed=3)
    _train(
        tiny_model,
        tokenizer,
        train_rows,
        tmp_path / "b",
        seed=3,
        evaluate_epoch=evaluate_with_sampling,
    )
    # step_s is wall time, so only the other columns must match.
    first = pd.read_csv(tmp_path / "a" / "losses.csv").drop(columns="step_s")
    second = pd.read_csv(tmp_path / "b" / "losses.csv").drop(columns="step_s")
    pd.testing.assert_frame_equal(first, second)


def test_train_base_model_unchanged(tiny_model, tokenizer, train_rows, tmp_path):
    before = {name: tensor.clone() for name, tensor in tiny_model.state_dict().items()}
    _train(tiny_model, tokenizer, train_rows, tmp_path / "cell")
    after = tiny_model.state_dict()
    assert set(after) == set(before)
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name
    assert not any("lora" in name for name, _ in tiny_model.named_modules())
    assert all(param.requires_grad for param in tiny_model.parameters())
    assert not tiny_model.training
    assert tokenizer.padding_side == "left"


def test_adapter_reload_same_logits(tiny_model, tokenizer, train_rows, tmp_path):
    final_logits = {}

    def capture_logits(model, epoch):
        with torch.no_grad():
            final_logits[epoch] = model(input_ids=_probe_ids(tokenizer)).logits
        return {}

    _train(tiny_model, tokenizer, train_rows, tmp_path / "cell", evaluate_epoch=capture_logits)
    peft_model = load_adapter(tiny_model, tmp_path / "cell" / "adapter")
    with torch.no_grad():
        reloaded = peft_model(input_ids=_probe_ids(tokenizer)).logits
    peft_model.unload()
    with torch.no_grad():
        base = tiny_model(input_ids=_probe_ids(tokenizer)).logits
    assert isinstance(peft_model, PeftModel)
    assert not peft_model.training
    assert torch.allclose(reloaded, final_logits[4], atol=1e-6)
    assert not torch.allclose(base, final_logits[4], atol=1e-6)


def test_count_trainable_parameters_non_peft_raises(tiny_model):
    with pytest.raises(TypeError, match="PeftModel"):
        count_trainable_parameters(tiny_model)


def test_train_peft_model_rejected(tiny_model, tokenizer, train_rows, tmp_path):
    _train(tiny_model, tokenizer, train_rows, tmp_path / "cell", FakeTrainConfig(n_epochs=1))
    peft_model = load_adapter(tiny_model, tmp_path / "cell" / "adapter")
    with pytest.raises(TypeError, match="unload"):
        _train(peft_model, tokenizer, train_rows, tmp_path / "other")
    peft_model.unload()


# --- Failures and resuming -------------------------------------------------------------------


def test_train_nonfinite_loss_raises(tiny_model, tokenizer, train_rows, tmp_path):
    original_forward = tiny_model.forward
    n_calls = []

    def forward_with_nan_loss(*args, **kwargs):
        output = original_forward(*args, **kwargs)
        n_calls.append(1)
        if len(n_calls) == 3:
            output.loss = output.loss * float("nan")
        return output

    tiny_model.forward = forward_with_nan_loss
    before = {name: tensor.clone() for name, tensor in tiny_model.state_dict().items()}
    cell_dir = tmp_path / "cell"
    with pytest.raises(NonFiniteLossError) as raised:
        _train(tiny_model, tokenizer, train_rows, cell_dir)
    losses = pd.read_csv(cell_dir / "losses.csv")
    # Steps 1-2 form epoch 1 (4 rows, batch 2), so the third forward is epoch 2, step 3.
    assert "at epoch 2, step 3" in str(raised.value)
    assert str(cell_dir) in str(raised.value)
    assert len(losses) == 3
    assert losses["loss"].isna().tolist() == [False, False, True]
    assert not is_cell_done(cell_dir)
    assert all(torch.equal(tiny_model.state_dict()[name], t) for name, t in before.items())


def test_train_huge_learning_rate_raises(tiny_model, tokenizer, train_rows, tmp_path):
    config = FakeTrainConfig(learning_rate=1e30, n_epochs=3)
    with pytest.raises(NonFiniteLossError, match="Lower learning_rate"):
        _train(tiny_model, tokenizer, train_rows, tmp_path / "cell", config)


def test_cell_done_after_training(tiny_model, tokenizer, train_rows, tmp_path):
    cell_dir = tmp_path / "cell"
    assert not is_cell_done(cell_dir)
    _train(tiny_model, tokenizer, train_rows, cell_dir, FakeTrainConfig(n_epochs=1))
    assert is_cell_done(cell_dir)
    with pytest.raises(FileExistsError, match="already contains a finished cell"):
        prepare_cell_dir(cell_dir)


def test_prepare_wipes_partial_dir(tmp_path):
    cell_dir = tmp_path / "cell"
    (cell_dir / "checkpoints" / "epoch_01").mkdir(parents=True)
    (cell_dir / "losses.csv").write_text("step,epoch,loss,n_tokens\n1,1,2.0,10\n")
    (cell_dir / ".epochs.csv.tmp-123").write_text("half")
    assert not is_cell_done(cell_dir)
    prepare_cell_dir(cell_dir)
    assert cell_dir.is_dir()
    assert list(cell_dir.iterdir()) == []


def test_prepare_corrupt_done_json_wiped(tmp_path):
    cell_dir = tmp_path / "cell"
    cell_dir.mkdir()
    (cell_dir / "done.json").write_text('{"key": ')
    assert not is_cell_done(cell_dir)
    prepare_cell_dir(cell_dir)
    assert list(cell_dir.iterdir()) == []


def test_prepare_foreign_dir_raises(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="notes.txt"):
        prepare_cell_dir(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "keep me"
