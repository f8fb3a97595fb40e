"""The flow a person runs or schedules: `dvc repro`, then the metrics as Prefect artifacts.

DVC decides what is stale, so a scheduled run recomputes only what changed.
Every stage's own flow run reports to the same Prefect server as this flow
(the configured one, or this process's temporary one), so one UI shows the
whole run and no stage pays for starting a server of its own.

    python -m flows.pipeline                       # run once
    python -m flows.pipeline serve --cron "0 3 * * *"   # a scheduled deployment, served here
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client

from tasks.report import metrics_diff_markdown, metrics_markdown, metrics_rows
from tasks.schemas import EVAL_DIR

METRICS = EVAL_DIR / "metrics.json"


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


def _read_metrics() -> dict | None:
    return json.loads(METRICS.read_text()) if METRICS.is_file() else None


@flow(name="pipeline")
def pipeline(targets: list[str] | None = None) -> dict:
    """Bring every DVC stage up to date, then publish the metrics and their change since the last run."""
    with get_client(sync_client=True) as client:
        api_url = str(client.api_url).rstrip("/")
    before = _read_metrics()
    dvc_repro(api_url, targets or [])
    after = _read_metrics()
    if after is None:
        raise RuntimeError(f"{METRICS} missing after dvc repro")
    table = metrics_markdown(after)
    create_markdown_artifact(table, key="guie-pipeline-metrics", description="mP@5 per model line after dvc repro")
    create_table_artifact(metrics_rows(after), key="guie-pipeline-metrics-table",
                          description="mP@5 per model line and source")
    diff = metrics_diff_markdown(before, after)
    create_markdown_artifact(diff, key="guie-pipeline-metrics-diff", description="change since the previous run")
    print(table + "\n" + diff)
    return after


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.pipeline", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("run", help="run the pipeline once (the default)")
    run.add_argument("targets", nargs="*", help="dvc stages to bring up to date (default: all)")
    serve = sub.add_parser("serve", help="serve a scheduled deployment from this process")
    serve.add_argument("--cron", default="0 3 * * *", help="cron schedule (default: 03:00 daily)")
    serve.add_argument("--name", default="scheduled", help="deployment name (default: scheduled)")
    args = parser.parse_args(argv)
    if args.command == "serve":
        pipeline.serve(name=args.name, cron=args.cron, tags=["guie"],
                       description="dvc repro on a schedule; recomputes only what changed")
    else:
        pipeline(getattr(args, "targets", None) or [])


if __name__ == "__main__":
    main()
