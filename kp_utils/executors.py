"""Run grid cells as Ray tasks: join a cluster, dispatch, retry, collect and report failures.

The local executor needs nothing from here, because stage 02 then loops over the cells itself.
With `executor.kind: ray` each cell becomes one task that requests `executor.cpus_per_cell` CPUs
and `executor.gpus_per_cell` GPUs. Ray reruns a failed task up to `executor.max_retries` times
on any exception or worker crash. A task that still fails is logged, the other tasks go on, and
`report_failures` then stops the stage with every failed task named.

NOTE: tasks read stage 01's tables from the run folder and write their cells into it. So every
Ray node must see the run folder, the project checkout and the model under the same paths (a
shared filesystem), and must have this package installed.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm.auto import tqdm

from kp_utils.artifacts import remove_path, write_json
from kp_utils.config import ExecutorSection
from kp_utils.logs import LOG_FORMAT

logger = logging.getLogger(__name__)

RAY_ADDRESS_ENV = "RAY_ADDRESS"  # the variable ray.init itself reads


class TasksFailed(RuntimeError):
    """Some tasks still failed after their retries; the message names each one with its error."""


@dataclass(frozen=True)
class TaskFailure:
    """A task that failed on its last attempt."""

    name: str
    error: str  # exception type and message
    details: str  # Ray's full error text, with the traceback from the worker


def ray_address(executor: ExecutorSection) -> str | None:
    """Return the Ray cluster to join: executor.address, else $RAY_ADDRESS, else None."""
    return executor.address or os.environ.get(RAY_ADDRESS_ENV) or None


@contextmanager
def ray_connection(executor: ExecutorSection) -> Iterator[None]:
    """Join the configured Ray cluster, or start a Ray instance here; disconnect afterwards.

    A connection that this process already has (say, from the user's own `ray.init`) is used
    as it is and left open.

    Raises:
        ValueError: a Ray instance started here has no room for one cell task.
    """
    import ray  # deferred: the local executor never needs Ray

    if ray.is_initialized():
        check_resources(executor, started_here=False)
        yield
        return
    address = ray_address(executor)
    if address:
        logger.info("Joining the Ray cluster at %s", address)
        ray.init(address=address)
    else:
        logger.info(
            "Starting a Ray instance on this machine with %s CPUs", executor.local_num_cpus or "all"
        )
        # "local" starts a new instance even when another one runs on this machine. The
        # dashboard needs the extra packages of ray[default], which the study does not install.
        ray.init(address="local", num_cpus=executor.local_num_cpus, include_dashboard=False)
    try:
        check_resources(executor, started_here=address is None)
        yield
    finally:
        ray.shutdown()


def check_resources(executor: ExecutorSection, started_here: bool) -> None:
    """Fail when no node of a Ray instance started here fits a cell task; warn on a cluster.

    A cluster may add nodes later (an autoscaler, or a node that is still joining), so there
    the tasks wait. An instance started here never grows, so its tasks would wait forever.
    """
    import ray

    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    if any(
        resources.get("CPU", 0) >= executor.cpus_per_cell
        and resources.get("GPU", 0) >= executor.gpus_per_cell
        for resources in nodes
    ):
        return
    offered = [(node.get("CPU", 0), node.get("GPU", 0)) for node in nodes]
    message = (
        f"No Ray node has executor.cpus_per_cell={executor.cpus_per_cell} CPUs and "
        f"executor.gpus_per_cell={executor.gpus_per_cell} GPUs free for a cell task; "
        f"(CPUs, GPUs) per node: {offered}"
    )
    if started_here:
        raise ValueError(f"{message}. Lower them, or raise executor.local_num_cpus.")
    logger.warning("%s. Tasks wait until a node with room joins the cluster.", message)


def run_tasks(
    function: Callable,
    jobs: dict[str, tuple],
    executor: ExecutorSection,
    desc: str,
    show_progress: bool = True,
) -> tuple[dict[str, object], list[TaskFailure]]:
    """Run `function(*arguments)` as one Ray task per job and collect what each returns.

    Needs a Ray connection (see `ray_connection`). Interrupting the wait, or any error in it,
    cancels the tasks still running, so that a rerun does not train a cell twice at once.

    Args:
        function: a module-level function, which workers import by name.
        jobs: job name -> arguments. Plain data (dicts, strings, numbers) travels best.
        executor: the resources and retries of each task.
        desc: label of the progress bar, which advances as tasks finish.

    Returns:
        (return value by job name, failures after retries, in the order they finished).
    """
    import ray

    remote = ray.remote(
        num_cpus=executor.cpus_per_cell,
        num_gpus=executor.gpus_per_cell,
        max_retries=executor.max_retries,
        retry_exceptions=True,
    )(function)
    pending = {remote.options(name=name).remote(*args): name for name, args in jobs.items()}
    results, failures = {}, []
    try:
        with tqdm(total=len(pending), desc=desc, disable=not show_progress) as bar:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                name = pending.pop(ready[0])
                try:
                    results[name] = ray.get(ready[0])
                except ray.exceptions.RayError as error:
                    failures.append(_describe_failure(name, error))
                    logger.error(
                        "Task %s failed after %d retries: %s",
                        name,
                        executor.max_retries,
                        error,
                    )
                bar.update()
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)
    return results, failures


def _describe_failure(name: str, error: Exception) -> TaskFailure:
    # A RayTaskError carries the exception raised in the task as `cause`; a crashed worker or
    # a lost node gives a Ray error without one.
    cause = getattr(error, "cause", None) or error
    return TaskFailure(name, f"{type(cause).__name__}: {cause}", str(error))


def report_failures(failures: list[TaskFailure], n_tasks: int, path: Path) -> None:
    """Write the failed tasks to `path` and raise TasksFailed naming each one.

    Without failures, a `path` left by an earlier attempt is removed, so it always describes
    the latest run.
    """
    if not failures:
        remove_path(Path(path))
        return
    write_json([asdict(failure) for failure in failures], path)
    listing = "\n".join(f"  {failure.name}: {failure.error}" for failure in failures)
    raise TasksFailed(
        f"{len(failures)} of {n_tasks} tasks failed after their retries:\n{listing}\n"
        f"Tracebacks are in {path}. Finished tasks are kept; run the stage again to retry the "
        "failed ones."
    )


def require_shared_folder(folder: Path) -> None:
    """Raise FileNotFoundError when a task's node cannot see `folder`, naming the node."""
    if not Path(folder).is_dir():
        raise FileNotFoundError(
            f"{folder} not found on node {socket.gethostname()}. Ray tasks need the run folder "
            "under the same path on every node, e.g. on a shared filesystem."
        )


@contextmanager
def task_logging(log_path: Path) -> Iterator[None]:
    """Send a task's INFO logs to `log_path` and to stderr, which Ray forwards to the driver.

    A Ray worker process runs many tasks in turn, so the handlers are removed when the task ends.
    """
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    handlers = [logging.StreamHandler(sys.stderr), logging.FileHandler(log_path)]
    previous_level = root.level
    for handler in handlers:
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    logger.info("Task log of %s on node %s", Path(log_path).stem, socket.gethostname())
    try:
        yield
    finally:
        for handler in handlers:
            root.removeHandler(handler)
            handler.close()
        root.setLevel(previous_level)
