"""Tests for kp_utils.plotting: file writers and the structure of each figure."""

import itertools

import matplotlib
import numpy as np
import pandas as pd
import pytest

from kp_utils.categories import KnowledgeCategory
from kp_utils.config import EXTRA_KIND_VALUES
from kp_utils.plotting import (
    KIND_SHORT_LABELS,
    label_augmentation,
    plot_metric_vs_facts,
    plot_reliability_by_epoch,
    plot_transition_heatmap,
    save_figure,
    save_table,
)

matplotlib.use("Agg")

PARAPHRASE, HIGHLY_KNOWN = EXTRA_KIND_VALUES
FACT_COUNTS = [10, 100, 1000]
# Augmentations as (n_extra_per_unknown, extra_kind). Both zero-extra cells are "UK only".
AUGMENTATIONS = [(0, PARAPHRASE), (0, HIGHLY_KNOWN), (1, PARAPHRASE), (10, HIGHLY_KNOWN)]
EXPECTED_LABELS = ["UK only", "+1 Para", "+10 HK"]


def make_results() -> pd.DataFrame:
    """Build one row per (fact count, augmentation, seed), where seed 1 scores 0.2 above seed 0."""
    rows = []
    for n_unknown, (n_extra, kind), seed in itertools.product(FACT_COUNTS, AUGMENTATIONS, [0, 1]):
        score = 0.5 + 0.01 * n_extra + 0.2 * seed
        rows.append(
            {
                "n_unknown": n_unknown,
                "n_extra_per_unknown": n_extra,
                "extra_kind": kind,
                "seed": seed,
                "reliability": score,
            }
        )
    return pd.DataFrame(rows)


def make_epochs() -> pd.DataFrame:
    """Build reliability per epoch for 2 fact counts x 2 augmentations x 2 seeds x 3 epochs."""
    rows = []
    cells = itertools.product([10, 100], [(0, PARAPHRASE), (1, PARAPHRASE)], [0, 1], [1, 2, 3])
    for n_unknown, (n_extra, kind), seed, epoch in cells:
        rows.append(
            {
                "n_unknown": n_unknown,
                "n_extra_per_unknown": n_extra,
                "extra_kind": kind,
                "seed": seed,
                "epoch": epoch,
                "reliability": 0.1 * epoch + 0.05 * seed,
            }
        )
    return pd.DataFrame(rows)


def test_kind_short_labels_paper_forms():
    assert KIND_SHORT_LABELS[PARAPHRASE] == "Para"
    assert KIND_SHORT_LABELS[HIGHLY_KNOWN] == "HK"


def test_label_augmentation_forms():
    assert label_augmentation(0, HIGHLY_KNOWN) == "UK only"
    assert label_augmentation(1, PARAPHRASE) == "+1 Para"
    assert label_augmentation(10, HIGHLY_KNOWN) == "+10 HK"


def test_metric_plot_log_axis():
    fig = plot_metric_vs_facts(make_results(), "reliability", "Reliability", "R", base_value=0.1)
    assert fig.axes[0].get_xscale() == "log"


def test_metric_plot_ticks_fact_counts():
    fig = plot_metric_vs_facts(make_results(), "reliability", "Reliability", "R", base_value=0.1)
    ax = fig.axes[0]
    assert list(ax.get_xticks()) == FACT_COUNTS
    assert [label.get_text() for label in ax.get_xticklabels()] == ["10", "100", "1000"]
    assert len(ax.xaxis.get_minorticklocs()) == 0


def test_metric_plot_lines_with_base():
    fig = plot_metric_vs_facts(make_results(), "reliability", "Reliability", "R", base_value=0.1)
    lines = fig.axes[0].get_lines()
    assert len(lines) == len(EXPECTED_LABELS) + 1
    assert lines[-1].get_linestyle() == "--"
    assert list(lines[-1].get_ydata()) == [0.1, 0.1]


def test_metric_plot_lines_without_base():
    fig = plot_metric_vs_facts(make_results(), "reliability", "Reliability", "R", base_value=None)
    assert len(fig.axes[0].get_lines()) == len(EXPECTED_LABELS)


def test_metric_plot_legend_order():
    fig = plot_metric_vs_facts(make_results(), "reliability", "Reliability", "R", base_value=0.1)
    texts = [text.get_text() for text in fig.axes[0].get_legend().get_texts()]
    assert texts == [*EXPECTED_LABELS, "Base model"]


def test_metric_plot_mean_over_seeds():
    # "+1 Para": seed 0 scores 0.51, seed 1 0.71, mean 0.61 at every fact count.
    fig = plot_metric_vs_facts(make_results(), "reliability", "Reliability", "R", base_value=None)
    line = fig.axes[0].get_lines()[1]
    assert line.get_label() == "+1 Para"
    assert np.allclose(line.get_ydata(), [0.61, 0.61, 0.61])


def test_metric_plot_band_min_max():
    # "UK only" spans 0.5 (seed 0) to 0.7 (seed 1).
    fig = plot_metric_vs_facts(make_results(), "reliability", "Reliability", "R", base_value=None)
    band = fig.axes[0].collections[0]
    y_values = band.get_paths()[0].vertices[:, 1]
    assert y_values.min() == pytest.approx(0.5)
    assert y_values.max() == pytest.approx(0.7)


def test_metric_plot_missing_column_raises():
    with pytest.raises(ValueError, match="accuracy"):
        plot_metric_vs_facts(make_results(), "accuracy", "Accuracy", "A", base_value=None)


def test_metric_plot_zero_facts_raises():
    results = make_results().assign(n_unknown=0)
    with pytest.raises(ValueError, match="positive on a log axis"):
        plot_metric_vs_facts(results, "reliability", "Reliability", "R", base_value=None)


def test_epoch_plot_one_line_per_cell():
    # 2 fact counts x 2 augmentations = 4 cells.
    fig = plot_reliability_by_epoch(make_epochs())
    assert len(fig.axes[0].get_lines()) == 4


def test_epoch_plot_labels_and_means():
    # Cell 10 UK, UK only at epoch 1: seeds 0.1 and 0.15, mean 0.125.
    fig = plot_reliability_by_epoch(make_epochs())
    first = fig.axes[0].get_lines()[0]
    assert first.get_label() == "10 UK, UK only"
    assert list(first.get_xdata()) == [1, 2, 3]
    assert first.get_ydata()[0] == pytest.approx(0.125)


def test_heatmap_short_tick_labels():
    order = [category.value for category in KnowledgeCategory]
    matrix = pd.DataFrame(np.arange(16).reshape(4, 4), index=order, columns=order)
    fig = plot_transition_heatmap(matrix, "Transitions")
    ax = fig.axes[0]
    assert [label.get_text() for label in ax.get_xticklabels()] == ["HK", "MK", "WK", "UK"]
    assert [label.get_text() for label in ax.get_yticklabels()] == ["HK", "MK", "WK", "UK"]


def test_heatmap_integer_annotations():
    order = [category.value for category in KnowledgeCategory]
    matrix = pd.DataFrame(np.arange(16).reshape(4, 4), index=order, columns=order)
    fig = plot_transition_heatmap(matrix, "Transitions")
    texts = [text.get_text() for text in fig.axes[0].texts]
    assert texts == [str(value) for value in range(16)]


def test_save_figure_writes_formats(tmp_path):
    fig = plot_metric_vs_facts(make_results(), "reliability", "Reliability", "R", base_value=0.1)
    paths = save_figure(fig, tmp_path / "figures", "reliability")
    assert [path.name for path in paths] == ["reliability.png", "reliability.pdf"]
    for path in paths:
        assert path.stat().st_size > 0


def test_save_figure_no_temporary_left(tmp_path):
    fig = plot_metric_vs_facts(make_results(), "reliability", "Reliability", "R", base_value=0.1)
    save_figure(fig, tmp_path, "reliability")
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "reliability.pdf",
        "reliability.png",
    ]


def test_save_figure_bad_format_cleans_up(tmp_path):
    fig = plot_metric_vs_facts(make_results(), "reliability", "Reliability", "R", base_value=0.1)
    with pytest.raises(ValueError):
        save_figure(fig, tmp_path, "reliability", formats=("nosuchformat",))
    assert list(tmp_path.iterdir()) == []


def test_save_table_writes_csv_markdown(tmp_path):
    table = pd.DataFrame({"n_unknown": [10, 100], "reliability": [0.5, 0.25]})
    csv_path, markdown_path = save_table(table, tmp_path, "summary")
    assert csv_path.name == "summary.csv"
    assert markdown_path.name == "summary.md"
    assert csv_path.stat().st_size > 0
    assert markdown_path.stat().st_size > 0


def test_save_table_csv_round_trip(tmp_path):
    table = pd.DataFrame({"n_unknown": [10, 100], "reliability": [0.5, 0.25]})
    csv_path, _ = save_table(table, tmp_path, "summary")
    pd.testing.assert_frame_equal(pd.read_csv(csv_path), table)


def test_save_table_markdown_header(tmp_path):
    table = pd.DataFrame({"n_unknown": [10, 100], "reliability": [0.5, 0.25]})
    _, markdown_path = save_table(table, tmp_path, "summary")
    first_line = markdown_path.read_text(encoding="utf-8").splitlines()[0]
    assert "n_unknown" in first_line
    assert "reliability" in first_line


def test_save_table_keeps_named_index(tmp_path):
    order = [category.value for category in KnowledgeCategory]
    matrix = pd.DataFrame(
        np.eye(4, dtype=int), index=pd.Index(order, name="base_category"), columns=order
    )
    csv_path, _ = save_table(matrix, tmp_path, "transitions")
    assert pd.read_csv(csv_path).columns[0] == "base_category"
