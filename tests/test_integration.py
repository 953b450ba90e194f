"""End-to-end run of the four notebooks on params/ci.yaml with the real embedded model."""

import pandas as pd
import pytest

from kp_utils.artifacts import RunLayout, read_json
from kp_utils.categories import KnowledgeCategory

pytestmark = pytest.mark.integration

# The ci_run fixture in conftest.py runs the study once per session; other modules reuse it.


def test_ci_facts_and_labels(ci_run):
    layout = RunLayout(ci_run.run_dir)
    facts = pd.read_parquet(layout.facts_path)
    replies = pd.read_parquet(layout.base_replies_path)
    labels = pd.read_parquet(layout.base_labels_path)
    # 4 facts per relation of the embedded base plus 4 TriviaQA questions.
    assert facts["relation"].value_counts().max() == 4
    assert (facts["relation"] == "triviaqa").sum() == 4
    assert len(replies) == len(facts) * ci_run.data.n_prompts
    assert set(labels["fact_id"]) == set(facts["fact_id"])
    assert set(labels["category"]) <= {c.value for c in KnowledgeCategory}
    # SmolLM2 names some capitals correctly, so not every fact can be Unknown.
    assert (labels["category"] != KnowledgeCategory.UNKNOWN.value).any()


def test_ci_table1_counts_all_facts(ci_run):
    table = pd.read_csv(ci_run.figures_dir / "table1_categories.csv")
    facts = pd.read_parquet(RunLayout(ci_run.run_dir).facts_path)
    assert int(table["total"].iloc[0]) == len(facts)


def test_ci_cells_trained(ci_run):
    layout = RunLayout(ci_run.run_dir)
    cells = pd.read_csv(layout.cells_index_path)
    # n_unknown [2] x (no extras + 1 paraphrase + 1 HighlyKnown fact).
    assert len(cells) == 3
    for key in cells["cell_key"]:
        cell_dir = layout.cell_dir(key)
        epochs = pd.read_csv(cell_dir / "epochs.csv")
        assert len(epochs) == ci_run.train.n_epochs
        assert epochs["reliability"].between(0, 1).all()
        assert (cell_dir / "adapter" / "adapter_model.safetensors").exists()
        assert read_json(cell_dir / "done.json")


def test_ci_train_set_sizes(ci_run):
    layout = RunLayout(ci_run.run_dir)
    cells = pd.read_csv(layout.cells_index_path)
    sizes = {
        row.n_extra_per_unknown: len(
            pd.read_parquet(layout.cell_dir(row.cell_key) / "train_set.parquet")
        )
        for row in cells.itertuples()
    }
    assert sizes == {0: 2, 1: 4}


def test_ci_reload_reproduces_final_reliability(ci_run):
    layout = RunLayout(ci_run.run_dir)
    results = pd.read_csv(layout.results_path)
    for row in results.itertuples():
        epochs = pd.read_csv(layout.cell_dir(row.cell_key) / "epochs.csv")
        # Stage 03 reloads the saved adapter and asks the same facts under the same prompts.
        assert row.reliability == pytest.approx(epochs["reliability"].iloc[-1])


def test_ci_results_measures(ci_run):
    layout = RunLayout(ci_run.run_dir)
    results = pd.read_csv(layout.results_path)
    n_facts = len(pd.read_parquet(layout.facts_path))
    assert len(results) == 3
    assert results["positive_share"].between(0, 1).all()
    assert results["negative_share"].between(0, 1).all()
    # Shifts exclude each cell's own training facts: 2 Unknown facts plus its extras.
    assert set(n_facts - results["n_questions"]) <= {2, 3, 4}
    assert (results["mmlu_n"] == 8).all()
    assert (results["truthfulqa_mc2_n"] == 8).all()
    assert results["truthfulqa_mc2"].between(0, 1).all()


def test_ci_base_benchmarks(ci_run):
    base = pd.read_csv(RunLayout(ci_run.run_dir).base_benchmarks_path).set_index("name")
    assert set(base.index) == {"mmlu", "truthfulqa_mc1", "truthfulqa_mc2", "arc_easy"}
    assert (base["n_questions"] == 8).all()
    assert (base["ci_low"] <= base["score"]).all()
    assert (base["score"] <= base["ci_high"]).all()


def test_ci_figures_and_tables(ci_run):
    figures = ci_run.figures_dir
    for name in (
        "figure2_reliability_by_epoch",
        "figure1_truthfulqa_mc1",
        "figure3_mmlu",
        "figure4_truthfulqa_mc2",
    ):
        assert (figures / f"{name}.png").stat().st_size > 1000
    for name in ("table2_reliability", "table3_shifts", "table7_8_benchmarks"):
        assert (figures / f"{name}.csv").exists()
        assert (figures / f"{name}.md").exists()


def test_ci_executed_notebooks_kept(ci_run):
    for name in ("01_data", "02_train", "03_eval", "04_analysis"):
        assert (ci_run.run_dir / f"{name}.ipynb").exists()
