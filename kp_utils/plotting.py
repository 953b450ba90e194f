"""Figures and tables for the analysis notebook, plus atomic writers for both.

Figures are built on `matplotlib.figure.Figure` directly, not through pyplot, so they work
under any backend (Agg included), never pile up in pyplot's figure registry and are shown in
a notebook only when a cell returns them. Labels use the short forms of Pletenev et al. (2025):
UK, HK, Para.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, NullFormatter, NullLocator

from kp_utils.artifacts import write_atomic
from kp_utils.categories import EXTRA_KIND_LABELS, SHORT_LABELS, KnowledgeCategory

logger = logging.getLogger(__name__)

# Plain-string keys, because results tables store the kind as its value ("paraphrase").
KIND_SHORT_LABELS = {kind.value: label for kind, label in EXTRA_KIND_LABELS.items()}
UNKNOWN_ONLY_LABEL = f"{SHORT_LABELS[KnowledgeCategory.UNKNOWN]} only"
CELL_COLUMNS = ("n_unknown", "n_extra_per_unknown", "extra_kind")


def save_figure(
    fig: Figure, out_dir: str | Path, name: str, formats: Sequence[str] = ("png", "pdf")
) -> list[Path]:
    """Write `fig` as out_dir/name.<format> for each format and return the paths written."""
    paths = []
    for file_format in formats:
        path = write_atomic(
            Path(out_dir) / f"{name}.{file_format}",
            lambda target, file_format=file_format: fig.savefig(
                target, format=file_format, bbox_inches="tight", dpi=150
            ),
        )
        paths.append(path)
    logger.info("Wrote figure %s to %s", name, [str(path) for path in paths])
    return paths


def save_table(df: pd.DataFrame, out_dir: str | Path, name: str) -> list[Path]:
    """Write `df` as out_dir/name.csv and out_dir/name.md and return both paths.

    The index is written only when it carries information, i.e. it is named or is not the
    default 0..n-1 range.
    """
    has_default_index = isinstance(df.index, pd.RangeIndex) and df.index.name is None
    keep_index = not has_default_index
    csv_path = write_atomic(
        Path(out_dir) / f"{name}.csv", lambda target: df.to_csv(target, index=keep_index)
    )
    markdown_path = write_atomic(
        Path(out_dir) / f"{name}.md",
        lambda target: target.write_text(df.to_markdown(index=keep_index) + "\n", encoding="utf-8"),
    )
    logger.info("Wrote table %s to %s and %s", name, csv_path, markdown_path)
    return [csv_path, markdown_path]


def label_augmentation(n_extra_per_unknown: int, extra_kind: str | None) -> str:
    """Return the figure label of one augmentation, e.g. "UK only", "+1 Para" or "+10 HK".

    A cell without extras is "UK only" whatever its `extra_kind`. An unlisted kind is shown as is.
    """
    if n_extra_per_unknown == 0:
        return UNKNOWN_ONLY_LABEL
    return f"+{n_extra_per_unknown} {KIND_SHORT_LABELS.get(extra_kind, extra_kind)}"


def _augmentation_labels(frame: pd.DataFrame) -> pd.Series:
    return pd.Series(
        [
            label_augmentation(int(n_extra), kind)
            for n_extra, kind in zip(frame["n_extra_per_unknown"], frame["extra_kind"], strict=True)
        ],
        index=frame.index,
    )


def _kind_position(n_extra_per_unknown: int, extra_kind: str | None) -> int:
    """Return the sort key of an augmentation kind: "UK only", listed kinds, then others."""
    if n_extra_per_unknown == 0:
        return -1
    if extra_kind in KIND_SHORT_LABELS:
        return list(KIND_SHORT_LABELS).index(extra_kind)
    return len(KIND_SHORT_LABELS)


def _augmentation_order(frame: pd.DataFrame) -> list[str]:
    """Order labels as "UK only" first, then by kind, then by number of extras."""
    keys = frame[["n_extra_per_unknown", "extra_kind"]].drop_duplicates()
    positions = [
        _kind_position(int(n_extra), kind)
        for n_extra, kind in zip(keys["n_extra_per_unknown"], keys["extra_kind"], strict=True)
    ]
    keys = keys.assign(label=_augmentation_labels(keys), kind_position=positions)
    keys = keys.sort_values(["kind_position", "n_extra_per_unknown"])
    return list(dict.fromkeys(keys["label"]))


def _require_columns(frame: pd.DataFrame, columns: Sequence[str], frame_name: str) -> None:
    missing = [column for column in columns if column not in frame.columns]
    if missing:
        raise ValueError(f"{frame_name} is missing columns {missing}. It has {list(frame.columns)}")


def _draw_band(ax, x: pd.Series, values: pd.DataFrame, label: str, color) -> None:
    """Draw the mean over seeds as a line and the min-max range over seeds as a band."""
    ax.plot(x, values["mean"], marker="o", label=label, color=color)
    ax.fill_between(x, values["min"], values["max"], alpha=0.2, color=color, linewidth=0)


def _set_fact_count_axis(ax, fact_counts: Sequence[int]) -> None:
    """Put the x axis on a log scale whose only ticks are the given fact counts."""
    ax.set_xscale("log")
    ax.set_xticks(list(fact_counts), labels=[str(count) for count in fact_counts])
    # Log-scale minor ticks would add unlabelled marks between the counts, so drop them.
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())


def plot_metric_vs_facts(
    results: pd.DataFrame,
    metric: str,
    ylabel: str,
    title: str,
    base_value: float | None = None,
) -> Figure:
    """Plot a metric against the number of Unknown facts, one line per augmentation.

    Args:
        results: one row per trained adapter with columns n_unknown, n_extra_per_unknown,
            extra_kind, seed and `metric`.
        metric: column to plot. Each line shows its mean over seeds and a band from the
            minimum to the maximum seed.
        base_value: the base model's value, drawn as a dashed horizontal line, or None for no line.

    The x axis is logarithmic and labelled with the fact counts present in `results`.
    """
    _require_columns(results, [*CELL_COLUMNS, "seed", metric], "results")
    if results.empty:
        raise ValueError("results is empty, so there is nothing to plot")
    fact_counts = sorted(int(count) for count in results["n_unknown"].unique())
    if fact_counts[0] <= 0:
        raise ValueError(f"n_unknown must be positive on a log axis, got {fact_counts[0]}")

    frame = results.assign(augmentation=_augmentation_labels(results))
    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.add_subplot()
    order = _augmentation_order(results)
    for label, color in zip(order, sns.color_palette(n_colors=len(order)), strict=True):
        group = frame[frame["augmentation"] == label]
        stats = group.groupby("n_unknown")[metric].agg(["mean", "min", "max"]).sort_index()
        _draw_band(ax, stats.index, stats, label, color)
    if base_value is not None:
        ax.axhline(base_value, linestyle="--", color="black", label="Base model")

    _set_fact_count_axis(ax, fact_counts)
    ax.set(
        xlabel=f"{SHORT_LABELS[KnowledgeCategory.UNKNOWN]} facts in training",
        ylabel=ylabel,
        title=title,
    )
    ax.legend(title="Training data", fontsize="small")
    return fig


def plot_models_vs_facts(
    results_by_model: dict[str, pd.DataFrame],
    metric: str,
    ylabel: str,
    title: str,
    base_values: dict[str, float] | None = None,
) -> Figure:
    """Plot a metric against the number of Unknown facts, one line per model.

    Each model's line is its mean over cells at each fact count (seeds and, where present,
    augmentations pooled), with a min-max band. A model's base value is a dashed line in the
    same colour. The x axis is logarithmic, labelled with every model's fact counts.
    """
    if not results_by_model:
        raise ValueError("results_by_model is empty, so there is nothing to plot")
    for model, results in results_by_model.items():
        _require_columns(results, ["n_unknown", metric], f"results of {model}")
    fact_counts = sorted({int(n) for r in results_by_model.values() for n in r["n_unknown"]})

    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.add_subplot()
    palette = sns.color_palette(n_colors=len(results_by_model))
    for (model, results), color in zip(results_by_model.items(), palette, strict=True):
        stats = results.groupby("n_unknown")[metric].agg(["mean", "min", "max"]).sort_index()
        _draw_band(ax, stats.index, stats, f"{model} with new facts", color)
        if base_values and model in base_values:
            ax.axhline(base_values[model], linestyle="--", color=color, label=f"{model} base")

    _set_fact_count_axis(ax, fact_counts)
    ax.set(
        xlabel=f"{SHORT_LABELS[KnowledgeCategory.UNKNOWN]} facts in training",
        ylabel=ylabel,
        title=title,
    )
    ax.legend(fontsize="small")
    return fig


def plot_reliability_by_epoch(epochs: pd.DataFrame) -> Figure:
    """Plot reliability against training epoch, one line per grid cell.

    `epochs` has one row per (cell, seed, epoch) with columns n_unknown, n_extra_per_unknown,
    extra_kind, seed, epoch and reliability. Each line is the mean over seeds with a min-max
    band, labelled like "100 UK, +1 Para".
    """
    _require_columns(epochs, [*CELL_COLUMNS, "seed", "epoch", "reliability"], "epochs")
    if epochs.empty:
        raise ValueError("epochs is empty, so there is nothing to plot")

    frame = epochs.assign(augmentation=_augmentation_labels(epochs))
    cells = frame[["n_unknown", "augmentation"]].drop_duplicates()
    order = {label: position for position, label in enumerate(_augmentation_order(epochs))}
    cells = cells.assign(position=cells["augmentation"].map(order))
    cells = cells.sort_values(["n_unknown", "position"])

    fig = Figure(figsize=(7.2, 4.2), layout="constrained")
    ax = fig.add_subplot()
    palette = sns.color_palette(n_colors=len(cells))
    unknown_label = SHORT_LABELS[KnowledgeCategory.UNKNOWN]
    for (n_unknown, augmentation), color in zip(
        cells[["n_unknown", "augmentation"]].itertuples(index=False), palette, strict=True
    ):
        is_cell = (frame["n_unknown"] == n_unknown) & (frame["augmentation"] == augmentation)
        stats = frame[is_cell].groupby("epoch")["reliability"].agg(["mean", "min", "max"])
        _draw_band(ax, stats.index, stats, f"{n_unknown} {unknown_label}, {augmentation}", color)

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="Epoch", ylabel="Reliability", title="Reliability on trained facts by epoch")
    ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.02, 0.5))
    return fig


def _short_category_label(value) -> str:
    try:
        return SHORT_LABELS[KnowledgeCategory(value)]
    except ValueError:
        return str(value)


def plot_transition_heatmap(matrix: pd.DataFrame, title: str) -> Figure:
    """Draw a base-by-adapted category matrix (e.g. from `transition_matrix`) as a heatmap.

    Rows are the base model's categories and columns the adapted model's. Category names are
    shown in short form (HK, MK, WK, UK). Cells show the values, as integers when the matrix
    contains integers.
    """
    annotation_format = "d" if np.issubdtype(matrix.to_numpy().dtype, np.integer) else ".2g"
    fig = Figure(figsize=(4.8, 4.0), layout="constrained")
    ax = fig.add_subplot()
    sns.heatmap(
        matrix,
        annot=True,
        fmt=annotation_format,
        cmap="Blues",
        ax=ax,
        xticklabels=[_short_category_label(value) for value in matrix.columns],
        yticklabels=[_short_category_label(value) for value in matrix.index],
    )
    ax.set(xlabel="Adapted model", ylabel="Base model", title=title)
    ax.tick_params(axis="y", labelrotation=0)
    return fig
