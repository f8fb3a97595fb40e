"""The flow a person runs or schedules: each stale DVC stage as a Prefect task, then the metrics.

DVC decides what is stale, so a scheduled run recomputes only what changed. The flow asks DVC
for the stages `dvc repro` would consider and visits them in the DAG's order; a stage that is
stale once its upstream has run becomes one Prefect task, named after the stage
(`extract@lite0`), which runs `dvc repro --single-item <stage>` and has its own state,
duration, logs and retries. A failed stage fails its task and the flow, and nothing downstream
of it runs. Independent stages run side by side with `--jobs N`: DVC holds its repo lock while
it plans and records a stage but not while the stage's command runs, so in one workspace two
stages' commands can overlap; the default is one at a time, since every heavy stage already
uses all cores.

Every stage's own flow run reports to the same Prefect server as this flow (the configured
one, or this process's temporary one), so one UI shows the whole run and no stage pays for
starting a server of its own.

    python -m flows.pipeline                       # run once
    python -m flows.pipeline run -j 2 --retries 1 train   # train and what it needs
    python -m flows.pipeline serve --cron "0 3 * * *"   # a scheduled deployment, served here
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.futures import PrefectFuture, as_completed

from tasks.dvc_stages import ReproPlan, is_stale, plan_stages
from tasks.report import metrics_diff_markdown, metrics_markdown, metrics_rows
from tasks.schemas.paths import EVAL_DIR

METRICS = EVAL_DIR / "metrics.json"


@task(name="dvc-stage", task_run_name="{stage}", cache_policy=NO_CACHE)
def run_stage(stage: str, api_url: str) -> None:
    """`dvc repro --single-item <stage>`, its output streamed into this task's log; a failed
    stage fails the task. `--wait-for-lock`: another stage may hold DVC's repo lock a moment."""
    log = get_run_logger()
    env = {**os.environ, "PREFECT_API_URL": api_url}
    cmd = [sys.executable, "-m", "dvc", "--wait-for-lock", "repro", "--single-item", stage]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=env) as proc:
        try:
            for line in proc.stdout:
                log.info(line.rstrip())
        except BaseException:  # cancelled or interrupted: leave no `dvc repro` writing
            proc.terminate()
            raise
    if proc.returncode:
        raise RuntimeError(f"stage {stage} failed: `dvc repro --single-item {stage}` "
                           f"exited with {proc.returncode}")


def _ran_upstream(stage: str, plan: ReproPlan,
                  futures: dict[str, PrefectFuture]) -> list[PrefectFuture]:
    """The nearest upstream stages that ran as tasks: the edges the Prefect UI draws."""
    found: list[PrefectFuture] = []
    for up in plan.upstream[stage]:
        found += [futures[up]] if up in futures else _ran_upstream(up, plan, futures)
    return list(dict.fromkeys(found))


def run_stages(plan: ReproPlan, api_url: str, retries: int, jobs: int,
               keep_going: bool) -> tuple[list[str], list[str], list[str]]:
    """Submit each stage once its upstream is done and DVC finds it stale, at most `jobs` at a
    time, in the plan's order. After a failure nothing new starts (as `dvc repro`), or with
    `keep_going` all that does not depend on it (as `dvc repro --keep-going`).
    Returns the stages that ran, failed, and did not run because of a failure."""
    stage_task = run_stage.with_options(retries=retries)
    pending = list(plan.upstream)
    done: set[str] = set()  # ran, or up to date
    failed: list[str] = []
    blocked: set[str] = set()  # downstream of a failure
    futures: dict[str, PrefectFuture] = {}
    running: dict[PrefectFuture, str] = {}
    while True:
        for stage in list(pending):  # upstream first: one pass settles a whole up-to-date chain
            if len(running) >= jobs or (failed and not keep_going):
                break
            ups = plan.upstream[stage]
            if any(up in blocked or up in failed for up in ups):
                pending.remove(stage)
                blocked.add(stage)
            elif all(up in done for up in ups):
                pending.remove(stage)
                if is_stale(stage):
                    futures[stage] = stage_task.submit(
                        stage, api_url, wait_for=_ran_upstream(stage, plan, futures))
                    running[futures[stage]] = stage
                else:
                    done.add(stage)
        if not running:
            break
        future = next(as_completed(list(running)))
        future.wait()
        stage = running.pop(future)
        if future.state.is_completed():
            done.add(stage)
        else:
            failed.append(stage)
    not_run = [s for s in plan.upstream if s in blocked or s in pending]
    return [s for s in futures if s in done], failed, not_run


def _read_metrics() -> dict | None:
    return json.loads(METRICS.read_text()) if METRICS.is_file() else None


@flow(name="pipeline")
def pipeline(targets: list[str] | None = None, retries: int = 0, jobs: int = 1,
             keep_going: bool = False) -> dict | None:
    """Bring the DVC stages up to date, one Prefect task per stale stage, then publish the
    metrics and their change since the last run."""
    log = get_run_logger()
    with get_client(sync_client=True) as client:
        api_url = str(client.api_url).rstrip("/")
    before = _read_metrics()
    # which stages, in which order: DVC's own plan for `dvc repro <targets>`
    plan = plan_stages(targets)
    # each stale stage as a task, upstream first
    ran, failed, not_run = run_stages(plan, api_url, retries, max(jobs, 1), keep_going)
    log.info("ran %d of %d stages: %s", len(ran), len(plan.upstream), ", ".join(ran) or "none")
    if failed:
        raise RuntimeError(f"failed: {', '.join(failed)}; not run: {', '.join(not_run) or 'none'}")
    # the metrics as artifacts; a plan without the stage that writes them may have none
    after = _read_metrics()
    if after is None:
        if any(METRICS.resolve() in outs for outs in plan.outs.values()):
            raise RuntimeError(f"{METRICS} missing after its stage ran")
        log.info("no %s: no stage in this run writes it", METRICS)
        return None
    table = metrics_markdown(after)
    create_markdown_artifact(table, key="guie-pipeline-metrics",
                             description="mP@5 per model line after dvc repro")
    create_table_artifact(metrics_rows(after), key="guie-pipeline-metrics-table",
                          description="mP@5 per model line and source")
    diff = metrics_diff_markdown(before, after)
    create_markdown_artifact(diff, key="guie-pipeline-metrics-diff",
                             description="change since the previous run")
    print(table + "\n" + diff)
    return after


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.pipeline",
                                     description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("run", help="run the pipeline once (the default)")
    run.add_argument("targets", nargs="*", help="dvc stages to bring up to date (default: all)")
    run.add_argument("-j", "--jobs", type=int, default=1,
                     help="stages whose commands may run at once (default: 1)")
    run.add_argument("--retries", type=int, default=0, help="retries of a failed stage")
    run.add_argument("-k", "--keep-going", action="store_true",
                     help="after a failure, still run the stages that do not depend on it")
    serve = sub.add_parser("serve", help="serve a scheduled deployment from this process")
    serve.add_argument("--cron", default="0 3 * * *", help="cron schedule (default: 03:00 daily)")
    serve.add_argument("--name", default="scheduled", help="deployment name (default: scheduled)")
    args = parser.parse_args(argv)
    if args.command == "serve":
        pipeline.serve(name=args.name, cron=args.cron, tags=["guie"],
                       description="dvc repro on a schedule; recomputes only what changed")
    elif args.command == "run":
        pipeline(args.targets, retries=args.retries, jobs=args.jobs, keep_going=args.keep_going)
    else:
        pipeline([])


if __name__ == "__main__":
    main()
