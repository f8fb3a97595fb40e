"""Re-evaluate a change to the pipeline and report what moved, as Markdown.

With a DVC remote (the DVC_REMOTE_URL environment variable, a repository
secret in CI, or a default remote in .dvc/config), it first pulls what the
team already computed, outputs and run-cache, so `dvc repro` reruns only the
stages this change made stale, and afterwards pushes what it computed.
Without one, `dvc repro` recomputes every stage not already in this clone.
`dvc repro`'s output is streamed and each stage timed; then the stages (ran,
skipped, restored from the run-cache, with seconds), `dvc params diff` and
`dvc metrics diff` against the base revision, and the P@k curves of both
revisions (`dvc plots diff`, drawn to a PNG beside the report) go into one
Markdown report, to --output and, when GitHub Actions provides one, to the
job summary. The GitHub workflow (.github/workflows/reevaluate.yml) only
calls this script, so the same thing runs, and is tested, anywhere:

    python .ci/reevaluate.py --base origin/main --output reevaluation.md
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

# dvc.yaml's top-level plot of the evaluate stage's precision_at_k.csv (model, k, precision)
PK_PLOT = "precision_at_k"
WORKSPACE = "workspace"  # how `dvc plots diff` names the uncommitted revision

# What `dvc repro` logs as it visits each stage (dvc/stage/run.py, stage/__init__.py, cache.py).
STAGE_EVENT = re.compile(r"Running stage '(?P<ran>[^']+)'"
                         r"|Stage '(?P<skipped>[^']+)' didn't change, skipping"
                         r"|Stage '(?P<cached>[^']+)' is cached - skipping run")
OUTCOMES = {"ran": "recomputed", "skipped": "up to date, skipped",
            "cached": "restored from the run-cache"}


@dataclass
class StageRun:
    """One stage `dvc repro` visited: what happened to it and its wall time in seconds."""

    stage: str
    outcome: str
    seconds: float = 0.0


def dvc(*args: str) -> str:
    proc = subprocess.run(["dvc", *args], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"`dvc {' '.join(args)}` failed:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout.strip()


def configure_remote() -> str | None:
    """The remote to share through: DVC_REMOTE_URL (added to this clone's local config
    only, so no URL is committed) or the project's default remote; None without one."""
    url = os.environ.get("DVC_REMOTE_URL", "").strip()
    if url:
        dvc("remote", "add", "--local", "--force", "--default", "ci", url)
        return "ci"
    default = subprocess.run(["dvc", "config", "core.remote"], capture_output=True, text=True)
    return default.stdout.strip() or None if default.returncode == 0 else None


def time_stages(lines: Iterable[str], clock: Callable[[], float] = time.monotonic
                ) -> list[StageRun]:
    """The stages in `dvc repro`'s output, in the order it visited them. DVC runs them one
    at a time, so a recomputed stage's seconds run from its "Running stage" line to the next
    stage's line (or the end): its command plus DVC hashing and caching its outputs. Skipped
    and run-cache-restored stages ran nothing: 0 s."""
    runs: list[StageRun] = []
    started: float | None = None
    for line in lines:
        event = STAGE_EVENT.search(line)
        if event is None:
            continue
        now = clock()
        if started is not None:
            runs[-1].seconds, started = now - started, None
        runs.append(StageRun(event[event.lastgroup], OUTCOMES[event.lastgroup]))
        if event.lastgroup == "ran":
            started = now
    if started is not None:
        runs[-1].seconds = clock() - started
    return runs


def _echoed(lines: Iterable[str]) -> Iterator[str]:
    """Pass lines through, writing each to stdout as it comes (the CI log shows progress)."""
    for line in lines:
        sys.stdout.write(line)
        sys.stdout.flush()
        yield line


def repro() -> tuple[list[StageRun], float]:
    """`dvc repro`, its output streamed; the stages it visited and its total seconds."""
    start = time.monotonic()
    with subprocess.Popen(["dvc", "repro"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True) as proc:
        runs = time_stages(_echoed(proc.stdout))
    if proc.returncode:
        raise SystemExit(f"`dvc repro` failed with exit code {proc.returncode}")
    return runs, time.monotonic() - start


def always_changed() -> set[str]:
    """Stages marked always_changed in dvc.yaml (`inputs`): they run on every repro."""
    from dvc.repo import Repo

    with Repo() as repo:
        return {s.addressing for s in repo.index.stages if getattr(s, "always_changed", False)}


def recomputed_line(runs: list[StageRun], always: set[str]) -> str:
    """The stages this change made stale, apart from those that run on every repro."""
    ran = sorted(r.stage for r in runs if r.outcome == OUTCOMES["ran"])
    changed = [s for s in ran if s not in always]
    every = [f"`{s}`" for s in ran if s in always]
    return (f"stages recomputed: {', '.join(changed) or 'none'}"
            + (f" (and {', '.join(every)}, which runs on every repro: always_changed in "
               "dvc.yaml)" if every else ""))


def stages_markdown(runs: list[StageRun], always: set[str], total: float) -> str:
    """A table row per stage `dvc repro` visited, in its order: what happened, seconds."""
    rows = ["| stage | what happened | seconds |", "|---|---|---:|"]
    for r in runs:
        every = r.stage in always and r.outcome == OUTCOMES["ran"]
        outcome = "ran (always_changed: on every repro)" if every else r.outcome
        rows.append(f"| {r.stage} | {outcome} | {r.seconds:.1f} |")
    return ("\n".join(rows) + f"\n\n`dvc repro` took {total:.1f} s in all (the rest: DVC "
            "checking what is stale and checking outputs out).")


def reproduce(remote: str | None) -> str:
    """Pull, repro only what is stale, push; the report's lines saying what happened."""
    if remote is not None:
        # Missing objects are fine: a stage whose outputs nobody pushed yet is simply rerun.
        subprocess.run(["dvc", "pull", "--run-cache", "--allow-missing", "-r", remote],
                       check=True, stdout=sys.stdout, stderr=sys.stderr)
    runs, total = repro()
    always = always_changed()
    if remote is None:
        how = ("No DVC remote configured (set the DVC_REMOTE_URL secret): nothing was pulled; "
               f"{recomputed_line(runs, always)}.")
    else:
        subprocess.run(["dvc", "push", "--run-cache", "-r", remote], check=True,
                       stdout=sys.stdout, stderr=sys.stderr)
        how = (f"Pulled from DVC remote `{remote}`; {recomputed_line(runs, always)}; "
               "pushed what was computed.")
    return f"{how}\n\n### Stages\n\n{stages_markdown(runs, always, total)}"


def pk_series(base: str, plot: str = PK_PLOT) -> dict[tuple[str, str], list[tuple[float, float]]]:
    """One plot of `dvc plots diff <base> --json` as {(revision, model): [(k, P@k), ...]}, k
    ascending; the fields come from the plot's own encoding (x, y, colour). A revision without
    the plot's file is absent; empty when neither has it."""
    out = json.loads(dvc("plots", "diff", base, "--json", "--targets", plot))
    series: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for rendered in (out.get("data") or {}).get(plot, []):
        spec = rendered["content"]
        x, y, colour = (spec["encoding"][axis]["field"] for axis in ("x", "y", "color"))
        for point in spec["data"]["values"]:
            series.setdefault((point["rev"], point[colour]), []).append(
                (float(point[x]), float(point[y])))
    return {key: sorted(points) for key, points in series.items()}


def draw_pk(series: dict[tuple[str, str], list[tuple[float, float]]], base: str,
            path: Path) -> None:
    """A PNG of the P@k curves: a colour per model, this change solid, the base dashed."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(8, 4.5), dpi=100, layout="constrained")
    ax = fig.subplots()
    models = sorted({model for _, model in series})
    for (rev, model), points in sorted(series.items(),
                                       key=lambda kv: (kv[0][1], kv[0][0] != WORKSPACE)):
        ks, values = zip(*points)
        this = rev == WORKSPACE
        # the base thin and on top of the change's wide line: equal curves show both
        ax.plot(ks, values, color=f"C{models.index(model) % 10}", linestyle="-" if this else "--",
                linewidth=2.5 if this else 1.2, alpha=0.6 if this else 1.0, zorder=1 if this else 2,
                marker="o" if this else None, markersize=4,
                label=f"{model} ({'this change' if this else rev})")
    ax.set(xlabel="k", ylabel="P@k")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(f"P@k on the test classes: {base} dashed")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize="small")
    fig.savefig(path)


def pk_section(base: str, image: Path) -> str:
    """The P@k curves of both revisions as an image the report links to, or why there is none."""
    try:
        series = pk_series(base)
    except SystemExit as failed:  # dvc() exits on failure; the rest of the report still stands
        lines = [line for line in str(failed).splitlines() if line.strip()]
        return f"No P@k image: {lines[0]} {lines[-1]}"
    if not series:
        image.unlink(missing_ok=True)  # not one left from an earlier run
        return (f"No P@k data (`{PK_PLOT}` in dvc.yaml) in `{base}` or this change: "
                "no image.")
    draw_pk(series, base, image)
    revisions = {rev for rev, _ in series}
    missing = ([f"`{base}`"] if revisions <= {WORKSPACE} else []) + (
        ["this change"] if WORKSPACE not in revisions else [])
    note = f"\n\n{' and '.join(missing)} has no P@k data; not drawn." if missing else ""
    return f"![P@k, base vs this change]({image.name}){note}"


def report(base: str, how: str = "", image: Path = Path("reevaluation-pk.png")) -> str:
    params = dvc("params", "diff", base, "--md") or "No params changed."
    metrics = (dvc("metrics", "diff", base, "--all", "--md", "--precision", "4")
               or "No metrics found.")
    return (f"## Re-evaluation against `{base}`\n\n" + (f"{how}\n\n" if how else "")
            + f"### Params changed\n\n{params}\n\n"
            f"### Metrics (base -> this change)\n\n{metrics}\n\n"
            f"### P@k, `{base}` (dashed) vs this change (solid)\n\n{pk_section(base, image)}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", required=True,
                        help="git revision to compare with, e.g. origin/main")
    parser.add_argument("--output", type=Path, default=Path("reevaluation.md"),
                        help="the Markdown report; the P@k image goes beside it, <name>-pk.png")
    parser.add_argument("--no-repro", action="store_true",
                        help="only diff (the pipeline already ran)")
    args = parser.parse_args()
    how = "" if args.no_repro else reproduce(configure_remote())
    markdown = report(args.base, how, args.output.with_name(f"{args.output.stem}-pk.png"))
    args.output.write_text(markdown, encoding="utf-8")
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary:
        with open(summary, "a", encoding="utf-8") as fh:
            fh.write(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
