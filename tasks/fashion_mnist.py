"""Fashion-MNIST from its published IDX files, at any URL urllib can open.

The same loader reads Debian's copy (`file:///usr/share/datasets/fashion-mnist`)
and the dataset's public mirror (`http://fashion-mnist.s3-website.eu-central-1.amazonaws.com`):
only the base URI differs.
"""

from __future__ import annotations

import gzip
import struct
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

CLASS_NAMES = ("tshirt_top", "trouser", "pullover", "dress", "coat",
               "sandal", "shirt", "sneaker", "bag", "ankle_boot")
TRAIN_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz")
_IMAGES_MAGIC, _LABELS_MAGIC = 2051, 2049
DEBIAN_HINT = "on Debian/Ubuntu: `sudo apt-get install dataset-fashion-mnist`"


def _fetch(uri: str, timeout: float = 60.0) -> bytes:
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        path = Path(parsed.path if parsed.scheme else uri)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found ({DEBIAN_HINT})")
        return path.read_bytes()
    with urllib.request.urlopen(uri, timeout=timeout) as resp:  # noqa: S310 - scheme checked by caller
        return resp.read()


def parse_idx(data: bytes, magic: int) -> np.ndarray:
    """Decode a (possibly gzipped) IDX file; checks the magic number and the size."""
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    if len(data) < 8:
        raise ValueError("IDX file is truncated")
    found, count = struct.unpack(">II", data[:8])
    if found != magic:
        raise ValueError(f"IDX magic {found} != expected {magic}")
    if magic == _IMAGES_MAGIC:
        rows, cols = struct.unpack(">II", data[8:16])
        body, shape = data[16:], (count, rows, cols)
    else:
        body, shape = data[8:], (count,)
    expected = int(np.prod(shape))
    if len(body) != expected:
        raise ValueError(f"IDX body has {len(body)} bytes, expected {expected}")
    return np.frombuffer(body, dtype=np.uint8).reshape(shape)


def load_fashion_mnist(uri: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28], labels uint8 [N]) of the training split at `uri`."""
    base = uri.rstrip("/")
    if urlparse(base).scheme not in ("", "file", "http", "https"):
        raise ValueError(f"uri {uri!r}: allowed schemes are file://, http://, https:// or a local path")
    images = parse_idx(_fetch(f"{base}/{TRAIN_FILES[0]}"), _IMAGES_MAGIC)
    labels = parse_idx(_fetch(f"{base}/{TRAIN_FILES[1]}"), _LABELS_MAGIC)
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels at {uri}")
    return images, labels


def first_per_class(labels: np.ndarray, per_class: int) -> list[int]:
    """Indices of the first `per_class` images of each class, in file order (deterministic)."""
    chosen: list[int] = []
    for cls in range(len(CLASS_NAMES)):
        chosen.extend(np.flatnonzero(labels == cls)[:per_class].tolist())
    return sorted(chosen)
