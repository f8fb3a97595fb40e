"""Read extracted features back as aligned numpy arrays, per split and backbone, and sort
the query and index features into class groups by the manifest."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from tasks.schemas.features import read_features
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
    keys, ids, mapped = _map_variant(variant, split, root)
    if not keys:
        return SplitFeatures([], np.zeros(0, np.int64), np.zeros((0, 0), np.float32))
    return SplitFeatures(keys, ids, np.concatenate(mapped.shards))


def _normalise_into(x: np.ndarray, out: np.ndarray, eps: float = 1e-12) -> None:
    """`l2_normalize(x)` written into `out` (a column block of a wider matrix): the same
    arithmetic per row, so the same bits, without the normalised copy."""
    np.divide(x, np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps), out=out)


@dataclass
class _MappedVariant:
    """One backbone's shards of a split: (rows, dim) float32 views on the memory-mapped files
    and the first row of each shard (`starts[-1]` is the row count)."""
    shards: list[np.ndarray]
    starts: np.ndarray
    dim: int


def _map_variant(variant: str, split: str, root: Path) -> tuple[list[str], np.ndarray,
                                                                 _MappedVariant]:
    """The keys, class ids and memory-mapped embeddings of one backbone's split; the
    embeddings stay on disk (the page cache) until rows are read."""
    keys: list[str] = []
    ids, shards = [], []
    for f in sorted((root / variant / split).glob("*.arrow")):
        table, _ = read_features(f)
        keys.extend(table.column("key").to_pylist())
        ids.append(table.column("class_id").to_numpy().astype(np.int64))
        col = table.column("embedding")
        col = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
        shards.append(col.flatten().to_numpy(zero_copy_only=False).reshape(-1, col.type.list_size))
    dim = shards[0].shape[1] if shards else 0
    starts = np.cumsum([0] + [len(s) for s in shards])
    return keys, (np.concatenate(ids) if ids else np.zeros(0, np.int64)), _MappedVariant(
        shards, starts, dim)


@dataclass
class MappedFeatures:
    """One split's features of several backbones, memory-mapped, not yet in RAM.

    Rows come out per-backbone L2-normalised and concatenated in the backbones' order, with
    the bits `load_concat` gives: all at once into one preallocated matrix (`load`), or a
    batch of rows at a time (`rows`), so a split bigger than RAM can be trained on.
    """
    keys: list[str]
    class_ids: np.ndarray  # int64 [N]
    variants: list[_MappedVariant]

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def dim(self) -> int:
        return sum(v.dim for v in self.variants)

    @property
    def nbytes(self) -> int:
        """Bytes of the concatenated float32 matrix `load` builds."""
        return len(self) * self.dim * 4

    def rows(self, index: np.ndarray) -> np.ndarray:
        """Rows `index` (in that order) as a new contiguous (len(index), dim) float32 array."""
        index = np.asarray(index, dtype=np.int64)
        if len(index) and (index.min() < 0 or index.max() >= len(self)):
            raise IndexError(f"row index out of range for {len(self)} rows")
        out = np.empty((len(index), self.dim), np.float32)
        offset = 0
        for v in self.variants:
            shard = np.searchsorted(v.starts, index, side="right") - 1
            gathered = np.empty((len(index), v.dim), np.float32)
            for s in np.unique(shard):
                at = shard == s
                gathered[at] = v.shards[s][index[at] - v.starts[s]]
            _normalise_into(gathered, out[:, offset:offset + v.dim])
            offset += v.dim
        return out

    def load(self) -> SplitFeatures:
        """Every row, normalised shard by shard straight into one preallocated matrix."""
        out = np.empty((len(self), self.dim), np.float32)
        offset = 0
        for v in self.variants:
            for s, shard in enumerate(v.shards):
                _normalise_into(shard, out[v.starts[s]:v.starts[s + 1], offset:offset + v.dim])
            offset += v.dim
        return SplitFeatures(self.keys, self.class_ids, out)


def map_concat(variants: list[str], split: str, root: Path = FEATURES_DIR) -> MappedFeatures:
    """The split's features of `variants`, memory-mapped; the backbones must agree on keys."""
    mapped = [_map_variant(v, split, root) for v in variants]
    for v, (keys, _, _) in zip(variants[1:], mapped[1:]):
        if keys != mapped[0][0]:
            raise ValueError(f"features of {v!r} and {variants[0]!r} disagree on the {split} "
                             "keys; rerun extract")
    keys, ids, _ = mapped[0]
    return MappedFeatures(keys, ids, [m for _, _, m in mapped] if keys else [])


def load_concat(variants: list[str], split: str, root: Path = FEATURES_DIR) -> SplitFeatures:
    """Per-backbone L2-normalised features, concatenated in `variants` order.

    Normalising each backbone first keeps one backbone's larger norm from
    drowning the other in the concatenation, as the 2xCLIP entries did. Read
    memory-mapped and written once into a preallocated matrix (no copies).
    """
    return map_concat(variants, split, root).load()


def seeded_rows(total: int, count: int, seed: int) -> np.ndarray:
    """`count` distinct row indices of `total`, drawn by numpy's generator seeded `seed`, in
    ascending order: the fixed samples the monitor, early stopping and the PCA fit take."""
    return np.sort(np.random.default_rng(seed).choice(total, count, replace=False))


def train_rows_for_fit(variants: list[str], max_rows: int, seed: int,
                       root: Path = FEATURES_DIR) -> np.ndarray:
    """Train features to fit a transform (a PCA) on: every row while there are at most
    `max_rows` (one backbone's as stored, several per-backbone normalised and concatenated),
    else a seeded sample of `max_rows`, read from the memory-mapped files alone."""
    mapped = map_concat(variants, "train", root)
    if len(mapped) > max_rows:
        return mapped.rows(seeded_rows(len(mapped), max_rows, seed))
    if len(variants) == 1 and len(mapped):  # as stored: what load_variant_split gives
        return np.concatenate(mapped.variants[0].shards)
    return mapped.load().embeddings


def available_memory_bytes() -> int:
    """RAM a new allocation can take without swapping: MemAvailable (Linux), else free pages."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def load_or_map(variants: list[str], split: str, max_memory_gb: float | None,
                root: Path = FEATURES_DIR) -> SplitFeatures | MappedFeatures:
    """The split in RAM if its concatenated matrix fits `max_memory_gb` (None: half the RAM
    available now, the rest for the other splits, the model and the page cache streaming
    reads through), else left memory-mapped for a reader to stream."""
    budget = available_memory_bytes() / 2 if max_memory_gb is None else max_memory_gb * 2**30
    mapped = map_concat(variants, split, root)
    return mapped if len(mapped) and mapped.nbytes > budget else mapped.load()


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


@dataclass
class ManifestIndex:
    """What readers of features need from the manifest (features hold only the key and the
    class id), kept as columns and looked up by key with a join: a dict of one Python dict
    per row took ~1.6 KiB an image, 1.6 GB at the 2xclip preset's size."""

    frame: pl.DataFrame  # key plus any of source, label, class_id, group, class_images

    def column(self, keys: list[str], name: str) -> pl.Series:
        """`name` of each of `keys`, in their order; a key the manifest lacks is an error."""
        wanted = pl.DataFrame({"key": keys}, schema={"key": pl.String})
        found = wanted.join(self.frame.select("key", name), on="key", how="left",
                            maintain_order="left")
        missing = wanted.filter(~pl.col("key").is_in(self.frame["key"].implode()))
        if len(missing):
            raise ValueError(f"{len(missing)} feature keys are not in the manifest (e.g. "
                             f"{missing['key'][0]!r}): features and manifest come from "
                             "different runs; rerun shard and extract")
        return found[name]

    def class_images(self) -> dict[int, int]:
        """Each class's image count in its source catalogs, before sampling capped it."""
        pairs = self.frame.select("class_id", "class_images").unique("class_id")
        return dict(zip(pairs["class_id"].to_list(), pairs["class_images"].to_list()))


def read_manifest(path: Path = MANIFEST) -> ManifestIndex:
    """The manifest's lookup columns (key, source, label, class_id, group, class_images)."""
    manifest = pl.from_arrow(read_table(path, MANIFEST_SCHEMA))
    return ManifestIndex(manifest.select("key", "source", "label", "class_id", "group",
                                         "class_images"))


def class_group(query: SplitFeatures, index: SplitFeatures, meta: ManifestIndex, group: str,
                ) -> GroupData:
    """The queries and index images of `group`'s classes (the manifest's `group`), in order."""
    q = select(query, (meta.column(query.keys, "group") == group).to_numpy())
    i = select(index, (meta.column(index.keys, "group") == group).to_numpy())
    return GroupData(q, i, meta.column(q.keys, "source").to_list())


def require_images(data: GroupData, group: str) -> GroupData:
    """`data` if it has query and index images; a group without either cannot be scored."""
    if not data.query.keys or not data.index.keys:
        raise ValueError(f"no {group} classes with both query and index images: raise "
                         "sample.eval_fraction or sample.num_classes (see the sample "
                         "stage's summary.json)")
    return data


def split_groups(query: SplitFeatures, index: SplitFeatures, meta: ManifestIndex,
                 ) -> dict[str, GroupData]:
    """The validation and test classes' query/index features, each group non-empty."""
    return {group: require_images(class_group(query, index, meta, group), group)
            for group in GROUPS}
