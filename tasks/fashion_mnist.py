"""Fashion-MNIST from its published IDX files, fetched like every other download.

The same loader reads Debian's copy (`file:///usr/share/datasets/fashion-mnist`)
and the dataset's public mirror (`http://fashion-mnist.s3-website.eu-central-1.amazonaws.com`):
only the base URI differs. Files come through `tasks.fetch.fetch` (download
cache, retries, byte limit), must have a known sha256, and are gunzipped as
a stream that stops at the size their IDX header announces, so a gzip bomb
or a lying header costs at most `MAX_IDX_BYTES` of memory.
"""

from __future__ import annotations

import gzip
import math
import struct
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlparse

import numpy as np

from tasks.fetch import ChecksumMismatch, fetch
from tasks.http_guard import ByteLimit, TimeLimit
from tasks.schemas.io import sha256_file

CLASS_NAMES = ("tshirt_top", "trouser", "pullover", "dress", "coat",
               "sandal", "shirt", "sneaker", "bag", "ankle_boot")
TRAIN_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz")
_IMAGES_MAGIC, _LABELS_MAGIC = 2051, 2049
DEBIAN_HINT = "on Debian/Ubuntu: `sudo apt-get install dataset-fashion-mnist`"
# The training images decompress to 47,040,016 bytes; a header announcing far more is not
# this dataset.
MAX_IDX_BYTES = 256 << 20

# sha256 of the two copies that exist. The published files: the README of
# zalandoresearch/fashion-mnist gives their md5s (8d4fb7e6..., 25c81989...),
# which these files match. Debian's dataset-fashion-mnist recompressed them
# (same deflate stream and IDX bytes, another gzip header), hence other digests.
KNOWN_SHA256 = {
    "train-images-idx3-ubyte.gz": {
        "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84": "published",
        "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7": "Debian",
    },
    "train-labels-idx1-ubyte.gz": {
        "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845": "published",
        "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056": "Debian",
    },
}


def fetch_checked(url: str, cache: Path, expected: set[str], *, source: str,
                  limit: ByteLimit | None, time_limit: TimeLimit | None = None) -> Path:
    """One file through the shared fetcher, kept only when its sha256 is one of `expected`."""
    try:
        path = fetch(url, None, cache, source=source, limit=limit, time_limit=time_limit)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{exc} ({DEBIAN_HINT})") from None
    got = sha256_file(path)
    if got not in expected:
        if path.resolve().is_relative_to(Path(cache).resolve()):
            path.unlink()  # a download, not the user's own file: do not reuse it
        raise ChecksumMismatch(f"{source}: {url}: sha256 is {got}, expected one of "
                               f"{sorted(expected)} (the published file or Debian's copy); for "
                               "another copy give its sha256 in params.yaml")
    return path


def read_idx(path: Path, magic: int, max_bytes: int = MAX_IDX_BYTES) -> np.ndarray:
    """A (possibly gzipped) IDX file as an array; checks the magic number and the size."""
    with open(path, "rb") as raw:
        gzipped = raw.read(2) == b"\x1f\x8b"
    with (gzip.open(path, "rb") if gzipped else open(path, "rb")) as fh:
        return parse_idx(fh, magic, max_bytes)


def parse_idx(fh: BinaryIO, magic: int, max_bytes: int = MAX_IDX_BYTES) -> np.ndarray:
    """Decode an IDX stream, reading no more than its header announces (at most `max_bytes`)."""
    head = fh.read(8)
    if len(head) < 8:
        raise ValueError("IDX file is truncated")
    found, count = struct.unpack(">II", head)
    if found != magic:
        raise ValueError(f"IDX magic {found} != expected {magic}")
    shape: tuple[int, ...] = (count,)
    if magic == _IMAGES_MAGIC:
        dims = fh.read(8)
        if len(dims) < 8:
            raise ValueError("IDX file is truncated")
        shape = (count, *struct.unpack(">II", dims))
    expected = math.prod(shape)
    if expected > max_bytes:
        raise ValueError(f"IDX header announces {expected} bytes ({shape}), over the "
                         f"{max_bytes}-byte limit for this dataset")
    body = fh.read(expected + 1)  # one byte more than announced tells trailing data apart
    if len(body) != expected:
        got = f"more than {expected}" if len(body) > expected else str(len(body))
        raise ValueError(f"IDX body has {got} bytes, expected {expected}")
    return np.frombuffer(body, dtype=np.uint8).reshape(shape)


def load_fashion_mnist(uri: str, cache: Path, *, source: str = "fashion_mnist",
                       limit: ByteLimit | None = None, time_limit: TimeLimit | None = None,
                       sha256: dict[str, str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28], labels uint8 [N]) of the training split at `uri`.

    `sha256` names each file's digest for a copy other than the published or Debian's.
    """
    base = uri.rstrip("/")
    if urlparse(base).scheme not in ("", "file", "http", "https"):
        raise ValueError(f"uri {uri!r}: allowed schemes are file://, http://, https:// or a "
                         "local path")
    own = {name: {digest.lower()} for name, digest in (sha256 or {}).items()}
    paths = [fetch_checked(f"{base}/{name}", cache, own.get(name, set(KNOWN_SHA256[name])),
                           source=source, limit=limit, time_limit=time_limit)
             for name in TRAIN_FILES]
    images = read_idx(paths[0], _IMAGES_MAGIC)
    labels = read_idx(paths[1], _LABELS_MAGIC)
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels at {uri}")
    return images, labels


def first_per_class(labels: np.ndarray, per_class: int) -> list[int]:
    """Indices of the first `per_class` images of each class, in file order (deterministic)."""
    chosen: list[int] = []
    for cls in range(len(CLASS_NAMES)):
        chosen.extend(np.flatnonzero(labels == cls)[:per_class].tolist())
    return sorted(chosen)
