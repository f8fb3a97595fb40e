"""The flow a person runs or schedules: `dvc repro`, then the metrics as a Prefect artifact.

DVC decides what is stale, so a scheduled run recomputes only what changed.
Every stage's own flow run reports to the same Prefect server as this flow
(the one configured, or this process's temporary one), so one UI shows the
whole run and no stage pays for starting a server of its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client

from tasks.evaluate import metrics_markdown
from tasks.schemas import EVAL_DIR


@task(name="dvc-repro", cache_policy=NO_CACHE)
def dvc_repro(api_url: str, targets: list[str]) -> None:
    """Run `dvc repro`, streaming its output into this run's log; a failed stage fails the task."""
    log = get_run_logger()
    env = {**os.environ, "PREFECT_API_URL": api_url}
    cmd = ["dvc", "repro", *targets]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
        for line in proc.stdout:
            log.info(line.rstrip())
    if proc.returncode:
        raise RuntimeError(f"`{' '.join(cmd)}` failed with exit code {proc.returncode}")


@flow(name="pipeline")
def pipeline(targets: list[str] | None = None) -> dict:
    """Bring every DVC stage up to date, then publish the evaluation table."""
    with get_client(sync_client=True) as client:
        api_url = str(client.api_url).rstrip("/")
    dvc_repro(api_url, targets or [])
    metrics = json.loads((EVAL_DIR / "metrics.json").read_text())
    table = metrics_markdown(metrics, metrics["k"])
    create_markdown_artifact(table, key="guie-pipeline-metrics", description="mP@5 per model line after dvc repro")
    print(table)
    return metrics


if __name__ == "__main__":
    pipeline(sys.argv[1:])
