"""Read extracted features back as aligned numpy arrays, per split and backbone, and sort
the query and index features into class groups by the manifest."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from tasks.schemas.features import embeddings_of, read_features
from tasks.schemas.io import read_table
from tasks.schemas.manifest import MANIFEST_SCHEMA
from tasks.schemas.paths import FEATURES_DIR, MANIFEST

GROUPS = ("validation", "test")  # the held-out class groups, each scored on its own


@dataclass
class SplitFeatures:
    keys: list[str]
    class_ids: np.ndarray  # int64 [N]
    embeddings: np.ndarray  # float32 [N, D]


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)


def load_variant_split(variant: str, split: str, root: Path = FEATURES_DIR) -> SplitFeatures:
    """All shards of one split for one backbone, concatenated in shard order."""
    files = sorted((root / variant / split).glob("*.arrow"))
    keys: list[str] = []
    ids, embs = [], []
    for f in files:
        table, _ = read_features(f)
        keys.extend(table.column("key").to_pylist())
        ids.append(table.column("class_id").to_numpy().astype(np.int64))
        embs.append(embeddings_of(table))
    if not files:
        return SplitFeatures([], np.zeros(0, np.int64), np.zeros((0, 0), np.float32))
    return SplitFeatures(keys, np.concatenate(ids), np.concatenate(embs))


def load_concat(variants: list[str], split: str, root: Path = FEATURES_DIR) -> SplitFeatures:
    """Per-backbone L2-normalised features, concatenated in `variants` order.

    Normalising each backbone first keeps one backbone's larger norm from
    drowning the other in the concatenation, as the 2xCLIP entries did.
    """
    parts = [load_variant_split(v, split, root) for v in variants]
    for v, p in zip(variants[1:], parts[1:]):
        if p.keys != parts[0].keys:
            raise ValueError(f"features of {v!r} and {variants[0]!r} disagree on the {split} "
                             "keys; rerun extract")
    if not parts[0].keys:
        return parts[0]
    emb = np.concatenate([l2_normalize(p.embeddings) for p in parts], axis=1)
    return SplitFeatures(parts[0].keys, parts[0].class_ids, emb.astype(np.float32))


def select(features: SplitFeatures, keep: np.ndarray) -> SplitFeatures:
    """The rows of `features` where the boolean mask `keep` is true, in their order."""
    keep = np.asarray(keep, dtype=bool)
    keys = [k for k, kept in zip(features.keys, keep) if kept]
    if not len(features.keys):
        return features
    return SplitFeatures(keys, features.class_ids[keep], features.embeddings[keep])


@dataclass
class GroupData:
    """The query and index features of one class group, with each query's source."""
    query: SplitFeatures
    index: SplitFeatures
    sources: list[str]


def read_manifest_rows(path: Path = MANIFEST) -> dict[str, dict]:
    """Each sampled image's manifest row (group, source, label, class_images...) by key:
    features hold only the key and the class id."""
    manifest = pl.from_arrow(read_table(path, MANIFEST_SCHEMA))
    return {row["key"]: row for row in manifest.iter_rows(named=True)}


def class_group(query: SplitFeatures, index: SplitFeatures, meta: dict[str, dict], group: str,
                ) -> GroupData:
    """The queries and index images of `group`'s classes (the manifest's `group`), in order."""
    q = select(query, np.array([meta[key]["group"] == group for key in query.keys], dtype=bool))
    i = select(index, np.array([meta[key]["group"] == group for key in index.keys], dtype=bool))
    return GroupData(q, i, [meta[key]["source"] for key in q.keys])


def require_images(data: GroupData, group: str) -> GroupData:
    """`data` if it has query and index images; a group without either cannot be scored."""
    if not data.query.keys or not data.index.keys:
        raise ValueError(f"no {group} classes with both query and index images: raise "
                         "sample.eval_fraction or sample.num_classes (see the sample "
                         "stage's summary.json)")
    return data


def split_groups(query: SplitFeatures, index: SplitFeatures, meta: dict[str, dict],
                 ) -> dict[str, GroupData]:
    """The validation and test classes' query/index features, each group non-empty."""
    return {group: require_images(class_group(query, index, meta, group), group)
            for group in GROUPS}
