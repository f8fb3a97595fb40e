"""Bad images are converted or rejected with a reason; shards round-trip through webdataset,
byte-reproducibly, and as the same bytes from one process or several."""

from __future__ import annotations

import hashlib
import io
import json
import math
import pickle
import shutil
import tarfile
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
import yaml
from PIL import Image

from conftest import REPO, jpeg_bytes
from flows.shard import shard
from tasks.images import BadImage, normalize_image
from tasks.params.base import ParamsError
from tasks.params.project import parse_params
from tasks.params.shard import ShardParams
from tasks.schemas.io import write_table
from tasks.schemas.manifest import MANIFEST_SCHEMA
from tasks.schemas.paths import MANIFEST, RAW_DIR, SHARDS_DIR
from tasks.schemas.shards import index_shard
from tasks.shard import ShardError, plan_shards, shard_index, write_shard, write_shards


def png_bytes(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    im = Image.fromarray(arr)
    assert mode is None or im.mode == mode, (im.mode, mode)
    im.save(buf, format="PNG")
    return buf.getvalue()


def png_bomb(pixels: int) -> bytes:
    """A real, complete 1-bit PNG of about `pixels` zeros: a few KB on disk, every pixel decodable.

    That is how a decompression bomb looks; the pixel limit must refuse it
    from its header, before the decoder allocates anything.
    """
    side = math.isqrt(pixels) + 1
    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body).to_bytes(4, "big")
        return len(body).to_bytes(4, "big") + kind + body + crc

    header = side.to_bytes(4, "big") * 2 + bytes([1, 0, 0, 0, 0])  # 1-bit grey, no interlace
    chunks = chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


def palette_png(transparent: bool) -> bytes:
    """A palette (P) PNG, with one palette entry fully transparent if asked (a tRNS chunk)."""
    im = Image.fromarray(np.arange(20 * 30, dtype=np.uint8).reshape(20, 30) % 4 * 60).convert("P")
    buf = io.BytesIO()
    im.save(buf, format="PNG", **({"transparency": 0} if transparent else {}))
    return buf.getvalue()


def bad_inputs() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    good = jpeg_bytes(1, (64, 48))
    cmyk = io.BytesIO()
    Image.new("CMYK", (30, 20), (0, 255, 255, 0)).save(cmyk, format="JPEG")
    rgba = rng.integers(0, 256, size=(20, 30, 4), dtype=np.uint8)
    rgba[..., 3] = 0  # fully transparent -> white
    grey_alpha = np.stack([np.full((20, 30), 50, np.uint8), np.full((20, 30), 255, np.uint8)], -1)
    good_png = png_bytes(rng.integers(0, 256, size=(40, 30, 3), dtype=np.uint8))
    return {
        "corrupt.jpg": good[: len(good) // 2],
        "empty.jpg": b"",
        "cmyk.jpg": cmyk.getvalue(),
        "deep.png": png_bytes((np.arange(20 * 30, dtype=np.uint16).reshape(20, 30) * 100), "I;16"),
        "rgba.png": png_bytes(rgba, "RGBA"),
        "not_an_image.jpg": b"hello, I am text",
        "huge.jpg": jpeg_bytes(2, (2000, 1000)),
        "palette.png": palette_png(transparent=False),
        "palette_alpha.png": palette_png(transparent=True),
        "grey_alpha.png": png_bytes(grey_alpha, "LA"),
        "truncated.png": good_png[: len(good_png) * 2 // 3],
        # past PIL's pixel limit (a warning there, an error here), and past twice it (an error)
        "bomb.png": png_bomb(Image.MAX_IMAGE_PIXELS + 1),
        "bomb_far.png": png_bomb(2 * Image.MAX_IMAGE_PIXELS + 1),
    }


def test_each_bad_input_is_converted_or_rejected_with_reason():
    outcomes = {}
    for name, data in bad_inputs().items():
        try:
            jpeg, note = normalize_image(data, max_side=512, quality=90)
            im = Image.open(io.BytesIO(jpeg))
            assert im.format == "JPEG" and im.mode == "RGB" and max(im.size) <= 512
            outcomes[name] = ("ok", note)
        except BadImage as exc:
            outcomes[name] = ("rejected", str(exc))
    assert outcomes["corrupt.jpg"][0] == "rejected" and "truncated" in outcomes["corrupt.jpg"][1]
    assert outcomes["empty.jpg"] == ("rejected", "empty file (0 bytes)")
    assert outcomes["not_an_image.jpg"][0] == "rejected"
    assert outcomes["cmyk.jpg"] == ("ok", "CMYK to RGB")
    assert outcomes["deep.png"][0] == "ok" and "I;16" in outcomes["deep.png"][1]
    assert outcomes["rgba.png"][0] == "ok" and "white" in outcomes["rgba.png"][1]
    assert outcomes["huge.jpg"][0] == "ok" and "downscaled" in outcomes["huge.jpg"][1]
    assert outcomes["palette.png"] == ("ok", "P to RGB")
    assert outcomes["palette_alpha.png"] == ("ok", "P+alpha composited on white")
    assert outcomes["grey_alpha.png"] == ("ok", "LA composited on white")
    assert outcomes["truncated.png"][0] == "rejected"
    assert "truncated" in outcomes["truncated.png"][1]
    for bomb in ("bomb.png", "bomb_far.png"):
        assert outcomes[bomb][0] == "rejected", bomb
        assert outcomes[bomb][1].startswith("image too large to decode safely"), outcomes[bomb]
        assert "exceeds limit of" in outcomes[bomb][1]
    assert outcomes.keys() == bad_inputs().keys()  # every kind has its expectation above


def test_palette_transparency_becomes_white():
    jpeg, _ = normalize_image(palette_png(transparent=True), 64, 95)
    arr = np.asarray(Image.open(io.BytesIO(jpeg)))
    index = np.arange(20 * 30).reshape(20, 30) % 4
    assert arr[index == 0].min() > 240  # palette entry 0 (black) was the transparent one
    assert arr[index == 1].max() < 80  # 60 stays dark grey


def test_rgba_transparent_pixels_become_white():
    rgba = np.zeros((8, 8, 4), np.uint8)
    jpeg, _ = normalize_image(png_bytes(rgba, "RGBA"), 64, 95)
    assert np.asarray(Image.open(io.BytesIO(jpeg))).min() > 240


def test_sixteen_bit_keeps_its_range():
    deep = np.full((8, 8), 65535, np.uint16)
    deep[:4] = 0
    arr = np.asarray(Image.open(io.BytesIO(normalize_image(png_bytes(deep, "I;16"), 64, 95)[0])))
    assert arr[:3].max() < 20 and arr[5:].min() > 235


def test_rgb_jpeg_passes_through_unchanged():
    data = jpeg_bytes(3)
    assert normalize_image(data, 512, 90) == (data, None)


def manifest_with(tmp_path, files: dict[str, bytes]) -> pa.Table:
    rows = []
    for i, (name, data) in enumerate(sorted(files.items())):
        (tmp_path / "raw" / "src" / "images").mkdir(parents=True, exist_ok=True)
        (tmp_path / "raw" / "src" / "images" / name).write_bytes(data)
        rows.append({"key": f"src-{i:04d}", "source": "src", "label": name.split(".")[0],
                     "class_id": i, "path": f"images/{name}",
                     "split": "train" if i % 2 else "query"})
    return pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)


def write_all(tmp_path, manifest, out_name="shards"):
    params = ShardParams(max_samples=3, max_side=256, jpeg_quality=90)
    results = [write_shard(p, tmp_path / "raw", tmp_path / out_name, params)
               for p in plan_shards(manifest, params.max_samples)]
    return shard_index([e for e, _ in results]), [r for _, rs in results for r in rs]


def test_shards_round_trip_through_webdataset_and_record_rejects(tmp_path):
    files = {**bad_inputs(), **{f"good{i}.jpg": jpeg_bytes(10 + i) for i in range(4)}}
    manifest = manifest_with(tmp_path, files)
    index, rejects = write_all(tmp_path, manifest)
    rejected = {r["path"].split("/")[-1]: r["reason"] for r in rejects}
    assert set(rejected) == {"corrupt.jpg", "empty.jpg", "not_an_image.jpg", "truncated.png",
                             "bomb.png", "bomb_far.png"}
    assert all(reason for reason in rejected.values())
    # every manifest row is either in a shard or in rejects: nothing silently lost
    seen = {}
    for entry in index["shardlist"]:
        # a shard may hold only rejects: an empty tar is a valid shard here
        ds = wds.WebDataset(str(tmp_path / "shards" / entry["url"]), shardshuffle=False,
                            empty_check=False).decode("pil")
        samples = list(ds.to_tuple("__key__", "jpg", "cls", "json"))
        assert len(samples) == entry["nsamples"]
        for key, img, cls, meta in samples:
            assert img.mode == "RGB" and meta["split"] == entry["split"]
            seen[key] = (cls, meta)
    assert len(seen) + len(rejects) == manifest.num_rows
    by_key = {r["key"]: r for r in manifest.to_pylist()}
    for key, (cls, meta) in seen.items():
        assert cls == by_key[key]["class_id"] and meta["path"] == by_key[key]["path"]
    assert index["__kind__"] == "wids-shard-index-v1"
    assert all(len(e["sha256"]) == 64 for e in index["shardlist"])


def test_sample_references_read_the_bytes_webdataset_reads_and_refuse_damage(tmp_path):
    """index_shard (tar headers, no bytes held) against WebDataset's own reader: same keys,
    classes and JPEG bytes in the same order; a shortened tar and a sample without its
    .cls member are refused by name."""
    manifest = manifest_with(tmp_path, {f"g{i}.jpg": jpeg_bytes(i) for i in range(7)})
    index, _ = write_all(tmp_path, manifest)
    for entry in index["shardlist"]:
        url = tmp_path / "shards" / entry["url"]
        reference = list(wds.WebDataset(str(url), shardshuffle=False, empty_check=False)
                         .to_tuple("__key__", "cls", "jpg"))
        refs = index_shard(url)
        assert [(r.key, r.class_id) for r in refs] == [(k, int(c)) for k, c, _ in reference]
        assert [r.read() for r in reversed(refs)] == [j for _, _, j in reversed(reference)]
    last = refs[-1]
    data = last.shard.read_bytes()
    last.shard.write_bytes(data[:last.offset + last.size // 2])
    with pytest.raises(ValueError, match="ends early"):
        last.read()
    broken = tmp_path / "broken.tar"
    with tarfile.open(broken, "w") as tar:
        member = tarfile.TarInfo("k1.jpg")
        member.size = 3
        tar.addfile(member, io.BytesIO(b"abc"))
    with pytest.raises(ValueError, match="'k1' lacks its .cls member"):
        index_shard(broken)


def test_shards_are_byte_reproducible(tmp_path):
    manifest = manifest_with(tmp_path, {f"g{i}.jpg": jpeg_bytes(i) for i in range(7)})
    first, _ = write_all(tmp_path, manifest, "a")
    second, _ = write_all(tmp_path, manifest, "b")
    assert [e["sha256"] for e in first["shardlist"]] == [e["sha256"] for e in second["shardlist"]]
    assert json.dumps(first) == json.dumps(second)


def rotated_jpeg() -> bytes:
    """A JPEG whose EXIF says "turn 90 degrees" (orientation 6): the shard stores turned pixels."""
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.arange(24 * 40 * 3, dtype=np.uint8).reshape(24, 40, 3)).save(
        buf, format="JPEG", exif=exif)
    return buf.getvalue()


def mixed_files() -> dict[str, bytes]:
    """Good, converted and rejected images: every path write_shard has."""
    bad = bad_inputs()
    return {**{k: bad[k] for k in ("corrupt.jpg", "empty.jpg", "cmyk.jpg", "rgba.png", "huge.jpg")},
            "rotated.jpg": rotated_jpeg(), **{f"good{i}.jpg": jpeg_bytes(20 + i) for i in range(9)}}


def test_plan_matches_a_python_sort_and_sends_only_its_rows():
    rng = np.random.default_rng(3)
    n, size = 1003, 40
    rows = [{"key": f"s-{k:05d}", "source": "s", "label": "l", "class_id": int(k % 7),
             "path": f"{k}.jpg", "split": ["train", "val", "query", "index", "other"][k % 5]}
            for k in rng.permutation(n)]
    manifest = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
    plans = plan_shards(manifest, size)
    # the reference: the whole manifest as dicts, sorted by key, cut per split
    by_key = sorted(manifest.to_pylist(), key=lambda r: r["key"])
    expected = []
    for split in ("train", "val", "query", "index"):
        part = [r for r in by_key if r["split"] == split]
        expected += [(split, f"{split}-{i // size:06d}", part[i:i + size])
                     for i in range(0, len(part), size)]
    assert [(p.split, p.name, p.rows) for p in plans] == expected
    assert all(p.table.num_rows == len(p.rows) for p in plans)
    # a plan travels to its worker as its own rows, not as a view of the whole manifest
    assert len(pickle.dumps(plans[0])) < len(pickle.dumps(manifest)) / 5


def write_manifest_and_raw(root, files: dict[str, bytes], missing: str) -> None:
    """The manifest and raw folder the shard flow reads, with one row whose file is gone."""
    manifest = manifest_with(root, files)
    shutil.move(root / "raw", RAW_DIR)
    (RAW_DIR / "src" / "images" / missing).unlink()
    n = manifest.num_rows
    manifest = manifest.drop_columns(["group", "class_images"])
    manifest = manifest.append_column("group", pa.array(["train"] * n))
    manifest = manifest.append_column("class_images", pa.array([1] * n, pa.int64()))
    write_table(MANIFEST, manifest, MANIFEST_SCHEMA)


def tree_bytes(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_two_processes_write_the_same_bytes_as_one(in_tmp):
    write_manifest_and_raw(in_tmp, mixed_files(), missing="good3.jpg")
    outputs = {}
    for processes in (1, 2):
        index = shard(ShardParams(max_samples=3, max_side=256, jpeg_quality=90,
                                  processes=processes))
        outputs[processes] = tree_bytes(SHARDS_DIR)
        shutil.rmtree(SHARDS_DIR)
    one, two = outputs[1], outputs[2]
    assert sorted(one) == sorted(two)
    assert {"index.json", "rejects.parquet"} <= set(one)
    assert sum(k.endswith(".tar") for k in one) >= 4
    for name in one:
        assert one[name] == two[name], name
    # and the index is the written shards: sha256 and counts of the tars on disk
    for entry in index["shardlist"]:
        assert entry["sha256"] == hashlib.sha256(two[entry["url"]]).hexdigest()
    reasons = {r["path"].split("/")[-1]: r["reason"]
               for r in pq.read_table(io.BytesIO(two["rejects.parquet"])).to_pylist()}
    assert set(reasons) == {"corrupt.jpg", "empty.jpg", "good3.jpg"}
    assert reasons["good3.jpg"] == "file missing"


@pytest.mark.parametrize("processes", [1, 2])
def test_a_failing_shard_is_named(tmp_path, processes):
    manifest = manifest_with(tmp_path, {f"g{i}.jpg": jpeg_bytes(i) for i in range(8)})
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "query").write_text("a file where the split's folder should be")
    params = ShardParams(max_samples=2, max_side=256, jpeg_quality=90, processes=processes)
    with pytest.raises(ShardError, match=r"^shard query/query-00000[01]\.tar: \w+Error"):
        write_shards(plan_shards(manifest, 2), tmp_path / "raw", tmp_path / "out", params)


@pytest.mark.parametrize("value", [0, "all"])
def test_bad_process_count_is_refused_with_its_key(value):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["shard"]["processes"] = value
    with pytest.raises(ParamsError, match=rf"shard\.processes\S* = '?{value}'?: allowed"):
        parse_params(raw)
