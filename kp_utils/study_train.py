"""Stage 02: train the grid of LoRA adapters, skipping cells that already finished."""

from __future__ import annotations

import hashlib
import logging

import pandas as pd
from tqdm.auto import tqdm

from kp_utils.artifacts import RunLayout, write_csv
from kp_utils.categories import KnowledgeCategory
from kp_utils.config import StudyConfig
from kp_utils.prompts import PromptStyle
from kp_utils.study_data import TRIVIAQA_RELATION, ask_study_questions, study_exemplars
from kp_utils.training import (
    build_training_set,
    cell_key,
    cell_label,
    check_grid_feasible,
    expand_grid,
    is_cell_done,
    train_adapter,
)

logger = logging.getLogger(__name__)


def category_pools(facts: pd.DataFrame, labels: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split the labelled facts into the Unknown pool and the HighlyKnown pool.

    The Unknown pool contains fact-base facts only, because TriviaQA questions have no paraphrase
    templates. The HighlyKnown pool lists fact-base facts first and TriviaQA facts after them.
    """
    merged = facts.merge(labels[["fact_id", "category"]], on="fact_id")
    merged["is_trivia"] = merged["relation"] == TRIVIAQA_RELATION
    merged = merged.sort_values(["is_trivia", "fact_id"], kind="stable").drop(columns="is_trivia")
    unknown = merged[
        (merged["category"] == KnowledgeCategory.UNKNOWN.value)
        & (merged["relation"] != TRIVIAQA_RELATION)
    ]
    highly_known = merged[merged["category"] == KnowledgeCategory.HIGHLY_KNOWN.value]
    logger.info("Pools: %d Unknown facts, %d HighlyKnown facts", len(unknown), len(highly_known))
    return unknown.reset_index(drop=True), highly_known.reset_index(drop=True)


def facts_fingerprint(facts: pd.DataFrame, labels: pd.DataFrame) -> str:
    """Hash the fact ids with their base categories, which decide every training set."""
    text = "\n".join(f"{f}\t{c}" for f, c in sorted(zip(labels["fact_id"], labels["category"])))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def make_reliability_probe(
    config: StudyConfig,
    tokenizer,
    facts: pd.DataFrame,
    pool: pd.DataFrame,
    train_rows: pd.DataFrame,
):
    """Return a callback that measures reliability on a cell's Unknown facts after each epoch."""
    n_prompts = config.train.epoch_eval_n_prompts or config.data.n_prompts
    exemplar_sets = study_exemplars(config, pool)[:n_prompts]
    trained_ids = train_rows.loc[~train_rows["is_extra"], "fact_id"]
    questions = facts[facts["fact_id"].isin(trained_ids)]

    def probe(model, epoch: int) -> dict:
        replies = ask_study_questions(config, model, tokenizer, questions, exemplar_sets, False)
        reliability = float(replies["is_correct"].mean())
        logger.info(
            "Epoch %d: reliability %.3f on %d facts x %d prompts",
            epoch,
            reliability,
            len(questions),
            len(exemplar_sets),
        )
        return {"reliability": reliability, "reliability_n_prompts": len(exemplar_sets)}

    return probe


def _index_row(key: str, cell) -> dict:
    return {
        "cell_key": key,
        "label": cell_label(cell),
        "n_unknown": cell.n_unknown,
        "n_extra_per_unknown": cell.n_extra_per_unknown,
        "extra_kind": cell.extra_kind.value if cell.extra_kind else "none",
        "seed": cell.seed,
    }


def train_grid(config: StudyConfig, model, tokenizer, stage01: dict) -> pd.DataFrame:
    """Train every cell of the grid that has not finished yet; return the cell index table."""
    facts, labels, pool = stage01["facts"], stage01["labels"], stage01["pool"]
    unknown, highly_known = category_pools(facts, labels)
    cells = expand_grid(config.train)
    check_grid_feasible(cells, unknown, highly_known)

    layout = RunLayout(config.run_dir)
    style = PromptStyle(config.model.prompt_style)
    fingerprint = facts_fingerprint(facts, labels)
    rows = []
    for cell in tqdm(cells, desc="grid cells", disable=not config.study.show_progress):
        key = cell_key(cell, config.train, config.model.name_or_path, fingerprint, style)
        cell_dir = layout.cell_dir(key)
        rows.append(_index_row(key, cell))
        if is_cell_done(cell_dir):
            logger.info("Cell %s already finished in %s; skipped", cell_label(cell), cell_dir)
            continue

        # train_adapter wipes an unfinished cell folder itself before writing into it.
        train_rows = build_training_set(cell, unknown, highly_known)
        probe = make_reliability_probe(config, tokenizer, facts, pool, train_rows)
        train_adapter(
            model,
            tokenizer,
            train_rows,
            config.train,
            cell_dir,
            style,
            evaluate_epoch=probe,
            seed=cell.seed,
            show_progress=config.study.show_progress,
        )

    index = pd.DataFrame(rows)
    write_csv(index, layout.cells_index_path)
    return index
