"""The real `dvc repro` in a temporary git repo: full run, no-op rerun, and exactly the right
rerun sets."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from datetime import datetime
from pathlib import Path

import pytest
import yaml

import miniatures
from conftest import REPO, jpeg_bytes, make_imagefolder

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """One local Prefect server for every stage of every repro (cheaper than one per process)."""
    home = tmp_path_factory.mktemp("prefect_home")
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_API_URL": ""}
    proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                             "--port", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        raise RuntimeError("prefect server did not start")
    yield {"PREFECT_API_URL": url, "PREFECT_HOME": str(home)}
    proc.terminate()
    proc.wait(timeout=30)


def tiny_params() -> dict:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["models"] = {"lite0": params["models"]["lite0"]}
    params["variants"] = {"lite0": "models"}
    params["sources"] = {
        "package_photos": {**params["sources"]["package_photos"], "views": 8, "max_side": 64},
        "mine": {"kind": "imagefolder", "path": "mine_images"},
        # a miniature GLR2021 as Kaggle ships it, from an archive: extracted safely, most
        # populous classes
        "glr": {"kind": "landmarks", "uri": "glr_mini.tar.gz"},
    }
    params["sample"].update(samples=4, num_classes={"package_photos": 8, "mine": 4, "glr": 4},
                            pick={"glr": "most_populous"})
    params["shard"].update(max_samples=16, max_side=64)
    params["extract"].update(batch_size=16, num_workers=0)
    params["train"].update(epochs=2, batch_size=16)
    params["evaluate"].update(pca_dim=8)
    return params


def run(repo: Path, env: dict, *args: str) -> str:
    proc = subprocess.run([str(BIN / "dvc"), *args], cwd=repo, env=env, capture_output=True,
                          text=True)
    assert proc.returncode == 0, f"dvc {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


# `inputs` is always_changed: it runs on every repro (in seconds), fingerprinting what download
# and models read from outside the project; the stages it guards run only when a fingerprint moved.
ALWAYS = {"inputs"}


def ran(output: str) -> set[str]:
    """The stages a repro ran, besides `inputs` (test_full_repro_then_noop checks it ran)."""
    return set(re.findall(r"Running stage '([^']+)'", output)) - ALWAYS


def up_to_date(status: str) -> bool:
    """`dvc status` lists nothing stale but `inputs`, which it lists as always changed."""
    return status.split() == ["inputs:", "always", "changed"]


def set_param(repo: Path, section: str, key: str, value) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params[section][key] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="module")
def repo(tmp_path_factory, prefect_server) -> tuple[Path, dict]:
    repo = tmp_path_factory.mktemp("repo")
    for name in ("flows", "tasks"):
        shutil.copytree(REPO / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", repo / "dvc.yaml")
    shutil.copy(REPO / ".gitignore", repo / ".gitignore")
    (repo / "params.yaml").write_text(yaml.safe_dump(tiny_params(), sort_keys=False))
    make_imagefolder(repo / "mine_images", classes=4, per_class=3,
                     size=(48, 40))  # + broken: 4 <= samples
    (repo / "mine_images" / "class_00" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    glr = tmp_path_factory.mktemp("glr")
    miniatures.landmarks(glr, sizes=(6, 5, 4, 4, 2, 1))
    miniatures.tar_gz(glr, repo / "glr_mini.tar.gz", top="landmark-recognition-2021")
    env = {**os.environ, **prefect_server, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True, env=env)
    run(repo, env, "init", "-q")
    # the project's plot templates
    shutil.copytree(REPO / ".dvc" / "plots", repo / ".dvc" / "plots")
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True, env=env)
    subprocess.run(["git", "commit", "-qm", "init"], cwd=repo, check=True, env=env)
    return repo, env


def test_full_repro_then_noop(repo):
    path, env = repo
    out = run(path, env, "repro")
    assert ran(out) == {"models@lite0", "download@package_photos", "download@mine", "download@glr",
                        "sample", "shard", "extract@lite0", "train", "evaluate", "sweep", "export"}
    metrics = json.loads((path / "data/06_eval/metrics.json").read_text())
    lines = {"zero_shot_pca8_lite0", "zero_shot_pca8_concat", "head"}
    for group in ("validation", "test"):  # scored apart, every score with its interval
        assert metrics[group]["queries"] > 0 and set(metrics[group]["lines"]) == lines
        for line in metrics[group]["lines"].values():
            assert all(0.0 <= s["low"] <= s["mP@5"] <= s["high"] <= 1.0 for s in line.values())
    assert "NaN" not in (path / "data/06_eval/metrics.json").read_text()
    assert "NaN" not in (path / "data/05_head/metrics.json").read_text()
    # the truncated JPEG in the user's folder was recorded, not fatal
    rejects = subprocess.run([sys.executable, "-c", "import polars as pl; print(pl.read_parquet("
                              "'data/03_shards/rejects.parquet')['path'].to_list())"],
                             cwd=path, capture_output=True, text=True, check=True).stdout
    assert "broken.jpg" in rejects
    # the landmarks archive: extracted, its missing file recorded, its four most populous
    # classes sampled
    script = ("import polars as pl; "
              "m = pl.read_parquet('data/02_sampled/manifest.parquet')"
              ".filter(pl.col('source') == 'glr'); "
              "print(sorted(m['label'].unique().to_list())); "
              "print(pl.read_parquet('data/01_raw/glr/skipped.parquet')['reason'].to_list())")
    tables = subprocess.run([sys.executable, "-c", script], cwd=path, capture_output=True,
                            text=True, check=True).stdout.splitlines()
    assert tables == ["['1000', '1001', '1002', '1003']", "['listed in the table but not found']"]

    again = run(path, env, "repro")
    assert ran(again) == set() and "Running stage 'inputs'" in out + again
    assert up_to_date(run(path, env, "status"))

    shown = run(path, env, "metrics", "show")
    assert "test.lines.head.all.mP@5" in shown and "train_acc" in shown
    run(path, env, "plots", "show", "-o", "plots_out")
    assert (path / "plots_out" / "index.html").is_file()
    plots = json.loads(subprocess.run([str(BIN / "dvc"), "plots", "show", "--json"], cwd=path,
                                      env=env, capture_output=True, text=True, check=True).stdout)
    assert not plots.get("errors"), plots["errors"]
    curves = (path / "data/06_eval/precision_at_k.csv").read_text().splitlines()
    depth = min(10, metrics["test"]["index"])
    assert curves[0] == "model,k,precision" and len(curves) == 1 + 3 * depth
    drawn = {(p["model"], p["k"])
             for p in plots["data"]["precision_at_k"][0]["content"]["data"]["values"]}
    assert drawn == {(m, str(k)) for m in metrics["test"]["lines"] for k in range(1, depth + 1)}
    assert (path / "data/06_eval/gallery.png").stat().st_size > 0
    sweep = json.loads((path / "data/08_sweep/sweep.json").read_text())
    assert sweep["baseline"] == "train" and sweep["chosen"] in sweep["recipes"]
    assert set(sweep["recipes"]) > {"train"}
    exported = json.loads((path / "data/07_export/embedder.json").read_text())
    assert exported["max_abs_diff_vs_pipeline"] <= 1e-3


REPEATABLE = ["data/05_head/head.safetensors", "data/05_head/head.json",
              "data/05_head/metrics.json", "data/05_head/history.csv",
              "data/06_eval/metrics.json", "data/06_eval/metrics.md",
              "data/06_eval/gallery.png", "data/06_eval/precision_at_k.csv",
              "data/08_sweep/sweep.json"]


def test_train_and_evaluate_rerun_give_the_same_bytes(repo):
    """Forced reruns of train, evaluate and sweep, under another OpenMP thread count, write the
    same bytes, so dvc.lock does not change without a cause."""
    path, env = repo
    before = {name: (path / name).read_bytes() for name in REPEATABLE}
    threads = {**env, "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
    for stage in ("train", "evaluate", "sweep"):
        assert ran(run(path, threads, "repro", "-f", "-s", stage)) == {stage}
    after = {name: (path / name).read_bytes() for name in REPEATABLE}
    assert [n for n in REPEATABLE if before[n] != after[n]] == []
    assert up_to_date(run(path, env, "status"))


def test_epochs_change_reruns_train_and_what_follows_only(repo):
    path, env = repo
    set_param(path, "train", "epochs", 3)
    assert ran(run(path, env, "repro")) == {"train", "evaluate", "sweep", "export"}


def shard_images(path: Path) -> int:
    index = json.loads((path / "data/03_shards/index.json").read_text())
    return sum(e["nsamples"] for e in index["shardlist"])


def test_samples_change_reruns_from_sample_on_and_embeds_only_new_images(repo):
    path, env = repo
    before = shard_images(path)
    set_param(path, "sample", "samples", 5)
    out = run(path, env, "repro")
    assert ran(out) == {"sample", "shard", "extract@lite0", "train", "evaluate", "sweep", "export"}
    after = shard_images(path)
    assert after > before
    # DVC reran extract (its shards changed); the stage embedded only the images it had not seen
    counts = re.search(r"extract\[lite0\]: (\d+) images from \d+ shards .*: (\d+) embedded, "
                       r"(\d+) from the cache", out)
    assert counts, out[-3000:]
    assert tuple(map(int, counts.groups())) == (after, after - before, before)
    assert ran(run(path, env, "repro")) == set()
    assert up_to_date(run(path, env, "status"))


def test_an_image_added_to_a_users_folder_reruns_its_download_and_what_follows(repo):
    """The folder is outside DVC's view; its fingerprint (data/00_inputs) is what DVC sees."""
    path, env = repo
    assert up_to_date(run(path, env, "status"))
    extra = path / "mine_images" / "class_01" / "img_new.jpg"
    extra.write_bytes(jpeg_bytes(4242, (48, 40)))
    assert ran(run(path, env, "repro")) == {"download@mine", "sample", "shard", "extract@lite0",
                                            "train", "evaluate", "sweep", "export"}
    catalog = subprocess.run([sys.executable, "-c", "import polars as pl; print(pl.read_parquet("
                              "'data/01_raw/mine/catalog.parquet')['path'].to_list())"],
                             cwd=path, capture_output=True, text=True, check=True).stdout
    assert "img_new.jpg" in catalog
    assert ran(run(path, env, "repro")) == set()


def test_invalid_params_stop_before_any_work(repo):
    path, env = repo
    set_param(path, "sample", "samples", 0)
    proc = subprocess.run([str(BIN / "dvc"), "repro"], cwd=path, env=env, capture_output=True,
                          text=True)
    assert proc.returncode != 0
    assert "sample.samples = 0: allowed is a value >= 1" in proc.stdout + proc.stderr
    set_param(path, "sample", "samples", 5)
    set_param(path, "sample", "num_classes", {"package_photos": 8, "mine": 9, "glr": 4})
    proc = subprocess.run([str(BIN / "dvc"), "repro"], cwd=path, env=env, capture_output=True,
                          text=True)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert ("sample.num_classes.mine = 9: source 'mine' has 4 classes with >= 2 images "
            "(sample.min_images); allowed is 2..4") in out
    assert "Traceback" not in out
    set_param(path, "sample", "num_classes", {"package_photos": 8, "mine": 4, "glr": 4})


def when(run: dict, key: str) -> datetime:
    return datetime.fromisoformat(run[key])


def pipeline_task_runs(env: dict) -> tuple[dict, dict]:
    """The latest run of the pipeline flow started by hand (not by a deployment, whose
    schedules leave runs in the future), and its task runs by name."""
    (flow_run,) = api(env, "flow_runs/filter", {
        "flows": {"name": {"any_": ["pipeline"]}},
        "flow_runs": {"deployment_id": {"is_null_": True}},
        "sort": "START_TIME_DESC", "limit": 1})
    tasks = api(env, "task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run["id"]]}}})
    assert len({t["name"] for t in tasks}) == len(tasks), "one task run per stage"
    return flow_run, {t["name"]: t for t in tasks}


def test_pipeline_flow_runs_repro_and_publishes_metrics(repo):
    """`python -m flows.pipeline` brings DVC up to date, one Prefect task per stale stage, and
    leaves the table as a Prefect artifact."""
    path, env = repo
    set_param(path, "train", "epochs", 2)
    proc = subprocess.run([sys.executable, "-m", "flows.pipeline"], cwd=path, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout + proc.stderr
    assert ran(out) == {"train", "evaluate", "sweep", "export"} and "| head |" in out
    # each stale stage is its own task run, named after it, Completed, upstream first: those
    # that ran, and those DVC restored from its run cache (sample: the failed repro of
    # test_invalid_params_stop_before_any_work removed its outputs)
    _, tasks = pipeline_task_runs(env)
    restored = set(re.findall(r"Stage '([^']+)' is cached - skipping run", out))
    assert set(tasks) == {"train", "evaluate", "sweep", "export"} | ALWAYS | restored
    assert {t["state_type"] for t in tasks.values()} == {"COMPLETED"}
    for up, down in [("inputs", "train"), ("train", "evaluate"), ("train", "export")]:
        assert when(tasks[up], "end_time") <= when(tasks[down], "start_time"), (up, down)
    query = json.dumps({"artifacts": {"key": {"any_": ["guie-pipeline-metrics"]}}}).encode()
    req = urllib.request.Request(f"{env['PREFECT_API_URL']}/artifacts/filter", data=query,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        artifacts = json.loads(resp.read())
    assert artifacts and "| head |" in artifacts[0]["data"]
    diff = api(env, "artifacts/filter",
               {"artifacts": {"key": {"any_": ["guie-pipeline-metrics-diff"]}}})
    assert diff and "previous mP@5" in diff[0]["data"]
    # every stage's flow runs reported to the same server, all Completed
    flows = {f["id"]: f["name"] for f in api(env, "flows/filter", {})}
    runs = api(env, "flow_runs/filter", {"limit": 200})
    by_flow: dict[str, set[str]] = {}
    for r in runs:
        by_flow.setdefault(flows[r["flow_id"]], set()).add(r["state_type"])
    assert set(by_flow) >= {"models", "download", "sample", "shard", "extract", "train", "evaluate",
                           "sweep", "export", "pipeline"}
    assert all(states == {"COMPLETED"} for states in by_flow.values()), by_flow


def api(env: dict, route: str, body: dict):
    req = urllib.request.Request(f"{env['PREFECT_API_URL']}/{route}",
                                 data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def git(repo: Path, env: dict, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, env=env, check=True, capture_output=True,
                          text=True).stdout


def test_ci_reevaluation_reports_params_and_metric_changes(repo, tmp_path):
    """The script the GitHub workflow calls, on a base branch and a params change."""
    path, env = repo
    git(path, env, "add", "-A")
    git(path, env, "commit", "-qm", "base")
    git(path, env, "branch", "-f", "base")
    set_param(path, "train", "epochs", 4)
    summary = tmp_path / "summary.md"
    proc = subprocess.run([sys.executable, str(REPO / ".ci" / "reevaluate.py"), "--base", "base",
                           "--output", str(tmp_path / "report.md")],
                          cwd=path, env={**env, "GITHUB_STEP_SUMMARY": str(summary)},
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert ran(proc.stdout + proc.stderr) == {"train", "evaluate", "sweep", "export"}
    report = (tmp_path / "report.md").read_text()
    assert summary.read_text() == report
    assert re.search(r"\|\s*params.yaml\s*\|\s*train.epochs\s*\|\s*2\s*\|\s*4\s*\|", report), report
    assert "test.lines.head.all.mP@5" in report and "train_loss" in report
    assert "No DVC remote configured" in report
    git(path, env, "checkout", "-q", "--", "params.yaml")
    run(path, env, "repro")


def test_team_remote_round_trip_and_ci_recomputes_only_what_changed(repo, tmp_path):
    """Push outputs and run-cache to a folder remote; a teammate's fresh clone pulls them and
    has nothing to run; CI on a params change pulls, reruns only the stale stages and pushes."""
    path, env = repo
    remote = tmp_path / "remote"
    run(path, env, "repro")
    git(path, env, "add", "-A")
    git(path, env, "commit", "-qm", "shared", "--allow-empty")
    run(path, env, "remote", "add", "--local", "--default", "team", str(remote))
    run(path, env, "push", "--run-cache")

    teammate = tmp_path / "teammate"
    git(tmp_path, env, "clone", "-q", str(path), str(teammate))
    run(teammate, env, "remote", "add", "--local", "--default", "team", str(remote))
    run(teammate, env, "pull", "--run-cache")
    assert up_to_date(run(teammate, env, "status"))
    assert ran(run(teammate, env, "repro")) == set()

    ci = tmp_path / "ci"
    git(tmp_path, env, "clone", "-q", str(path), str(ci))
    set_param(ci, "train", "epochs", 5)
    proc = subprocess.run([sys.executable, str(REPO / ".ci" / "reevaluate.py"), "--base", "HEAD",
                           "--output", str(tmp_path / "report.md")], cwd=ci,
                          env={**env, "DVC_REMOTE_URL": str(remote)}, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert ran(proc.stdout + proc.stderr) == {"train", "evaluate", "sweep", "export"}
    report = (tmp_path / "report.md").read_text()
    assert "Pulled from DVC remote `ci`" in report and "export, sweep, train" in report
    # what CI computed is on the remote now
    assert "in sync" in run(ci, env, "status", "--cloud")


def test_dvc_experiments_run_and_show_metrics(repo):
    path, env = repo
    run(path, env, "exp", "run", "-S", "train.epochs=3", "-n", "epochs3")
    shown = json.loads(run(path, env, "exp", "show", "--json"))
    text = json.dumps(shown)
    assert "epochs3" in text and "mP@5" in text


def wait_for(predicate, timeout: float = 90.0, step: float = 1.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError("condition not met in time")


def test_serve_registers_a_scheduled_deployment(repo):
    path, env = repo
    proc = subprocess.Popen([sys.executable, "-m", "flows.pipeline", "serve", "--cron",
                             "17 3 * * 1", "--name", "served"],
                            cwd=path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deployments = wait_for(lambda: [d for d in api(env, "deployments/filter", {})
                                        if d["name"] == "served"])
        crons = [s["schedule"].get("cron") for s in deployments[0]["schedules"]]
        assert crons == ["17 3 * * 1"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_prefect_yaml_deployment_runs_through_a_work_pool(repo):
    """`prefect deploy` from prefect.yaml, then a process worker executes a run of it."""
    path, env = repo
    shutil.copy(REPO / "prefect.yaml", path / "prefect.yaml")
    prefect = str(BIN / "prefect")
    subprocess.run([prefect, "work-pool", "create", "guie-local", "--type", "process"], cwd=path,
                   env=env, check=True, capture_output=True)
    deploy = subprocess.run([prefect, "--no-prompt", "deploy", "--all"], cwd=path,
                            capture_output=True, text=True,
                            env={**env, "GUIE_PROJECT_DIR": str(path)})
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr
    nightly = [d for d in api(env, "deployments/filter", {}) if d["name"] == "nightly"][0]
    assert nightly["work_pool_name"] == "guie-local"
    assert [s["schedule"]["cron"] for s in nightly["schedules"]] == ["0 3 * * *"]
    run = api(env, f"deployments/{nightly['id']}/create_flow_run", {})
    # A long-running worker, not --run-once: one poll can miss a run created a moment before.
    worker = subprocess.Popen([prefect, "worker", "start", "--pool", "guie-local"], cwd=path,
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        done = ("COMPLETED", "FAILED", "CRASHED")
        state = wait_for(lambda: (lambda r: r["state_type"] if r["state_type"] in done else None)(
            api_get(env, f"flow_runs/{run['id']}")), timeout=300)
    finally:
        worker.terminate()
        worker.wait(timeout=60)
    assert state == "COMPLETED"


def api_get(env: dict, route: str):
    with urllib.request.urlopen(f"{env['PREFECT_API_URL']}/{route}", timeout=10) as resp:
        return json.loads(resp.read())


def test_pipeline_flow_fails_when_a_stage_fails(repo):
    """Runs last: it leaves a Failed pipeline run on the server."""
    path, env = repo
    set_param(path, "sample", "samples", 0)
    try:
        proc = subprocess.run([sys.executable, "-m", "flows.pipeline"], cwd=path, env=env,
                              capture_output=True, text=True)
        assert proc.returncode != 0
        assert "sample.samples = 0: allowed is a value >= 1" in proc.stdout + proc.stderr
        # the failed stage's task is Failed, the flow run too, and nothing ran after it
        flow_run, tasks = pipeline_task_runs(env)
        failed = [name for name, t in tasks.items() if t["state_type"] == "FAILED"]
        assert flow_run["state_type"] == "FAILED" and len(failed) == 1, tasks
        assert f"failed: {failed[0]};" in flow_run["state"]["message"]
        assert all(when(t, "end_time") <= when(tasks[failed[0]], "start_time")
                   for name, t in tasks.items() if name != failed[0])
    finally:
        set_param(path, "sample", "samples", 5)
