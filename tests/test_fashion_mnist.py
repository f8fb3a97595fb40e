"""The Fashion-MNIST loader reads the published IDX layout from file:// and from http:// alike,
through the shared fetcher: download cache, known sha256s, byte limit, a bounded gunzip."""

from __future__ import annotations

import gzip
import hashlib
import io
import struct
from pathlib import Path

import numpy as np
import pytest

from loopback import Loopback
from tasks.download import write_fashion_mnist
from tasks.fashion_mnist import (CLASS_NAMES, KNOWN_SHA256, TRAIN_FILES, first_per_class,
                                 load_fashion_mnist, parse_idx, read_idx)
from tasks.fetch import ChecksumMismatch
from tasks.http_guard import ByteLimit, TooLarge
from tasks.params.sources import FashionMnistSource

DEBIAN = Path("/usr/share/datasets/fashion-mnist")


def write_idx_dir(root, n=30):
    """A miniature copy of the dataset's folder: its file names, gzipped IDX with real headers."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    root.mkdir(parents=True, exist_ok=True)
    head = struct.pack(">IIII", 2051, n, 28, 28)
    (root / TRAIN_FILES[0]).write_bytes(gzip.compress(head + images.tobytes()))
    (root / TRAIN_FILES[1]).write_bytes(gzip.compress(
        struct.pack(">II", 2049, n) + labels.tobytes()))
    return images, labels


def digests(root) -> dict[str, str]:
    return {name: hashlib.sha256((root / name).read_bytes()).hexdigest() for name in TRAIN_FILES}


@pytest.fixture
def server():
    with Loopback() as srv:
        yield srv


def serve_dir(server: Loopback, root: Path, prefix: str = "/fashion") -> str:
    for p in root.iterdir():
        server.files[f"{prefix}/{p.name}"] = p.read_bytes()
    return f"{server.url}{prefix}/"


def test_same_loader_for_file_and_http_and_http_is_cached(tmp_path, server):
    images, labels = write_idx_dir(tmp_path / "local")
    base = serve_dir(server, tmp_path / "local")
    sha = digests(tmp_path / "local")
    for uri in (f"file://{tmp_path / 'local'}", base, base):
        got_images, got_labels = load_fashion_mnist(uri, tmp_path / "cache", sha256=sha)
        assert np.array_equal(got_images, images) and np.array_equal(got_labels, labels)
    assert len(server.requests) == 2  # the second http load came from the download cache
    assert len(list((tmp_path / "cache").iterdir())) == 2


def test_a_file_with_an_unknown_sha256_is_refused_and_not_kept(tmp_path, server):
    write_idx_dir(tmp_path / "local")
    base = serve_dir(server, tmp_path / "local")
    with pytest.raises(ChecksumMismatch, match=r"sources.fm: .*train-images-idx3-ubyte.gz"):
        load_fashion_mnist(base, tmp_path / "cache", source="sources.fm")  # published expected
    assert list((tmp_path / "cache").iterdir()) == []  # the download was not kept for a rerun
    with pytest.raises(ChecksumMismatch):
        load_fashion_mnist(f"file://{tmp_path / 'local'}", tmp_path / "cache")
    assert (tmp_path / "local" / TRAIN_FILES[0]).is_file()  # the user's own file: left alone


def test_downloads_stop_at_the_byte_limit(tmp_path, server):
    write_idx_dir(tmp_path / "local", n=300)
    base = serve_dir(server, tmp_path / "local")
    with pytest.raises(TooLarge, match="sources.fm.max_download_bytes = 1000"):
        load_fashion_mnist(base, tmp_path / "cache", sha256=digests(tmp_path / "local"),
                           limit=ByteLimit(1000, "sources.fm.max_download_bytes"))
    assert list((tmp_path / "cache").iterdir()) == []


def test_gunzip_stops_at_the_size_the_header_announces(tmp_path):
    bomb = tmp_path / "bomb.gz"
    with gzip.open(bomb, "wb", compresslevel=6) as fh:  # 64 MB of zeros behind a 47 MB header
        fh.write(struct.pack(">IIII", 2051, 60000, 28, 28))
        for _ in range(64):
            fh.write(bytes(1 << 20))
    assert bomb.stat().st_size < 200_000
    with pytest.raises(ValueError, match="IDX body has more than 47040000 bytes"):
        read_idx(bomb, 2051)
    liar = tmp_path / "liar.gz"
    liar.write_bytes(gzip.compress(struct.pack(">IIII", 2051, 4_000_000_000, 28, 28)))
    with pytest.raises(ValueError, match="over the 268435456-byte limit"):
        read_idx(liar, 2051)


def test_writes_pngs_per_class(tmp_path):
    write_idx_dir(tmp_path / "src")
    spec = FashionMnistSource(kind="fashion_mnist", uri=f"file://{tmp_path / 'src'}", per_class=2,
                              sha256=digests(tmp_path / "src"),
                              download_cache=str(tmp_path / "cache"))
    rows = write_fashion_mnist(spec, tmp_path / "out", "fm")
    assert len(rows) == 20 and {r["label"] for r in rows} == set(CLASS_NAMES)
    assert all((tmp_path / "out" / r["path"]).is_file() for r in rows)


@pytest.mark.skipif(not DEBIAN.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_debians_copy_matches_its_known_sha256_and_loads_whole(tmp_path):
    assert {n: digests(DEBIAN)[n] for n in TRAIN_FILES} == {
        n: next(d for d, who in KNOWN_SHA256[n].items() if who == "Debian") for n in TRAIN_FILES}
    images, labels = load_fashion_mnist(f"file://{DEBIAN}", tmp_path / "cache")
    assert images.shape == (60000, 28, 28) and np.bincount(labels).tolist() == [6000] * 10


def test_truncated_or_wrong_file_is_a_clear_error():
    with pytest.raises(ValueError, match="magic"):
        parse_idx(io.BytesIO(struct.pack(">II", 1234, 0)), 2049)
    with pytest.raises(ValueError, match="expected 5"):
        parse_idx(io.BytesIO(struct.pack(">II", 2049, 5) + b"\x00\x01"), 2049)
    with pytest.raises(ValueError, match="truncated"):
        parse_idx(io.BytesIO(struct.pack(">III", 2051, 5, 28)), 2051)


def test_first_per_class_is_deterministic():
    labels = np.array([0, 1, 0, 1, 0, 2])
    assert first_per_class(labels, 2) == [0, 1, 2, 3, 5]
