"""The evaluation's metrics as people read them: Markdown tables, artifact rows, curves, diffs.

`metrics.json` (written by the evaluate flow) holds, per class group
("validation", "test"), the counts, every line's mP@k with its bootstrap
interval overall and per source, and the head's paired gain over the
reference zero-shot line. This module only formats it.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from tasks.schemas.io import atomic_path

GROUP_TITLES = {"test": "Test classes (reported; never used to choose anything)",
                "validation": "Validation classes (every choice is made on these)"}


def _cell(score: dict, k: int) -> str:
    return f"{score[f'mP@{k}']:.4f} [{score['low']:.3f}, {score['high']:.3f}]"


def _line_order(lines: dict) -> list[str]:
    return sorted(lines, key=lambda name: (name == "head", name))


def group_markdown(summary: dict, k: int) -> str:
    """One group's table: a row per model line, mP@k [interval] overall and per source."""
    lines = summary["lines"]
    sources = sorted({s for scores in lines.values() for s in scores if s != "all"})
    cols = ["all", *sources]
    out = [f"| model | mP@{k} | " + " | ".join(sources) + " |", "|---|" + "---|" * len(cols)]
    for name in _line_order(lines):
        cells = [_cell(lines[name][c], k) if c in lines[name] else "-" for c in cols]
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    gain = summary["head_minus_reference"]
    verdict = "significant" if gain["significant"] else "not significant: the interval contains 0"
    unmatched = summary["queries_without_match"]
    out += ["", f"{summary['queries']} scored queries of {summary['classes']} classes against "
                f"{summary['index']} index images (k={k}); {unmatched} queries had no index image "
                "of their class and are not scored.",
            f"head - {gain['reference']}: {gain['difference']:+.4f} "
            f"[{gain['low']:+.3f}, {gain['high']:+.3f}], {verdict}."]
    return "\n".join(out) + "\n"


def search_markdown(metrics: dict) -> str:
    """A paragraph for the report naming each line scored with approximate search and its
    recall@k against exact search; empty when every line's search was exact."""
    k = metrics["k"]
    rows = [(group, name, scores["all"]) for group in ("validation", "test")
            for name, scores in metrics[group]["lines"].items()
            if scores["all"].get("search") == "approximate"]
    if not rows:
        return ""
    out = [f"\nApproximate search (the index is over `evaluate.exact_max_index` images): the "
           f"recall@{k} of its neighbours against exact search, on a seeded sample of "
           "queries, beside the line's mP@k.\n",
           f"| group | model | index | setting | queries | recall@{k} | mP@{k} |",
           "|---|---|---|---|---|---|---|"]
    out += [f"| {g} | {n} | {s['index']} | {s['setting']} | {s['recall_queries']} | "
            f"{s[f'recall@{k}']:.4f} | {s[f'mP@{k}']:.4f} |" for g, n, s in rows]
    return "\n".join(out) + "\n"


def metrics_markdown(metrics: dict) -> str:
    """Both groups' tables, test first, with what the intervals are, and the recall of each
    line scored with approximate search."""
    k, boot = metrics["k"], metrics["bootstrap"]
    parts = []
    for group in ("test", "validation"):
        parts.append(f"### {GROUP_TITLES[group]}\n\n"
                     + group_markdown(metrics[group], k))
    parts.append(f"Intervals: {boot['confidence']:.0%} percentile bootstrap over query classes "
                 f"({boot['resamples']} resamples, seed {boot['seed']}); the head's gain is "
                 f"paired (the same resampled classes for both lines). The reference zero-shot "
                 f"line is the best one on the validation classes.\n")
    return "\n".join(parts) + search_markdown(metrics)


def metrics_rows(metrics: dict) -> list[dict]:
    """One row per group, model line and source, for a table artifact: mP@k, its interval,
    how the line's neighbours were searched and, if approximately, their recall@k against
    exact search (the line's, on every row of it; empty when exact)."""
    k = metrics["k"]
    return [{"group": group, "model": name, "source": source, f"mP@{k}": score[f"mP@{k}"],
             "low": score["low"], "high": score["high"],
             "search": scores["all"].get("search", "exact"),
             f"recall@{k}": scores["all"].get(f"recall@{k}")}
            for group in ("test", "validation")
            for name, scores in metrics[group]["lines"].items()
            for source, score in scores.items()]


def _test_scores(metrics: dict | None) -> dict[str, float]:
    """{line: test mP@k}; empty for a missing or older-format file."""
    if not metrics or "test" not in metrics:
        return {}
    k = metrics["k"]
    return {name: s["all"][f"mP@{k}"] for name, s in metrics["test"]["lines"].items()}


def metrics_diff_markdown(before: dict | None, after: dict) -> str:
    """Markdown of how each line's test mP@k moved since `before` (None: the first run)."""
    k = after["k"]
    if before is None:
        return "First run: no previous metrics to compare with.\n"
    old_scores = _test_scores(before)
    out = [f"| model | previous mP@{k} | mP@{k} | change |", "|---|---|---|---|"]
    for name, scores in after["test"]["lines"].items():
        old, new = old_scores.get(name), scores["all"][f"mP@{k}"]
        change = "new" if old is None else f"{new - old:+.4f}"
        out.append(f"| {name} | {'-' if old is None else f'{old:.4f}'} | {new:.4f} | {change} |")
    return "\n".join(out) + "\n"


def write_curves(results: dict[str, dict], out_dir: Path) -> None:
    """P@k and recall@k for `dvc plots`, in long format: `precision_at_k.csv` has columns
    `model,k,precision` and `recall_at_k.csv` `model,k,recall`, one row per model line and k.

    One column per line would name the columns after the variants, so dvc.yaml's
    plot definitions would break with every preset; in long format they name only
    `k` and the metric, and the template `.dvc/plots/lines_by_model.json` draws one
    line per value of `model`.
    """
    depth = min(len(r["precision"]) for r in results.values())  # < CURVE_K only for a tiny index
    for name in ("precision", "recall"):
        frame = pl.DataFrame({
            "model": [line for line in results for _ in range(depth)],
            "k": [k for _ in results for k in range(1, depth + 1)],
            name: [round(float(v), 4) for r in results.values() for v in r[name][:depth]]})
        with atomic_path(Path(out_dir) / f"{name}_at_k.csv") as tmp:
            frame.write_csv(tmp)
