"""Stage 03: measure what each adapter learned and what it harmed."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from kp_utils import benchmarks, metrics
from kp_utils.artifacts import RunLayout, read_json, write_csv, write_json, write_parquet
from kp_utils.categories import CATEGORY_RULE_VERSION
from kp_utils.config import StudyConfig
from kp_utils.matching import MATCHING_VERSION
from kp_utils.study_data import ask_study_questions, label_facts, study_exemplars
from kp_utils.training import load_adapter

logger = logging.getLogger(__name__)

# Every results row names the versions of the rules that produced its numbers.
RESULT_VERSIONS = {
    "category_rule_version": CATEGORY_RULE_VERSION,
    "matching_version": MATCHING_VERSION,
    "metrics_version": metrics.METRICS_VERSION,
    "benchmark_version": benchmarks.BENCHMARK_VERSION,
}


def load_benchmark_sets(config: StudyConfig) -> dict[str, pd.DataFrame]:
    """Load the benchmark questions once; a benchmark with n_questions 0 is skipped."""
    cfg, seed = config.eval, config.study.seed
    sets = {}
    if cfg.mmlu_n_questions != 0:
        sets["mmlu"] = benchmarks.load_mmlu(cfg.mmlu_n_questions, seed)
    if cfg.truthfulqa_n_questions != 0:
        questions = benchmarks.load_truthfulqa(str(config.resolve_path(cfg.truthfulqa_source)))
        if cfg.truthfulqa_n_questions is not None:
            logger.warning(
                "TruthfulQA subset: %d of %d questions", cfg.truthfulqa_n_questions, len(questions)
            )
            questions = questions.sample(cfg.truthfulqa_n_questions, random_state=seed)
        sets["truthfulqa"] = questions.reset_index(drop=True)
    if cfg.arc_n_questions != 0:
        for subset in cfg.arc_subsets:
            sets[subset.lower().replace("-", "_")] = benchmarks.load_arc(
                subset, cfg.arc_n_questions, seed
            )
    if cfg.mmlu_n_questions is not None and "mmlu" in sets:
        logger.warning("MMLU subset: %d of 14,042 test questions", len(sets["mmlu"]))
    return sets


def score_benchmarks(
    config: StudyConfig, model, tokenizer, sets: dict[str, pd.DataFrame]
) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    """Score every loaded benchmark; return (summary rows, per-question tables)."""
    cfg, show = config.eval, config.study.show_progress
    per_question, summary = {}, []
    for name, questions in sets.items():
        if name == "mmlu":
            scored = benchmarks.score_mmlu(
                model, tokenizer, questions, cfg.mmlu_n_shots, cfg.batch_size, show
            )
            columns = {"mmlu": "is_correct"}
        elif name == "truthfulqa":
            scored = benchmarks.score_truthfulqa(model, tokenizer, questions, cfg.batch_size, show)
            columns = {"truthfulqa_mc1": "mc1", "truthfulqa_mc2": "mc2"}
        else:
            scored = benchmarks.score_arc(model, tokenizer, questions, cfg.batch_size, show)
            columns = {name: "is_correct"}
        per_question[name] = scored
        for label, column in columns.items():
            summary.append(
                benchmarks.summarise_benchmark(
                    scored, column, label, cfg.n_bootstrap, config.study.seed
                )
            )
    return pd.DataFrame(summary), per_question


def _heldout_questions(facts: pd.DataFrame, fact_ids) -> pd.DataFrame:
    chosen = facts[facts["fact_id"].isin(set(fact_ids))]
    chosen = chosen[chosen["heldout_questions"].map(len) > 0]
    return pd.DataFrame(
        {
            "fact_id": chosen["fact_id"].to_numpy(),
            "question": [q[0] for q in chosen["heldout_questions"]],
            "aliases": chosen["aliases"].to_numpy(),
        }
    )


def measure_adapter(
    config: StudyConfig, model, tokenizer, stage01: dict, train_rows: pd.DataFrame
) -> tuple[dict, dict[str, pd.DataFrame]]:
    """Re-label every question with `model` and compare with the base model.

    Returns a flat dict of scalar measures and the tables behind them.
    """
    facts = stage01["facts"]
    exemplar_sets = study_exemplars(config, stage01["pool"])
    replies, labels, _ = label_facts(config, model, tokenizer, facts, exemplar_sets)
    trained_ids = list(train_rows.loc[~train_rows["is_extra"], "fact_id"])
    heldout = _heldout_questions(facts, trained_ids)
    heldout_replies = ask_study_questions(config, model, tokenizer, heldout, exemplar_sets, False)
    tables = {"replies": replies, "labels": labels, "heldout_replies": heldout_replies}
    return _compare_with_base(
        config, stage01, replies, labels, train_rows, trained_ids, heldout_replies, tables
    )


def _compare_with_base(
    config, stage01, replies, labels, train_rows, trained_ids, heldout_replies, tables
):
    base_labels, base_replies = stage01["labels"], stage01["replies"]
    shifts = metrics.knowledge_shifts(
        base_labels, labels, exclude_fact_ids=set(train_rows["fact_id"])
    )
    collapse, exploded = metrics.answer_collapse(
        base_replies, replies, config.eval.explode_ratio, config.eval.explode_min_count
    )
    train_facts = stage01["facts"][stage01["facts"]["fact_id"].isin(set(train_rows["fact_id"]))]
    tables["shares_by_base_category"] = shifts.pop("shares_by_base_category")
    tables["transition_matrix"] = metrics.transition_matrix(base_labels, labels)
    tables["exploded_answers"] = exploded
    tables["shift_reasons"] = metrics.shift_reasons(
        base_labels,
        labels,
        base_replies,
        replies,
        train_rows,
        train_facts,
        set(exploded["answer"]) if "answer" in exploded else set(),
        exclude_fact_ids=set(train_rows["fact_id"]),
    )
    tables["confidence_by_category"] = _confidence_table(base_labels, base_replies, labels, replies)
    measures = {
        "reliability": metrics.reliability(replies, trained_ids),
        "generalisation": float(heldout_replies["is_correct"].mean())
        if len(heldout_replies)
        else float("nan"),
        **shifts,
        **{f"collapse_{k}": v for k, v in collapse.items()},
        "refusals_base": metrics.count_refusals(base_replies),
        "refusals_adapted": metrics.count_refusals(replies),
        "ece_base": metrics.expected_calibration_error(
            base_replies["greedy_prob"], base_replies["is_correct"]
        ),
        "ece_adapted": metrics.expected_calibration_error(
            replies["greedy_prob"], replies["is_correct"]
        ),
    }
    return measures, tables


def _confidence_table(base_labels, base_replies, labels, replies) -> pd.DataFrame:
    """Join the mean greedy-answer probability per category, base model against adapter."""
    base = metrics.confidence_by_category(base_labels, base_replies).set_index("category")
    adapted = metrics.confidence_by_category(labels, replies).set_index("category")
    return base.join(adapted, lsuffix="_base", rsuffix="_adapted").reset_index()


def _write_tables(out_dir: Path, tables: dict[str, pd.DataFrame]) -> None:
    for name, table in tables.items():
        if name in ("replies", "labels", "heldout_replies"):
            write_parquet(table, out_dir / f"{name}.parquet")
        else:
            write_csv(table, out_dir / f"{name}.csv", index=name == "transition_matrix")


def evaluate_base(config: StudyConfig, model, tokenizer, sets) -> pd.DataFrame:
    """Score the base model on the benchmarks once per run folder and return the summary."""
    layout = RunLayout(config.run_dir)
    if layout.base_benchmarks_path.exists():
        return pd.read_csv(layout.base_benchmarks_path)
    summary, per_question = score_benchmarks(config, model, tokenizer, sets)
    for name, table in per_question.items():
        write_parquet(table, layout.eval_dir / f"base_{name}.parquet")
    write_csv(summary, layout.base_benchmarks_path)
    return summary


def is_cell_evaluated(cell_dir: Path) -> bool:
    """Tell whether a cell's evaluation finished, i.e. <cell>/eval/done.json exists."""
    return (Path(cell_dir) / "eval" / "done.json").exists()


def evaluate_cell(config: StudyConfig, model, tokenizer, stage01: dict, cell: dict, sets) -> dict:
    """Evaluate one trained cell, or read its finished evaluation; return its results row."""
    cell_dir = RunLayout(config.run_dir).cell_dir(cell["cell_key"])
    out_dir = cell_dir / "eval"
    if is_cell_evaluated(cell_dir):
        return read_json(out_dir / "done.json")
    train_rows = pd.read_parquet(cell_dir / "train_set.parquet")
    adapted = load_adapter(model, cell_dir / "adapter")
    measures, tables = measure_adapter(config, adapted, tokenizer, stage01, train_rows)
    summary, per_question = score_benchmarks(config, adapted, tokenizer, sets)
    adapted.unload()
    _write_tables(out_dir, tables)
    for name, table in per_question.items():
        write_parquet(table, out_dir / f"benchmark_{name}.parquet")
    row = {**cell, **measures, **RESULT_VERSIONS}
    for record in summary.to_dict("records"):
        name = record["name"]
        row.update(
            {
                name: record["score"],
                f"{name}_ci_low": record["ci_low"],
                f"{name}_ci_high": record["ci_high"],
                f"{name}_n": record["n_questions"],
            }
        )
    write_json(row, out_dir / "done.json")
    return row


def evaluate_grid(
    config: StudyConfig, model, tokenizer, stage01: dict, cells: pd.DataFrame
) -> pd.DataFrame:
    """Evaluate the base model and every cell; write and return the results table."""
    sets = load_benchmark_sets(config)
    base = evaluate_base(config, model, tokenizer, sets)
    rows = [
        evaluate_cell(config, model, tokenizer, stage01, cell, sets)
        for cell in tqdm(
            cells.to_dict("records"), desc="evaluate cells", disable=not config.study.show_progress
        )
    ]
    results = pd.DataFrame(rows)
    # done.json stores its keys sorted, so a row read back from it and a row just computed list
    # their columns in different orders. Fix one order: the cells.csv columns, then by name.
    measures = sorted(set(results.columns) - set(cells.columns))
    results = results[[column for column in cells.columns if column in results] + measures]
    layout = RunLayout(config.run_dir)
    write_csv(results, layout.results_path)
    logger.info(
        "Results for %d cells written to %s (base benchmarks: %s)",
        len(results),
        layout.results_path,
        ", ".join(base["name"]),
    )
    return results
