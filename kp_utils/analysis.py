"""Stage 04: the figures and tables of Pletenev et al. (2025), drawn from a run folder alone."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from kp_utils import capacity, findings, paper, plotting
from kp_utils.artifacts import RunLayout
from kp_utils.categories import KnowledgeCategory
from kp_utils.config import StudyConfig, load_config
from kp_utils.labelling import count_categories

logger = logging.getLogger(__name__)

CELL_FIELDS = ["cell_key", "label", "n_unknown", "n_extra_per_unknown", "extra_kind", "seed"]
# Benchmark columns of results.csv -> axis label; Figures 1, 3 and 4 of Pletenev et al. (2025).
BENCHMARK_FIGURES = {
    "truthfulqa_mc1": ("figure1_truthfulqa_mc1", "TruthfulQA MC1 accuracy"),
    "mmlu": ("figure3_mmlu", "MMLU 5-shot accuracy"),
    "truthfulqa_mc2": ("figure4_truthfulqa_mc2", "TruthfulQA MC2 score"),
    "arc_easy": ("figure_arc_easy", "ARC-Easy accuracy"),
    "arc_challenge": ("figure_arc_challenge", "ARC-Challenge accuracy"),
}


def collect_epochs(run_dir: Path, cells: pd.DataFrame) -> pd.DataFrame:
    """Join every cell's epochs.csv (loss and reliability per epoch) with the cell's fields."""
    frames = []
    for cell in cells.to_dict("records"):
        path = RunLayout(run_dir).cell_dir(cell["cell_key"]) / "epochs.csv"
        if path.exists():
            frames.append(pd.read_csv(path).assign(**{k: cell[k] for k in CELL_FIELDS}))
        else:
            logger.warning("Cell %s has no epochs.csv yet; left out", cell["cell_key"])
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=CELL_FIELDS)


def load_run(config: StudyConfig) -> dict:
    """Read the tables that notebooks 01 to 03 wrote.

    Raises FileNotFoundError naming the missing files when a stage has not run yet.
    """
    layout = RunLayout(config.run_dir)
    required = [
        layout.base_labels_path,
        layout.cells_index_path,
        layout.results_path,
        layout.base_benchmarks_path,
    ]
    missing = [str(path) for path in required if not path.exists()]
    if missing:
        raise FileNotFoundError(f"Run {config.run_dir} lacks {missing}; run notebooks 01-03 first.")
    cells = pd.read_csv(layout.cells_index_path)
    return {
        "base_labels": pd.read_parquet(layout.base_labels_path),
        "base_replies": pd.read_parquet(layout.base_replies_path),
        "cells": cells,
        "results": pd.read_csv(layout.results_path),
        "base_benchmarks": pd.read_csv(layout.base_benchmarks_path),
        "epochs": collect_epochs(config.run_dir, cells),
        "reasons": _reasons_table(config, cells),
    }


def _model_name(config: StudyConfig) -> str:
    return config.model.name_or_path.removeprefix("embedded:")


def has_several_adapters(results: pd.DataFrame) -> bool:
    """Tell whether the grid swept the adapter size (LoRA rank, alpha, modules or layers)."""
    return "adapter" in results and results["adapter"].nunique() > 1


def make_figures(config: StudyConfig, run: dict) -> dict[str, list[Path]]:
    """Draw and save every figure the run's tables support; return the paths per figure.

    A grid that sweeps adapter sizes gets the capacity figures instead of the paper's
    per-augmentation figures, whose lines would otherwise pool different adapter sizes.
    """
    if has_several_adapters(run["results"]):
        logger.info("Several adapter sizes: the capacity figures replace Figures 1-4")
        return {}
    out, formats, model = config.figures_dir, config.analysis.figure_formats, _model_name(config)
    results, base = run["results"], run["base_benchmarks"].set_index("name")
    saved = {}
    if not run["epochs"].empty:
        fig = plotting.plot_reliability_by_epoch(run["epochs"])
        n_prompts = config.train.epoch_eval_n_prompts or config.data.n_prompts
        fig.axes[0].set_title(f"{model}: reliability by epoch ({n_prompts} prompt(s) per fact)")
        fig.axes[0].set_ylim(-0.02, 1.02)  # a share, so the full range keeps flat lines honest
        saved["figure2_reliability_by_epoch"] = plotting.save_figure(
            fig, out, "figure2_reliability_by_epoch", formats
        )
    for column, (name, label) in BENCHMARK_FIGURES.items():
        if column not in results or results[column].isna().all():
            continue
        n_questions = int(results[f"{column}_n"].iloc[0])
        base_value = float(base.loc[column, "score"]) if column in base.index else None
        fig = plotting.plot_metric_vs_facts(
            results, column, label, f"{model}: {label} ({n_questions} questions)", base_value
        )
        saved[name] = plotting.save_figure(fig, out, name, formats)
    for column, label in (
        ("positive_share", "positive shift"),
        ("negative_share", "negative shift"),
    ):
        low, high = int(results["n_questions"].min()), int(results["n_questions"].max())
        counted = f"{low}" if low == high else f"{low}-{high}"
        fig = plotting.plot_metric_vs_facts(
            results,
            column,
            f"Share of questions ({label})",
            f"{model}: {label} (share of {counted} questions, trained facts left out)",
            None,
        )
        saved[f"figure_{column}"] = plotting.save_figure(fig, out, f"figure_{column}", formats)
    if config.analysis.compare_with:
        saved.update(make_model_comparison(config, run))
    logger.info("Saved %d figures to %s", len(saved), out)
    return saved


def _comparison_results(results: pd.DataFrame) -> pd.DataFrame:
    # Figure 5 of Pletenev et al. (2025) follows adapters trained without extras.
    plain = results[results["n_extra_per_unknown"] == 0]
    return plain if len(plain) else results


def make_model_comparison(
    config: StudyConfig, run: dict, metric: str = "truthfulqa_mc1"
) -> dict[str, list[Path]]:
    """Draw Figure 5: `metric` against the number of new facts for this study's model and
    for each study in `analysis.compare_with`, with each base model as a dashed line.

    A compared study whose notebooks 01-03 have not run, or that did not score `metric`, is
    left out with a WARNING. The studies should score the same benchmark questions (same
    seed and subset size) so that their lines compare.
    """
    results_by_model = {_model_name(config): _comparison_results(run["results"])}
    bases = {_model_name(config): _base_score(run["base_benchmarks"], metric)}
    n_questions = (
        {int(run["results"][f"{metric}_n"].iloc[0])} if metric in run["results"] else set()
    )
    for other_path in config.analysis.compare_with:
        other = load_config(str(config.resolve_path(other_path)))
        layout = RunLayout(other.run_dir)
        if not (layout.results_path.exists() and layout.base_benchmarks_path.exists()):
            logger.warning(
                "Study %s has no results in %s; left out of Figure 5",
                other.study.name,
                other.run_dir,
            )
            continue
        results = pd.read_csv(layout.results_path)
        if metric not in results:
            logger.warning(
                "Study %s did not score %s; left out of Figure 5", other.study.name, metric
            )
            continue
        results_by_model[_model_name(other)] = _comparison_results(results)
        bases[_model_name(other)] = _base_score(pd.read_csv(layout.base_benchmarks_path), metric)
        n_questions.add(int(results[f"{metric}_n"].iloc[0]))
    if len(results_by_model) < 2 or metric not in run["results"]:
        logger.warning("Figure 5 needs two studies that scored %s; not drawn", metric)
        return {}
    label = BENCHMARK_FIGURES[metric][1]
    counted = "/".join(str(n) for n in sorted(n_questions))
    fig = plotting.plot_models_vs_facts(
        results_by_model,
        metric,
        label,
        f"{label} by model ({counted} questions)",
        {model: value for model, value in bases.items() if value is not None},
    )
    name = "figure5_models_truthfulqa_mc1"
    return {
        name: plotting.save_figure(fig, config.figures_dir, name, config.analysis.figure_formats)
    }


def _base_score(base_benchmarks: pd.DataFrame, metric: str) -> float | None:
    scores = base_benchmarks.set_index("name")["score"]
    return float(scores[metric]) if metric in scores else None


def _mean_over_seeds(results: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    keys = ["n_unknown", "n_extra_per_unknown", "extra_kind"]
    if has_several_adapters(results):
        keys = ["adapter", *keys]
    present = [c for c in columns if c in results]
    return results.groupby(keys)[present].agg(["mean", "min", "max"]).round(4)


def _benchmark_table(run: dict) -> pd.DataFrame:
    base = run["base_benchmarks"].assign(label="base model")
    rows = [base]
    for record in run["results"].to_dict("records"):
        for name in base["name"]:
            if name in record:
                rows.append(
                    pd.DataFrame(
                        [
                            {
                                "label": record["label"],
                                "name": name,
                                "score": record[name],
                                "ci_low": record[f"{name}_ci_low"],
                                "ci_high": record[f"{name}_ci_high"],
                                "n_questions": record[f"{name}_n"],
                            }
                        ]
                    )
                )
    return pd.concat(rows, ignore_index=True)[
        ["label", "name", "score", "ci_low", "ci_high", "n_questions"]
    ]


def _reasons_table(config: StudyConfig, cells: pd.DataFrame) -> pd.DataFrame:
    frames = []
    for cell in cells.to_dict("records"):
        path = RunLayout(config.run_dir).cell_dir(cell["cell_key"]) / "eval" / "shift_reasons.csv"
        if path.exists():
            frames.append(pd.read_csv(path).assign(label=cell["label"]))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def make_tables(config: StudyConfig, run: dict) -> dict[str, pd.DataFrame]:
    """Build the paper's Tables 1-5, 7 and 8 for this run and save each as CSV and Markdown."""
    results = run["results"]
    tables = {
        "table1_categories": count_categories(run["base_labels"]),
        "table2_reliability": _mean_over_seeds(results, ["reliability", "generalisation"]),
        "table3_shifts": _mean_over_seeds(
            results, ["positive_share", "negative_share", "n_questions"]
        ),
        "table4_refusals_diversity": _mean_over_seeds(
            results,
            [
                "refusals_base",
                "refusals_adapted",
                *[c for c in results if c.startswith("collapse_")],
            ],
        ),
        "table5_shift_reasons": run["reasons"],
        "table_calibration": _mean_over_seeds(results, ["ece_base", "ece_adapted"]),
        "table7_8_benchmarks": _benchmark_table(run),
    }
    for name, table in tables.items():
        flat = table.copy()
        if isinstance(flat.columns, pd.MultiIndex):
            flat.columns = ["_".join(map(str, c)) for c in flat.columns]
        plotting.save_table(
            flat.reset_index() if name != "table5_shift_reasons" else flat, config.figures_dir, name
        )
    return tables


def make_capacity_outputs(config: StudyConfig, run: dict) -> dict[str, pd.DataFrame]:
    """Save the capacity tables and figures when the grid sweeps adapter sizes; else nothing."""
    return capacity.make_capacity_outputs(config, run["results"], run["base_benchmarks"])


def compare_with_paper(config: StudyConfig, run: dict) -> dict[str, pd.DataFrame]:
    """Build and save every side-by-side table: the paper's value, then this run's.

    A grid that sweeps adapter sizes gets none, because the paper trains one adapter size.
    """
    if has_several_adapters(run["results"]):
        logger.info("Several adapter sizes: no side-by-side tables with the paper's rank-1 grid")
        return {}
    tables = paper.compare_with_paper(run)
    for name, table in tables.items():
        plotting.save_table(table, config.figures_dir, name)
    return tables


def findings_checklist(config: StudyConfig, run: dict) -> pd.DataFrame:
    """Check the paper's main claims on this run and save the checklist as CSV and Markdown.

    A grid that sweeps adapter sizes gets an empty checklist, because the claims concern the
    paper's single adapter size.
    """
    if has_several_adapters(run["results"]):
        logger.info("Several adapter sizes: the findings checklist is left to the paper's grid")
        return pd.DataFrame()
    checklist = findings.findings_checklist(config, run)
    plotting.save_table(checklist, config.figures_dir, "findings_checklist")
    return checklist


def shift_examples(
    config: StudyConfig, run: dict, cell_key: str, relation: str | None, shift: str
) -> pd.DataFrame:
    """List the questions of one cell whose category moved in the `shift` direction.

    `shift` is "positive", "negative" or "any". The table shows each question's base and
    adapted categories and its base and adapted answers under the first prompt.
    """
    eval_dir = RunLayout(config.run_dir).cell_dir(cell_key) / "eval"
    adapted = pd.read_parquet(eval_dir / "labels.parquet")
    joined = run["base_labels"].merge(
        adapted, on=["fact_id", "relation", "domain"], suffixes=("_base", "_adapted")
    )
    rank = {c.value: c.rank for c in KnowledgeCategory}
    delta = joined["category_adapted"].map(rank) - joined["category_base"].map(rank)
    keep = {"positive": delta > 0, "negative": delta < 0, "any": delta != 0}[shift]
    joined = joined[keep]
    if relation:
        joined = joined[joined["relation"] == relation]
    adapted_first = _first_prompt_answers(pd.read_parquet(eval_dir / "replies.parquet"))
    base_first = _first_prompt_answers(run["base_replies"]).drop(columns="question")
    table = joined.merge(adapted_first, on="fact_id").merge(
        base_first, on="fact_id", suffixes=("_adapted", "_base")
    )
    return table[
        [
            "fact_id",
            "relation",
            "question",
            "category_base",
            "category_adapted",
            "answer_base",
            "answer_adapted",
        ]
    ]


def _first_prompt_answers(replies: pd.DataFrame) -> pd.DataFrame:
    # The first prompt's answer stands for the question; the others are in replies.parquet.
    first = replies[replies["prompt_index"] == 0][["fact_id", "question", "extracted_answer"]]
    return first.rename(columns={"extracted_answer": "answer"})


def explore(config: StudyConfig, run: dict):
    """Show an interactive explorer of shifted questions; headless runs get a static table.

    The static table (first cell, any relation, any shift) is always displayed, so the
    executed notebook records something readable even without a widget frontend.
    """
    import ipywidgets as widgets
    from IPython.display import display

    cells = run["cells"]
    if cells.empty:
        return None
    first_key = cells["cell_key"].iloc[0]
    display(shift_examples(config, run, first_key, None, "any").head(20))
    relations = ["(all)"] + sorted(run["base_labels"]["relation"].unique())
    cell_picker = widgets.Dropdown(
        options=list(zip(cells["label"], cells["cell_key"])), description="cell"
    )
    relation_picker = widgets.Dropdown(options=relations, description="relation")
    shift_picker = widgets.ToggleButtons(
        options=["any", "positive", "negative"], description="shift"
    )

    def show(cell_key, relation, shift):
        chosen = None if relation == "(all)" else relation
        display(shift_examples(config, run, cell_key, chosen, shift))
        exploded = RunLayout(config.run_dir).cell_dir(cell_key) / "eval" / "exploded_answers.csv"
        if exploded.exists():
            display(pd.read_csv(exploded))

    return widgets.interactive(
        show, cell_key=cell_picker, relation=relation_picker, shift=shift_picker
    )
