"""Photos are sharded and embedded as they are displayed: EXIF orientation is applied first.

Phones and cameras store the sensor's pixels and a tag (EXIF 0x0112) saying
how to turn them for display. The references here are turned by hand with
numpy from the tag's definition in the EXIF spec (where the stored 0th row
and 0th column go), not with PIL, so a wrong mapping in the code shows up.
"""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from tasks.images import normalize_image
from tasks.preprocess import decode_rgb
from test_shard import manifest_with, write_all

ORIENTATION = 0x0112

# tag -> the displayed image, from the stored one; the spec's words for each tag
DISPLAYED = {
    1: lambda a: a,                              # 0th row top, 0th column left
    2: lambda a: a[:, ::-1],                     # 0th row top, 0th column right
    3: lambda a: a[::-1, ::-1],                  # 0th row bottom, 0th column right
    4: lambda a: a[::-1],                        # 0th row bottom, 0th column left
    5: lambda a: a.transpose(1, 0, 2),           # 0th row left, 0th column top
    6: lambda a: np.rot90(a, k=-1),              # 0th row right, 0th column top
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),  # 0th row right, 0th column bottom
    8: lambda a: np.rot90(a, k=1),               # 0th row left, 0th column bottom
}


def stored_pixels(width: int = 48, height: int = 32, block: int = 16) -> np.ndarray:
    """Landscape pixels in flat 16-px blocks of distinct colours: no turn maps it to itself.

    Blocks aligned to JPEG's 16-px MCUs keep compression error (chroma
    subsampling at the colour edges, twice when turned and re-encoded) to
    about 6 grey levels on average, against 60 or more between two orientations.
    """
    rng = np.random.default_rng(7)
    colours = rng.integers(0, 256, size=(height // block, width // block, 3), dtype=np.uint8)
    return np.repeat(np.repeat(colours, block, axis=0), block, axis=1)


def exif_block(orientation: int, extra: bytes = b"") -> bytes:
    """An APP1 EXIF payload with one orientation entry (big-endian TIFF), built by hand.

    `extra` is one more 12-byte IFD entry placed before it (entries sort by tag).
    """
    entries = [extra] if extra else []
    entries.append(struct.pack(">HHIHH", ORIENTATION, 3, 1, orientation, 0))  # SHORT, count 1
    ifd = struct.pack(">H", len(entries)) + b"".join(entries) + struct.pack(">I", 0)
    return b"Exif\x00\x00" + b"MM\x00\x2a" + struct.pack(">I", 8) + ifd


def encode(pixels: np.ndarray, fmt: str = "JPEG", exif: bytes | None = None,
           mode: str = "RGB") -> bytes:
    """Pixels saved as stored (not turned), with the EXIF block if given."""
    buf = io.BytesIO()
    extra = {"quality": 95} if fmt == "JPEG" else {}
    Image.fromarray(pixels).convert(mode).save(buf, format=fmt, exif=exif or b"", **extra)
    return buf.getvalue()


def orientation_of(jpeg: bytes) -> int | None:
    """The orientation tag a reader of these bytes would find (None: no tag)."""
    with Image.open(io.BytesIO(jpeg)) as im:
        return im.getexif().get(ORIENTATION)


def assert_looks_like(got: np.ndarray, expected: np.ndarray, tolerance: float = 10.0) -> None:
    """Same shape, and on average within `tolerance` grey levels (JPEG is lossy)."""
    assert got.shape == expected.shape
    diff = np.abs(got.astype(np.int16) - expected.astype(np.int16))
    assert diff.mean() < tolerance, diff.mean()


def test_every_orientation_is_sharded_as_displayed(tmp_path):
    stored = stored_pixels()
    files = {f"tag{tag}.jpg": encode(stored, exif=exif_block(tag)) for tag in DISPLAYED}
    manifest = manifest_with(tmp_path, files)
    index, rejects = write_all(tmp_path, manifest)
    assert rejects == []
    shard_jpegs = {}
    for entry in index["shardlist"]:
        for sample in wds.WebDataset(str(tmp_path / "shards" / entry["url"]), shardshuffle=False):
            shard_jpegs[sample["__key__"]] = sample["jpg"]
    keys = {r["path"].split("/")[-1]: r["key"] for r in manifest.to_pylist()}
    for tag, turn in DISPLAYED.items():
        jpeg = shard_jpegs[keys[f"tag{tag}.jpg"]]
        # nothing left for a reader to turn a second time, and extraction's decoder
        # (which ignores tags) sees the displayed image
        assert orientation_of(jpeg) in (None, 1), tag
        pixels = decode_rgb(jpeg).permute(1, 2, 0).numpy()
        assert_looks_like(pixels, turn(stored))
        if tag != 1:
            for other, turn_other in DISPLAYED.items():  # and it is none of the other seven
                if other != tag and turn_other(stored).shape == pixels.shape:
                    off = np.abs(pixels.astype(int) - turn_other(stored)).mean()
                    assert off > 40, (tag, other, off)
    assert jpeg_passes_through(files["tag1.jpg"])


def jpeg_passes_through(data: bytes) -> bool:
    """An upright JPEG (tag 1) keeps its bytes: no second round of compression."""
    return normalize_image(data, 512, 90) == (data, None)


@pytest.mark.parametrize("tag", [5, 6, 7, 8])
def test_turned_photo_is_downscaled_after_turning(tag):
    stored = np.repeat(np.repeat(stored_pixels(), 4, axis=0), 4, axis=1)  # 192 x 128
    jpeg, note = normalize_image(encode(stored, exif=exif_block(tag)), max_side=96, quality=95)
    assert note == f"EXIF orientation {tag} applied; downscaled from 192x128"
    with Image.open(io.BytesIO(jpeg)) as im:
        assert im.size == (64, 96)  # portrait, longer side at the limit


@pytest.mark.parametrize("fmt,mode,note", [
    ("PNG", "RGB", "EXIF orientation 6 applied"),
    ("PNG", "RGBA", "RGBA composited on white; EXIF orientation 6 applied"),
    ("JPEG", "CMYK", "CMYK to RGB; EXIF orientation 6 applied"),
    ("JPEG", "L", "L to RGB; EXIF orientation 6 applied"),
    ("WEBP", "RGB", "EXIF orientation 6 applied"),
])
def test_orientation_is_applied_whatever_the_format_and_mode(fmt, mode, note):
    stored = stored_pixels()
    data = encode(stored, fmt=fmt, exif=exif_block(6), mode=mode)
    jpeg, got_note = normalize_image(data, 512, 95)
    assert got_note == note
    with Image.open(io.BytesIO(jpeg)) as im:
        assert im.size == (32, 48) and orientation_of(jpeg) in (None, 1)
        turned = Image.fromarray(np.rot90(stored, k=-1).copy())
        expected = np.asarray(turned.convert(mode).convert("RGB"))
        assert_looks_like(np.asarray(im), expected)


def test_hostile_exif_neither_crashes_nor_stops_the_turn():
    # BitsPerSample (a SHORT) given as ASCII: PIL reads it but cannot write it back,
    # which is what exif_transpose tries after removing the tag
    bad_entry = struct.pack(">HHI4s", 0x0102, 2, 4, b"abc\x00")
    stored = stored_pixels()
    jpeg, note = normalize_image(encode(stored, exif=exif_block(6, bad_entry)), 512, 95)
    assert note == "EXIF orientation 6 applied"
    assert_looks_like(np.asarray(Image.open(io.BytesIO(jpeg))), np.rot90(stored, k=-1))


@pytest.mark.parametrize("value", [0, 9, 65535])
def test_out_of_range_orientation_is_shown_as_stored(value):
    data = encode(stored_pixels(), exif=exif_block(value))
    assert normalize_image(data, 512, 90) == (data, None)


def test_corrupt_exif_block_is_shown_as_stored():
    data = encode(stored_pixels(), exif=b"Exif\x00\x00MM\x00\x2a\x00\x00\x00\x08\x00\x05\x01")
    jpeg, note = normalize_image(data, 512, 90)
    assert note is None and jpeg == data


def test_embedder_cli_embeds_a_portrait_photo_upright(tmp_path, tiny_backbone, capsys):
    """A portrait stored landscape with tag 6 finds its upright copy, not its sideways one."""
    import torch

    from flows.embed import main
    from tasks.embed import load_image
    from tasks.export import Embedder, export_embedder
    from tasks.heads import build_head
    from tasks.backbone import load_backbone

    stored = np.repeat(np.repeat(stored_pixels(), 2, axis=0), 2, axis=1)  # 96 x 64, landscape
    upright = np.rot90(stored, k=-1).copy()
    query = tmp_path / "portrait.jpg"
    query.write_bytes(encode(stored, exif=exif_block(6)))
    assert_looks_like(load_image(query).permute(1, 2, 0).numpy(), upright)

    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "upright.jpg").write_bytes(encode(upright))
    (folder / "sideways.jpg").write_bytes(encode(stored))  # the same pixels, no tag
    (folder / "upside_down.jpg").write_bytes(encode(np.rot90(stored, k=1).copy()))
    model, preprocess, _ = load_backbone(tiny_backbone)
    head = build_head("dropout_linear", 16, 8, dropout=0.0).eval()
    export_embedder(Embedder([(preprocess, model.visual)], head), tmp_path / "e.pt2",
                    torch.randint(0, 256, (2, 3, 40, 50), dtype=torch.uint8))
    model_args = ["--model", str(tmp_path / "e.pt2")]
    assert main([*model_args, "index", str(folder), "--out", str(tmp_path / "i.parquet")]) == 0
    assert main([*model_args, "search", str(query), "--index", str(tmp_path / "i.parquet")]) == 0
    ranked = [line.split("\t") for line in capsys.readouterr().out.strip().splitlines()[-3:]]
    assert ranked[0][2] == "upright.jpg", ranked
    assert float(ranked[0][1]) < 0.5 * float(ranked[1][1]), ranked
