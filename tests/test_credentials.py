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

The run reaches a Kaggle client in CI too, where the kaggle extra is not
installed: a stand-in `kaggle` package (FAKE_CLIENT, put first on the path)
that says the token wherever a careless client could. It logs it, prints it
(to stdout and stderr), writes it into its download folder and raises
errors whose messages and attributes hold it, as is and as a Basic
Authorization header. With the kaggle extra installed the real client runs
too (it authenticates and builds its request). Both read the token from the
environment or from kaggle.json alone. VERBOSE=1 is set because the real
client then prints every request, headers included, and
PREFECT_LOGGING_LOG_PRINTS so that whatever a task prints lands in Prefect's
logs too and is searched there.
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


FAKE_CLIENT = '''
"""A stand-in for kaggle.api.kaggle_api_extended that leaks its token every way it can."""
import base64, json, logging, os, sys
from pathlib import Path

log = logging.getLogger("kaggle")


class HTTPError(Exception):
    def __init__(self, message, headers):
        super().__init__(message)
        self.request_headers = headers  # as requests keeps the request that failed


class KaggleApi:
    def authenticate(self):
        self.user, self.key = os.environ.get("KAGGLE_USERNAME"), os.environ.get("KAGGLE_KEY")
        if not self.key:
            config = Path(os.environ.get("KAGGLE_CONFIG_DIR", Path.home() / ".kaggle"))
            saved = json.loads((config / "kaggle.json").read_text())
            self.user, self.key = saved["username"], saved["key"]
        self.token = os.environ.get("KAGGLE_API_TOKEN", "")
        self.auth = "Basic " + base64.b64encode(f"{self.user}:{self.key}".encode()).decode()
        log.warning("authenticated %s with key %s, token %s", self.user, self.key, self.token)
        print(f"send: GET https://api.kaggle.com/v1/hello Authorization: {self.auth}")
        sys.stderr.write(f"debug: key={self.key} token={self.token}\\n")

    def _error(self, status, url):
        return HTTPError(f"{status} for url: https://api.kaggle.com/v1/{url}?key={self.key} "
                         f"(Authorization: {self.auth}, token {self.token})",
                         {"Authorization": self.auth})

    def competition_list_files(self, competition, page_token=None, page_size=20):
        raise self._error("401 Unauthorized", f"competitions/{competition}/files")

    def competition_download_files(self, competition, path=None, force=False, quiet=True):
        Path(path, competition + ".zip").write_text(f"<html>denied: {self.auth}</html>")
        error = self._error("403 Forbidden", f"competitions/data/download-all/{competition}")
        log.error("download failed with key %s", self.key, exc_info=error)
        raise error
'''


def fake_client(root: Path) -> Path:
    """A folder holding the stand-in `kaggle` package; first on PYTHONPATH, it is the client."""
    api = root / "fake_kaggle" / "kaggle" / "api"
    api.mkdir(parents=True)
    (api.parent / "__init__.py").write_text("")
    (api / "__init__.py").write_text("")
    (api / "kaggle_api_extended.py").write_text(FAKE_CLIENT)
    return root / "fake_kaggle"


def kaggle_project(root: Path, source: str) -> Path:
    """The project's own params.yaml, with one extra source: a Kaggle competition."""
    project = root / "project"
    project.mkdir()
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["sources"][source] = {"kind": "landmarks", "uri": KAGGLE_URI}
    params["sample"]["num_classes"][source] = 4
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return project


def run_env(root: Path, project: Path, secrets: dict[str, str],
            client: Path | None = None) -> dict[str, str]:
    """The stage's environment: the harness's API, a temporary HOME, only the given credentials
    and, when given, the folder of a stand-in Kaggle client first on the path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KAGGLE_")}
    env.update(secrets)
    path = [str(client) if client else None, str(REPO), os.environ.get("PYTHONPATH")]
    env.update({
        "HOME": str(root / "home"),
        "PYTHONPATH": os.pathsep.join(filter(None, path)),
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


REAL = pytest.mark.skipif(not HAS_CLIENT, reason="the kaggle extra is not installed")


@pytest.mark.parametrize("client, where", [
    ("fake", "environment"), ("fake", "kaggle.json"),
    pytest.param("real", "environment", marks=REAL),
    pytest.param("real", "kaggle.json", marks=REAL),
])
def test_kaggle_token_appears_in_no_log_output_or_record(tmp_path, client, where):
    source = f"kaggle_{client}_{where.replace('.', '_')}"
    env_key, env_token, file_key = secret("envkey"), secret("apitoken"), secret("filekey")
    project = kaggle_project(tmp_path, source)
    kaggle_json = tmp_path / "home" / ".kaggle" / "kaggle.json"
    kaggle_json.parent.mkdir(parents=True)
    kaggle_json.write_text(json.dumps({"username": USER, "key": file_key}))
    kaggle_json.chmod(0o600)
    in_env = {"KAGGLE_USERNAME": USER, "KAGGLE_KEY": env_key, "KAGGLE_API_TOKEN": env_token}
    env = run_env(tmp_path, project, in_env if where == "environment" else {},
                  fake_client(tmp_path) if client == "fake" else None)

    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "flows.download", source], cwd=project, env=env,
                          capture_output=True, timeout=600)
    output = proc.stdout + proc.stderr

    # it got as far as Kaggle's client, and failed there for want of a network (or of rights)
    assert proc.returncode != 0, output.decode(errors="replace")[-3000:]
    reached = "api.kaggle.com"
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
    if client == "fake":  # what it said was said, with the token replaced
        for said in [b"authenticated guie-leak-test-user with key ***", b"debug: key=***",
                     b"Authorization: Basic ***", b"403 Forbidden for url: https://api.kaggle"]:
            assert said in output, (said, output.decode(errors="replace")[-3000:])
