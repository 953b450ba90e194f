"""Tests for the published numbers file and the side-by-side tables."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from kp_utils import paper


@pytest.fixture(scope="module")
def published():
    return paper.load_paper_numbers()


def value(table: pd.DataFrame, source: str, n_unknown: int, n_extra: int, kind: str, metric: str):
    row = table[
        (table["source_table"] == source)
        & (table["n_unknown"] == n_unknown)
        & (table["n_extra_per_unknown"] == n_extra)
        & (table["extra_kind"] == kind)
        & (table["metric"] == metric)
    ]
    assert len(row) == 1, (source, n_unknown, n_extra, kind, metric)
    return float(row["value"].iloc[0])


def test_paper_numbers_every_table(published):
    tables = set(published["source_table"])
    assert tables == {f"Table {i}" for i in range(1, 9)}


def test_paper_numbers_spot_values(published):
    # Values typed from arXiv 2502.14502v3, checked against the printed tables.
    assert value(published, "Table 1", 0, 0, "none", "count_Unknown") == 14373
    assert value(published, "Table 2", 3000, 10, "highly_known", "reliability") == 0.48
    assert value(published, "Table 3", 1, 10, "highly_known", "negative_share") == 0.118
    assert value(published, "Table 4", 10, 0, "none", "collapse_adapted_n_distinct") == 22804
    assert value(published, "Table 5", 500, 10, "highly_known", "hk_to_uk_n_shifted") == 1134
    assert value(published, "Table 7", 0, 0, "none", "truthfulqa_mc1") == 0.382
    assert value(published, "Table 7", 3000, 10, "paraphrase", "mmlu") == 0.441
    assert value(published, "Table 8", 10, 10, "highly_known", "arc_easy") == 0.7517


def test_paper_numbers_shares_in_range(published):
    shares = published[published["metric"].str.endswith("_share")]
    assert shares["value"].between(0, 1).all()


def test_paper_numbers_duplicate_raises(tmp_path, published):
    path = tmp_path / "numbers.csv"
    pd.concat([published, published.head(1)]).to_csv(path, index=False)
    with pytest.raises(ValueError, match="repeats 1"):
        paper.load_paper_numbers(path)


def test_paper_source_names_arxiv():
    source = paper.load_paper_source()
    assert source["url"] == "https://arxiv.org/abs/2502.14502v3"
    assert source["file"] == paper.PAPER_NUMBERS_PATH.name


def tiny_run() -> dict:
    """A run with the base model and two cells: 1 UK alone and 1 UK + 1 HK, one seed each."""
    results = pd.DataFrame(
        {
            "cell_key": ["a", "b"],
            "label": ["UK1 s0", "UK1+HK1 s0"],
            "n_unknown": [1, 1],
            "n_extra_per_unknown": [0, 1],
            "extra_kind": ["none", "highly_known"],
            "seed": [0, 0],
            "reliability": [1.0, 0.5],
            "positive_share": [0.1, 0.2],
            "negative_share": [0.05, 0.0],
            "refusals_base": [4, 4],
            "refusals_adapted": [2, 0],
            "collapse_base_n_distinct": [10, 10],
            "collapse_adapted_n_distinct": [5, 10],
            "collapse_base_mean_count": [2.0, 2.0],
            "collapse_adapted_mean_count": [4.0, 2.0],
            "collapse_base_std_count": [1.0, 1.0],
            "collapse_adapted_std_count": [3.0, 1.0],
            "truthfulqa_mc1": [0.30, 0.40],
        }
    )
    return {
        "results": results,
        "base_labels": pd.DataFrame({"category": ["Unknown"] * 3 + ["HighlyKnown"]}),
        "base_benchmarks": pd.DataFrame({"name": ["truthfulqa_mc1"], "score": [0.35]}),
        "reasons": pd.DataFrame(
            {
                "label": ["UK1 s0", "UK1 s0"],
                "shift": ["UK -> HK", "HK -> UK"],
                "n_shifted": [2, 0],
                "trained_domain": [0.5, float("nan")],
                "explained": [1.0, float("nan")],
            }
        ),
    }


def test_side_by_side_pairs_columns():
    tables = paper.compare_with_paper(tiny_run())
    table = tables["table3_shifts_vs_paper"].set_index(paper.CELL_KEYS)
    assert list(table.columns) == [
        "positive_share_paper",
        "positive_share_run",
        "negative_share_paper",
        "negative_share_run",
    ]
    assert table.loc[(1, 1, "highly_known"), "positive_share_paper"] == 0.036
    assert table.loc[(1, 1, "highly_known"), "positive_share_run"] == 0.2


def test_side_by_side_keeps_unmatched_cells():
    # The paper trains 10 UK, this run does not: the row stays with NaN on the run side.
    table = paper.compare_with_paper(tiny_run())["table2_reliability_vs_paper"]
    row = table[(table["n_unknown"] == 10) & (table["n_extra_per_unknown"] == 0)]
    assert row["reliability_paper"].iloc[0] == 1.0
    assert math.isnan(row["reliability_run"].iloc[0])


def test_side_by_side_category_shares():
    table = paper.compare_with_paper(tiny_run())["table1_categories_vs_paper"]
    base = table[table["n_unknown"] == 0].iloc[0]
    assert base["share_Unknown_run"] == 0.75  # 3 of 4 questions
    assert base["share_Unknown_paper"] == pytest.approx(14373 / (14373 + 3931 + 2732))


def test_side_by_side_benchmark_change():
    table = paper.compare_with_paper(tiny_run())["table7_benchmarks_vs_paper"]
    cell = table[(table["n_unknown"] == 1) & (table["n_extra_per_unknown"] == 1)]
    cell = cell[cell["extra_kind"] == "highly_known"].iloc[0]
    assert cell["truthfulqa_mc1_change_run"] == pytest.approx(0.05)  # 0.40 - 0.35
    assert cell["truthfulqa_mc1_change_paper"] == pytest.approx(-0.021)  # 0.361 - 0.382


def test_side_by_side_ratios():
    table = paper.compare_with_paper(tiny_run())["table4_refusals_diversity_vs_paper"]
    plain = table[(table["n_unknown"] == 1) & (table["n_extra_per_unknown"] == 0)].iloc[0]
    assert plain["refusals_ratio_run"] == 0.5  # 2 of the base model's 4
    assert plain["distinct_ratio_run"] == 0.5  # 5 of 10 distinct answers
    assert plain["refusals_ratio_paper"] == pytest.approx(758 / 3189)


def test_side_by_side_reasons_spread():
    table = paper.compare_with_paper(tiny_run())["table5_shift_reasons_vs_paper"]
    plain = table[(table["n_unknown"] == 1) & (table["n_extra_per_unknown"] == 0)].iloc[0]
    assert plain["uk_to_hk_n_shifted_run"] == 2
    assert plain["uk_to_hk_trained_domain_run"] == 0.5
    assert plain["uk_to_hk_explained_paper"] == 0.75
