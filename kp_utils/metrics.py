"""Intrinsic metrics of an adapted model against its base model, after Pletenev et al. (2025).

Inputs are the DataFrames written by labelling:
- replies: one row per (fact_id, prompt_index) with `reply`, `extracted_answer`, `is_correct`,
  `is_refusal` and `greedy_prob` (probability of the greedy reply, in [0, 1]).
- labels: one row per fact with `fact_id`, `relation`, `domain`, `n_correct`, `n_prompts`,
  `category` (a KnowledgeCategory value), `n_refusals` and `mean_greedy_prob`.
- train_set: one row per training example with `fact_id`, `question`, `answer`, `is_extra`,
  `extra_kind` and `source_fact_id`.

A shift is positive when a fact moves to a better-known category (a higher
`KnowledgeCategory.rank`, so UK -> WK, MK or HK, WK -> MK or HK, MK -> HK) and negative when it
moves to a lower rank.

METRICS_VERSION changes whenever a definition here changes the numbers it returns (shift
direction, answer normalisation, which rows count as answers, calibration bins). Bump it, add a
line below saying why, and write it into every results file next to CATEGORY_RULE_VERSION.
Version 1: first definitions.
Version 2: shift_reasons adds `explained`, the share of shifted facts with any reason.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
import pandas as pd

from kp_utils.categories import SHORT_LABELS, KnowledgeCategory
from kp_utils.matching import normalize_text

logger = logging.getLogger(__name__)

METRICS_VERSION = 2

# Table order: best known first (HK, MK, WK, UK).
CATEGORY_ORDER = sorted(KnowledgeCategory, key=lambda category: category.rank, reverse=True)
_ORDER_VALUES = [category.value for category in CATEGORY_ORDER]

# Shifts analysed by `shift_reasons` (Pletenev et al., 2025, Table 5), as (base, adapted).
REASON_SHIFTS = (
    (KnowledgeCategory.UNKNOWN, KnowledgeCategory.HIGHLY_KNOWN),
    (KnowledgeCategory.HIGHLY_KNOWN, KnowledgeCategory.UNKNOWN),
)
REASON_COLUMNS = ("no_longer_refuses", "exploded_answer", "trained_answer", "trained_domain")


def _require_columns(frame: pd.DataFrame, columns: Iterable[str], frame_name: str) -> None:
    missing = [column for column in columns if column not in frame.columns]
    if missing:
        raise ValueError(f"{frame_name} is missing columns {missing}. It has {list(frame.columns)}")


def _require_unique_ids(labels: pd.DataFrame, frame_name: str) -> None:
    duplicated = labels["fact_id"][labels["fact_id"].duplicated()].unique().tolist()
    if duplicated:
        raise ValueError(f"{frame_name} has duplicate fact_id values, e.g. {duplicated[:5]}")


def _to_categories(values: pd.Series) -> list[KnowledgeCategory]:
    # A list, not a Series, because pandas 3 stores str-based enum members as plain str.
    # KnowledgeCategory(...) raises ValueError on a value that is not a category.
    return [KnowledgeCategory(value) for value in values]


def join_labels(base_labels: pd.DataFrame, adapted_labels: pd.DataFrame) -> pd.DataFrame:
    """Join base and adapted labels on fact_id, one row per fact.

    Returns columns fact_id, base_category, adapted_category (KnowledgeCategory values as str),
    base_rank and adapted_rank, plus `domain` from the base labels when present. Raises
    ValueError when the two frames do not hold the same set of fact ids or repeat an id.
    """
    for frame, frame_name in ((base_labels, "base_labels"), (adapted_labels, "adapted_labels")):
        _require_columns(frame, ["fact_id", "category"], frame_name)
        _require_unique_ids(frame, frame_name)

    base_ids, adapted_ids = set(base_labels["fact_id"]), set(adapted_labels["fact_id"])
    if base_ids != adapted_ids:
        only_base, only_adapted = sorted(base_ids - adapted_ids), sorted(adapted_ids - base_ids)
        raise ValueError(
            f"base and adapted labels must cover the same facts: {len(only_base)} ids only in "
            f"base (e.g. {only_base[:5]}), {len(only_adapted)} only in adapted "
            f"(e.g. {only_adapted[:5]}). Label both models on the same fact set"
        )

    base_columns = ["fact_id", "category"] + (["domain"] if "domain" in base_labels else [])
    joined = base_labels[base_columns].merge(
        adapted_labels[["fact_id", "category"]], on="fact_id", suffixes=("_base", "_adapted")
    )
    joined = joined.rename(
        columns={"category_base": "base_category", "category_adapted": "adapted_category"}
    )
    for side in ("base", "adapted"):
        categories = _to_categories(joined[f"{side}_category"])
        joined[f"{side}_category"] = [category.value for category in categories]
        joined[f"{side}_rank"] = np.array([category.rank for category in categories], dtype=int)
    return joined


def reliability(replies: pd.DataFrame, fact_ids: Iterable[str]) -> float:
    """Compute the share of correct replies over every (fact, prompt) row of the given facts.

    `fact_ids` are usually the trained facts. Ids absent from `replies` are skipped with a
    WARNING. Raises ValueError when none of them is present.
    """
    _require_columns(replies, ["fact_id", "is_correct"], "replies")
    requested_ids = set(fact_ids)
    rows = replies[replies["fact_id"].isin(requested_ids)]
    if rows.empty:
        raise ValueError(f"none of the {len(requested_ids)} fact ids occurs in replies")

    n_missing = len(requested_ids - set(rows["fact_id"]))
    if n_missing:
        logger.warning(
            "reliability skips %d of %d fact ids without replies", n_missing, len(requested_ids)
        )
    return float(rows["is_correct"].astype(bool).mean())


def transition_matrix(base_labels: pd.DataFrame, adapted_labels: pd.DataFrame) -> pd.DataFrame:
    """Count facts per (base category, adapted category) pair.

    Rows are base categories and columns adapted categories, both in the order HighlyKnown,
    MaybeKnown, WeaklyKnown, Unknown, and every category is present even with zero facts.
    Raises ValueError when the two frames hold different fact ids.
    """
    joined = join_labels(base_labels, adapted_labels)
    counts = pd.crosstab(
        pd.Categorical(joined["base_category"], categories=_ORDER_VALUES),
        pd.Categorical(joined["adapted_category"], categories=_ORDER_VALUES),
        dropna=False,
    )
    counts = counts.reindex(index=_ORDER_VALUES, columns=_ORDER_VALUES, fill_value=0).astype(int)
    counts.index = pd.Index(_ORDER_VALUES, name="base_category")
    counts.columns = pd.Index(_ORDER_VALUES, name="adapted_category")
    return counts


def _shares_by_base_category(joined: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for category in _ORDER_VALUES:
        group = joined[joined["base_category"] == category]
        n_positive = int((group["adapted_rank"] > group["base_rank"]).sum())
        n_negative = int((group["adapted_rank"] < group["base_rank"]).sum())
        n = len(group)
        rows.append(
            {
                "base_category": category,
                "n": n,
                "n_positive": n_positive,
                "n_negative": n_negative,
                # NaN where a category has no facts, because a share of nothing is undefined.
                "positive_share": n_positive / n if n else float("nan"),
                "negative_share": n_negative / n if n else float("nan"),
            }
        )
    return pd.DataFrame(rows)


def knowledge_shifts(
    base_labels: pd.DataFrame,
    adapted_labels: pd.DataFrame,
    exclude_fact_ids: Iterable[str] = (),
) -> dict:
    """Count facts whose category moved up (positive) or down (negative) after adaptation.

    Args:
        base_labels, adapted_labels: labels of the same facts under both models.
        exclude_fact_ids: facts left out of every count, usually the trained facts.

    Returns a dict with `n_questions` (facts counted after exclusion, the denominator),
    `n_positive`, `n_negative`, `positive_share`, `negative_share` and
    `shares_by_base_category` (DataFrame: base_category, n, n_positive, n_negative,
    positive_share, negative_share, the shares taken within that base category). Raises
    ValueError when the id sets differ or no fact is left after exclusion.
    """
    joined = join_labels(base_labels, adapted_labels)
    excluded = set(exclude_fact_ids)
    counted = joined[~joined["fact_id"].isin(excluded)]
    logger.info(
        "knowledge_shifts counts %d facts, %d excluded", len(counted), len(joined) - len(counted)
    )
    if counted.empty:
        raise ValueError(
            f"no facts left for knowledge_shifts: all {len(joined)} labelled facts are in "
            "exclude_fact_ids, so pass fewer ids"
        )

    n_questions = len(counted)
    n_positive = int((counted["adapted_rank"] > counted["base_rank"]).sum())
    n_negative = int((counted["adapted_rank"] < counted["base_rank"]).sum())
    return {
        "n_questions": n_questions,
        "n_positive": n_positive,
        "n_negative": n_negative,
        "positive_share": n_positive / n_questions,
        "negative_share": n_negative / n_questions,
        "shares_by_base_category": _shares_by_base_category(counted),
    }


def count_refusals(replies: pd.DataFrame) -> int:
    """Count the replies flagged as refusals."""
    _require_columns(replies, ["is_refusal"], "replies")
    return int(replies["is_refusal"].astype(bool).sum())


def _normalised_answers(replies: pd.DataFrame) -> pd.Series:
    """Return the normalised extracted answers of the non-refusal rows with a non-empty answer."""
    _require_columns(replies, ["extracted_answer", "is_refusal"], "replies")
    answered = replies[~replies["is_refusal"].astype(bool)]
    answers = answered["extracted_answer"].fillna("").astype(str).map(normalize_text)
    return answers[answers != ""]


def _count_summary(counts: pd.Series, prefix: str) -> dict:
    # Population std (ddof=0), because the distinct answers are all there are, not a sample.
    values = counts.to_numpy(dtype=float)
    return {
        f"{prefix}_n_answers": int(values.sum()),
        f"{prefix}_n_distinct": int(len(values)),
        f"{prefix}_mean_count": float(values.mean()) if len(values) else float("nan"),
        f"{prefix}_std_count": float(values.std(ddof=0)) if len(values) else float("nan"),
    }


def answer_collapse(
    base_replies: pd.DataFrame,
    adapted_replies: pd.DataFrame,
    explode_ratio: float,
    min_count: int,
) -> tuple[dict, pd.DataFrame]:
    """Measure how much the adapted model's answers concentrate on a few strings.

    Answers are the extracted answers after `normalize_text`. Refusals and answers that are
    empty after normalisation are not answers and are skipped. An answer "explodes" when its
    adapted count is at least `min_count` and at least `explode_ratio` times its base count,
    a base count of 0 counting as 1.

    Returns a summary dict and a DataFrame of the exploded answers. The dict has, for prefix
    `base` and `adapted`: `<prefix>_n_answers`, `<prefix>_n_distinct` (distinct answers),
    `<prefix>_mean_count` and `<prefix>_std_count` (mean and population std of how often each
    distinct answer occurs), plus `n_exploded`. The DataFrame has columns answer, base_count,
    adapted_count and ratio (adapted_count / max(base_count, 1)), sorted by adapted_count,
    largest first.
    """
    if explode_ratio <= 0:
        raise ValueError(f"explode_ratio must be positive, got {explode_ratio}")
    if min_count < 1:
        raise ValueError(f"min_count must be at least 1, got {min_count}")

    base_counts = _normalised_answers(base_replies).value_counts()
    adapted_counts = _normalised_answers(adapted_replies).value_counts()
    table = pd.DataFrame(
        {
            "answer": adapted_counts.index.astype(str),
            "base_count": base_counts.reindex(adapted_counts.index, fill_value=0).to_numpy(
                dtype=int
            ),
            "adapted_count": adapted_counts.to_numpy(dtype=int),
        }
    )
    table["ratio"] = table["adapted_count"] / table["base_count"].clip(lower=1)

    is_exploded = (table["adapted_count"] >= min_count) & (table["ratio"] >= explode_ratio)
    exploded = table[is_exploded].sort_values(
        ["adapted_count", "answer"], ascending=[False, True], ignore_index=True
    )
    summary = {
        **_count_summary(base_counts, "base"),
        **_count_summary(adapted_counts, "adapted"),
        "n_exploded": len(exploded),
    }
    logger.info("answer_collapse found %d exploded answers", len(exploded))
    return summary, exploded


def _facts_with_refusal(replies: pd.DataFrame) -> set:
    _require_columns(replies, ["fact_id", "is_refusal"], "replies")
    return set(replies.loc[replies["is_refusal"].astype(bool), "fact_id"])


def _answer_sets(replies: pd.DataFrame) -> dict:
    """Map each fact_id to the set of its normalised non-empty, non-refusal answers."""
    _require_columns(replies, ["fact_id"], "replies")
    answers = _normalised_answers(replies)
    fact_ids = replies.loc[answers.index, "fact_id"]
    return answers.groupby(fact_ids).agg(set).to_dict()


def _reason_row(
    shifted: pd.DataFrame,
    base: KnowledgeCategory,
    adapted: KnowledgeCategory,
    flags: pd.DataFrame,
) -> dict:
    row = {
        "shift": f"{SHORT_LABELS[base]} -> {SHORT_LABELS[adapted]}",
        "base_category": base.value,
        "adapted_category": adapted.value,
        "n_shifted": len(shifted),
    }
    for reason in REASON_COLUMNS:
        # NaN when no fact made this shift, because a share of nothing is undefined.
        row[reason] = float(flags[reason].mean()) if len(shifted) else float("nan")
    # The paper's "shift explained": facts with at least one reason, so overlaps count once.
    any_reason = flags[list(REASON_COLUMNS)].any(axis=1)
    row["explained"] = float(any_reason.mean()) if len(shifted) else float("nan")
    return row


def _reason_flags(
    facts: pd.DataFrame,
    base_replies: pd.DataFrame,
    adapted_replies: pd.DataFrame,
    trained_answers: set[str],
    trained_domains: set,
    exploded_answers: set[str],
) -> pd.DataFrame:
    """Return one boolean column per reason for every row of `facts` (fact_id, domain)."""
    base_refused = _facts_with_refusal(base_replies)
    adapted_refused = _facts_with_refusal(adapted_replies)
    answers = (
        facts["fact_id"]
        .map(_answer_sets(adapted_replies))
        .map(lambda found: found if isinstance(found, set) else set())
    )
    return pd.DataFrame(
        {
            "no_longer_refuses": facts["fact_id"].isin(base_refused)
            & ~facts["fact_id"].isin(adapted_refused),
            "exploded_answer": answers.map(lambda found: bool(found & exploded_answers)),
            "trained_answer": answers.map(lambda found: bool(found & trained_answers)),
            "trained_domain": facts["domain"].isin(trained_domains),
        },
        index=facts.index,
    )


def _require_replies_for(fact_ids: set, replies: pd.DataFrame, frame_name: str) -> None:
    missing = sorted(fact_ids - set(replies["fact_id"]))
    if missing:
        raise ValueError(
            f"{frame_name} has no rows for {len(missing)} shifted facts, e.g. {missing[:5]}"
        )


def shift_reasons(
    base_labels: pd.DataFrame,
    adapted_labels: pd.DataFrame,
    base_replies: pd.DataFrame,
    adapted_replies: pd.DataFrame,
    train_set: pd.DataFrame,
    train_facts: pd.DataFrame,
    exploded_answers: set[str],
    exclude_fact_ids: Iterable[str] = (),
) -> pd.DataFrame:
    """Tabulate likely causes of Unknown -> HighlyKnown and HighlyKnown -> Unknown shifts.

    After Pletenev et al. (2025), Table 5. For each shifted fact four reasons are checked:
    - no_longer_refuses: the base model refused under at least one prompt and the adapted
      model under none.
    - exploded_answer: an adapted answer under some prompt is in `exploded_answers` (see
      `answer_collapse`).
    - trained_answer: an adapted answer under some prompt equals the answer of a training
      example (`train_set.answer`) or of a trained fact (`train_facts.answer`).
    - trained_domain: the fact's domain (from `base_labels`) is the domain of a trained fact.
    Answers are compared after `normalize_text`, and refusals or empty answers never match.
    The reasons may overlap, so one fact can count under several and the shares of a row need
    not sum to 1. `explained` is the share of facts with at least one reason.
    `exclude_fact_ids` (e.g. the trained facts) are left out before counting.

    Returns one row per shift with columns shift (short label such as "UK -> HK"),
    base_category, adapted_category, n_shifted and one share column per reason (NaN when
    n_shifted is 0).
    """
    _require_columns(base_labels, ["domain"], "base_labels")
    _require_columns(train_set, ["answer"], "train_set")
    _require_columns(train_facts, ["fact_id", "domain", "answer"], "train_facts")
    joined = join_labels(base_labels, adapted_labels)
    joined = joined[~joined["fact_id"].isin(set(exclude_fact_ids))]

    answer_texts = pd.concat([train_set["answer"], train_facts["answer"]]).dropna().astype(str)
    trained_answers = {normalize_text(answer) for answer in answer_texts} - {""}
    exploded = {normalize_text(answer) for answer in exploded_answers}
    trained_domains = set(train_facts["domain"].dropna())

    # NOTE: a reason counts when it applies under any prompt of the fact. This aggregation over
    # prompts is our choice, because we found none stated for Table 5 of Pletenev et al. (2025).
    rows = []
    for base, adapted in REASON_SHIFTS:
        is_shift = (joined["base_category"] == base.value) & (
            joined["adapted_category"] == adapted.value
        )
        shifted = joined[is_shift]
        shifted_ids = set(shifted["fact_id"])
        _require_replies_for(shifted_ids, base_replies, "base_replies")
        _require_replies_for(shifted_ids, adapted_replies, "adapted_replies")
        flags = _reason_flags(
            shifted, base_replies, adapted_replies, trained_answers, trained_domains, exploded
        )
        rows.append(_reason_row(shifted, base, adapted, flags))
    return pd.DataFrame(rows)


def expected_calibration_error(probs, correct, n_bins: int = 10) -> float:
    """Compute the expected calibration error of confidences against 0/1 outcomes.

    Confidences fall into `n_bins` equal-width bins [k/n_bins, (k+1)/n_bins), the last bin also
    holding 1.0. ECE = sum over bins of (bin size / total) * |accuracy - mean confidence|, which
    equals sum |sum(correct) - sum(probs)| per bin, divided by the total. Raises ValueError on
    empty or unequal inputs, confidences outside [0, 1], or n_bins < 1.
    """
    probs = np.asarray(probs, dtype=float)
    correct = np.asarray(correct, dtype=float)
    if n_bins < 1:
        raise ValueError(f"n_bins must be at least 1, got {n_bins}")
    if probs.shape != correct.shape or probs.ndim != 1:
        raise ValueError(
            "probs and correct must be 1-D of equal length, "
            f"got shapes {probs.shape} and {correct.shape}"
        )
    if probs.size == 0:
        raise ValueError("expected_calibration_error needs at least one prediction")
    if np.isnan(probs).any() or (probs < 0).any() or (probs > 1).any():
        raise ValueError("probs must lie in [0, 1] and contain no NaN")

    bins = np.minimum(np.floor(probs * n_bins).astype(int), n_bins - 1)
    confidence_sums = np.bincount(bins, weights=probs, minlength=n_bins)
    correct_sums = np.bincount(bins, weights=correct, minlength=n_bins)
    return float(np.abs(correct_sums - confidence_sums).sum() / probs.size)


def confidence_by_category(labels: pd.DataFrame, replies: pd.DataFrame) -> pd.DataFrame:
    """Average the greedy-reply probability over all replies of each category's facts.

    Returns one row per category in the order HighlyKnown, MaybeKnown, WeaklyKnown, Unknown with
    columns category, n_facts, n_replies and mean_greedy_prob (NaN for a category without
    replies). Raises ValueError when a reply's fact_id has no label.
    """
    _require_columns(labels, ["fact_id", "category"], "labels")
    _require_columns(replies, ["fact_id", "greedy_prob"], "replies")
    _require_unique_ids(labels, "labels")
    categories = pd.Series(
        [category.value for category in _to_categories(labels["category"])],
        index=labels["fact_id"].to_numpy(),
    )
    reply_categories = replies["fact_id"].map(categories)
    if reply_categories.isna().any():
        unlabelled = sorted(set(replies.loc[reply_categories.isna(), "fact_id"]))
        raise ValueError(
            f"replies hold {len(unlabelled)} fact ids without a label, e.g. {unlabelled[:5]}"
        )

    grouped = replies.assign(category=reply_categories).groupby("category")
    table = pd.DataFrame(
        {
            "n_facts": grouped["fact_id"].nunique(),
            "n_replies": grouped.size(),
            "mean_greedy_prob": grouped["greedy_prob"].mean(),
        }
    ).reindex(_ORDER_VALUES)
    table[["n_facts", "n_replies"]] = table[["n_facts", "n_replies"]].fillna(0).astype(int)
    return table.rename_axis("category").reset_index()
