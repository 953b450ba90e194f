"""Stage 02: train the grid of LoRA adapters, skipping cells that already finished.

`executor.kind` decides where the cells run: one after another in this process ("local"), or
as Ray tasks that each train one cell and then evaluate it as stage 03 would ("ray").
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import socket
from dataclasses import dataclass

import pandas as pd
import torch
from tqdm.auto import tqdm

from kp_utils import executors
from kp_utils.artifacts import RunLayout, write_csv
from kp_utils.categories import KnowledgeCategory
from kp_utils.config import StudyConfig, config_from_dict
from kp_utils.models import load_model
from kp_utils.prompts import PromptStyle
from kp_utils.study_data import (
    TRIVIAQA_RELATION,
    ask_study_questions,
    load_data_stage,
    study_exemplars,
)
from kp_utils.study_eval import evaluate_cell, is_cell_evaluated, load_benchmark_sets
from kp_utils.training import (
    TrainingCell,
    adapter_label,
    build_training_set,
    cell_key,
    cell_label,
    cell_train_config,
    check_grid_feasible,
    expand_grid,
    format_layers,
    is_cell_done,
    read_cell_result,
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
    """Return a callback that measures reliability on a cell's Unknown facts after an epoch.

    It measures after every `train.epoch_eval_every`-th epoch and after the last one, and
    returns an empty dict after the others.
    """
    n_prompts = config.train.epoch_eval_n_prompts or config.data.n_prompts
    exemplar_sets = study_exemplars(config, pool)[:n_prompts]
    trained_ids = train_rows.loc[~train_rows["is_extra"], "fact_id"]
    questions = facts[facts["fact_id"].isin(trained_ids)]

    def probe(model, epoch: int) -> dict:
        every, last = config.train.epoch_eval_every, config.train.n_epochs
        if epoch % every != 0 and epoch != last:
            return {}
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
        "adapter": adapter_label(cell),
        "lora_rank": cell.lora_rank,
        "lora_alpha": cell.lora_alpha,
        "target_modules": "+".join(cell.target_modules),
        "layers": format_layers(cell.layers),
    }


def _add_trainable_counts(index: pd.DataFrame, layout: RunLayout) -> pd.DataFrame:
    """Add each finished cell's trainable-parameter count, as peft read it from the model."""
    counts = []
    for key in index["cell_key"]:
        result = read_cell_result(layout.cell_dir(key)) or {}
        counts.append(result.get("n_trainable_parameters"))
    return index.assign(n_trainable_parameters=pd.array(counts, dtype="Int64"))


@dataclass(frozen=True)
class GridPlan:
    """A study's grid: every cell by its folder key, in grid order, and the pools they draw from."""

    cells: dict[str, TrainingCell]
    unknown: pd.DataFrame
    highly_known: pd.DataFrame


def plan_grid(config: StudyConfig, stage01: dict) -> GridPlan:
    """Expand the grid, check that the labelled pools can fill every cell, and key each cell."""
    facts, labels = stage01["facts"], stage01["labels"]
    unknown, highly_known = category_pools(facts, labels)
    cells = expand_grid(config.train)
    check_grid_feasible(cells, unknown, highly_known)

    style = PromptStyle(config.model.prompt_style)
    fingerprint = facts_fingerprint(facts, labels)
    keyed = {}
    for cell in cells:
        cell_cfg = cell_train_config(config.train, cell)
        keyed[cell_key(cell, cell_cfg, config.model.name_or_path, fingerprint, style)] = cell
    return GridPlan(keyed, unknown, highly_known)


def train_cell(
    config: StudyConfig, model, tokenizer, stage01: dict, plan: GridPlan, key: str
) -> None:
    """Train the cell `key` of `plan` into its folder, unless it already finished."""
    cell = plan.cells[key]
    cell_dir = RunLayout(config.run_dir).cell_dir(key)
    if is_cell_done(cell_dir):
        logger.info("Cell %s already finished in %s; skipped", cell_label(cell), cell_dir)
        return

    # train_adapter wipes an unfinished cell folder itself before writing into it.
    train_rows = build_training_set(cell, plan.unknown, plan.highly_known)
    probe = make_reliability_probe(config, tokenizer, stage01["facts"], stage01["pool"], train_rows)
    train_adapter(
        model,
        tokenizer,
        train_rows,
        cell_train_config(config.train, cell),
        cell_dir,
        PromptStyle(config.model.prompt_style),
        evaluate_epoch=probe,
        seed=cell.seed,
        show_progress=config.study.show_progress,
    )


def build_cell_index(plan: GridPlan, layout: RunLayout) -> pd.DataFrame:
    """Return the cells.csv table: one row per cell with its grid values and trainable count."""
    rows = [_index_row(key, cell) for key, cell in plan.cells.items()]
    return _add_trainable_counts(pd.DataFrame(rows), layout)


def train_grid(config: StudyConfig, model, tokenizer, stage01: dict) -> pd.DataFrame:
    """Train every cell of the grid that has not finished yet; return the cell index table.

    With `executor.kind: ray` every cell that is not yet evaluated is trained and evaluated by
    a Ray task instead (see `run_grid_on_ray`), and `model` is not used.
    """
    plan = plan_grid(config, stage01)
    if config.executor.kind == "ray":
        run_grid_on_ray(config, plan)
    else:
        for key in tqdm(plan.cells, desc="grid cells", disable=not config.study.show_progress):
            train_cell(config, model, tokenizer, stage01, plan, key)

    layout = RunLayout(config.run_dir)
    index = build_cell_index(plan, layout)
    write_csv(index, layout.cells_index_path)
    return index


def run_grid_on_ray(config: StudyConfig, plan: GridPlan) -> None:
    """Train and evaluate each cell that has no finished evaluation as one Ray task.

    Cells with a finished evaluation are skipped before dispatch, so a restarted driver resumes.
    A task trains its cell unless training already finished, then evaluates it exactly as
    stage 03 would, so stage 03 only collects the results.

    Raises:
        executors.TasksFailed: some cells still failed after executor.max_retries retries.
            The other cells finished, and <run>/failed_cells.json lists each error.
    """
    layout = RunLayout(config.run_dir)
    todo = [key for key in plan.cells if not is_cell_evaluated(layout.cell_dir(key))]
    logger.info(
        "Ray executor: %d of %d cells already evaluated, %d to run",
        len(plan.cells) - len(todo),
        len(plan.cells),
        len(todo),
    )
    # The config goes to the workers as plain data; each worker rebuilds and checks it.
    config_data = config.to_dict()
    jobs = {key: (config_data, key) for key in todo}
    failures = []
    if jobs:
        with executors.ray_connection(config.executor):
            _, failures = executors.run_tasks(
                run_cell_task,
                jobs,
                config.executor,
                "grid cells on Ray",
                config.study.show_progress,
            )
    executors.report_failures(failures, len(jobs), layout.failed_cells_path)


def run_cell_task(config_data: dict, key: str) -> dict:
    """Train the cell `key` and evaluate it as stage 03 would: the body of one Ray task.

    Args:
        config_data: the study config as `StudyConfig.to_dict` returns it.
        key: the cell's folder name, as `plan_grid` keys it.

    Returns:
        The cell's results row, also written to <cell>/eval/done.json.
    """
    config = config_from_dict(config_data)
    # Bars from several workers would interleave in the driver's output; the logs stay.
    config = dataclasses.replace(
        config, study=dataclasses.replace(config.study, show_progress=False)
    )
    layout = RunLayout(config.run_dir)
    executors.require_shared_folder(layout.data_dir)
    # The thread count changes the order of float sums, so it comes from the config rather than
    # from the OMP_NUM_THREADS value that Ray also sets.
    torch.set_num_threads(config.executor.cpus_per_cell)
    with executors.task_logging(layout.cell_log_path(key)):
        stage01 = load_data_stage(config)
        plan = plan_grid(config, stage01)
        if key not in plan.cells:
            raise ValueError(
                f"Cell {key} is not in the grid that node {socket.gethostname()} computes from "
                f"{config.source_path}. The node may run other code than the driver, or stage 01 "
                "changed after the driver started; install the same commit and run the stage again."
            )
        model, tokenizer = load_model(
            config.model.name_or_path,
            config.model.device,
            config.model.dtype,
            config.model.trust_remote_code,
        )
        train_cell(config, model, tokenizer, stage01, plan, key)
        cell_row = _as_read_from_csv(build_cell_index(_single_cell(plan, key), layout))
        sets = load_benchmark_sets(config)
        return evaluate_cell(config, model, tokenizer, stage01, cell_row, sets)


def _single_cell(plan: GridPlan, key: str) -> GridPlan:
    return dataclasses.replace(plan, cells={key: plan.cells[key]})


def _as_read_from_csv(index: pd.DataFrame) -> dict:
    """Return the one row of `index` as stage 03 gets it from cells.csv, with the same types.

    evaluate_cell copies the row into done.json and results.csv, so a Ray task must pass what a
    local stage 03 would pass (say, the Int64 trainable count as a plain int).
    """
    (row,) = pd.read_csv(io.StringIO(index.to_csv(index=False))).to_dict("records")
    return row
