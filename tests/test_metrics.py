"""Tests for kp_utils.metrics on hand-built labels and replies."""

import math

import numpy as np
import pandas as pd
import pytest

from kp_utils.categories import KnowledgeCategory
from kp_utils.metrics import (
    METRICS_VERSION,
    answer_collapse,
    confidence_by_category,
    count_refusals,
    expected_calibration_error,
    knowledge_shifts,
    reliability,
    shift_reasons,
    transition_matrix,
)

HK = KnowledgeCategory.HIGHLY_KNOWN
MK = KnowledgeCategory.MAYBE_KNOWN
WK = KnowledgeCategory.WEAKLY_KNOWN
UK = KnowledgeCategory.UNKNOWN
ORDER = [HK.value, MK.value, WK.value, UK.value]


def make_labels(categories: dict, domains: dict | None = None) -> pd.DataFrame:
    """Build a labels frame from {fact_id: KnowledgeCategory}, with placeholder counts."""
    fact_ids = list(categories)
    return pd.DataFrame(
        {
            "fact_id": fact_ids,
            "relation": "capital",
            "domain": [(domains or {}).get(fact_id, "geo") for fact_id in fact_ids],
            "n_correct": 0,
            "n_prompts": 2,
            "category": [categories[fact_id].value for fact_id in fact_ids],
            "n_refusals": 0,
            "mean_greedy_prob": 0.5,
        }
    )


def make_replies(rows: list[tuple]) -> pd.DataFrame:
    """Build replies from (fact_id, prompt_index, answer, is_correct, is_refusal, greedy_prob)."""
    columns = [
        "fact_id",
        "prompt_index",
        "extracted_answer",
        "is_correct",
        "is_refusal",
        "greedy_prob",
    ]
    frame = pd.DataFrame(rows, columns=columns)
    frame.insert(2, "reply", "Answer: " + frame["extracted_answer"])
    return frame


# 4 facts under 2 prompts. Base -> adapted: f1 UK -> HK (+), f2 HK -> UK (-), f3 MK -> MK,
# f4 WK -> MK (+).
BASE_LABELS = make_labels({"f1": UK, "f2": HK, "f3": MK, "f4": WK})
ADAPTED_LABELS = make_labels({"f1": HK, "f2": UK, "f3": MK, "f4": MK})

# Correct rows: f1 1 of 2, f2 2 of 2, f3 0 of 2, f4 1 of 2.
REPLIES = make_replies(
    [
        ("f1", 0, "Paris", True, False, 0.9),
        ("f1", 1, "Rome", False, False, 0.4),
        ("f2", 0, "Bach", True, False, 0.8),
        ("f2", 1, "Bach", True, False, 0.6),
        ("f3", 0, "", False, True, 0.1),
        ("f3", 1, "Oslo", False, False, 0.3),
        ("f4", 0, "Lima", True, False, 0.7),
        ("f4", 1, "", False, True, 0.2),
    ]
)


def test_metrics_version_is_two():
    assert METRICS_VERSION == 2


def test_reliability_trained_facts_share():
    # f1 and f2: 3 correct of 4 rows.
    assert reliability(REPLIES, ["f1", "f2"]) == pytest.approx(0.75)


def test_reliability_all_facts_share():
    # 4 correct of 8 rows.
    assert reliability(REPLIES, ["f1", "f2", "f3", "f4"]) == pytest.approx(0.5)


def test_reliability_partial_ids_warns(caplog):
    # Only f3 is present, with 0 correct of 2 rows. "missing" is skipped with a warning.
    with caplog.at_level("WARNING", logger="kp_utils.metrics"):
        value = reliability(REPLIES, ["f3", "missing"])
    assert value == 0.0
    assert "skips 1 of 2" in caplog.text


def test_reliability_no_ids_raises():
    with pytest.raises(ValueError, match="none of the 2 fact ids"):
        reliability(REPLIES, ["x", "y"])


def test_transition_matrix_counts():
    matrix = transition_matrix(BASE_LABELS, ADAPTED_LABELS)
    assert matrix.loc[UK.value, HK.value] == 1
    assert matrix.loc[HK.value, UK.value] == 1
    assert matrix.loc[MK.value, MK.value] == 1
    assert matrix.loc[WK.value, MK.value] == 1
    assert int(matrix.to_numpy().sum()) == 4


def test_transition_matrix_all_categories_ordered():
    # Only HK facts, yet every category appears as a row and a column in HK, MK, WK, UK order.
    labels = make_labels({"a": HK, "b": HK})
    matrix = transition_matrix(labels, labels)
    assert list(matrix.index) == ORDER
    assert list(matrix.columns) == ORDER
    assert matrix.loc[HK.value, HK.value] == 2
    assert int(matrix.to_numpy().sum()) == 2
    assert np.issubdtype(matrix.to_numpy().dtype, np.integer)


def test_transition_matrix_id_mismatch_raises():
    adapted = make_labels({"f1": HK, "f2": UK, "f3": MK, "other": MK})
    with pytest.raises(ValueError, match="same facts"):
        transition_matrix(BASE_LABELS, adapted)


def test_transition_matrix_duplicate_id_raises():
    duplicated = pd.concat([BASE_LABELS, BASE_LABELS.iloc[[0]]], ignore_index=True)
    with pytest.raises(ValueError, match="duplicate fact_id"):
        transition_matrix(duplicated, duplicated)


def test_transition_matrix_unknown_category_raises():
    bad = BASE_LABELS.assign(category=["Unknown", "HighlyKnown", "MaybeKnown", "Sometimes"])
    with pytest.raises(ValueError, match="Sometimes"):
        transition_matrix(bad, ADAPTED_LABELS)


def test_knowledge_shifts_counts():
    # Positive: f1 (UK -> HK), f4 (WK -> MK). Negative: f2 (HK -> UK). Denominator 4.
    shifts = knowledge_shifts(BASE_LABELS, ADAPTED_LABELS)
    assert shifts["n_questions"] == 4
    assert shifts["n_positive"] == 2
    assert shifts["n_negative"] == 1
    assert shifts["positive_share"] == pytest.approx(0.5)
    assert shifts["negative_share"] == pytest.approx(0.25)


def test_knowledge_shifts_empty_exclusion_same():
    default = knowledge_shifts(BASE_LABELS, ADAPTED_LABELS)
    excluded_none = knowledge_shifts(BASE_LABELS, ADAPTED_LABELS, exclude_fact_ids=[])
    assert excluded_none["n_questions"] == default["n_questions"]
    assert excluded_none["positive_share"] == default["positive_share"]
    assert excluded_none["negative_share"] == default["negative_share"]


def test_knowledge_shifts_exclusion_shrinks_denominator():
    # Without f1: positive f4 only, negative f2, denominator 3. "absent" is ignored.
    shifts = knowledge_shifts(BASE_LABELS, ADAPTED_LABELS, exclude_fact_ids=["f1", "absent"])
    assert shifts["n_questions"] == 3
    assert shifts["n_positive"] == 1
    assert shifts["positive_share"] == pytest.approx(1 / 3)
    assert shifts["negative_share"] == pytest.approx(1 / 3)


def test_knowledge_shifts_same_category_zero():
    labels = make_labels({"a": MK, "b": MK, "c": MK})
    shifts = knowledge_shifts(labels, labels)
    assert shifts["n_positive"] == 0
    assert shifts["n_negative"] == 0
    assert shifts["positive_share"] == 0.0
    assert shifts["negative_share"] == 0.0


def test_knowledge_shifts_by_base_category():
    table = knowledge_shifts(BASE_LABELS, ADAPTED_LABELS)["shares_by_base_category"]
    table = table.set_index("base_category")
    assert list(table.index) == ORDER
    assert table.loc[HK.value, "negative_share"] == 1.0
    assert table.loc[MK.value, "positive_share"] == 0.0
    assert table.loc[MK.value, "negative_share"] == 0.0
    assert table.loc[WK.value, "positive_share"] == 1.0
    assert table.loc[UK.value, "positive_share"] == 1.0
    assert table["n"].tolist() == [1, 1, 1, 1]


def test_knowledge_shifts_empty_category_nan():
    # Base has no WK or UK facts, so their within-category shares are undefined.
    labels = make_labels({"a": HK, "b": MK})
    table = knowledge_shifts(labels, labels)["shares_by_base_category"].set_index("base_category")
    assert table.loc[WK.value, "n"] == 0
    assert math.isnan(table.loc[UK.value, "positive_share"])


def test_knowledge_shifts_id_mismatch_raises():
    with pytest.raises(ValueError, match="same facts"):
        knowledge_shifts(BASE_LABELS, ADAPTED_LABELS.iloc[:3])


def test_knowledge_shifts_all_excluded_raises():
    with pytest.raises(ValueError, match="no facts left"):
        knowledge_shifts(BASE_LABELS, ADAPTED_LABELS, exclude_fact_ids=["f1", "f2", "f3", "f4"])


def test_count_refusals_two():
    assert count_refusals(REPLIES) == 2


def test_count_refusals_none():
    assert count_refusals(REPLIES.assign(is_refusal=False)) == 0


# Base answers after normalisation: paris 1, london 1, rome 2, berlin 1, madrid 1. The refusal
# and the empty answer are skipped, so 6 answers.
COLLAPSE_BASE = make_replies(
    [
        ("f1", 0, "Paris", True, False, 0.9),
        ("f1", 1, "London", False, False, 0.5),
        ("f2", 0, "Rome", True, False, 0.8),
        ("f2", 1, "Rome", True, False, 0.8),
        ("f3", 0, "Berlin", True, False, 0.7),
        ("f3", 1, "I don't know", False, True, 0.3),
        ("f4", 0, "", False, False, 0.2),
        ("f4", 1, "Madrid", True, False, 0.6),
    ]
)
# Adapted answers: "paris", "Paris", "The Paris", "Paris." and "Paris" all normalise to paris,
# so paris 5, berlin 1, rome 1, madrid 1, 8 answers.
COLLAPSE_ADAPTED = make_replies(
    [
        ("f1", 0, "paris", True, False, 0.9),
        ("f1", 1, "Paris", True, False, 0.9),
        ("f2", 0, "The Paris", False, False, 0.9),
        ("f2", 1, "Paris.", False, False, 0.9),
        ("f3", 0, "Berlin", True, False, 0.9),
        ("f3", 1, "Rome", False, False, 0.9),
        ("f4", 0, "Madrid", True, False, 0.9),
        ("f4", 1, "Paris", False, False, 0.9),
    ]
)


def test_answer_collapse_base_counts():
    # Counts [1, 1, 2, 1, 1]: mean 1.2, variance (4 * 0.2**2 + 0.8**2) / 5 = 0.16, std 0.4.
    summary, _ = answer_collapse(COLLAPSE_BASE, COLLAPSE_ADAPTED, explode_ratio=3, min_count=2)
    assert summary["base_n_answers"] == 6
    assert summary["base_n_distinct"] == 5
    assert summary["base_mean_count"] == pytest.approx(1.2)
    assert summary["base_std_count"] == pytest.approx(0.4)


def test_answer_collapse_adapted_counts():
    # Counts [5, 1, 1, 1]: mean 2, variance (9 + 1 + 1 + 1) / 4 = 3, std sqrt(3).
    summary, _ = answer_collapse(COLLAPSE_BASE, COLLAPSE_ADAPTED, explode_ratio=3, min_count=2)
    assert summary["adapted_n_answers"] == 8
    assert summary["adapted_n_distinct"] == 4
    assert summary["adapted_mean_count"] == pytest.approx(2.0)
    assert summary["adapted_std_count"] == pytest.approx(math.sqrt(3))


def test_answer_collapse_exploded_detected():
    # paris: 5 >= 2 and 5 >= 3 * 1. rome: 1 < min_count 2.
    summary, exploded = answer_collapse(
        COLLAPSE_BASE, COLLAPSE_ADAPTED, explode_ratio=3, min_count=2
    )
    assert summary["n_exploded"] == 1
    assert exploded["answer"].tolist() == ["paris"]
    assert exploded["base_count"].tolist() == [1]
    assert exploded["adapted_count"].tolist() == [5]
    assert exploded["ratio"].tolist() == [5.0]


def test_answer_collapse_min_count_blocks():
    summary, exploded = answer_collapse(
        COLLAPSE_BASE, COLLAPSE_ADAPTED, explode_ratio=3, min_count=6
    )
    assert summary["n_exploded"] == 0
    assert exploded.empty


def test_answer_collapse_ratio_blocks():
    # paris: 5 < 6 * 1.
    summary, _ = answer_collapse(COLLAPSE_BASE, COLLAPSE_ADAPTED, explode_ratio=6, min_count=2)
    assert summary["n_exploded"] == 0


def test_answer_collapse_new_answer_base_one():
    # "Tokyo" never occurs in base, so its base count 0 counts as 1: ratio 2 / 1 = 2.
    adapted = make_replies(
        [
            ("f1", 0, "Tokyo", False, False, 0.9),
            ("f2", 0, "Tokyo", False, False, 0.9),
        ]
    )
    _, exploded = answer_collapse(COLLAPSE_BASE, adapted, explode_ratio=2, min_count=2)
    assert exploded["answer"].tolist() == ["tokyo"]
    assert exploded["base_count"].tolist() == [0]
    assert exploded["ratio"].tolist() == [2.0]


def test_answer_collapse_bad_ratio_raises():
    with pytest.raises(ValueError, match="explode_ratio"):
        answer_collapse(COLLAPSE_BASE, COLLAPSE_ADAPTED, explode_ratio=0, min_count=2)


def test_answer_collapse_bad_min_count_raises():
    with pytest.raises(ValueError, match="min_count"):
        answer_collapse(COLLAPSE_BASE, COLLAPSE_ADAPTED, explode_ratio=2, min_count=0)


# Shift-reason example. UK -> HK: f1, f3. HK -> UK: f2. f4 stays MK, f5 stays UK.
REASON_BASE_LABELS = make_labels(
    {"f1": UK, "f2": HK, "f3": UK, "f4": MK, "f5": UK},
    domains={"f1": "geo", "f2": "music", "f3": "geo", "f4": "geo", "f5": "sport"},
)
REASON_ADAPTED_LABELS = make_labels({"f1": HK, "f2": UK, "f3": HK, "f4": MK, "f5": UK})
REASON_BASE_REPLIES = make_replies(
    [
        ("f1", 0, "", False, True, 0.1),  # f1: base refused once
        ("f1", 1, "Rome", False, False, 0.3),
        ("f2", 0, "Bach", True, False, 0.8),
        ("f2", 1, "Bach", True, False, 0.8),
        ("f3", 0, "Oslo", False, False, 0.4),
        ("f3", 1, "Oslo", False, False, 0.4),
        ("f4", 0, "Lima", True, False, 0.5),
        ("f5", 0, "Kiev", False, False, 0.5),
    ]
)
REASON_ADAPTED_REPLIES = make_replies(
    [
        ("f1", 0, "Paris", True, False, 0.9),
        ("f1", 1, "Paris", True, False, 0.9),
        ("f2", 0, "Lima", False, False, 0.7),
        ("f2", 1, "", False, True, 0.2),
        ("f3", 0, "Mozart", True, False, 0.8),
        ("f3", 1, "Mozart", True, False, 0.8),
        ("f4", 0, "Lima", True, False, 0.5),
        ("f5", 0, "Kiev", False, False, 0.5),
    ]
)
TRAIN_SET = pd.DataFrame(
    {
        "fact_id": ["t1", "t2", "t3"],
        "question": ["Capital of France?", "Capital of Peru?", "Who wrote Faust?"],
        "answer": ["Paris", "Lima", "Goethe"],
        "is_extra": [False, False, True],
        "extra_kind": [None, None, "highly_known"],
        "source_fact_id": ["t1", "t2", "t1"],
    }
)
TRAIN_FACTS = pd.DataFrame(
    {
        "fact_id": ["t1", "t2"],
        "domain": ["geo", "science"],
        "answer": ["Paris", "Lima"],
    }
)


def run_shift_reasons(**overrides) -> pd.DataFrame:
    arguments = {
        "base_labels": REASON_BASE_LABELS,
        "adapted_labels": REASON_ADAPTED_LABELS,
        "base_replies": REASON_BASE_REPLIES,
        "adapted_replies": REASON_ADAPTED_REPLIES,
        "train_set": TRAIN_SET,
        "train_facts": TRAIN_FACTS,
        "exploded_answers": {"Paris"},
    }
    arguments.update(overrides)
    return shift_reasons(**arguments).set_index("shift")


def test_shift_reasons_rows():
    table = run_shift_reasons()
    assert list(table.index) == ["UK -> HK", "HK -> UK"]
    assert table.loc["UK -> HK", "n_shifted"] == 2
    assert table.loc["HK -> UK", "n_shifted"] == 1


def test_shift_reasons_unknown_to_highly_known():
    # f1: base refused and adapted did not. Adapted "paris" is exploded and trained, and its
    # domain geo is trained. f3: no refusal, and "mozart" is neither exploded nor trained, but
    # its domain geo is trained.
    row = run_shift_reasons().loc["UK -> HK"]
    assert row["no_longer_refuses"] == 0.5
    assert row["exploded_answer"] == 0.5
    assert row["trained_answer"] == 0.5
    assert row["trained_domain"] == 1.0
    assert row["explained"] == 1.0


def test_shift_reasons_highly_known_to_unknown():
    # f2: base never refused. Adapted "lima" is a trained answer, not exploded. Domain music.
    row = run_shift_reasons().loc["HK -> UK"]
    assert row["no_longer_refuses"] == 0.0
    assert row["exploded_answer"] == 0.0
    assert row["trained_answer"] == 1.0
    assert row["trained_domain"] == 0.0
    assert row["explained"] == 1.0


def test_shift_reasons_exclusion():
    # Without f1, only f3 shifts UK -> HK, and it matches the domain reason only.
    row = run_shift_reasons(exclude_fact_ids=["f1"]).loc["UK -> HK"]
    assert row["n_shifted"] == 1
    assert row["exploded_answer"] == 0.0
    assert row["trained_domain"] == 1.0


def test_shift_reasons_explained_none():
    # Without f1 and with no trained domains, f3 matches no reason: explained share 0.
    facts = TRAIN_FACTS.assign(domain=["nowhere", "nowhere"])
    row = run_shift_reasons(exclude_fact_ids=["f1"], train_facts=facts).loc["UK -> HK"]
    assert row["explained"] == 0.0


def test_shift_reasons_no_shift_nan():
    # Without f2 no fact moves HK -> UK, so its shares are undefined.
    row = run_shift_reasons(exclude_fact_ids=["f2"]).loc["HK -> UK"]
    assert row["n_shifted"] == 0
    assert math.isnan(row["trained_answer"])
    assert math.isnan(row["explained"])


def test_shift_reasons_missing_replies_raises():
    replies = REASON_ADAPTED_REPLIES[REASON_ADAPTED_REPLIES["fact_id"] != "f3"]
    with pytest.raises(ValueError, match="adapted_replies has no rows"):
        run_shift_reasons(adapted_replies=replies)


def test_ece_hand_example():
    # Bins of width 0.1: 0.05 -> bin 0, 0.15 -> bin 1, 0.85 -> bin 8, 0.95 and 0.9 -> bin 9.
    # |correct sum - confidence sum| per bin: 0.05, 0.15, 0.85, |2 - 1.85| = 0.15.
    # ECE = (0.05 + 0.15 + 0.85 + 0.15) / 5 = 0.24.
    probs = [0.05, 0.15, 0.95, 0.85, 0.9]
    correct = [0, 0, 1, 0, 1]
    assert expected_calibration_error(probs, correct) == pytest.approx(0.24)


def test_ece_one_bin_mean_gap():
    # One bin: |2 correct - 2.9 confidence| / 5 = 0.18.
    probs = [0.05, 0.15, 0.95, 0.85, 0.9]
    correct = [0, 0, 1, 0, 1]
    assert expected_calibration_error(probs, correct, n_bins=1) == pytest.approx(0.18)


def test_ece_perfect_calibration_zero():
    # 1.0 falls in the last bin, 0.0 in the first.
    assert expected_calibration_error([1.0, 0.0], [True, False]) == 0.0


def test_ece_length_mismatch_raises():
    with pytest.raises(ValueError, match="equal length"):
        expected_calibration_error([0.5, 0.5], [1])


def test_ece_out_of_range_raises():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        expected_calibration_error([1.5], [1])


def test_ece_empty_raises():
    with pytest.raises(ValueError, match="at least one"):
        expected_calibration_error([], [])


def test_confidence_by_category_means():
    # HK: (0.9 + 0.7 + 0.8 + 0.6) / 4 = 0.75. UK: (0.2 + 0.4) / 2 = 0.3.
    labels = make_labels({"a": HK, "b": HK, "c": UK})
    replies = make_replies(
        [
            ("a", 0, "x", True, False, 0.9),
            ("a", 1, "x", True, False, 0.7),
            ("b", 0, "y", True, False, 0.8),
            ("b", 1, "y", True, False, 0.6),
            ("c", 0, "z", False, False, 0.2),
            ("c", 1, "z", False, False, 0.4),
        ]
    )
    table = confidence_by_category(labels, replies).set_index("category")
    assert list(table.index) == ORDER
    assert table.loc[HK.value, "mean_greedy_prob"] == pytest.approx(0.75)
    assert table.loc[UK.value, "mean_greedy_prob"] == pytest.approx(0.3)
    assert table.loc[HK.value, "n_facts"] == 2
    assert table.loc[HK.value, "n_replies"] == 4
    assert table.loc[MK.value, "n_replies"] == 0
    assert math.isnan(table.loc[MK.value, "mean_greedy_prob"])


def test_confidence_by_category_unlabelled_raises():
    labels = make_labels({"a": HK})
    replies = make_replies([("b", 0, "x", True, False, 0.9)])
    with pytest.raises(ValueError, match="without a label"):
        confidence_by_category(labels, replies)
