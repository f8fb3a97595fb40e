"""The shards (`shard`, data/03_shards): how they are read, and the images left out, with why.

WebDataset tars per split listed in index.json (wids layout); every reader of the shards
goes through `read_index`, `read_shard` and `read_split`, or, to read images one at a time
in any order without holding a split's bytes in memory, `index_split` and `SampleRef.read`.
Both kinds of sample give their bytes as `.jpeg`; `Jpegs` is a list of them read on demand.
"""

from __future__ import annotations

import json
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import pyarrow as pa
import webdataset as wds

from tasks.schemas.paths import SHARD_INDEX

REJECTS_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("path", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
    ]
)


def shards_of_split(index: dict, split: str) -> list[dict]:
    return [e for e in index["shardlist"] if e["split"] == split]


@dataclass(frozen=True)
class Sample:
    key: str
    class_id: int
    jpeg: bytes


def read_shard(url: str | Path) -> list[Sample]:
    """All samples of one tar, in stored order, as raw bytes (decoding happens in workers)."""
    stream = wds.WebDataset(str(url), shardshuffle=False, empty_check=False)
    return [Sample(key, int(cls.decode() if isinstance(cls, bytes) else cls), jpg)
            for key, cls, jpg in stream.to_tuple("__key__", "cls", "jpg")]


# WebDataset's split of a member name into sample key and field (`base_plus_ext`): the key
# runs to the first dot of the file name.
_MEMBER = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


@dataclass(frozen=True)
class SampleRef:
    """Where one sample's JPEG lies in its tar: read on demand, in any order."""

    key: str
    class_id: int
    shard: Path
    offset: int
    size: int

    def read(self) -> bytes:
        with self.shard.open("rb") as f:
            f.seek(self.offset)
            data = f.read(self.size)
        if len(data) != self.size:
            raise ValueError(f"{self.shard}: {self.key}.jpg ends early ({len(data)} of "
                             f"{self.size} bytes): the shard changed after it was indexed")
        return data

    @property
    def jpeg(self) -> bytes:
        """The bytes, read now: a SampleRef goes wherever a Sample's `.jpeg` is read."""
        return self.read()


class Jpegs(Sequence[bytes]):
    """The JPEG bytes of samples (Sample or SampleRef), each read only when asked for: what
    the decode pool slices, holding no more than the chunks in flight."""

    def __init__(self, samples: Sequence[Sample | SampleRef]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i):  # an int or a slice, as the decode pool asks
        if isinstance(i, slice):
            return [s.jpeg for s in self.samples[i]]
        return self.samples[i].jpeg


def index_shard(url: str | Path) -> list[SampleRef]:
    """The samples of one tar (key, class, where its JPEG's bytes are), in stored order,
    from the tar's headers and `.cls` members only. A sample without both is refused."""
    fields: dict[str, dict[str, object]] = {}
    with tarfile.open(url, mode="r:") as tar:
        for member in tar:
            found = _MEMBER.match(member.name) if member.isfile() else None
            if found is None:
                continue
            key, ext = found.groups()
            entry = fields.setdefault(key, {})
            if ext == "cls":
                entry["cls"] = int(tar.extractfile(member).read().decode())
            elif ext == "jpg":
                entry["jpg"] = (member.offset_data, member.size)
    refs = []
    for key, entry in fields.items():
        if "cls" not in entry or "jpg" not in entry:
            raise ValueError(f"{url}: sample {key!r} lacks its "
                             f"{'.cls' if 'cls' not in entry else '.jpg'} member")
        offset, size = entry["jpg"]
        refs.append(SampleRef(key, entry["cls"], Path(url), offset, size))
    return refs


def index_split(shards_dir: Path, split: str) -> Iterator[SampleRef]:
    """`read_split`'s samples, in its order, as references instead of bytes."""
    for entry in shards_of_split(read_index(shards_dir), split):
        yield from index_shard(shards_dir / entry["url"])


def read_index(shards_dir: Path) -> dict:
    """The shard stage's index.json (wids shape: `shardlist` of url, nsamples, name, split,
    sha256)."""
    return json.loads((shards_dir / SHARD_INDEX).read_text())


def read_split(shards_dir: Path, split: str) -> Iterator[Sample]:
    """Every sample of one split, shard after shard, in the order index.json lists them."""
    for entry in shards_of_split(read_index(shards_dir), split):
        yield from read_shard(shards_dir / entry["url"])
