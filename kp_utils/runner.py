"""Run a study's notebooks headlessly with Papermill, in pipeline order."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import papermill
from papermill.exceptions import PapermillExecutionError

from kp_utils.artifacts import write_json
from kp_utils.config import load_config

logger = logging.getLogger(__name__)

NOTEBOOKS = ("01_data", "02_train", "03_eval", "04_analysis")
NOTEBOOKS_DIR = Path(__file__).resolve().parent.parent / "notebooks"


class NotebookFailed(RuntimeError):
    """A study notebook raised; the message names the notebook, the cell and the error."""


def select_notebooks(only: list[str] | None) -> list[str]:
    """Return the notebooks to run, in pipeline order; `only` takes names or prefixes like "02"."""
    if not only:
        return list(NOTEBOOKS)
    chosen = [name for name in NOTEBOOKS if any(name.startswith(item) for item in only)]
    unknown = [item for item in only if not any(name.startswith(item) for name in NOTEBOOKS)]
    if unknown:
        raise ValueError(f"Unknown notebook(s) {unknown}; choose from {list(NOTEBOOKS)}")
    return chosen


def run_notebook(source: Path, target: Path, params_path: Path, show_progress: bool) -> None:
    """Execute one notebook with Papermill; the executed copy is kept even when a cell fails."""
    try:
        papermill.execute_notebook(
            str(source),
            str(target),
            parameters={"params_path": str(params_path)},
            cwd=str(source.parent),
            kernel_name="python3",
            progress_bar=show_progress,
            log_output=True,
        )
    except PapermillExecutionError as error:
        raise NotebookFailed(
            f"Notebook {source.name} failed in its code cell In [{error.exec_count}] with "
            f"{error.ename}: {error.evalue}\nThe partly executed notebook is kept at {target}"
        ) from error


def run_study(params_path: str | Path, only: list[str] | None = None) -> Path:
    """Validate the params file, then run the study's notebooks; return the run folder.

    Stops at the first failing notebook with `NotebookFailed`.
    """
    config = load_config(params_path)
    names = select_notebooks(only)
    notebooks_dir = NOTEBOOKS_DIR
    missing = [name for name in names if not (notebooks_dir / f"{name}.ipynb").exists()]
    if missing:
        raise FileNotFoundError(f"Notebooks {missing} not found in {notebooks_dir}")
    config.run_dir.mkdir(parents=True, exist_ok=True)
    write_json(config.to_dict(), config.run_dir / "config.json")
    timings = {}
    for name in names:
        logger.info("Running %s for study %r", name, config.study.name)
        started = time.monotonic()
        run_notebook(
            notebooks_dir / f"{name}.ipynb",
            config.run_dir / f"{name}.ipynb",
            Path(config.source_path),
            config.study.show_progress,
        )
        timings[name] = round(time.monotonic() - started, 1)
        logger.info("%s finished in %.0f s", name, timings[name])
        write_json(timings, config.run_dir / "timings.json")
    logger.info(
        "Study %r done; run folder %s, figures %s",
        config.study.name,
        config.run_dir,
        config.figures_dir,
    )
    return config.run_dir
