import nbformat
import pytest

from kp_utils import runner
from kp_utils.__main__ import main
from kp_utils.runner import NotebookFailed, run_notebook, select_notebooks


def test_select_notebooks_default_all():
    assert select_notebooks(None) == list(runner.NOTEBOOKS)


def test_select_notebooks_by_prefix_in_order():
    assert select_notebooks(["03", "01"]) == ["01_data", "03_eval"]


def test_select_notebooks_unknown_raises():
    with pytest.raises(ValueError, match=r"Unknown notebook\(s\) \['05'\]"):
        select_notebooks(["05"])


def failing_notebook(path):
    parameters = nbformat.v4.new_code_cell('params_path: str = "x.yaml"  # study params file')
    parameters.metadata["tags"] = ["parameters"]
    cells = [
        parameters,
        nbformat.v4.new_code_cell("marker = params_path"),
        nbformat.v4.new_code_cell("raise RuntimeError('boom in ' + marker)"),
    ]
    notebook = nbformat.v4.new_notebook(cells=cells)
    notebook.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nbformat.write(notebook, path)


def test_failing_notebook_names_cell_and_keeps_output(tmp_path):
    source, target = tmp_path / "bad.ipynb", tmp_path / "out" / "bad.ipynb"
    target.parent.mkdir()
    failing_notebook(source)
    with pytest.raises(NotebookFailed) as error:
        run_notebook(source, target, tmp_path / "given.yaml", show_progress=False)
    message = str(error.value)
    assert "bad.ipynb failed in its code cell In [" in message
    assert "RuntimeError" in message
    # The injected parameter reached the notebook: the error text carries the path passed in.
    assert "given.yaml" in message
    assert target.exists()


def test_cli_check_valid_params(capsys):
    assert main(["check", "params/ci.yaml"]) == 0
    assert "valid study 'ci'" in capsys.readouterr().out


def test_cli_bad_params_exit_code(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("study:\n  name: x\n  seed: 0\ntrain:\n  n_unknown: [1]\n  lr: 3\n")
    assert main(["run", str(path)]) == 2
    assert "unknown key(s) ['lr']" in capsys.readouterr().err
