"""Re-evaluate a change to the pipeline and report what moved, as Markdown.

Runs `dvc repro` (only stale stages run), then `dvc params diff` and
`dvc metrics diff` against the base revision, and writes one Markdown report
to --output and, when GitHub Actions provides one, to the job summary. The
GitHub workflow (.github/workflows/reevaluate.yml) only calls this script,
so the same thing runs, and is tested, anywhere:

    python .ci/reevaluate.py --base origin/main --output reevaluation.md
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path


def dvc(*args: str) -> str:
    proc = subprocess.run(["dvc", *args], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"`dvc {' '.join(args)}` failed:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout.strip()


def report(base: str) -> str:
    params = dvc("params", "diff", base, "--md") or "No params changed."
    metrics = dvc("metrics", "diff", base, "--all", "--md", "--precision", "4") or "No metrics found."
    return (f"## Re-evaluation against `{base}`\n\n"
            f"### Params changed\n\n{params}\n\n"
            f"### Metrics (base -> this change)\n\n{metrics}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", required=True, help="git revision to compare with, e.g. origin/main")
    parser.add_argument("--output", type=Path, default=Path("reevaluation.md"))
    parser.add_argument("--no-repro", action="store_true", help="only diff (the pipeline already ran)")
    args = parser.parse_args()
    if not args.no_repro:
        # Stream DVC's progress: a CI log should show which stages ran.
        subprocess.run(["dvc", "repro"], check=True, stdout=sys.stdout, stderr=sys.stderr)
    markdown = report(args.base)
    args.output.write_text(markdown, encoding="utf-8")
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary:
        with open(summary, "a", encoding="utf-8") as fh:
            fh.write(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
