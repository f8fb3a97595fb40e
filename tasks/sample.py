"""Per-class sampling: train/val images of training classes, query/index images of
validation classes (every choice is made on them) and of test classes (reported).

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

from tasks.params.base import ParamsError
from tasks.params.sample import SampleParams
from tasks.schemas.manifest import GROUPS, MANIFEST_SCHEMA

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
    """`<source>-<hash of path>`: stable, unique per source, free of dots (WebDataset splits
    on them)."""
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
                raise ParamsError(f"sample.num_classes.{source} = 'all': source '{source}' "
                                  f"has {len(eligible)} classes with >= {params.min_images} "
                                  "images; at least 2 are needed")
        elif wanted > len(eligible):
            raise ParamsError(
                f"sample.num_classes.{source} = {wanted}: source '{source}' has "
                f"{len(eligible)} classes with >= {params.min_images} images "
                f"(sample.min_images); allowed is 2..{len(eligible)}"
            )


def choose_classes(catalog: pl.DataFrame, source: str, num_classes: int | str, seed: int,
                   pick: str = "random", min_images: int = MIN_IMAGES_PER_CLASS,
                   ) -> tuple[list[str], list[SkippedClass]]:
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
    ordered = sorted(eligible, key=lambda label: (-size.get(label, 0),
                                                  seeded_order(seed, source, label), label))
    return ordered[:num_classes], skipped


def class_groups(classes: list[str], eval_fraction: float, test_fraction: float) -> dict[str, str]:
    """The group of each class, by its position in the chosen order (prefix-stable).

    A share `eval_fraction` of the classes is held out of training; of those, a
    share `test_fraction` are test classes and the rest validation classes. Adding
    classes appends to both orders, so no class ever changes group.
    """
    groups, held_out = {}, 0
    for position, label in enumerate(classes):
        if not is_minority(position, eval_fraction):
            groups[label] = "train"
            continue
        groups[label] = "test" if is_minority(held_out, test_fraction) else "validation"
        held_out += 1
    return groups


def sample_source(catalog: pl.DataFrame, source: str, num_classes: int | str, params: SampleParams,
                  ) -> tuple[pl.DataFrame, list[SkippedClass]]:
    """Rows (key, source, label, path, split, group, class_images) sampled from one catalog."""
    classes, skipped = choose_classes(catalog, source, num_classes, params.seed,
                                      params.pick.get(source, "random"), params.min_images)
    groups = class_groups(classes, params.eval_fraction, params.test_fraction)
    # every chosen class's paths in one pass (a filter a class would read the whole catalog
    # once a class: 10,000 landmark classes x 1.6M rows in the 2xclip preset)
    paths_of = dict(catalog.filter(pl.col("label").is_in(classes)).group_by("label")
                    .agg("path").iter_rows())
    rows = []
    for label in classes:
        paths = sorted(paths_of[label],
                       key=lambda p: (seeded_order(params.seed, source, label, p), p))
        for j, path in enumerate(paths[: params.samples]):
            if groups[label] != "train":
                split = "query" if is_minority(j, params.query_fraction) else "index"
            else:
                split = "val" if is_minority(j, params.val_fraction) else "train"
            rows.append({"key": image_key(source, path), "source": source, "label": label,
                         "path": path, "split": split, "group": groups[label],
                         "class_images": len(paths_of[label])})
    schema = {c: pl.String for c in ("key", "source", "label", "path", "split", "group")}
    return pl.DataFrame(rows, schema={**schema, "class_images": pl.Int64}), skipped


def _one_group_per_class(manifest: pl.DataFrame) -> pl.DataFrame:
    """A class shared by two sources (label_map) takes the first of its groups in
    train, validation, test order: drawn for training in one source and held out in
    another, its held-out images would leak into the scores, so they move to
    training; drawn for validation and test, it is a validation class. Its
    class_images is the sum over its sources."""
    rank = {g: i for i, g in enumerate(GROUPS)}
    manifest = manifest.with_columns(pl.col("group").replace_strict(rank).alias("_rank"))
    per_class = manifest.group_by("class_name").agg(pl.col("_rank").min().alias("_class_rank"))
    manifest = manifest.join(per_class, on="class_name").with_columns(
        pl.col("_class_rank").replace_strict({i: g for g, i in rank.items()}).alias("group"))
    to_train = (pl.col("group") == "train") & pl.col("split").is_in(["query", "index"])
    totals = (manifest.unique(["class_name", "source", "label"]).group_by("class_name")
              .agg(pl.col("class_images").sum().alias("_total")))
    manifest = manifest.join(totals, on="class_name")
    return manifest.with_columns(
        pl.when(to_train).then(pl.lit("train")).otherwise(pl.col("split")).alias("split"),
        pl.col("_total").alias("class_images"),
    ).drop("_rank", "_class_rank", "_total")


def build_manifest(catalogs: dict[str, pl.DataFrame], params: SampleParams,
                   ) -> tuple[pa.Table, list[SkippedClass]]:
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
    manifest = _one_group_per_class(manifest)
    ids = (manifest.select("class_name").unique().sort("class_name")
           .with_row_index("class_id").with_columns(pl.col("class_id").cast(pl.Int32)))
    manifest = manifest.join(ids, on="class_name").sort("key")
    if manifest["key"].n_unique() != manifest.height:
        raise ValueError("duplicate image keys: two catalog rows share a path")
    return manifest.select(MANIFEST_SCHEMA.names).to_arrow().cast(MANIFEST_SCHEMA), skipped
