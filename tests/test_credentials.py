"""The Kaggle token never leaves the process: not in logs, outputs, params or Prefect's records.

A recognisable fake token is put where Kaggle's tools look for one (the
environment and ~/.kaggle/kaggle.json under a temporary HOME); the real
`python -m flows.download` then runs a kaggle:// source in a temporary
project until it needs the network and fails. Every byte that run left
behind is searched for the token, in the forms a client sends it (as is and
base64 in a Basic Authorization header): the project tree (params.yaml,
data/, the download cache, Prefect's home), its stdout and stderr, the flow
run, task runs, logs and artifacts as Prefect's API returns them, and the
API's database file itself.

With the kaggle extra installed the run goes further (the client
authenticates and builds its request) and the test also runs with the token
in kaggle.json alone; VERBOSE=1 is set because the client then prints every
request, headers included, and PREFECT_LOGGING_LOG_PRINTS so that whatever a
task prints lands in Prefect's logs too and is searched there.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterFlowRunId, FlowFilter,
                                            FlowFilterName, FlowRunFilter, FlowRunFilterId,
                                            FlowRunFilterStartTime, LogFilter, LogFilterFlowRunId)
from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_DATABASE_CONNECTION_URL

from conftest import REPO

USER = "guie-leak-test-user"
KAGGLE_URI = "kaggle://competitions/landmark-recognition-2021"
HAS_CLIENT = importlib.util.find_spec("kaggle") is not None


def secret(name: str) -> str:
    """A token no real output would contain by chance."""
    return f"{name}-LEAKCHECK-{uuid.uuid4().hex}"


def base64_inside(data: bytes) -> list[bytes]:
    """What `data` looks like inside any longer base64 text, at each of the 3 alignments.

    Prefect stores a failed task's exception as base64 of its pickle; a token
    inside shows up as one of these, whatever comes before it.
    """
    out = []
    for skip in range(3):
        encoded = base64.b64encode(b"\0" * skip + data)
        out.append(encoded[-(-4 * skip // 3):(4 * (skip + len(data))) // 3])
    return out


def leak_forms(secrets: list[str]) -> dict[bytes, str]:
    """Byte strings that reveal a secret -> which secret.

    As is, as HTTP Basic auth sends it (base64 of user:key) and either of
    those inside base64 text.
    """
    forms = {}
    for s in secrets:
        for plain in (s.encode(), base64.b64encode(f"{USER}:{s}".encode())):
            forms[plain] = s
            forms.update(dict.fromkeys(base64_inside(plain), s))
    return forms


def leaks_in(data: bytes, forms: dict[bytes, str]) -> list[str]:
    """The secrets found in `data`, also once line breaks (base64 is often wrapped) are dropped."""
    unwrapped = re.sub(rb"\s", b"", data)
    return sorted({s for form, s in forms.items() if form in data or form in unwrapped})


def leaks_in_tree(root: Path, forms: dict[bytes, str], allowed: set[Path]) -> dict[str, list[str]]:
    """Every regular file under `root` (links not followed) -> the secrets found in it."""
    found = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink() and path not in allowed:
            if hits := leaks_in(path.read_bytes(), forms):
                found[str(path.relative_to(root))] = hits
    return found


def kaggle_project(root: Path, source: str) -> Path:
    """The project's own params.yaml, with one extra source: a Kaggle competition."""
    project = root / "project"
    project.mkdir()
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["sources"][source] = {"kind": "landmarks", "uri": KAGGLE_URI}
    params["sample"]["num_classes"][source] = 4
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return project


def run_env(root: Path, project: Path, secrets: dict[str, str]) -> dict[str, str]:
    """The stage's environment: the harness's API, a temporary HOME, only the given credentials."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KAGGLE_")}
    env.update(secrets)
    env.update({
        "HOME": str(root / "home"),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "PREFECT_API_URL": PREFECT_API_URL.value(),
        "PREFECT_HOME": str(project / ".prefect"),
        "PREFECT_LOGGING_LOG_PRINTS": "true",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "VERBOSE": "1",
    })
    return env


def prefect_records(source: str, since: float) -> tuple[bytes, list[str]]:
    """All that Prefect's API holds on the download flow run of `source` started after `since`.

    Returns the records as JSON bytes and the log messages (to check that the
    search had something to search).
    """
    from datetime import datetime, timezone

    started = FlowRunFilterStartTime(after_=datetime.fromtimestamp(since - 60, timezone.utc))
    with get_client(sync_client=True) as client:
        download = FlowFilter(name=FlowFilterName(any_=["download"]))
        runs = [r for r in client.read_flow_runs(flow_filter=download,
                                                 flow_run_filter=FlowRunFilter(start_time=started))
                if r.parameters.get("source") == source]
        assert len(runs) == 1, f"expected one download flow run of {source!r}, got {len(runs)}"
        run = runs[0]
        this_run = FlowRunFilter(id=FlowRunFilterId(any_=[run.id]))
        tasks = client.read_task_runs(flow_run_filter=this_run)
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
        logs, offset = [], 0
        while page := client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])),
                                       limit=200, offset=offset):
            logs.extend(page)
            offset += len(page)
    records = [run, *tasks, *artifacts, *logs]
    return "\n".join(r.model_dump_json() for r in records).encode(), [log.message for log in logs]


def database_files() -> list[Path]:
    """The harness's SQLite database and its journal files."""
    db = Path(PREFECT_SERVER_DATABASE_CONNECTION_URL.value().split(":///", 1)[1])
    return [p for p in (db, Path(f"{db}-wal"), Path(f"{db}-shm")) if p.is_file()]


@pytest.mark.parametrize("where", [
    "environment",
    pytest.param("kaggle.json", marks=pytest.mark.skipif(
        not HAS_CLIENT, reason="without the kaggle extra, nothing reads kaggle.json's contents")),
])
def test_kaggle_token_appears_in_no_log_output_or_record(tmp_path, where):
    source = f"kaggle_{where.replace('.', '_')}"
    env_key, env_token, file_key = secret("envkey"), secret("apitoken"), secret("filekey")
    project = kaggle_project(tmp_path, source)
    kaggle_json = tmp_path / "home" / ".kaggle" / "kaggle.json"
    kaggle_json.parent.mkdir(parents=True)
    kaggle_json.write_text(json.dumps({"username": USER, "key": file_key}))
    kaggle_json.chmod(0o600)
    in_env = {"KAGGLE_USERNAME": USER, "KAGGLE_KEY": env_key, "KAGGLE_API_TOKEN": env_token}
    env = run_env(tmp_path, project, in_env if where == "environment" else {})

    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "flows.download", source], cwd=project, env=env,
                          capture_output=True, timeout=600)
    output = proc.stdout + proc.stderr

    # it got as far as Kaggle's code, and failed there for want of a package or a network
    assert proc.returncode != 0, output.decode(errors="replace")[-3000:]
    reached = "api.kaggle.com" if HAS_CLIENT else "kaggle package is not installed"
    assert reached.encode() in output, output.decode(errors="replace")[-3000:]

    forms = leak_forms([env_key, env_token, file_key])
    records, messages = prefect_records(source, start)
    assert any(reached in m for m in messages), messages  # the failure itself was logged
    leaks = {
        "stdout": leaks_in(proc.stdout, forms),
        "stderr": leaks_in(proc.stderr, forms),
        "prefect API": leaks_in(records, forms),
        **{f"prefect db {p.name}": leaks_in(p.read_bytes(), forms) for p in database_files()},
        **leaks_in_tree(tmp_path, forms, allowed={kaggle_json}),
    }
    assert (project / "params.yaml").is_file() and (project / ".prefect").is_dir()
    assert {where: hits for where, hits in leaks.items() if hits} == {}
