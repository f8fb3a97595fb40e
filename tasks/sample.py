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


def eligible_classes(catalog: pl.DataFrame, source: str, min_images: int = MIN_IMAGES_PER_CLASS,
                     ) -> tuple[list[str], list[SkippedClass]]:
    """Labels with enough images to be sampled, and the ones skipped (with the reason)."""
    counts = catalog.group_by("label").len().sort("label")
    skipped = [SkippedClass(source, r["label"], r["len"], f"fewer than {min_images} images")
               for r in counts.filter(pl.col("len") < min_images).iter_rows(named=True)]
    return counts.filter(pl.col("len") >= min_images)["label"].to_list(), skipped


def check_class_counts(catalogs: dict[str, pl.DataFrame], params: SampleParams) -> None:
    """Raise ParamsError, before any sampling, when a source has fewer classes than asked for."""
    for source in sorted(catalogs):
        eligible, _ = eligible_classes(catalogs[source], source, params.min_images)
        wanted = params.num_classes[source]
        if wanted == "all":
            if len(eligible) < 2:
                raise ParamsError(f"sample.num_classes.{source} = 'all': source '{source}' has {len(eligible)} "
                                  f"classes with >= {params.min_images} images; at least 2 are needed")
        elif wanted > len(eligible):
            raise ParamsError(
                f"sample.num_classes.{source} = {wanted}: source '{source}' has {len(eligible)} classes "
                f"with >= {params.min_images} images (sample.min_images); allowed is 2..{len(eligible)}"
            )


def choose_classes(catalog: pl.DataFrame, source: str, num_classes: int | str, seed: int,
                   pick: str = "random", min_images: int = MIN_IMAGES_PER_CLASS) -> tuple[list[str], list[SkippedClass]]:
    """Pick `num_classes` eligible labels (or all of them); report the ineligible ones.

    "random" takes them in seeded order; "most_populous" takes the classes
    with the most images first (GLR2021's "top 7k classes"), ties in seeded
    order. Either way the order is fixed, so raising num_classes appends.
    """
    eligible, skipped = eligible_classes(catalog, source, min_images)
    num_classes = len(eligible) if num_classes == "all" else num_classes
    if num_classes > len(eligible):
        raise ValueError(f"{source}: {num_classes} classes asked for, {len(eligible)} eligible")
    size = dict(catalog.group_by("label").len().iter_rows()) if pick == "most_populous" else {}
    ordered = sorted(eligible, key=lambda label: (-size.get(label, 0), seeded_order(seed, source, label), label))
    return ordered[:num_classes], skipped


def sample_source(catalog: pl.DataFrame, source: str, num_classes: int | str, params: SampleParams) -> tuple[pl.DataFrame, list[SkippedClass]]:
    """Rows (key, source, label, path, split) sampled from one source's catalog."""
    classes, skipped = choose_classes(catalog, source, num_classes, params.seed, params.pick.get(source, "random"),
                                      params.min_images)
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


def _keep_mapped_classes_on_one_side(manifest: pl.DataFrame) -> pl.DataFrame:
    """A shared class drawn for training in one source and held out in another would leak
    into the evaluation: its held-out images move to training."""
    seen = manifest.filter(pl.col("split").is_in(["train", "val"]))["class_name"].unique()
    leak = pl.col("class_name").is_in(seen.implode()) & pl.col("split").is_in(["query", "index"])
    return manifest.with_columns(pl.when(leak).then(pl.lit("train")).otherwise(pl.col("split")).alias("split"))


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
    # A class is "<source>/<label>" unless label_map names a shared class for it.
    mapped = {k: f"*/{v}" for k, v in params.label_map.items()}
    manifest = manifest.with_columns(
        pl.concat_str("source", pl.lit("/"), "label").replace(mapped).alias("class_name"))
    manifest = _keep_mapped_classes_on_one_side(manifest)
    ids = (manifest.select("class_name").unique().sort("class_name")
           .with_row_index("class_id").with_columns(pl.col("class_id").cast(pl.Int32)))
    manifest = manifest.join(ids, on="class_name").sort("key")
    if manifest["key"].n_unique() != manifest.height:
        raise ValueError("duplicate image keys: two catalog rows share a path")
    return manifest.select(MANIFEST_SCHEMA.names).to_arrow().cast(MANIFEST_SCHEMA), skipped
