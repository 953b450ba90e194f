"""Tests for kp_utils.capacity on hand-made results tables."""

from __future__ import annotations

import itertools
import math

import matplotlib
import numpy as np
import pandas as pd
import pytest

from kp_utils.capacity import (
    ThresholdStatus,
    capacity_thresholds,
    count_adapter_sizes,
    find_threshold,
    fit_threshold_scaling,
    harm_onsets,
    harm_table,
    make_capacity_outputs,
    plot_harm_by_facts,
    plot_harm_frontier,
    plot_reliability_heatmap,
    plot_threshold_curve,
    reliability_curve,
)
from kp_utils.config import load_config

matplotlib.use("Agg")

FACT_COUNTS = [4, 16, 48]
# Adapter label -> (trainable parameters, mean reliability at 4, 16 and 48 facts).
ADAPTERS = {
    "r1-a2-down_proj": (100, [1.0, 0.5, 0.2]),
    "r4-a8-down_proj": (400, [1.0, 0.97, 0.6]),
    "r16-a32-down_proj": (1600, [1.0, 1.0, 0.96]),
}
BASE = pd.DataFrame(
    {
        "name": ["arc_easy", "truthfulqa_mc2"],
        "score": [0.6, 0.4],
        "ci_low": [0.5, 0.3],
        "ci_high": [0.7, 0.5],
        "n_questions": [40, 40],
    }
)


def make_results(adapters=ADAPTERS) -> pd.DataFrame:
    """Build one row per (adapter, fact count, seed); below 1, seed 1 scores 0.02 above seed 0.

    The mean over the two seeds is the reliability listed in `adapters`. ARC-Easy drops 0.01
    per fact, so its 95% interval (score +- 0.05) leaves the base score 0.6 behind at 16 facts.
    """
    rows = []
    for adapter, (n_params, levels) in adapters.items():
        rows.extend(_adapter_rows(adapter, n_params, levels))
    return pd.DataFrame(rows)


def _adapter_rows(adapter: str, n_params: int, levels: list[float]) -> list[dict]:
    rows = []
    for (n, level), seed in itertools.product(zip(FACT_COUNTS, levels), [0, 1]):
        arc = 0.6 - 0.01 * n
        rows.append(
            {
                "adapter": adapter,
                "n_trainable_parameters": n_params,
                "lora_rank": int(adapter.split("-")[0][1:]),
                "n_unknown": n,
                "n_extra_per_unknown": 0,
                "extra_kind": "none",
                "seed": seed,
                "reliability": level if level == 1 else level - 0.01 + 0.02 * seed,
                "negative_share": 0.001 * n + 0.01 * seed,
                "positive_share": 0.01,
                "n_questions": 150 - n,
                "arc_easy": arc,
                "arc_easy_ci_low": arc - 0.05,
                "arc_easy_ci_high": arc + 0.05,
                "arc_easy_n": 40,
                "truthfulqa_mc2": 0.4,
                "truthfulqa_mc2_ci_low": 0.3,
                "truthfulqa_mc2_ci_high": 0.5,
                "truthfulqa_mc2_n": 40,
            }
        )
    return rows


def make_thresholds(points, status=ThresholdStatus.INSIDE) -> pd.DataFrame:
    """Build a thresholds table from (trainable parameters, threshold) pairs."""
    return pd.DataFrame(
        {
            "adapter": [f"a{i}" for i in range(len(points))],
            "n_trainable_parameters": [p for p, _ in points],
            "n_extra_per_unknown": 0,
            "extra_kind": "none",
            "threshold_n_unknown": [float(t) for _, t in points],
            "status": status.value,
        }
    )


def _threshold_of(table: pd.DataFrame, adapter: str) -> pd.Series:
    return table.set_index("adapter").loc[adapter]


# --- Threshold rule --------------------------------------------------------------------------


def test_threshold_monotone_inside():
    row = find_threshold([4, 16, 48], [1.0, 0.96, 0.5], 0.95)
    assert row["threshold_n_unknown"] == 16
    assert row["status"] == ThresholdStatus.INSIDE.value
    assert row["first_failed_n_unknown"] == 48
    assert row["is_monotone"]


def test_threshold_non_monotone_keeps_prefix():
    # 48 reaches the share again after 16 missed; the rule stops at the first miss.
    row = find_threshold([4, 16, 48], [1.0, 0.9, 0.97], 0.95)
    assert row["threshold_n_unknown"] == 4
    assert row["first_failed_n_unknown"] == 16
    assert row["reached_above_failure"] == "48"
    assert not row["is_monotone"]


def test_threshold_none_reached():
    row = find_threshold([4, 16, 48], [0.5, 0.2, 0.1], 0.95)
    assert math.isnan(row["threshold_n_unknown"])
    assert row["status"] == ThresholdStatus.BELOW.value
    assert row["first_failed_n_unknown"] == 4


def test_threshold_all_reached_lower_bound():
    row = find_threshold([4, 16, 48], [1.0, 0.99, 0.95], 0.95)
    assert row["threshold_n_unknown"] == 48
    assert row["status"] == ThresholdStatus.AT_LEAST.value
    assert math.isnan(row["first_failed_n_unknown"])


def test_threshold_input_order_irrelevant():
    row = find_threshold([48, 4, 16], [0.5, 1.0, 0.96], 0.95)
    assert row["threshold_n_unknown"] == 16


def test_threshold_float_rounding_reaches():
    # 0.95 computed from counts can come out one ulp below 0.95.
    row = find_threshold([4, 16], [1.0, 0.95 - 1e-12], 0.95)
    assert row["threshold_n_unknown"] == 16


def test_threshold_nan_counts_as_miss():
    row = find_threshold([4, 16], [float("nan"), 1.0], 0.95)
    assert row["status"] == ThresholdStatus.BELOW.value
    assert row["reached_above_failure"] == "16"


def test_threshold_repeated_count_raises():
    with pytest.raises(ValueError, match=r"each tested count once, got \[4, 4\]"):
        find_threshold([4, 4], [1.0, 1.0], 0.95)


# --- Tables ----------------------------------------------------------------------------------


def test_count_adapter_sizes():
    assert count_adapter_sizes(make_results()) == 3
    assert count_adapter_sizes(make_results().drop(columns="adapter")) == 1


def test_curve_mean_min_max_over_seeds():
    curve = reliability_curve(make_results())
    row = curve[(curve["adapter"] == "r4-a8-down_proj") & (curve["n_unknown"] == 16)].iloc[0]
    assert row["reliability_mean"] == pytest.approx(0.97)
    assert row["reliability_min"] == pytest.approx(0.96)
    assert row["reliability_max"] == pytest.approx(0.98)
    assert row["n_seeds"] == 2


def test_curve_facts_per_parameter():
    curve = reliability_curve(make_results())
    row = curve[(curve["adapter"] == "r1-a2-down_proj") & (curve["n_unknown"] == 16)].iloc[0]
    # Mean reliability 0.5 x 16 facts = 8 facts learned, over 100 parameters.
    assert row["facts_learned"] == pytest.approx(8.0)
    assert row["facts_per_parameter"] == pytest.approx(0.08)


def test_curve_sorted_by_size():
    curve = reliability_curve(make_results())
    assert curve["n_trainable_parameters"].is_monotonic_increasing
    assert "lora_rank" in curve.columns


def test_curve_missing_column_raises():
    with pytest.raises(ValueError, match=r"missing columns \['n_trainable_parameters'\]"):
        reliability_curve(make_results().drop(columns="n_trainable_parameters"))


def test_curve_missing_count_raises():
    results = make_results().astype({"n_trainable_parameters": float})
    results.loc[0, "n_trainable_parameters"] = np.nan
    with pytest.raises(ValueError, match=r"no n_trainable_parameters for adapters \['r1-a2"):
        reliability_curve(results)


def test_curve_mixed_counts_raises():
    results = make_results()
    results.loc[0, "n_trainable_parameters"] = 101
    with pytest.raises(ValueError, match="several trainable-parameter counts"):
        reliability_curve(results)


def test_thresholds_per_adapter():
    table = capacity_thresholds(reliability_curve(make_results()), 0.95)
    assert table["threshold_n_unknown"].tolist() == [4.0, 16.0, 48.0]
    assert table["status"].tolist() == [
        ThresholdStatus.INSIDE.value,
        ThresholdStatus.INSIDE.value,
        ThresholdStatus.AT_LEAST.value,
    ]


def test_thresholds_facts_per_parameter():
    table = capacity_thresholds(reliability_curve(make_results()), 0.95)
    row = _threshold_of(table, "r4-a8-down_proj")
    # 0.97 x 16 facts = 15.52 facts learned at the threshold, over 400 parameters.
    assert row["facts_learned_at_threshold"] == pytest.approx(15.52)
    assert row["facts_per_parameter_at_threshold"] == pytest.approx(15.52 / 400)
    assert row["max_facts_learned"] == pytest.approx(0.6 * 48)
    assert row["n_unknown_at_max_facts_learned"] == 48


def test_thresholds_mean_over_seeds_decides():
    # Seeds at 0.94 and 0.96 average 0.95, which reaches the share.
    adapters = {"r2-a4-down_proj": (10, [0.95, 0.2, 0.1]), "r8-a16-down_proj": (20, [1, 1, 1])}
    table = capacity_thresholds(reliability_curve(make_results(adapters)), 0.95)
    assert _threshold_of(table, "r2-a4-down_proj")["threshold_n_unknown"] == 4


def test_thresholds_state_budget():
    budget = {"n_epochs": 20, "learning_rate": 0.01}
    table = capacity_thresholds(reliability_curve(make_results()), 0.9, budget)
    assert table["n_epochs"].tolist() == [20, 20, 20]
    assert table["learning_rate"].tolist() == [0.01, 0.01, 0.01]
    assert table["min_reliability"].tolist() == [0.9, 0.9, 0.9]


def test_thresholds_bad_share_raises():
    with pytest.raises(ValueError, match=r"min_reliability must lie in \(0, 1\], got 0"):
        capacity_thresholds(reliability_curve(make_results()), 0)


def test_fit_known_slope():
    # threshold = 3 x params^0.5, so log10 threshold = 0.5 log10 params + log10 3.
    points = [(p, 3 * p**0.5) for p in (100, 400, 1600, 6400)]
    fit = fit_threshold_scaling(make_thresholds(points)).iloc[0]
    assert fit["slope"] == pytest.approx(0.5)
    assert fit["intercept"] == pytest.approx(math.log10(3))
    assert fit["n_points"] == 4
    assert fit["reason_skipped"] == ""


def test_fit_leaves_out_bounds():
    inside = make_thresholds([(100, 10), (400, 20)])
    bound = make_thresholds([(1600, 5000)], ThresholdStatus.AT_LEAST)
    fit = fit_threshold_scaling(pd.concat([inside, bound])).iloc[0]
    # Only the two inside points: log10(20 / 10) / log10(400 / 100) = 0.5.
    assert fit["n_points"] == 2
    assert fit["slope"] == pytest.approx(0.5)


def test_fit_one_point_skipped():
    fit = fit_threshold_scaling(make_thresholds([(100, 10)])).iloc[0]
    assert math.isnan(fit["slope"])
    assert fit["n_points"] == 1
    assert "a fit needs at least 2" in fit["reason_skipped"]


def test_harm_deltas_against_base():
    harm = harm_table(make_results(), BASE)
    row = harm[(harm["adapter"] == "r1-a2-down_proj") & (harm["n_unknown"] == 16)].iloc[0]
    # ARC-Easy 0.6 - 0.16 = 0.44 against the base 0.6.
    assert row["arc_easy_delta_mean"] == pytest.approx(-0.16)
    assert row["truthfulqa_mc2_delta_mean"] == pytest.approx(0.0)
    assert row["negative_share_mean"] == pytest.approx(0.021)
    assert row["negative_share_max"] == pytest.approx(0.026)
    assert row["n_questions"] == 134


def test_harm_seeds_below_base():
    harm = harm_table(make_results(), BASE)
    at_4 = harm[(harm["adapter"] == "r1-a2-down_proj") & (harm["n_unknown"] == 4)].iloc[0]
    at_16 = harm[(harm["adapter"] == "r1-a2-down_proj") & (harm["n_unknown"] == 16)].iloc[0]
    # Interval tops: 0.56 + 0.05 = 0.61 at 4 facts, above 0.6; 0.49 at 16 facts, below.
    assert at_4["arc_easy_n_seeds_below_base"] == 0
    assert at_16["arc_easy_n_seeds_below_base"] == 2


def test_harm_onset_first_harmed_count():
    onsets = harm_onsets(harm_table(make_results(), BASE), ["arc_easy", "truthfulqa_mc2"])
    assert onsets["harm_onset_n_unknown"].tolist() == [16.0, 16.0, 16.0]
    assert onsets["harm_onset_benchmarks"].tolist() == ["arc_easy"] * 3


def test_harm_onset_none():
    onsets = harm_onsets(harm_table(make_results(), BASE), ["truthfulqa_mc2"])
    assert onsets["harm_onset_n_unknown"].isna().all()


# --- Figures ---------------------------------------------------------------------------------


def test_heatmap_rows_largest_on_top():
    fig = plot_reliability_heatmap(reliability_curve(make_results()), "t")
    ax = fig.axes[0]
    labels = [label.get_text() for label in ax.get_yticklabels()]
    assert labels[0] == "r16-a32-down_proj (1,600 params)"
    assert labels[-1] == "r1-a2-down_proj (100 params)"
    assert [label.get_text() for label in ax.get_xticklabels()] == ["4", "16", "48"]


def test_heatmap_annotates_means():
    fig = plot_reliability_heatmap(reliability_curve(make_results()), "t")
    texts = [text.get_text() for text in fig.axes[0].texts]
    assert len(texts) == 9
    assert texts[:3] == ["1.00", "1.00", "0.96"]


def test_heatmap_two_augmentations_raises():
    curve = reliability_curve(make_results())
    mixed = pd.concat([curve, curve.assign(n_extra_per_unknown=1, extra_kind="paraphrase")])
    with pytest.raises(ValueError, match="contains 2 augmentations"):
        plot_reliability_heatmap(mixed, "t")


def test_threshold_plot_log_axes_and_fit():
    thresholds = make_thresholds([(100, 10), (400, 20), (1600, 40)])
    thresholds["first_failed_n_unknown"] = thresholds["threshold_n_unknown"] * 2
    fig = plot_threshold_curve(thresholds, fit_threshold_scaling(thresholds), "t")
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    assert ax.get_yscale() == "log"
    labels = [line.get_label() for line in ax.get_lines()]
    assert "UK only fit: slope 0.50 (3 points)" in labels


def test_harm_plot_lines_and_stars():
    results = make_results()
    harm = harm_table(results, BASE)
    thresholds = capacity_thresholds(reliability_curve(results), 0.95)
    fig = plot_harm_by_facts(harm, thresholds, "negative_share", "share", "t")
    ax = fig.axes[0]
    stars = [line for line in ax.get_lines() if line.get_marker() == "*" and len(line.get_xdata())]
    # One star per adapter, at its threshold: 4, 16 and 48 facts.
    assert sorted(float(line.get_xdata()[0]) for line in stars) == [4.0, 16.0, 48.0]
    assert ax.get_xscale() == "log"


def test_frontier_plot_facts_learned():
    fig = plot_harm_frontier(harm_table(make_results(), BASE), "t")
    line = fig.axes[0].get_lines()[0]
    # Smallest adapter: 1.0 x 4, 0.5 x 16 and 0.2 x 48 facts learned.
    assert np.allclose(line.get_xdata(), [4.0, 8.0, 9.6])


# --- Entry point -----------------------------------------------------------------------------


def _config(tmp_path):
    params = tmp_path / "capacity.yaml"
    params.write_text(
        "study:\n  name: capacity\n  seed: 0\n"
        f"  run_root: {tmp_path}/runs\n  figures_root: {tmp_path}/figures\n"
        "train:\n  n_unknown: [4, 16, 48]\n  lora_rank: [1, 4, 16]\n  lora_alpha_per_rank: 2\n"
        "analysis:\n  figure_formats: [png]\n"
    )
    return load_config(params)


def test_outputs_written(tmp_path):
    config = _config(tmp_path)
    tables = make_capacity_outputs(config, make_results(), BASE)
    assert sorted(tables) == ["fit", "harm", "reliability", "thresholds"]
    written = sorted(path.name for path in config.figures_dir.iterdir())
    assert "figure_capacity_reliability_heatmap.png" in written
    assert "figure_capacity_threshold.png" in written
    assert "figure_capacity_negative_share.png" in written
    assert "figure_capacity_arc_easy_delta.png" in written
    assert "figure_capacity_frontier.png" in written
    assert "table_capacity_thresholds.md" in written
    assert "table_capacity_fit.csv" in written


def test_outputs_thresholds_table(tmp_path):
    config = _config(tmp_path)
    make_capacity_outputs(config, make_results(), BASE)
    saved = pd.read_csv(config.figures_dir / "table_capacity_thresholds.csv")
    assert saved["threshold_n_unknown"].tolist() == [4.0, 16.0, 48.0]
    assert saved["n_epochs"].tolist() == [10, 10, 10]
    assert saved["harm_onset_n_unknown"].tolist() == [16.0, 16.0, 16.0]


def test_outputs_one_size_skipped(tmp_path):
    config = _config(tmp_path)
    one = make_results({"r1-a2-down_proj": ADAPTERS["r1-a2-down_proj"]})
    assert make_capacity_outputs(config, one, BASE) == {}
    assert not config.figures_dir.exists()
