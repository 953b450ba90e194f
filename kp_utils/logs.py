"""Logging setup shared by the notebooks and the command line."""

from __future__ import annotations

import importlib.metadata
import logging
import platform
import subprocess
import sys
from pathlib import Path

from kp_utils.artifacts import write_json
from kp_utils.config import StudyConfig

logger = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
TRACKED_PACKAGES = ("torch", "transformers", "peft", "pandas", "papermill", "knowledge-packing")


def git_commit(folder: Path) -> str:
    """Return the checked-out commit of `folder`, with "+dirty" for local changes, or "unknown"."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=folder,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if status.strip() else "")


def package_versions() -> dict[str, str]:
    """Return the versions of the main libraries, "not installed" where one is missing."""
    versions = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def setup_logging(config: StudyConfig, stage: str, level: int = logging.INFO) -> dict:
    """Send logs to stderr and to <run>/logs/<stage>.log, and record the run's provenance.

    Writes <run>/run_info_<stage>.json with the resolved config, git commit and library versions,
    and logs the same at INFO. Returns that record.
    """
    log_dir = config.run_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    formatter = logging.Formatter(LOG_FORMAT)
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_kp_handler", False):
            root.removeHandler(handler)
    for handler in (
        logging.StreamHandler(sys.stderr),
        logging.FileHandler(log_dir / f"{stage}.log"),
    ):
        handler.setFormatter(formatter)
        handler._kp_handler = True
        root.addHandler(handler)
    root.setLevel(level)
    info = {
        "stage": stage,
        "params_path": config.source_path,
        "git_commit": git_commit(Path(config.project_root)),
        "versions": package_versions(),
        "config": config.to_dict(),
    }
    write_json(info, config.run_dir / f"run_info_{stage}.json")
    logger.info("Stage %s of study %r, params %s", stage, config.study.name, config.source_path)
    logger.info(
        "Model %s, seed %d, commit %s",
        config.model.name_or_path,
        config.study.seed,
        info["git_commit"],
    )
    logger.info("Resolved config: %s", config.to_dict())
    return info
