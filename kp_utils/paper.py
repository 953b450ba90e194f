"""The published numbers of Pletenev et al. (2025), and this run's tables beside them.

The numbers live in `paper_pletenev2025.csv`, one row per published value, with its source and
reading notes in `paper_pletenev2025.source.json` next to it. Metric names are the columns that
stage 03 writes to results.csv, so a paper row and a run row with the same cell (n_unknown,
n_extra_per_unknown, extra_kind) describe the same measurement. n_unknown 0 is the base model.

Absolute values rarely compare across models of 8B and 135M parameters or across 21,036 and a
few hundred questions. So each side-by-side table also carries scale-free columns: category
shares, changes against the base model, and adapted-to-base ratios.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

PAPER_NUMBERS_PATH = Path(__file__).with_name("paper_pletenev2025.csv")
PAPER_SOURCE_PATH = Path(__file__).with_name("paper_pletenev2025.source.json")
PAPER_MODEL = "Llama-3.1-8B-Instruct"
SECOND_PAPER_MODEL = "Mistral-7B-Instruct-v0.3"
CELL_KEYS = ["n_unknown", "n_extra_per_unknown", "extra_kind"]
BASE_N_UNKNOWN = 0  # n_unknown of the base-model rows in both the paper file and run tables
CATEGORIES = ("HighlyKnown", "MaybeKnown", "Unknown")
BENCHMARKS = ("mmlu", "truthfulqa_mc1", "truthfulqa_mc2", "arc_easy", "arc_challenge")
REASONS = ("no_longer_refuses", "exploded_answer", "trained_answer", "trained_domain", "explained")
SHIFT_PREFIXES = {"UK -> HK": "uk_to_hk", "HK -> UK": "hk_to_uk"}

# Output table -> (paper table, paper model, metrics shown side by side).
COMPARISONS = {
    "table1_categories_vs_paper": (
        "Table 1",
        PAPER_MODEL,
        [f"share_{c}" for c in CATEGORIES] + [f"count_{c}" for c in CATEGORIES],
    ),
    "table2_reliability_vs_paper": ("Table 2", PAPER_MODEL, ["reliability"]),
    "table3_shifts_vs_paper": ("Table 3", PAPER_MODEL, ["positive_share", "negative_share"]),
    "table4_refusals_diversity_vs_paper": (
        "Table 4",
        PAPER_MODEL,
        ["refusals_ratio", "distinct_ratio", "mean_count_ratio", "refusals", "n_distinct"],
    ),
    "table5_shift_reasons_vs_paper": (
        "Table 5",
        PAPER_MODEL,
        [f"{prefix}_{reason}" for prefix in SHIFT_PREFIXES.values() for reason in REASONS]
        + [f"{prefix}_n_shifted" for prefix in SHIFT_PREFIXES.values()],
    ),
    "table6_second_model_shifts_vs_paper": (
        "Table 6",
        SECOND_PAPER_MODEL,
        ["positive_share", "negative_share"],
    ),
    "table7_benchmarks_vs_paper": (
        "Table 7",
        PAPER_MODEL,
        [f"{b}_change" for b in BENCHMARKS[:3]] + list(BENCHMARKS[:3]),
    ),
    "table8_arc_vs_paper": ("Table 8", PAPER_MODEL, ["arc_easy", "arc_challenge"]),
}


def load_paper_numbers(path: Path = PAPER_NUMBERS_PATH) -> pd.DataFrame:
    """Read the published numbers (long layout, one row per value)."""
    table = pd.read_csv(path)
    duplicated = table.duplicated(["source_table", "model", *CELL_KEYS, "metric"])
    if duplicated.any():
        raise ValueError(f"{path} repeats {int(duplicated.sum())} (table, cell, metric) rows")
    return table


def load_paper_source(path: Path = PAPER_SOURCE_PATH) -> dict:
    """Read the citation, URL and reading notes of the published numbers."""
    return json.loads(path.read_text(encoding="utf-8"))


def _long(frame: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    present = [m for m in metrics if m in frame]
    return frame.melt(id_vars=CELL_KEYS, value_vars=present, var_name="metric").dropna(
        subset=["value"]
    )


def _base_row_values(run: dict) -> dict:
    """Collect base-model values: category counts, refusals, answer counts, benchmark scores."""
    labels = run["base_labels"]
    values = {f"count_{c}": int((labels["category"] == c).sum()) for c in CATEGORIES}
    first = run["results"].iloc[0] if len(run["results"]) else pd.Series(dtype=float)
    for column in ("refusals_base", "collapse_base_n_distinct", "collapse_base_mean_count"):
        if column in first:
            values[column] = first[column]
    if "collapse_base_std_count" in first:
        values["collapse_base_var_count"] = first["collapse_base_std_count"] ** 2
    for record in run["base_benchmarks"].to_dict("records"):
        values[record["name"]] = record["score"]
    return values


def _reason_values(run: dict) -> pd.DataFrame:
    """Spread the per-cell Table 5 rows into uk_to_hk_* and hk_to_uk_* columns."""
    reasons = run.get("reasons", pd.DataFrame())
    if reasons.empty:
        return pd.DataFrame(columns=["label"])
    rows = []
    for label, group in reasons.groupby("label"):
        row = {"label": label}
        for record in group.to_dict("records"):
            prefix = SHIFT_PREFIXES.get(record["shift"])
            if prefix is None:
                continue
            for column in ("n_shifted", *REASONS):
                row[f"{prefix}_{column}"] = record.get(column, np.nan)
        rows.append(row)
    return pd.DataFrame(rows)


def run_long_table(run: dict) -> pd.DataFrame:
    """Reshape one run into the paper file's long layout, averaging cells over seeds.

    `run` contains the tables of `analysis.load_run`, including "reasons" (the Table 5 rows
    with a `label` column). The base model is the row with n_unknown 0.
    """
    results = run["results"].copy()
    if "collapse_adapted_std_count" in results:
        results["collapse_adapted_var_count"] = results["collapse_adapted_std_count"] ** 2
    reasons = _reason_values(run)
    if len(reasons.columns) > 1:
        results = results.merge(reasons, on="label", how="left")
    numeric = [c for c in results.select_dtypes("number").columns if c not in CELL_KEYS]
    cells = results.groupby(CELL_KEYS, as_index=False)[numeric].mean()
    base = pd.DataFrame(
        [
            {
                "n_unknown": BASE_N_UNKNOWN,
                "n_extra_per_unknown": 0,
                "extra_kind": "none",
                **_base_row_values(run),
            }
        ]
    )
    metrics = sorted(set(cells.columns) | set(base.columns) - set(CELL_KEYS))
    return pd.concat([_long(base, metrics), _long(cells, metrics)], ignore_index=True)


def _add_derived(wide: pd.DataFrame) -> pd.DataFrame:
    """Add the scale-free columns: shares, changes and ratios against the base row."""
    wide = wide.copy()
    base = wide.loc[wide.index.get_level_values("n_unknown") == BASE_N_UNKNOWN]
    base_row = base.iloc[0] if len(base) else pd.Series(dtype=float)
    counts = [f"count_{c}" for c in CATEGORIES if f"count_{c}" in wide]
    if counts:
        total = wide[counts].sum(axis=1)
        for column in counts:
            wide[column.replace("count_", "share_")] = wide[column] / total
    for name in BENCHMARKS:
        if name in wide and name in base_row:
            wide[f"{name}_change"] = wide[name] - base_row[name]
    ratios = {
        "refusals_ratio": ("refusals_adapted", "refusals_base"),
        "distinct_ratio": ("collapse_adapted_n_distinct", "collapse_base_n_distinct"),
        "mean_count_ratio": ("collapse_adapted_mean_count", "collapse_base_mean_count"),
    }
    for name, (adapted, base_column) in ratios.items():
        if adapted in wide and base_column in base_row and base_row[base_column] > 0:
            wide[name] = wide[adapted] / base_row[base_column]
    for name, columns in {
        "refusals": ("refusals_adapted", "refusals_base"),
        "n_distinct": ("collapse_adapted_n_distinct", "collapse_base_n_distinct"),
    }.items():
        present = [c for c in columns if c in wide]
        if present:
            wide[name] = wide[present].bfill(axis=1).iloc[:, 0]
    return wide


def _wide(long: pd.DataFrame) -> pd.DataFrame:
    if long.empty:
        return pd.DataFrame(index=pd.MultiIndex.from_tuples([], names=CELL_KEYS))
    wide = long.pivot_table(index=CELL_KEYS, columns="metric", values="value", aggfunc="first")
    wide.columns.name = None
    return _add_derived(wide)


def side_by_side(
    paper: pd.DataFrame, run_long: pd.DataFrame, table: str, model: str, metrics: list[str]
) -> pd.DataFrame:
    """Put one paper table beside the same metrics of a run, cell by cell.

    Columns come in pairs, `<metric>_paper` then `<metric>_run`. A cell that only one side
    has keeps NaN on the other side. Rows are sorted with the base model first.
    """
    chosen = paper[(paper["source_table"] == table) & (paper["model"] == model)]
    published, ours = _wide(chosen.drop(columns=["source_table", "model"])), _wide(run_long)
    columns = [m for m in metrics if m in published or m in ours]
    joined = (
        published.reindex(columns=columns)
        .add_suffix("_paper")
        .join(ours.reindex(columns=columns).add_suffix("_run"), how="outer")
    )
    ordered = [f"{m}_{side}" for m in columns for side in ("paper", "run")]
    # A row empty on both sides is a cell that neither reports for this table's metrics.
    return joined[ordered].dropna(how="all").sort_index().reset_index()


def compare_with_paper(run: dict, paper: pd.DataFrame | None = None) -> dict[str, pd.DataFrame]:
    """Build every side-by-side table of `COMPARISONS` for one run."""
    paper = load_paper_numbers() if paper is None else paper
    run_long = run_long_table(run)
    tables = {}
    for name, (table, model, metrics) in COMPARISONS.items():
        tables[name] = side_by_side(paper, run_long, table, model, metrics)
    logger.info("Built %d side-by-side tables against %s", len(tables), PAPER_NUMBERS_PATH.name)
    return tables
