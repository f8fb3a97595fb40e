"""Read extracted features back as aligned numpy arrays, per split and backbone."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks.schemas import FEATURES_DIR, embeddings_of, read_features


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
            raise ValueError(f"features of {v!r} and {variants[0]!r} disagree on the {split} keys; rerun extract")
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
