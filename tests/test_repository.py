"""Repository checks: notebooks stripped with one parameters cell, README files present."""

import re
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_four_numbered_notebooks():
    assert [p.stem for p in NOTEBOOKS] == ["01_data", "02_train", "03_eval", "04_analysis"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_stripped(path):
    notebook = nbformat.read(path, as_version=4)
    code_cells = [c for c in notebook.cells if c.cell_type == "code"]
    assert all(c.outputs == [] for c in code_cells)
    assert all(c.execution_count is None for c in code_cells)
    assert notebook.metadata["kernelspec"]["name"] == "python3"
    assert "widgets" not in notebook.metadata


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_one_parameters_cell(path):
    notebook = nbformat.read(path, as_version=4)
    tagged = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    lines = [line for line in tagged[0].source.splitlines() if line.strip()]
    # Literals only, each annotated and commented, so papermill --help-notebook lists them.
    assert all(re.match(r"^\w+: \w+ = .+  # .+", line) for line in lines)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_has_no_personal_paths(path):
    text = path.read_text()
    assert "/root/" not in text
    assert "/home/" not in text


def test_readme_named_files_exist():
    readme = (ROOT / "README.md").read_text()
    names = set(
        re.findall(r"`((?:params|notebooks|kp_utils|benchmarks|tests|figures)/[\w./-]+)`", readme)
    )
    assert names, "the README names no project files"
    missing = sorted(name for name in names if not (ROOT / name).exists())
    assert missing == []
