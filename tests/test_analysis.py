"""Tests for the analysis stage's two-model comparison (Figure 5)."""

from __future__ import annotations

import logging

import pandas as pd
import pytest

from kp_utils import analysis
from kp_utils.artifacts import RunLayout
from kp_utils.config import load_config

PARAMS = """study:
  name: {name}
  seed: 0
model:
  name_or_path: {model}
train:
  n_unknown: [1, 10]
analysis:
  figure_formats: [png]
  compare_with: {compare_with}
"""


def write_study(root, name: str, model: str, compare_with: list[str], mc1: list[float]):
    """Write a params file and the results tables that notebooks 01-03 would leave."""
    path = root / "params" / f"{name}.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(PARAMS.format(name=name, model=model, compare_with=compare_with))
    config = load_config(str(path))
    layout = RunLayout(config.run_dir)
    layout.eval_dir.mkdir(parents=True)
    results = pd.DataFrame(
        {
            "n_unknown": [1, 10, 10],
            "n_extra_per_unknown": [0, 0, 1],
            "extra_kind": ["none", "none", "paraphrase"],
            "truthfulqa_mc1": mc1,
            "truthfulqa_mc1_n": [60, 60, 60],
        }
    )
    results.to_csv(layout.results_path, index=False)
    base = pd.DataFrame({"name": ["truthfulqa_mc1"], "score": [0.3]})
    base.to_csv(layout.base_benchmarks_path, index=False)
    return config, {"results": results, "base_benchmarks": base}


@pytest.fixture()
def project(tmp_path):
    (tmp_path / "pyproject.toml").write_text("")  # makes tmp_path the project root
    return tmp_path


def test_model_comparison_draws_figure5(project):
    write_study(project, "other", "some/other-model", [], [0.2, 0.25, 0.9])
    config, run = write_study(
        project, "main", "embedded:smollm2-135m-instruct", ["params/other.yaml"], [0.3, 0.28, 0.1]
    )
    saved = analysis.make_model_comparison(config, run)
    paths = saved["figure5_models_truthfulqa_mc1"]
    assert [path.name for path in paths] == ["figure5_models_truthfulqa_mc1.png"]
    assert paths[0].stat().st_size > 0


def test_model_comparison_uses_plain_cells():
    results = pd.DataFrame({"n_extra_per_unknown": [0, 1], "truthfulqa_mc1": [0.3, 0.9]})
    assert list(analysis._comparison_results(results)["truthfulqa_mc1"]) == [0.3]


def test_model_comparison_missing_study_skipped(project, caplog):
    (project / "params").mkdir()
    (project / "params" / "other.yaml").write_text(
        PARAMS.format(name="other", model="x", compare_with=[])
    )
    config, run = write_study(
        project, "main", "embedded:smollm2-135m-instruct", ["params/other.yaml"], [0.3, 0.3, 0.3]
    )
    with caplog.at_level(logging.WARNING):
        saved = analysis.make_model_comparison(config, run)
    assert saved == {}
    assert "has no results" in caplog.text


def test_compare_with_missing_file_raises(project):
    from kp_utils.config import ConfigError

    path = project / "main.yaml"
    path.write_text(PARAMS.format(name="main", model="x", compare_with=["params/none.yaml"]))
    with pytest.raises(ConfigError, match="analysis.compare_with names 'params/none.yaml'"):
        load_config(str(path))
