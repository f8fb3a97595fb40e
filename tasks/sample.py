"""Per-class sampling into train/val (seen classes) and query/index (unseen classes).

Every choice is an order given by a seeded hash, and every split is decided
by a position in that order, never by a count of what was drawn. So raising
`samples` only appends images to each class (the chosen ones stay chosen and
keep their split), and raising `num_classes` only appends classes.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import polars as pl
import pyarrow as pa

from tasks.params import ParamsError, SampleParams
from tasks.schemas import MANIFEST_SCHEMA

# A held-out class needs one query and one index image to be scored at all.
MIN_IMAGES_PER_CLASS = 2


def seeded_order(seed: int, *parts: str) -> int:
    """A stable pseudo-random sort key for (seed, parts), the same on every machine."""
    text = "\x1f".join([str(seed), *parts]).encode("utf-8")
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "big")


def is_minority(position: int, fraction: float) -> bool:
    """True for the positions that make up `fraction` of any prefix (prefix-stable split)."""
    return math.floor((position + 1) * fraction) > math.floor(position * fraction)


def image_key(source: str, path: str) -> str:
    """`<source>-<hash of path>`: stable, unique per source, free of dots (WebDataset splits on them)."""
    return f"{source}-{hashlib.sha1(path.encode('utf-8')).hexdigest()[:16]}"


@dataclass(frozen=True)
class SkippedClass:
    source: str
    label: str
    images: int
    reason: str


def eligible_classes(catalog: pl.DataFrame, source: str) -> tuple[list[str], list[SkippedClass]]:
    """Labels with enough images to be sampled, and the ones skipped (with the reason)."""
    counts = catalog.group_by("label").len().sort("label")
    skipped = [SkippedClass(source, r["label"], r["len"], f"fewer than {MIN_IMAGES_PER_CLASS} images")
               for r in counts.filter(pl.col("len") < MIN_IMAGES_PER_CLASS).iter_rows(named=True)]
    return counts.filter(pl.col("len") >= MIN_IMAGES_PER_CLASS)["label"].to_list(), skipped


def check_class_counts(catalogs: dict[str, pl.DataFrame], params: SampleParams) -> None:
    """Raise ParamsError, before any sampling, when a source has fewer classes than asked for."""
    for source in sorted(catalogs):
        eligible, _ = eligible_classes(catalogs[source], source)
        wanted = params.num_classes[source]
        if wanted == "all":
            if len(eligible) < 2:
                raise ParamsError(f"sample.num_classes.{source} = 'all': source '{source}' has {len(eligible)} "
                                  f"classes with >= {MIN_IMAGES_PER_CLASS} images; at least 2 are needed")
        elif wanted > len(eligible):
            raise ParamsError(
                f"sample.num_classes.{source} = {wanted}: source '{source}' has {len(eligible)} classes "
                f"with >= {MIN_IMAGES_PER_CLASS} images; allowed is 2..{len(eligible)}"
            )


def choose_classes(catalog: pl.DataFrame, source: str, num_classes: int | str, seed: int) -> tuple[list[str], list[SkippedClass]]:
    """Pick `num_classes` eligible labels (or all of them) in seeded order; report the ineligible ones."""
    eligible, skipped = eligible_classes(catalog, source)
    num_classes = len(eligible) if num_classes == "all" else num_classes
    if num_classes > len(eligible):
        raise ValueError(f"{source}: {num_classes} classes asked for, {len(eligible)} eligible")
    ordered = sorted(eligible, key=lambda label: (seeded_order(seed, source, label), label))
    return ordered[:num_classes], skipped


def sample_source(catalog: pl.DataFrame, source: str, num_classes: int | str, params: SampleParams) -> tuple[pl.DataFrame, list[SkippedClass]]:
    """Rows (key, source, label, path, split) sampled from one source's catalog."""
    classes, skipped = choose_classes(catalog, source, num_classes, params.seed)
    rows = []
    for position, label in enumerate(classes):
        held_out = is_minority(position, params.eval_fraction)
        paths = catalog.filter(pl.col("label") == label)["path"].to_list()
        paths.sort(key=lambda p: (seeded_order(params.seed, source, label, p), p))
        for j, path in enumerate(paths[: params.samples]):
            if held_out:
                split = "query" if is_minority(j, params.query_fraction) else "index"
            else:
                split = "val" if is_minority(j, params.val_fraction) else "train"
            rows.append({"key": image_key(source, path), "source": source, "label": label,
                         "path": path, "split": split})
    return pl.DataFrame(rows, schema={c: pl.String for c in ("key", "source", "label", "path", "split")}), skipped


def build_manifest(catalogs: dict[str, pl.DataFrame], params: SampleParams) -> tuple[pa.Table, list[SkippedClass]]:
    """The manifest of all sources, with class ids global across sources.

    The same label in two sources stays two classes: ids are given per
    (source, label), in sorted order.
    """
    check_class_counts(catalogs, params)
    frames, skipped = [], []
    for source in sorted(catalogs):
        frame, skip = sample_source(catalogs[source], source, params.num_classes[source], params)
        frames.append(frame)
        skipped.extend(skip)
    manifest = pl.concat(frames)
    ids = (manifest.select("source", "label").unique().sort("source", "label")
           .with_row_index("class_id").with_columns(pl.col("class_id").cast(pl.Int32)))
    manifest = manifest.join(ids, on=["source", "label"]).sort("key")
    if manifest["key"].n_unique() != manifest.height:
        raise ValueError("duplicate image keys: two catalog rows share a path")
    return manifest.select(MANIFEST_SCHEMA.names).to_arrow().cast(MANIFEST_SCHEMA), skipped
