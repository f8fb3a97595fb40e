"""Re-evaluate a change to the pipeline and report what moved, as Markdown.

With a DVC remote (the DVC_REMOTE_URL environment variable, a repository
secret in CI, or a default remote in .dvc/config), it first pulls what the
team already computed, outputs and run-cache, so `dvc repro` reruns only the
stages this change made stale, and afterwards pushes what it computed.
Without one, `dvc repro` recomputes everything, and the report says so.
Then `dvc params diff` and `dvc metrics diff` against the base revision go
into one Markdown report, to --output and, when GitHub Actions provides one,
to the job summary. The GitHub workflow (.github/workflows/reevaluate.yml)
only calls this script, so the same thing runs, and is tested, anywhere:

    python .ci/reevaluate.py --base origin/main --output reevaluation.md
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path


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


def reproduce(remote: str | None) -> str:
    """Pull, repro only what is stale, push; a line for the report saying what happened."""
    if remote is None:
        subprocess.run(["dvc", "repro"], check=True, stdout=sys.stdout, stderr=sys.stderr)
        return ("No DVC remote configured (set the DVC_REMOTE_URL secret): every stage "
                "was recomputed from nothing.")
    # Missing objects are fine: a stage whose outputs nobody pushed yet is simply rerun.
    subprocess.run(["dvc", "pull", "--run-cache", "--allow-missing", "-r", remote],
                   check=True, stdout=sys.stdout, stderr=sys.stderr)
    proc = subprocess.run(["dvc", "repro"], check=True, capture_output=True, text=True)
    sys.stdout.write(proc.stdout + proc.stderr)
    ran = sorted(set(re.findall(r"Running stage '([^']+)'", proc.stdout + proc.stderr)))
    subprocess.run(["dvc", "push", "--run-cache", "-r", remote], check=True, stdout=sys.stdout,
                   stderr=sys.stderr)
    return (f"Pulled from DVC remote `{remote}`; stages recomputed: "
            f"{', '.join(ran) if ran else 'none'}; pushed what was computed.")


def report(base: str, how: str = "") -> str:
    params = dvc("params", "diff", base, "--md") or "No params changed."
    metrics = (dvc("metrics", "diff", base, "--all", "--md", "--precision", "4")
               or "No metrics found.")
    return (f"## Re-evaluation against `{base}`\n\n" + (f"{how}\n\n" if how else "")
            + f"### Params changed\n\n{params}\n\n"
            f"### Metrics (base -> this change)\n\n{metrics}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", required=True,
                        help="git revision to compare with, e.g. origin/main")
    parser.add_argument("--output", type=Path, default=Path("reevaluation.md"))
    parser.add_argument("--no-repro", action="store_true",
                        help="only diff (the pipeline already ran)")
    args = parser.parse_args()
    how = "" if args.no_repro else reproduce(configure_remote())
    markdown = report(args.base, how)
    args.output.write_text(markdown, encoding="utf-8")
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary:
        with open(summary, "a", encoding="utf-8") as fh:
            fh.write(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
