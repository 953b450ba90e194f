"""Adapter capacity: how many new facts each adapter size learns, and what it harms on the way.

Every function reads the results table of stage 03 (one row per trained cell, as in
results.csv) and, for harm, the base model's benchmark table. Definitions:

- Adapter size: the number of trainable parameters that peft counted in the trained model
  (`n_trainable_parameters`, from each cell's done.json), never a hand-computed count.
- Reliability: the share of correct replies over every (trained fact, prompt) pair, as
  `metrics.reliability` measures it. Curves show its mean, min and max over seeds.
- Facts learned: reliability x n_unknown, the expected number of trained facts a prompt of the
  study gets right. Facts per parameter divides it by the adapter size.
- Capacity threshold: the largest tested n_unknown whose mean reliability over seeds reaches
  `min_reliability`, where every smaller tested n_unknown reached it too. A larger n_unknown
  that reaches it again after a miss does not count. It is listed in `reached_above_failure`,
  and `is_monotone` is False. When even the smallest tested n_unknown misses, the threshold is
  NaN with status "below smallest tested". When every tested n_unknown reaches it, the
  threshold is the largest tested one, a lower bound, with status "at least largest tested".
- Threshold fit: least squares of log10(threshold) on log10(adapter size), over thresholds
  inside the tested range only, because bounds would bias the slope.
- Harm: the negative shift share (questions whose category moved down, trained facts left out)
  and each benchmark's score minus the base model's score. A benchmark counts as harmed at an
  n_unknown when every seed's 95% interval lies below the base score.

Each table row also carries the epoch budget it was measured under (epochs, learning rate and
batch size), because a threshold only holds for that budget.

CAPACITY_RULE_VERSION changes whenever a definition above changes the numbers. Version 1:
first implementation.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from enum import Enum

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from kp_utils import plotting
from kp_utils.categories import SHORT_LABELS, KnowledgeCategory
from kp_utils.config import StudyConfig
from kp_utils.plotting import _draw_band, _set_fact_count_axis, label_augmentation

logger = logging.getLogger(__name__)

CAPACITY_RULE_VERSION = 1
ADAPTER_KEYS = ["adapter", "n_trainable_parameters"]
AUGMENTATION_KEYS = ["n_extra_per_unknown", "extra_kind"]
# Adapter fields of the cells index that describe an adapter size, copied into the tables.
ADAPTER_FIELDS = ["lora_rank", "lora_alpha", "target_modules", "layers"]
RESULT_COLUMNS = [*ADAPTER_KEYS, *AUGMENTATION_KEYS, "n_unknown", "seed", "reliability"]
# Reliabilities are ratios of small counts, so 0.95 may come out as 0.9499999999999999.
_TOLERANCE = 1e-9
UNKNOWN_LABEL = SHORT_LABELS[KnowledgeCategory.UNKNOWN]


class ThresholdStatus(str, Enum):
    """Position of the capacity threshold relative to the tested numbers of facts."""

    INSIDE = "inside tested range"
    BELOW = "below smallest tested"
    AT_LEAST = "at least largest tested"


# ---------------------------------------------------------------------------------------------
# Tables


def count_adapter_sizes(results: pd.DataFrame) -> int:
    """Count the distinct adapters in `results`; a table without an adapter column has one."""
    if "adapter" not in results.columns:
        return 1
    return int(results["adapter"].nunique())


def _check_results(results: pd.DataFrame) -> None:
    missing = [column for column in RESULT_COLUMNS if column not in results.columns]
    if missing:
        raise ValueError(
            f"results is missing columns {missing}. Stage 02 writes them into the cells index, "
            "so rerun stages 02 and 03 with this code."
        )
    absent = results.loc[results["n_trainable_parameters"].isna(), "adapter"].unique()
    if len(absent):
        raise ValueError(
            f"results has no n_trainable_parameters for adapters {list(absent)}, because their "
            "cells have no done.json yet. Finish stage 02 first."
        )
    counts = results.groupby("adapter")["n_trainable_parameters"].unique()
    mixed = {adapter: list(values) for adapter, values in counts.items() if len(values) > 1}
    if mixed:
        raise ValueError(
            f"adapters {mixed} have several trainable-parameter counts, but the cells of one "
            "adapter size must come from one model."
        )


def _group_keys(results: pd.DataFrame) -> list[str]:
    return [*ADAPTER_KEYS, *[c for c in ADAPTER_FIELDS if c in results], *AUGMENTATION_KEYS]


def reliability_curve(results: pd.DataFrame) -> pd.DataFrame:
    """Summarise reliability per adapter size, augmentation and number of Unknown facts.

    Returns one row per group, sorted by adapter size, with reliability_mean, _min and _max
    over seeds, n_seeds, facts_learned (mean over seeds of reliability x n_unknown) and
    facts_per_parameter (facts_learned / n_trainable_parameters).
    """
    _check_results(results)
    frame = results.assign(facts_learned=results["reliability"] * results["n_unknown"])
    keys = [*_group_keys(results), "n_unknown"]
    grouped = frame.groupby(keys, dropna=False)
    curve = grouped["reliability"].agg(["mean", "min", "max"]).add_prefix("reliability_")
    curve["n_seeds"] = grouped["seed"].nunique()
    curve["facts_learned"] = grouped["facts_learned"].mean()
    curve = curve.reset_index()
    curve["facts_per_parameter"] = curve["facts_learned"] / curve["n_trainable_parameters"]
    return curve.sort_values(["n_trainable_parameters", "adapter", *AUGMENTATION_KEYS, "n_unknown"])


def find_threshold(
    n_unknown: Sequence[int], reliability: Sequence[float], min_reliability: float
) -> dict:
    """Apply the capacity-threshold rule of this module to one reliability curve.

    Args:
        n_unknown: the tested numbers of facts, each once, in any order.
        reliability: the reliability at each of them; NaN counts as a miss.
        min_reliability: the share that counts as learned, e.g. 0.95.

    Returns:
        threshold_n_unknown (float, NaN when below the smallest tested), status (a
        ThresholdStatus value), first_failed_n_unknown (the smallest tested n that missed, NaN
        when none did), reached_above_failure (tested n above the first miss that reach the
        share again, as text) and is_monotone.
    """
    if len(set(n_unknown)) != len(n_unknown):
        raise ValueError(f"n_unknown must list each tested count once, got {list(n_unknown)}")
    order = np.argsort(n_unknown)
    counts = np.asarray(n_unknown)[order]
    reached = np.asarray(reliability, dtype=float)[order] >= min_reliability - _TOLERANCE
    n_prefix = len(counts) if reached.all() else int(np.argmin(reached))
    above = [int(n) for n, ok in zip(counts[n_prefix:], reached[n_prefix:]) if ok]
    if n_prefix == 0:
        threshold, status = float("nan"), ThresholdStatus.BELOW
    elif n_prefix == len(counts):
        threshold, status = float(counts[-1]), ThresholdStatus.AT_LEAST
    else:
        threshold, status = float(counts[n_prefix - 1]), ThresholdStatus.INSIDE
    return {
        "threshold_n_unknown": threshold,
        "status": status.value,
        "first_failed_n_unknown": float(counts[n_prefix]) if n_prefix < len(counts) else np.nan,
        "reached_above_failure": ", ".join(map(str, above)),
        "is_monotone": not above,
    }


def _threshold_row(group: pd.DataFrame, min_reliability: float) -> dict:
    """Find one curve's threshold and the facts learned at it and at best."""
    row = find_threshold(
        group["n_unknown"].tolist(), group["reliability_mean"].tolist(), min_reliability
    )
    at_threshold = group[group["n_unknown"] == row["threshold_n_unknown"]]
    best = group.loc[group["facts_learned"].idxmax()]
    row |= {
        "reliability_at_threshold": at_threshold["reliability_mean"].sum()
        if len(at_threshold)
        else np.nan,
        "facts_learned_at_threshold": at_threshold["facts_learned"].sum()
        if len(at_threshold)
        else np.nan,
        "max_facts_learned": float(best["facts_learned"]),
        "n_unknown_at_max_facts_learned": int(best["n_unknown"]),
        "tested_n_unknown": ", ".join(str(int(n)) for n in sorted(group["n_unknown"])),
    }
    return row


def capacity_thresholds(
    curve: pd.DataFrame, min_reliability: float = 0.95, budget: dict | None = None
) -> pd.DataFrame:
    """Find the capacity threshold of every adapter size and augmentation in `curve`.

    Args:
        curve: the table of `reliability_curve`.
        min_reliability: the mean reliability over seeds that counts as learned.
        budget: constant columns naming the training budget the threshold holds for, e.g.
            {"n_epochs": 10, "learning_rate": 1e-3}.

    Returns:
        One row per adapter size and augmentation, sorted by adapter size. Columns: the fields
        of `find_threshold`, then reliability, facts learned and facts per parameter at the
        threshold. Then the most facts learned at any tested n_unknown, min_reliability, the
        budget columns and capacity_rule_version.
    """
    if not 0 < min_reliability <= 1:
        raise ValueError(f"min_reliability must lie in (0, 1], got {min_reliability}")
    keys = [c for c in curve.columns if c in _group_keys(curve)]
    rows = []
    for values, group in curve.groupby(keys, dropna=False, sort=False):
        rows.append(dict(zip(keys, values)) | _threshold_row(group, min_reliability))
    table = pd.DataFrame(rows)
    table["facts_per_parameter_at_threshold"] = (
        table["facts_learned_at_threshold"] / table["n_trainable_parameters"]
    )
    table["min_reliability"] = min_reliability
    table = table.assign(**(budget or {}), capacity_rule_version=CAPACITY_RULE_VERSION)
    return table.sort_values(["n_trainable_parameters", "adapter", *AUGMENTATION_KEYS])


def _fit_one(points: pd.DataFrame) -> dict:
    n_points = len(points)
    n_sizes = points["n_trainable_parameters"].nunique()
    if n_sizes < 2:
        return {
            "slope": np.nan,
            "intercept": np.nan,
            "n_points": n_points,
            "reason_skipped": f"{n_sizes} adapter size(s) with a threshold inside the tested "
            "range; a fit needs at least 2",
        }
    x = np.log10(points["n_trainable_parameters"].to_numpy(dtype=float))
    y = np.log10(points["threshold_n_unknown"].to_numpy(dtype=float))
    slope, intercept = np.polyfit(x, y, deg=1)
    return {"slope": slope, "intercept": intercept, "n_points": n_points, "reason_skipped": ""}


def fit_threshold_scaling(thresholds: pd.DataFrame) -> pd.DataFrame:
    """Fit log10(threshold) = slope x log10(trainable parameters) + intercept per augmentation.

    Only thresholds inside the tested range enter the fit. Returns one row per augmentation
    with slope, intercept, n_points and reason_skipped (empty when the fit ran). A slope of 1
    means the threshold grows in proportion to the adapter size.
    """
    rows = []
    for values, group in thresholds.groupby(AUGMENTATION_KEYS, sort=False):
        inside = group[
            (group["status"] == ThresholdStatus.INSIDE.value) & (group["threshold_n_unknown"] > 0)
        ]
        fit = _fit_one(inside)
        if fit["reason_skipped"]:
            logger.info("Threshold fit for %s skipped: %s", values, fit["reason_skipped"])
        rows.append(dict(zip(AUGMENTATION_KEYS, values)) | fit)
    return pd.DataFrame(rows)


def _benchmark_names(results: pd.DataFrame, base_benchmarks: pd.DataFrame) -> list[str]:
    return [name for name in base_benchmarks["name"] if name in results.columns]


def harm_table(results: pd.DataFrame, base_benchmarks: pd.DataFrame) -> pd.DataFrame:
    """Summarise harm per adapter size, augmentation and number of Unknown facts.

    Returns one row per group with reliability_mean, negative_share_mean/_min/_max,
    positive_share_mean, n_questions (fewest counted over seeds), and for each benchmark in
    both tables: <name>_delta_mean/_min/_max (score minus the base model's score) and
    <name>_n_seeds_below_base (seeds whose 95% interval lies wholly below the base score).
    """
    _check_results(results)
    frame = results.copy()
    base = base_benchmarks.set_index("name")["score"]
    names = _benchmark_names(results, base_benchmarks)
    for name in names:
        frame[f"{name}_delta"] = frame[name] - base[name]
        frame[f"{name}_below_base"] = frame[f"{name}_ci_high"] < base[name]
    keys = [*_group_keys(results), "n_unknown"]
    grouped = frame.groupby(keys, dropna=False)
    table = grouped["reliability"].mean().rename("reliability_mean").to_frame()
    table["n_seeds"] = grouped["seed"].nunique()
    for column in ["negative_share", *[f"{name}_delta" for name in names]]:
        stats = grouped[column].agg(["mean", "min", "max"]).add_prefix(f"{column}_")
        table = table.join(stats)
    table["positive_share_mean"] = grouped["positive_share"].mean()
    table["n_questions"] = grouped["n_questions"].min()
    for name in names:
        table[f"{name}_n_seeds_below_base"] = grouped[f"{name}_below_base"].sum()
    table = table.reset_index()
    return table.sort_values(["n_trainable_parameters", "adapter", *AUGMENTATION_KEYS, "n_unknown"])


def harm_onsets(harm: pd.DataFrame, benchmark_names: Sequence[str]) -> pd.DataFrame:
    """Find, per adapter size and augmentation, the smallest n_unknown with benchmark harm.

    Harm means that every seed's 95% interval of some benchmark lies below the base score.
    Returns harm_onset_n_unknown (NaN when no tested n_unknown shows harm) and
    harm_onset_benchmarks (the harmed benchmarks at that n, as text).
    """
    rows = []
    keys = [*ADAPTER_KEYS, *AUGMENTATION_KEYS]
    for values, group in harm.groupby(keys, sort=False):
        onset, harmed = np.nan, ""
        for record in group.sort_values("n_unknown").to_dict("records"):
            below = [
                name
                for name in benchmark_names
                if record[f"{name}_n_seeds_below_base"] == record["n_seeds"]
            ]
            if below:
                onset, harmed = float(record["n_unknown"]), ", ".join(below)
                break
        rows.append(
            dict(zip(keys, values))
            | {"harm_onset_n_unknown": onset, "harm_onset_benchmarks": harmed}
        )
    return pd.DataFrame(rows, columns=[*keys, "harm_onset_n_unknown", "harm_onset_benchmarks"])


# ---------------------------------------------------------------------------------------------
# Figures


def _size_labels(frame: pd.DataFrame) -> dict[str, str]:
    """Map each adapter label to "<adapter> (<n> params)"."""
    sizes = frame[ADAPTER_KEYS].drop_duplicates()
    return {
        adapter: f"{adapter} ({int(n_params):,} params)"
        for adapter, n_params in sizes.itertuples(index=False)
    }


def _require_one_augmentation(frame: pd.DataFrame, name: str) -> None:
    plotting._require_columns(frame, [*ADAPTER_KEYS, *AUGMENTATION_KEYS, "n_unknown"], name)
    if frame.empty:
        raise ValueError(f"{name} is empty, so there is nothing to plot")
    n_augmentations = len(frame[AUGMENTATION_KEYS].drop_duplicates())
    if n_augmentations != 1:
        raise ValueError(
            f"{name} contains {n_augmentations} augmentations. Pass the rows of one of them, "
            "for example those with n_extra_per_unknown == 0."
        )


def _adapters_by_size(frame: pd.DataFrame) -> list[str]:
    sizes = frame[ADAPTER_KEYS].drop_duplicates().sort_values(ADAPTER_KEYS[::-1])
    return sizes["adapter"].tolist()


def plot_reliability_heatmap(curve: pd.DataFrame, title: str) -> Figure:
    """Draw mean reliability over seeds for each adapter size (rows) and number of facts.

    `curve` contains the `reliability_curve` rows of one augmentation. The largest adapter is
    the top row, and each cell is annotated with its value; untested pairs stay blank.
    """
    _require_one_augmentation(curve, "curve")
    order = _adapters_by_size(curve)[::-1]
    matrix = curve.pivot_table(
        index="adapter", columns="n_unknown", values="reliability_mean", aggfunc="mean"
    ).reindex(order)
    labels = _size_labels(curve)
    fig = Figure(
        figsize=(4.5 + 0.8 * matrix.shape[1], 1.8 + 0.45 * matrix.shape[0]), layout="constrained"
    )
    ax = fig.add_subplot()
    sns.heatmap(
        matrix,
        annot=True,
        fmt=".2f",
        vmin=0,
        vmax=1,
        cmap="viridis",
        ax=ax,
        yticklabels=[labels[adapter] for adapter in order],
        cbar_kws={"label": "Reliability (mean over seeds)"},
    )
    ax.set(
        xlabel=f"{UNKNOWN_LABEL} facts in training",
        ylabel="Adapter (trainable parameters)",
        title=title,
    )
    ax.tick_params(axis="y", labelrotation=0)
    return fig


def _draw_thresholds(ax, group: pd.DataFrame, color, label: str) -> None:
    """Draw one augmentation's thresholds: a dot with a bar up to the first miss, or a bound."""
    x = group["n_trainable_parameters"].astype(float)
    inside = group["status"] == ThresholdStatus.INSIDE.value
    ax.plot(x[inside], group.loc[inside, "threshold_n_unknown"], "o", color=color, label=label)
    # The true threshold lies between the last reached and the first missed n_unknown.
    ax.vlines(
        x[inside],
        group.loc[inside, "threshold_n_unknown"],
        group.loc[inside, "first_failed_n_unknown"],
        color=color,
        alpha=0.5,
    )
    at_least = group["status"] == ThresholdStatus.AT_LEAST.value
    ax.plot(x[at_least], group.loc[at_least, "threshold_n_unknown"], "^", color=color)
    below = group["status"] == ThresholdStatus.BELOW.value
    ax.plot(x[below], group.loc[below, "first_failed_n_unknown"], "v", color=color)


def plot_threshold_curve(thresholds: pd.DataFrame, fits: pd.DataFrame, title: str) -> Figure:
    """Plot the capacity threshold against trainable parameters on log-log axes, with its fit.

    Dots are thresholds inside the tested range, with a bar up to the first n_unknown that
    missed. Up triangles are lower bounds (every tested n_unknown reached the share) and down
    triangles upper bounds (none did). One colour per augmentation; a line per fit that ran.
    """
    columns = [*ADAPTER_KEYS, *AUGMENTATION_KEYS, "status"]
    plotting._require_columns(thresholds, columns, "thresholds")
    groups = list(thresholds.groupby(AUGMENTATION_KEYS, sort=False))
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.add_subplot()
    for ((n_extra, kind), group), color in zip(groups, sns.color_palette(n_colors=len(groups))):
        augmentation = label_augmentation(int(n_extra), kind)
        _draw_thresholds(ax, group, color, augmentation)
        fit = fits[(fits["n_extra_per_unknown"] == n_extra) & (fits["extra_kind"] == kind)]
        if len(fit) and np.isfinite(fit["slope"].iloc[0]):
            slope, intercept, n_points = fit[["slope", "intercept", "n_points"]].iloc[0]
            sizes = group["n_trainable_parameters"].astype(float)
            xs = np.geomspace(sizes.min(), sizes.max())
            ax.plot(
                xs,
                10**intercept * xs**slope,
                "--",
                color=color,
                label=f"{augmentation} fit: slope {slope:.2f} ({int(n_points)} points)",
            )
    ax.plot([], [], "^", color="grey", label="lower bound (all tested reached)")
    ax.plot([], [], "v", color="grey", label="upper bound (none reached)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set(
        xlabel="Trainable LoRA parameters (counted by peft)",
        ylabel=f"Capacity threshold ({UNKNOWN_LABEL} facts)",
        title=title,
    )
    ax.legend(fontsize="small")
    return fig


def plot_harm_by_facts(
    harm: pd.DataFrame,
    thresholds: pd.DataFrame,
    column: str,
    ylabel: str,
    title: str,
    reference: float | None = None,
) -> Figure:
    """Plot a harm measure against the number of facts, one line per adapter size.

    Args:
        harm: `harm_table` rows of one augmentation, with <column>_mean, _min and _max.
        thresholds: `capacity_thresholds` rows; each adapter's threshold is starred on its line.
        column: e.g. "negative_share" or "truthfulqa_mc2_delta".
        reference: a value drawn as a dashed line (0 for score deltas), or None.
    """
    _require_one_augmentation(harm, "harm")
    plotting._require_columns(harm, [f"{column}_{stat}" for stat in ("mean", "min", "max")], "harm")
    order = _adapters_by_size(harm)
    labels = _size_labels(harm)
    fig = Figure(figsize=(6.8, 4.2), layout="constrained")
    ax = fig.add_subplot()
    for adapter, color in zip(order, sns.color_palette(n_colors=len(order))):
        rows = harm[harm["adapter"] == adapter].set_index("n_unknown").sort_index()
        stats = rows[[f"{column}_{stat}" for stat in ("mean", "min", "max")]]
        stats.columns = ["mean", "min", "max"]
        _draw_band(ax, stats.index, stats, labels[adapter], color)
        threshold = thresholds.loc[thresholds["adapter"] == adapter, "threshold_n_unknown"]
        threshold = threshold[threshold.isin(stats.index)]
        if len(threshold):
            n = threshold.iloc[0]
            ax.plot([n], [stats.loc[n, "mean"]], "*", markersize=14, color=color)
    ax.plot([], [], "*", color="grey", markersize=10, label="capacity threshold")
    if reference is not None:
        ax.axhline(reference, linestyle="--", color="black", label="Base model")
    _set_fact_count_axis(ax, sorted(int(n) for n in harm["n_unknown"].unique()))
    ax.set(xlabel=f"{UNKNOWN_LABEL} facts in training", ylabel=ylabel, title=title)
    ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.02, 0.5))
    return fig


def plot_harm_frontier(harm: pd.DataFrame, title: str) -> Figure:
    """Plot the negative shift share against facts learned, one line per adapter size.

    Points follow increasing n_unknown along each line and are annotated with it, so a line
    that rises steeply shows harm growing faster than the facts learned.
    """
    _require_one_augmentation(harm, "harm")
    plotting._require_columns(harm, ["reliability_mean", "negative_share_mean"], "harm")
    labels = _size_labels(harm)
    order = _adapters_by_size(harm)
    fig = Figure(figsize=(6.8, 4.2), layout="constrained")
    ax = fig.add_subplot()
    for adapter, color in zip(order, sns.color_palette(n_colors=len(order))):
        rows = harm[harm["adapter"] == adapter].sort_values("n_unknown")
        learned = rows["reliability_mean"] * rows["n_unknown"]
        ax.plot(learned, rows["negative_share_mean"], "o-", color=color, label=labels[adapter])
        for x, y, n in zip(learned, rows["negative_share_mean"], rows["n_unknown"]):
            ax.annotate(str(int(n)), (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
    ax.set(
        xlabel=f"Facts learned (reliability x {UNKNOWN_LABEL} facts, mean over seeds)",
        ylabel="Negative shift (share of questions)",
        title=title,
    )
    ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.02, 0.5))
    return fig


# ---------------------------------------------------------------------------------------------
# Entry point for the analysis notebook


def _augmentation_suffix(n_extra_per_unknown: int, extra_kind: str) -> str:
    """Name the figure files of one augmentation: "" for Unknown facts alone."""
    return "" if n_extra_per_unknown == 0 else f"_{extra_kind}{n_extra_per_unknown}"


def _counted_questions(results: pd.DataFrame) -> str:
    low, high = int(results["n_questions"].min()), int(results["n_questions"].max())
    return f"{low}" if low == high else f"{low}-{high}"


def _harm_figures(tables, results, names, model, suffix) -> dict[str, Figure]:
    harm, thresholds = tables["harm"], tables["thresholds"]
    figures = {
        f"figure_capacity_negative_share{suffix}": plot_harm_by_facts(
            harm,
            thresholds,
            "negative_share",
            "Negative shift (share of questions)",
            f"{model}: negative shift (share of {_counted_questions(results)} questions, "
            "trained facts left out)",
        ),
        f"figure_capacity_frontier{suffix}": plot_harm_frontier(
            harm, f"{model}: negative shift against facts learned"
        ),
    }
    for name in names:
        n_questions = int(results[f"{name}_n"].iloc[0])
        figures[f"figure_capacity_{name}_delta{suffix}"] = plot_harm_by_facts(
            harm,
            thresholds,
            f"{name}_delta",
            f"{name} score minus base model",
            f"{model}: {name} against the base model ({n_questions} questions)",
            reference=0.0,
        )
    return figures


def _select_augmentation(table: pd.DataFrame, n_extra_per_unknown, extra_kind) -> pd.DataFrame:
    is_selected = (table["n_extra_per_unknown"] == n_extra_per_unknown) & (
        table["extra_kind"] == extra_kind
    )
    return table[is_selected]


def _capacity_figures(config: StudyConfig, tables: dict, results: pd.DataFrame, names) -> dict:
    """Draw every capacity figure: the threshold curve, then heatmap and harm per augmentation."""
    model = config.model.name_or_path.removeprefix("embedded:")
    train = config.train
    budget = f"{train.n_epochs} epochs, learning rate {train.learning_rate:g}"
    min_reliability = config.analysis.capacity_min_reliability
    figures = {
        "figure_capacity_threshold": plot_threshold_curve(
            tables["thresholds"],
            tables["fit"],
            f"{model}: capacity at reliability >= {min_reliability:g}\n({budget})",
        )
    }
    for (n_extra, kind), curve in tables["reliability"].groupby(AUGMENTATION_KEYS, sort=False):
        suffix = _augmentation_suffix(int(n_extra), kind)
        augmentation = label_augmentation(int(n_extra), kind)
        figures[f"figure_capacity_reliability_heatmap{suffix}"] = plot_reliability_heatmap(
            curve,
            f"{model}: reliability on trained facts, {augmentation}\n"
            f"({config.data.n_prompts} prompts per fact, {budget})",
        )
        subset = {
            name: _select_augmentation(tables[name], n_extra, kind)
            for name in ("harm", "thresholds")
        }
        figures |= _harm_figures(subset, results, names, model, suffix)
    return figures


def make_capacity_outputs(
    config: StudyConfig, results: pd.DataFrame, base_benchmarks: pd.DataFrame
) -> dict[str, pd.DataFrame]:
    """Build, save and return the capacity tables, and save the capacity figures.

    Args:
        config: the study; figures and tables go to config.figures_dir in its figure formats.
        results: results.csv of stage 03, one row per cell, with the adapter columns.
        base_benchmarks: base_benchmarks.csv of stage 03 (name, score, ...).

    Returns:
        The tables "reliability", "thresholds", "fit" and "harm", saved as
        table_capacity_<name>.csv and .md. An empty dict, with nothing written, when the
        results hold fewer than two adapter sizes.
    """
    n_sizes = count_adapter_sizes(results)
    if n_sizes < 2:
        logger.info("Results contain %d adapter size, so capacity outputs are skipped", n_sizes)
        return {}
    train = config.train
    budget = {
        "n_epochs": train.n_epochs,
        "learning_rate": train.learning_rate,
        "batch_size": train.batch_size,
    }
    names = _benchmark_names(results, base_benchmarks)
    curve = reliability_curve(results)
    harm = harm_table(results, base_benchmarks)
    thresholds = capacity_thresholds(curve, config.analysis.capacity_min_reliability, budget).merge(
        harm_onsets(harm, names), on=[*ADAPTER_KEYS, *AUGMENTATION_KEYS], how="left"
    )
    tables = {
        "reliability": curve,
        "thresholds": thresholds,
        "fit": fit_threshold_scaling(thresholds),
        "harm": harm,
    }
    for name, table in tables.items():
        plotting.save_table(
            table.reset_index(drop=True), config.figures_dir, f"table_capacity_{name}"
        )
    formats = config.analysis.figure_formats
    for name, fig in _capacity_figures(config, tables, results, names).items():
        plotting.save_figure(fig, config.figures_dir, name, formats)
    logger.info("Capacity of %d adapter sizes written to %s", n_sizes, config.figures_dir)
    return tables
