from pathlib import Path

import pandas as pd
import pytest

from kp_utils.artifacts import RunLayout, read_json, write_atomic, write_json, write_parquet


def test_write_atomic_failure_leaves_nothing(tmp_path):
    def write_then_fail(path: Path) -> None:
        path.write_text("partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(tmp_path / "epochs.csv", write_then_fail)
    assert list(tmp_path.iterdir()) == []


def test_write_atomic_replaces_folder(tmp_path):
    target = tmp_path / "adapter"
    target.mkdir()
    (target / "old.txt").write_text("old")
    write_atomic(target, lambda path: (path.mkdir(), (path / "new.txt").write_text("new")))
    assert sorted(item.name for item in target.iterdir()) == ["new.txt"]


def test_write_json_numpy_and_paths(tmp_path):
    import numpy as np

    path = write_json({"n": np.int64(3), "where": Path("/x")}, tmp_path / "a.json")
    assert read_json(path) == {"n": 3, "where": "/x"}


def test_write_parquet_round_trip(tmp_path):
    frame = pd.DataFrame({"fact_id": ["a", "b"], "aliases": [["x"], ["y", "z"]]})
    path = write_parquet(frame, tmp_path / "sub" / "facts.parquet")
    back = pd.read_parquet(path)
    assert list(back["fact_id"]) == ["a", "b"]
    assert list(back["aliases"].iloc[1]) == ["y", "z"]
    assert [p.name for p in path.parent.iterdir()] == ["facts.parquet"]


def test_run_layout_paths(tmp_path):
    layout = RunLayout(tmp_path)
    assert layout.facts_path == tmp_path / "data" / "facts.parquet"
    assert layout.cell_dir("uk1-s0-abc") == tmp_path / "cells" / "uk1-s0-abc"
    assert layout.results_path == tmp_path / "eval" / "results.csv"
