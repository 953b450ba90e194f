"""Tests for stage 02 helpers that need no model: the per-epoch reliability schedule."""

from __future__ import annotations

import pandas as pd

from kp_utils.config import load_config
from kp_utils.study_train import make_reliability_probe


def test_probe_skips_between_measured_epochs(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text(
        "study: {name: x, seed: 0}\ntrain: {n_unknown: [1], n_epochs: 10, epoch_eval_every: 5}\n"
    )
    config = load_config(str(path))
    train_rows = pd.DataFrame({"fact_id": ["f1"], "is_extra": [False]})
    facts = pd.DataFrame({"fact_id": ["f1"], "question": ["Q?"], "aliases": [["A"]]})
    pool = pd.DataFrame(
        {"fact_id": [f"p{i}" for i in range(8)], "question": ["q"] * 8, "answer": ["a"] * 8}
    )
    probe = make_reliability_probe(config, None, facts, pool, train_rows)
    # Epochs 1-4 and 6-9 are skipped without touching the model, which is None here.
    assert probe(None, 3) == {}
    assert probe(None, 9) == {}
