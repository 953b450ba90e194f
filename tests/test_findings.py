"""Tests for the findings checklist: intervals, verdict rules and each claim's check."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from kp_utils import findings
from kp_utils.artifacts import RunLayout


def test_wilson_interval_known_value():
    # 8 of 10: centre (0.8 + 1.96^2/20) / (1 + 1.96^2/10) = 0.7167, half-width 0.2265.
    low, high = findings.wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-3)
    assert high == pytest.approx(0.9433, abs=1e-3)


def test_wilson_interval_no_trials_nan():
    low, high = findings.wilson_interval(0, 0)
    assert math.isnan(low)
    assert math.isnan(high)


@pytest.mark.parametrize(
    ("low", "high", "sign", "verdict"),
    [
        (-0.2, -0.1, -1, findings.REPRODUCED),
        (0.1, 0.2, -1, findings.CONTRADICTED),
        (-0.1, 0.1, -1, findings.INCONCLUSIVE),
        (0.1, 0.2, +1, findings.REPRODUCED),
        (math.nan, 0.2, +1, findings.INCONCLUSIVE),
    ],
)
def test_sign_verdict_cases(low, high, sign, verdict):
    assert findings._sign_verdict(low, high, sign) == verdict


def cells(**columns) -> pd.DataFrame:
    """Results rows: UK only, +1 Para and +1 HK at n_unknown 10, one seed."""
    base = {
        "cell_key": ["plain", "para", "hk"],
        "n_unknown": [10, 10, 10],
        "n_extra_per_unknown": [0, 1, 1],
        "extra_kind": ["none", "paraphrase", "highly_known"],
        "seed": [0, 0, 0],
        "reliability": [1.0, 1.0, 1.0],
        "n_questions": [1000, 1000, 1000],
        "n_positive": [50, 50, 50],
        "n_negative": [50, 50, 50],
        "refusals_base": [100, 100, 100],
        "refusals_adapted": [0, 0, 0],
        "collapse_base_n_distinct": [100, 100, 100],
        "collapse_adapted_n_distinct": [50, 90, 95],
        "collapse_n_exploded": [3, 0, 0],
    }
    base.update(columns)
    return pd.DataFrame(base)


def test_facts_learned_below_threshold_contradicted():
    finding = findings.check_facts_learned(cells(reliability=[0.2, 0.3, 0.25]), n_prompts=3)
    assert finding.verdict == findings.CONTRADICTED
    assert finding.value == pytest.approx(0.25)


def test_facts_learned_few_facts_inconclusive():
    # All 10 facts learned, but the claim is about hundreds.
    finding = findings.check_facts_learned(cells(), n_prompts=10)
    assert finding.verdict == findings.INCONCLUSIVE
    assert "fewer than the hundreds" in finding.reason


def test_facts_learned_hundreds_reproduced():
    frame = cells(n_unknown=[200, 200, 200])
    assert findings.check_facts_learned(frame, n_prompts=10).verdict == findings.REPRODUCED


def test_highly_known_balance_reproduced():
    frame = cells(n_positive=[50, 50, 200], n_negative=[100, 100, 20])
    finding = findings.check_highly_known_balance(frame)
    assert finding.verdict == findings.REPRODUCED
    # HK: (200 - 20) / 1000 = 0.18; the others: (50 - 100) / 1000 = -0.05.
    assert finding.value == pytest.approx(0.23)


def test_highly_known_balance_equal_inconclusive():
    assert findings.check_highly_known_balance(cells()).verdict == findings.INCONCLUSIVE


def test_highly_known_balance_without_hk():
    frame = cells().iloc[:2]
    assert findings.check_highly_known_balance(frame).verdict == findings.INCONCLUSIVE


def epochs_table(para_curve, plain_curve, n_pairs=2) -> pd.DataFrame:
    rows = []
    for seed in range(n_pairs):
        for kind, n_extra, curve in (("paraphrase", 1, para_curve), ("none", 0, plain_curve)):
            for epoch, reliability in enumerate(curve, start=1):
                rows.append(
                    {
                        "n_unknown": 10,
                        "n_extra_per_unknown": n_extra,
                        "extra_kind": kind,
                        "seed": seed,
                        "epoch": epoch,
                        "reliability": reliability,
                    }
                )
    return pd.DataFrame(rows)


def test_paraphrase_speed_reproduced():
    finding = findings.check_paraphrase_speed(epochs_table([0.5, 1.0], [0.0, 1.0]))
    assert finding.verdict == findings.REPRODUCED
    assert finding.value == pytest.approx(0.25)  # mean 0.75 against mean 0.5


def test_paraphrase_speed_one_pair_inconclusive():
    finding = findings.check_paraphrase_speed(epochs_table([0.5, 1.0], [0.0, 1.0], n_pairs=1))
    assert finding.verdict == findings.INCONCLUSIVE


def test_paired_bootstrap_constant_drop():
    base = np.ones(50)
    change, low, high = findings.paired_bootstrap_change(base, [base - 0.5], 200, seed=0)
    assert change == -0.5
    assert low == -0.5
    assert high == -0.5


def write_benchmark(run_dir, results, base_scores, cell_scores):
    layout = RunLayout(run_dir)
    layout.eval_dir.mkdir(parents=True)
    ids = list(range(len(base_scores)))
    pd.DataFrame({"question_id": ids, "mc1": base_scores}).to_parquet(
        layout.eval_dir / "base_truthfulqa.parquet"
    )
    for key, scores in zip(results["cell_key"], cell_scores, strict=True):
        folder = layout.cell_dir(key) / "eval"
        folder.mkdir(parents=True)
        pd.DataFrame({"question_id": ids, "mc1": scores}).to_parquet(
            folder / "benchmark_truthfulqa.parquet"
        )


def test_benchmark_falls_reproduced(tmp_path):
    results = cells()
    base = [1.0] * 40 + [0.0] * 10
    dropped = [0.0] * 20 + [1.0] * 20 + [0.0] * 10  # 20 of the 40 right answers lost
    write_benchmark(tmp_path, results, base, [dropped] * 3)
    summary = pd.DataFrame({"name": ["truthfulqa_mc1"], "score": [0.8], "ci_low": [0.7]})
    finding = findings.check_benchmark_falls(
        tmp_path, results, summary, "truthfulqa_mc1", n_bootstrap=500, seed=0
    )
    assert finding.value == pytest.approx(-0.4)
    assert finding.verdict == findings.REPRODUCED


def test_benchmark_at_chance_inconclusive(tmp_path):
    results = cells()
    layout = RunLayout(tmp_path)
    layout.eval_dir.mkdir(parents=True)
    pd.DataFrame({"question_id": [0, 1], "is_correct": [1.0, 0.0]}).to_parquet(
        layout.eval_dir / "base_mmlu.parquet"
    )
    for key in results["cell_key"]:
        folder = layout.cell_dir(key) / "eval"
        folder.mkdir(parents=True)
        pd.DataFrame({"question_id": [0, 1], "is_correct": [0.0, 0.0]}).to_parquet(
            folder / "benchmark_mmlu.parquet"
        )
    summary = pd.DataFrame({"name": ["mmlu"], "score": [0.5], "ci_low": [0.0]})
    finding = findings.check_benchmark_falls(tmp_path, results, summary, "mmlu", 200, 0)
    assert finding.verdict == findings.INCONCLUSIVE
    assert "chance" in finding.reason


def test_benchmark_not_scored_inconclusive(tmp_path):
    summary = pd.DataFrame({"name": [], "score": [], "ci_low": []})
    finding = findings.check_benchmark_falls(tmp_path, cells(), summary, "mmlu", 200, 0)
    assert finding.verdict == findings.INCONCLUSIVE


def test_refusals_vanish_reproduced():
    # 100 of 1000 replies refused by the base model, none after training.
    finding = findings.check_refusals_vanish(cells(), n_replies=1000)
    assert finding.verdict == findings.REPRODUCED
    assert finding.value == pytest.approx(-0.1)


def test_refusals_never_refused_inconclusive():
    frame = cells(refusals_base=[0, 0, 0])
    finding = findings.check_refusals_vanish(frame, n_replies=1000)
    assert finding.verdict == findings.INCONCLUSIVE
    assert "never refused" in finding.reason


def test_refusals_small_fall_inconclusive():
    frame = cells(refusals_adapted=[80, 80, 80])
    assert findings.check_refusals_vanish(frame, 1000).verdict == findings.INCONCLUSIVE


def test_collapse_reproduced():
    # The cell without extras keeps 50 of 100 distinct answers and has 3 exploded answers.
    finding = findings.check_collapse(cells())
    assert finding.verdict == findings.REPRODUCED
    assert finding.value == 0.5


def test_collapse_diverse_contradicted():
    frame = cells(collapse_adapted_n_distinct=[99, 90, 95], collapse_n_exploded=[0, 0, 0])
    assert findings.check_collapse(frame).verdict == findings.CONTRADICTED
