"""The Fashion-MNIST loader reads the published IDX layout from file:// and from http:// alike."""

from __future__ import annotations

import functools
import gzip
import http.server
import struct
import threading

import numpy as np
import pytest

from tasks.download import write_fashion_mnist
from tasks.fashion_mnist import CLASS_NAMES, TRAIN_FILES, first_per_class, load_fashion_mnist, parse_idx


def write_idx_dir(root, n=30):
    """A miniature copy of the dataset's folder: the same file names, gzipped IDX with real headers."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    root.mkdir(parents=True, exist_ok=True)
    (root / TRAIN_FILES[0]).write_bytes(gzip.compress(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes()))
    (root / TRAIN_FILES[1]).write_bytes(gzip.compress(struct.pack(">II", 2049, n) + labels.tobytes()))
    return images, labels


@pytest.fixture
def http_root(tmp_path):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "www"))
    (tmp_path / "www").mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield tmp_path / "www", f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_same_loader_for_file_and_http(tmp_path, http_root):
    images, labels = write_idx_dir(tmp_path / "local")
    www, base = http_root
    write_idx_dir(www / "fashion")
    for uri in (f"file://{tmp_path / 'local'}", f"{base}/fashion/"):
        got_images, got_labels = load_fashion_mnist(uri)
        assert np.array_equal(got_images, images) and np.array_equal(got_labels, labels)


def test_writes_pngs_per_class(tmp_path):
    write_idx_dir(tmp_path / "src")
    rows = write_fashion_mnist(f"file://{tmp_path / 'src'}", tmp_path / "out", per_class=2)
    assert len(rows) == 20 and {r["label"] for r in rows} == set(CLASS_NAMES)
    assert all((tmp_path / "out" / r["path"]).is_file() for r in rows)


def test_truncated_or_wrong_file_is_a_clear_error():
    with pytest.raises(ValueError, match="magic"):
        parse_idx(struct.pack(">II", 1234, 0), 2049)
    with pytest.raises(ValueError, match="expected 5"):
        parse_idx(struct.pack(">II", 2049, 5) + b"\x00\x01", 2049)


def test_first_per_class_is_deterministic():
    labels = np.array([0, 1, 0, 1, 0, 2])
    assert first_per_class(labels, 2) == [0, 1, 2, 3, 5]
