"""Run-folder layout and crash-safe writes.

Every file goes to a temporary name in its target folder and is then renamed into place. A run
killed at any moment leaves the old file, the new file or a temporary leftover, never a
half-written file under the final name. Tables are parquet or CSV, records JSON: never pickle.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pandas as pd

TEMP_MARK = ".tmp-"  # in every temporary name, so cleanup code can recognise leftovers


def remove_path(path: Path) -> None:
    """Delete a file, link or folder; do nothing if it does not exist."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def write_atomic(path: Path, write: Callable[[Path], None]) -> Path:
    """Write a file or folder through `write(temporary_path)`, then rename it to `path`.

    The temporary name is hidden and sits in the same folder, so the rename stays on one file
    system. A run killed mid-write leaves only ".<name>.tmp-<pid>", never a file under the final
    name. An existing folder at `path` is replaced.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}")
    remove_path(temporary)
    try:
        write(temporary)
        if path.is_dir():
            # os.replace cannot overwrite a non-empty folder.
            shutil.rmtree(path)
        os.replace(temporary, path)
    finally:
        remove_path(temporary)
    return path


def write_parquet(frame: pd.DataFrame, path: Path) -> Path:
    """Write a DataFrame as parquet, atomically."""
    return write_atomic(path, lambda tmp: frame.to_parquet(tmp, index=False))


def write_csv(frame: pd.DataFrame, path: Path, index: bool = False) -> Path:
    """Write a DataFrame as CSV, atomically."""
    return write_atomic(path, lambda tmp: frame.to_csv(tmp, index=index))


def write_json(data, path: Path) -> Path:
    """Write JSON-serialisable data, atomically; paths and numpy scalars become plain values."""
    text = json.dumps(data, indent=2, sort_keys=True, default=_plain)
    return write_atomic(path, lambda tmp: tmp.write_text(text + "\n", encoding="utf-8"))


def read_json(path: Path):
    """Read a JSON file written by `write_json`."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _plain(value):
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (set, frozenset, tuple)):
        return sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    raise TypeError(f"Cannot write {type(value).__name__} as JSON")


class RunLayout:
    """File names inside one study's run folder, derived from the folder alone."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)

    @property
    def data_dir(self) -> Path:
        return self.run_dir / "data"

    @property
    def cells_dir(self) -> Path:
        return self.run_dir / "cells"

    @property
    def eval_dir(self) -> Path:
        return self.run_dir / "eval"

    @property
    def logs_dir(self) -> Path:
        return self.run_dir / "logs"

    @property
    def facts_path(self) -> Path:
        return self.data_dir / "facts.parquet"

    @property
    def exemplar_pool_path(self) -> Path:
        return self.data_dir / "exemplar_pool.parquet"

    @property
    def base_replies_path(self) -> Path:
        return self.data_dir / "base_replies.parquet"

    @property
    def base_labels_path(self) -> Path:
        return self.data_dir / "base_labels.parquet"

    @property
    def base_benchmarks_path(self) -> Path:
        return self.eval_dir / "base_benchmarks.csv"

    @property
    def cells_index_path(self) -> Path:
        return self.run_dir / "cells.csv"

    @property
    def results_path(self) -> Path:
        return self.eval_dir / "results.csv"

    @property
    def failed_cells_path(self) -> Path:
        return self.run_dir / "failed_cells.json"

    def cell_log_path(self, key: str) -> Path:
        return self.logs_dir / "cells" / f"{key}.log"

    def cell_dir(self, key: str) -> Path:
        return self.cells_dir / key
