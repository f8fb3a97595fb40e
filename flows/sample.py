"""Stage `sample`: catalogs of all sources -> data/02_sampled/manifest.parquet."""

from __future__ import annotations

from typing import Any

import polars as pl
from prefect import flow, get_run_logger

from flows._cli import main
from tasks.params.base import NAMES, ParamsError
from tasks.params.sample import SampleParams, check_sources
from tasks.sample import build_manifest, check_class_counts
from tasks.schemas.io import read_table, write_json, write_table
from tasks.schemas.manifest import MANIFEST_SCHEMA
from tasks.schemas.paths import CATALOG_NAME, MANIFEST, RAW_DIR
from tasks.schemas.raw import CATALOG_SCHEMA


def read_catalogs(sources: list[str]) -> dict[str, pl.DataFrame]:
    return {s: pl.from_arrow(read_table(RAW_DIR / s / CATALOG_NAME, CATALOG_SCHEMA))
            for s in sources}


@flow(name="sample")
def sample(sources: list[str], params: SampleParams) -> dict:
    """Choose classes and images per source, split them, and write the manifest."""
    log = get_run_logger()
    manifest, skipped = build_manifest(read_catalogs(sources), params)
    write_table(MANIFEST, manifest, MANIFEST_SCHEMA)
    frame = pl.from_arrow(manifest)
    counts = frame.group_by("source", "split").len().sort("source", "split")
    groups = (frame.group_by("source", "group").agg(pl.col("class_id").n_unique().alias("n"))
              .sort("source", "group"))
    summary = {
        "images": manifest.num_rows,
        "classes": len(set(manifest.column("class_id").to_pylist())),
        "per_source_split": {f"{r['source']}/{r['split']}": r["len"]
                             for r in counts.iter_rows(named=True)},
        # Classes per group: training, validation (choices are made on them), test (reported).
        "classes_per_source_group": {f"{r['source']}/{r['group']}": r["n"]
                                     for r in groups.iter_rows(named=True)},
        "skipped_classes": [s.__dict__ for s in skipped],
    }
    write_json(MANIFEST.parent / "summary.json", summary)
    for s in skipped:
        log.warning("skipped class %s/%s: %s (%d images)", s.source, s.label, s.reason, s.images)
    log.info("sample: %d images, %d classes; images %s; classes %s", summary["images"],
             summary["classes"], summary["per_source_split"], summary["classes_per_source_group"])
    return summary


def run(params: Any, _key: str | None) -> None:
    try:
        check_sources(params.sample, list(params.sources))
    except ValueError as exc:
        raise ParamsError(f"params.yaml: {exc}") from None
    # Class counts depend on the downloaded catalogs: check them before the flow starts.
    check_class_counts(read_catalogs(sorted(params.sources)), params.sample)
    sample(sorted(params.sources), params.sample)


if __name__ == "__main__":
    main(run, {"sources": NAMES, "sample": SampleParams})
