"""Ray executor: addresses, retries, failure reports, and the ci grid run through Ray."""

import logging
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from kp_utils import executors, study_train
from kp_utils.artifacts import RunLayout, read_json
from kp_utils.config import ExecutorSection, load_config
from kp_utils.runner import run_study

ROOT = Path(__file__).resolve().parent.parent
# The local run's kernel uses torch's default thread count (2 on a 2-core machine) and each Ray
# task 1 thread, so that two tasks run at once. On the ci study that left training losses,
# replies and categories bitwise equal, but moved greedy-answer probabilities by up to 1.2e-6
# (absolute), because sums inside matrix products were split over other thread counts. With
# cpus_per_cell 2 every value came out bitwise equal. Tolerances sit about tenfold above that.
PROBABILITY_ATOL = 1e-5  # answer probabilities lie in [0, 1]
MEASURE_RTOL = 1e-5  # losses and results.csv measures


def square(value: int) -> int:
    return value * value


def fail_until(attempts_path: str, n_failures: int) -> str:
    """Fail on the first `n_failures` calls, counted in a file, since retries get new processes."""
    path = Path(attempts_path)
    attempt = int(path.read_text()) + 1 if path.exists() else 1
    path.write_text(str(attempt))
    if attempt <= n_failures:
        raise ValueError(f"planned failure on attempt {attempt}")
    return f"succeeded on attempt {attempt}"


@pytest.fixture(scope="module")
def ray_instance():
    """Start a Ray instance with 2 CPUs on this machine through the executor, as stage 02 does."""
    pytest.importorskip("ray")
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv(executors.RAY_ADDRESS_ENV, raising=False)
        with executors.ray_connection(ExecutorSection(kind="ray", local_num_cpus=2)):
            import ray

            yield ray.get_runtime_context().gcs_address


def test_ray_address_params_first(monkeypatch):
    monkeypatch.setenv(executors.RAY_ADDRESS_ENV, "10.0.0.9:6379")
    executor = ExecutorSection(kind="ray", address="ray://head:10001")
    assert executors.ray_address(executor) == "ray://head:10001"


def test_ray_address_from_environment(monkeypatch):
    monkeypatch.setenv(executors.RAY_ADDRESS_ENV, "10.0.0.9:6379")
    assert executors.ray_address(ExecutorSection(kind="ray")) == "10.0.0.9:6379"


def test_ray_address_none_starts_local(monkeypatch):
    monkeypatch.delenv(executors.RAY_ADDRESS_ENV, raising=False)
    assert executors.ray_address(ExecutorSection(kind="ray")) is None


def test_report_failures_writes_and_raises(tmp_path):
    failures = [executors.TaskFailure("uk2-s0-abc", "ValueError: bad cell", "Traceback ...")]
    path = tmp_path / "failed_cells.json"
    with pytest.raises(executors.TasksFailed, match=r"1 of 3 tasks failed") as error:
        executors.report_failures(failures, 3, path)
    assert "uk2-s0-abc: ValueError: bad cell" in str(error.value)
    assert read_json(path) == [
        {"name": "uk2-s0-abc", "error": "ValueError: bad cell", "details": "Traceback ..."}
    ]


def test_report_failures_none_removes_old_file(tmp_path):
    path = tmp_path / "failed_cells.json"
    path.write_text("[]")
    executors.report_failures([], 3, path)
    assert not path.exists()


def test_run_tasks_returns_each_result(ray_instance):
    executor = ExecutorSection(kind="ray", max_retries=0)
    jobs = {f"job{n}": (n,) for n in range(4)}
    results, failures = executors.run_tasks(square, jobs, executor, "squares", False)
    assert results == {"job0": 0, "job1": 1, "job2": 4, "job3": 9}
    assert failures == []


def test_run_tasks_retry_succeeds(ray_instance, tmp_path):
    attempts = tmp_path / "attempts.txt"
    executor = ExecutorSection(kind="ray", max_retries=2)
    results, failures = executors.run_tasks(
        fail_until, {"flaky": (str(attempts), 2)}, executor, "flaky", False
    )
    assert results == {"flaky": "succeeded on attempt 3"}
    assert failures == []


def test_run_tasks_failure_reported_others_finish(ray_instance, tmp_path):
    attempts = tmp_path / "attempts.txt"
    executor = ExecutorSection(kind="ray", max_retries=1)
    jobs = {"broken": (str(attempts), 99), "fine": (str(tmp_path / "other.txt"), 0)}
    results, failures = executors.run_tasks(fail_until, jobs, executor, "mixed", False)
    assert results == {"fine": "succeeded on attempt 1"}
    assert [failure.name for failure in failures] == ["broken"]
    assert failures[0].error == "ValueError: planned failure on attempt 2"
    # One attempt plus max_retries=1 retry.
    assert attempts.read_text() == "2"


def test_check_resources_local_too_small_raises(ray_instance):
    with pytest.raises(ValueError, match="executor.cpus_per_cell=4 CPUs"):
        executors.check_resources(ExecutorSection(kind="ray", cpus_per_cell=4), True)


def test_check_resources_cluster_too_small_warns(ray_instance, caplog):
    executor = ExecutorSection(kind="ray", gpus_per_cell=1.0)
    with caplog.at_level(logging.WARNING, logger="kp_utils.executors"):
        executors.check_resources(executor, False)
    assert "Tasks wait until a node with room joins" in caplog.text


def fake_cell_task(config_data: dict, key: str) -> dict:
    """Stand in for run_cell_task: record the call in the run folder, and fail for "bad" cells."""
    marker = Path(config_data["project_root"]) / f"called-{key}"
    marker.write_text(key)
    if key.startswith("bad"):
        raise RuntimeError(f"cell {key} broke")
    return {"cell_key": key}


def test_grid_on_ray_skips_and_reports(ray_instance, tmp_path, monkeypatch):
    params = {
        "study": {"name": "t", "seed": 0, "run_root": str(tmp_path / "runs")},
        "train": {"n_unknown": [1]},
        "executor": {"kind": "ray", "address": ray_instance, "max_retries": 0},
    }
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(params))
    config = load_config(tmp_path / "t.yaml")
    layout = RunLayout(config.run_dir)
    done = layout.cell_dir("done-cell") / "eval" / "done.json"
    done.parent.mkdir(parents=True)
    done.write_text("{}")
    # Workers import the task by reference, so they run the replacement too.
    monkeypatch.setattr(study_train, "run_cell_task", fake_cell_task)
    cells = dict.fromkeys(["done-cell", "bad-cell", "good-cell"])
    plan = study_train.GridPlan(cells, pd.DataFrame(), pd.DataFrame())

    with pytest.raises(executors.TasksFailed, match="1 of 2 tasks failed") as error:
        study_train.run_grid_on_ray(config, plan)
    assert "bad-cell: RuntimeError: cell bad-cell broke" in str(error.value)
    assert not (tmp_path / "called-done-cell").exists()
    assert (tmp_path / "called-good-cell").exists()
    assert [entry["name"] for entry in read_json(layout.failed_cells_path)] == ["bad-cell"]


# ---------------------------------------------------------------------------------------------
# The ci grid through Ray, against the local run of the same params


def _copy_cell(source: RunLayout, target: RunLayout, key: str, with_eval: bool) -> None:
    ignore = None if with_eval else shutil.ignore_patterns("eval")
    shutil.copytree(source.cell_dir(key), target.cell_dir(key), ignore=ignore)


@pytest.fixture(scope="module")
def ray_ci_run(ci_run, ray_instance, tmp_path_factory):
    """Run notebooks 02 and 03 of the ci study through the Ray instance and return the config.

    Stage 01's tables and the base benchmarks come from the local run, which has the same
    data settings. Of the three cells, the first is copied finished (trained and evaluated)
    and the second trained only, so the Ray run must skip the first, only evaluate the second
    and train and evaluate the third.
    """
    folder = tmp_path_factory.mktemp("ci_ray")
    params = yaml.safe_load((ROOT / "params" / "ci.yaml").read_text())
    params["study"]["run_root"] = str(folder / "runs")
    params["study"]["figures_root"] = str(folder / "figures")
    # Ray tasks get torch.get_num_threads() == cpus_per_cell; 1 lets the two CPUs run two
    # cells at once. The comparisons below show which values must match exactly.
    params["executor"] = {
        "kind": "ray",
        "address": ray_instance,
        "cpus_per_cell": 1,
        "max_retries": 0,
    }
    path = folder / "ci.yaml"
    path.write_text(yaml.safe_dump(params))
    config = load_config(path)

    local, remote = RunLayout(ci_run.run_dir), RunLayout(config.run_dir)
    shutil.copytree(local.data_dir, remote.data_dir)
    remote.eval_dir.mkdir(parents=True)
    for base_file in local.eval_dir.glob("base_*"):
        shutil.copy2(base_file, remote.eval_dir / base_file.name)
    keys = list(pd.read_csv(local.cells_index_path)["cell_key"])
    _copy_cell(local, remote, keys[0], with_eval=True)
    _copy_cell(local, remote, keys[1], with_eval=False)

    run_study(path, only=["02", "03"])
    return config


@pytest.mark.integration
def test_ray_grid_same_cells(ci_run, ray_ci_run):
    local = pd.read_csv(RunLayout(ci_run.run_dir).cells_index_path)
    remote = pd.read_csv(RunLayout(ray_ci_run.run_dir).cells_index_path)
    pd.testing.assert_frame_equal(remote, local)


@pytest.mark.integration
def test_ray_grid_resumes_finished_cells(ci_run, ray_ci_run):
    layout = RunLayout(ray_ci_run.run_dir)
    keys = list(pd.read_csv(layout.cells_index_path)["cell_key"])
    # The finished cell was not sent to Ray: a task writes its log first.
    assert not layout.cell_log_path(keys[0]).exists()
    trained_only_log = layout.cell_log_path(keys[1]).read_text()
    assert "already finished" in trained_only_log
    assert f"Training {keys[1]}:" not in trained_only_log
    assert f"Training {keys[2]}:" in layout.cell_log_path(keys[2]).read_text()
    assert not layout.failed_cells_path.exists()


@pytest.mark.integration
def test_ray_grid_training_matches_local(ci_run, ray_ci_run):
    local, remote = RunLayout(ci_run.run_dir), RunLayout(ray_ci_run.run_dir)
    for key in pd.read_csv(local.cells_index_path)["cell_key"]:
        pd.testing.assert_frame_equal(
            pd.read_parquet(remote.cell_dir(key) / "train_set.parquet"),
            pd.read_parquet(local.cell_dir(key) / "train_set.parquet"),
        )
        local_epochs = pd.read_csv(local.cell_dir(key) / "epochs.csv")
        remote_epochs = pd.read_csv(remote.cell_dir(key) / "epochs.csv")
        assert list(remote_epochs["reliability"]) == list(local_epochs["reliability"])
        local_losses = pd.read_csv(local.cell_dir(key) / "losses.csv")["loss"]
        remote_losses = pd.read_csv(remote.cell_dir(key) / "losses.csv")["loss"]
        assert remote_losses.to_numpy() == pytest.approx(local_losses.to_numpy(), rel=MEASURE_RTOL)


@pytest.mark.integration
def test_ray_grid_labels_match_local(ci_run, ray_ci_run):
    local, remote = RunLayout(ci_run.run_dir), RunLayout(ray_ci_run.run_dir)
    for key in pd.read_csv(local.cells_index_path)["cell_key"]:
        local_labels = pd.read_parquet(local.cell_dir(key) / "eval" / "labels.parquet")
        remote_labels = pd.read_parquet(remote.cell_dir(key) / "eval" / "labels.parquet")
        exact = [column for column in local_labels.columns if column != "mean_greedy_prob"]
        pd.testing.assert_frame_equal(remote_labels[exact], local_labels[exact])
        assert remote_labels["mean_greedy_prob"].to_numpy() == pytest.approx(
            local_labels["mean_greedy_prob"].to_numpy(), rel=0, abs=PROBABILITY_ATOL
        )


@pytest.mark.integration
def test_ray_grid_results_match_local(ci_run, ray_ci_run):
    local = pd.read_csv(RunLayout(ci_run.run_dir).results_path)
    remote = pd.read_csv(RunLayout(ray_ci_run.run_dir).results_path)
    assert list(remote.columns) == list(local.columns)
    counts = [column for column in local.columns if column.startswith("n_")]
    pd.testing.assert_frame_equal(remote[counts], local[counts])
    for column in ("cell_key", "reliability", "positive_share", "negative_share"):
        assert list(remote[column]) == list(local[column])
    # Calibration error and TruthfulQA MC2 are computed from answer probabilities.
    pd.testing.assert_frame_equal(remote, local, check_exact=False, rtol=MEASURE_RTOL)
