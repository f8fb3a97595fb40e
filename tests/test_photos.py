"""The photos packages ship: Qt resource bundles read without Qt, one class per distinct object."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import REPO
from tasks.photos import GCOMPRIS_RCC, PhotoSet, find_photos, photo_dirs, read_qt_resources


def make_rcc(files: dict[str, bytes], version: int = 3, compressed: tuple[str, ...] = ()) -> bytes:
    """A Qt resource bundle as rcc writes it: header, tree (a folder's children contiguous),
    data, names."""
    tree: dict = {}
    for path in files:
        *folders, leaf = path.split("/")
        node = tree
        for folder in folders:
            node = node.setdefault(folder, {})
        node[leaf] = path
    nodes, children, i = [("", tree)], {}, 0
    while i < len(nodes):  # breadth first: each folder's children get consecutive numbers
        if isinstance(nodes[i][1], dict):
            children[i] = (len(nodes[i][1]), len(nodes))
            nodes += sorted(nodes[i][1].items())
        i += 1
    names, data, data_at = b"", b"", {}
    for path, raw in files.items():
        body = struct.pack(">I", len(raw)) + zlib.compress(raw) if path in compressed else raw
        data_at[path] = len(data)
        data += struct.pack(">I", len(body)) + body
    node_size, header = (14 if version == 1 else 22), (24 if version >= 3 else 20)
    tree_at, data_start = header, header + node_size * len(nodes)
    blob = b"qres" + struct.pack(">IIII", version, tree_at, data_start, data_start + len(data))
    blob += struct.pack(">I", 0) if version >= 3 else b""
    for i, (name, node) in enumerate(nodes):
        if isinstance(node, dict):
            entry = struct.pack(">IHII", len(names), 0x02, *children[i])
        else:
            flags = 0x01 if node in compressed else 0
            entry = struct.pack(">IHHHI", len(names), flags, 0, 0, data_at[node])
        names += struct.pack(">HI", len(name), 0) + name.encode("utf-16-be")
        blob += entry + (b"\0" * 8 if version >= 2 else b"")
    return blob + data + names


def photo_bytes(seed: int, fmt: str = "WEBP", size=(48, 40)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("version", [1, 3])
def test_qt_bundle_reads_back_every_file(tmp_path, version):
    files = {"a/res/one.webp": photo_bytes(1), "a/res/deep/two.png": photo_bytes(2, "PNG"),
             "a/notes.txt": b"hello " * 100}
    path = tmp_path / "b.rcc"
    path.write_bytes(make_rcc(files, version, compressed=("a/notes.txt",)))
    assert read_qt_resources(path) == files


def test_damaged_qt_bundles_raise_value_errors(tmp_path):
    good = make_rcc({"a/one.webp": photo_bytes(1)})
    cases = {
        "not_qres": b"nope" + good[4:],
        "truncated": good[: len(good) // 2],
        # the root folder claims to be its own child: a loop
        "loop": good[:24] + struct.pack(">IHII", 0, 0x02, 1, 0) + good[24 + 14:],
    }
    for name, blob in cases.items():
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(ValueError):
            read_qt_resources(tmp_path / name)


def test_find_photos_keeps_one_per_object(tmp_path):
    folder = tmp_path / "files"
    folder.mkdir()
    for name, seed in [("left01.jpg", 1), ("left02.jpg", 2), ("pier.jpg", 3), ("logo.png", 4)]:
        (folder / name).write_bytes(photo_bytes(seed, "PNG" if name.endswith("png") else "JPEG"))
    (folder / "pier_copy.jpg").write_bytes((folder / "pier.jpg").read_bytes())  # same look
    bundle = tmp_path / "b.rcc"
    bundle.write_bytes(make_rcc({"r/fish1.webp": photo_bytes(5), "r/fish2.webp": photo_bytes(6),
                                 "r/Tower.webp": photo_bytes(7), "r/tower.webp": photo_bytes(8)}))
    other = tmp_path / "c.rcc"
    other.write_bytes(make_rcc({"s/tower.webp": photo_bytes(9), "s/gull.webp": photo_bytes(10)}))
    dirs = {"pkg": PhotoSet((folder,)), "edu": PhotoSet((bundle, other), families=False)}
    photos = find_photos(dirs, exclude=["logo*"], duplicate_threshold=12.0)
    assert [p.label for p in photos] == [
        "edu-Tower", "edu-fish1", "edu-fish2", "edu-gull",  # numbers: different fish; one tower
        "pkg-left01", "pkg-pier"]                           # numbers: one chessboard; one pier
    gull = photos[3]
    assert (gull.path, gull.member) == (other, "s/gull.webp")
    assert gull.origin.endswith("c.rcc:s/gull.webp")
    with gull.open() as im:
        assert im.size == (48, 40)


def default_photos():
    spec = yaml.safe_load((REPO / "params.yaml").read_text())["sources"]["package_photos"]
    return find_photos(photo_dirs(), spec["exclude"], spec["duplicate_threshold"])


@pytest.mark.skipif(not GCOMPRIS_RCC.is_dir(), reason="Debian gcompris-qt-data is not installed")
def test_default_has_two_hundred_distinct_photos():
    """The default's objects: enough that a held-out third is 60+ classes (issue 12)."""
    photos = default_photos()
    by_package = {}
    for p in photos:
        by_package.setdefault(p.label.split("-")[0], []).append(p)
    assert len(photos) >= 200 and len(by_package["gcompris"]) >= 180
    assert len({p.label.lower() for p in photos}) == len(photos)
    for p in by_package["gcompris"][::15]:  # every bundle's photos decode (320-1920 px)
        with p.open() as im:
            im.load()
            assert min(im.size) >= 100
