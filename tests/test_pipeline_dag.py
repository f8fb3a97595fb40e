"""The pipeline flow runs each stale DVC stage as its own Prefect task, in the DAG's order.

A real git + DVC repo of four shell stages (a -> b, a -> c, b + c -> d), the real flow under
Prefect's test harness, and the task runs read back from the Prefect API.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from flows.pipeline import pipeline

# DVC, asked in-process for its plan, warns about its own use of pygtrie
pytestmark = pytest.mark.filterwarnings("ignore:_NoneStep.value:DeprecationWarning")
DAG = {"a": (), "b": ("a",), "c": ("a",), "d": ("b", "c")}
DVC_YAML = """\
stages:
  a:
    cmd: cp src.txt a.txt
    deps: [src.txt]
    outs: [a.txt]
  b:
    cmd: sh b.sh
    deps: [b.sh, a.txt, b_in.txt]
    outs: [b.txt]
  c:
    cmd: sleep 1 && cat a.txt > c.txt
    deps: [a.txt]
    outs: [c.txt]
  d:
    cmd: cat b.txt c.txt > d.txt
    deps: [b.txt, c.txt]
    outs: [d.txt]
"""
B_SH = "sleep 1 && cat a.txt b_in.txt > b.txt\n"


@pytest.fixture
def toy_repo(tmp_path, monkeypatch) -> Path:
    """A fresh git + DVC repo holding the four stages, as the working directory."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    subprocess.run(["git", "init", "-q"], check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], check=True)
    (tmp_path / "dvc.yaml").write_text(DVC_YAML)
    (tmp_path / "b.sh").write_text(B_SH)
    (tmp_path / "src.txt").write_text("src\n")
    (tmp_path / "b_in.txt").write_text("b\n")
    return tmp_path


def task_runs(state) -> dict:
    """This flow run's task runs by name."""
    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    assert len({r.name for r in runs}) == len(runs), "one task run per stage"
    return {r.name: r for r in runs}


def assert_dag_order(runs: dict) -> None:
    for stage, ups in DAG.items():
        for up in ups:
            if stage in runs and up in runs:
                assert runs[up].end_time <= runs[stage].start_time, (up, stage)


def test_each_stale_stage_is_a_task_and_only_stale_ones_rerun(toy_repo):
    state = pipeline(return_state=True)
    assert state.is_completed()
    runs = task_runs(state)
    assert set(runs) == set(DAG)
    assert {r.state_type.value for r in runs.values()} == {"COMPLETED"}
    assert_dag_order(runs)
    assert (toy_repo / "d.txt").read_text() == "src\nb\nsrc\n"

    state = pipeline(return_state=True)
    assert state.is_completed() and task_runs(state) == {}  # nothing stale, no task

    (toy_repo / "b_in.txt").write_text("b changed\n")
    state = pipeline(return_state=True)
    runs = task_runs(state)
    assert set(runs) == {"b", "d"} and all(r.state.is_completed() for r in runs.values())
    assert_dag_order(runs)
    assert (toy_repo / "d.txt").read_text() == "src\nb changed\nsrc\n"

    # b reruns but writes the same bytes: d is up to date, as in `dvc repro`
    (toy_repo / "b.sh").write_text("# same output\n" + B_SH)
    assert set(task_runs(pipeline(return_state=True))) == {"b"}


def test_targets_run_only_what_they_need(toy_repo):
    assert set(task_runs(pipeline(["b"], return_state=True))) == {"a", "b"}
    assert not (toy_repo / "c.txt").exists()


def test_a_failed_stage_fails_its_task_and_the_flow_and_nothing_downstream_runs(toy_repo):
    (toy_repo / "b.sh").write_text("echo b is broken; exit 3\n")
    state = pipeline(retries=1, return_state=True)
    assert state.is_failed() and "failed: b; not run: c, d" in state.message
    runs = task_runs(state)
    assert set(runs) == {"a", "b"}  # as `dvc repro`: nothing new starts after a failure
    assert runs["b"].state_type.value == "FAILED" and runs["b"].run_count == 2  # one retry

    # --keep-going: what does not depend on b still runs
    state = pipeline(keep_going=True, return_state=True)
    assert state.is_failed() and "failed: b; not run: d" in state.message
    runs = task_runs(state)
    assert set(runs) == {"b", "c"}  # a is up to date now
    assert runs["b"].state_type.value == "FAILED" and runs["c"].state.is_completed()
    assert not (toy_repo / "d.txt").exists()


def test_independent_stages_run_side_by_side_with_jobs(toy_repo):
    state = pipeline(jobs=2, return_state=True)
    assert state.is_completed()
    runs = task_runs(state)
    assert_dag_order(runs)
    b, c = runs["b"], runs["c"]
    assert b.start_time < c.end_time and c.start_time < b.end_time, "b and c overlap"
    assert (toy_repo / "d.txt").read_text() == "src\nb\nsrc\n"
