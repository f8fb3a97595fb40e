"""Flows run for real under Prefect's test harness, on a tiny imagefolder source with bad images
in it."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
from PIL import Image

from conftest import make_imagefolder
from flows.download import download
from flows.sample import sample
from flows.shard import shard
from tasks.download import check_source
from tasks.params.base import ParamsError
from tasks.params.sample import SampleParams
from tasks.params.shard import ShardParams
from tasks.params.sources import ImageFolderSource
from tasks.schemas.paths import MANIFEST, RAW_DIR, SHARDS_DIR


def add_bad_images(class_dir):
    good = (class_dir / "img_000.jpg").read_bytes()
    (class_dir / "bad_corrupt.jpg").write_bytes(good[: len(good) // 3])
    (class_dir / "bad_empty.jpg").write_bytes(b"")
    Image.new("CMYK", (30, 20), (10, 200, 30, 0)).save(class_dir / "bad_cmyk.jpg")
    Image.fromarray(np.arange(600, dtype=np.uint16).reshape(20, 30) * 100).save(
        class_dir / "bad_16bit.png")
    Image.fromarray(np.zeros((20, 30, 4), np.uint8)).save(class_dir / "bad_rgba.png")


def test_download_sample_shard_with_bad_inputs(in_tmp):
    src = make_imagefolder(in_tmp / "mine", classes=5, per_class=6)
    add_bad_images(src / "class_00")
    spec = ImageFolderSource(kind="imagefolder", path=src)
    assert download("mine", spec) == 5 * 6 + 5
    catalog = pl.read_parquet(RAW_DIR / "mine" / "catalog.parquet")
    assert catalog.columns == ["path", "label", "source"] and catalog.height == 35

    # class_00 has 11 images, the others 6: take them all so every bad file is sampled
    params = SampleParams(seed=0, samples=11, num_classes={"mine": 5}, eval_fraction=0.4)
    summary = sample(["mine"], params)
    assert summary["images"] == 35
    index = shard(ShardParams(max_samples=8))

    rejects = pl.read_parquet(SHARDS_DIR / "rejects.parquet")
    reasons = dict(zip([p.split("/")[-1] for p in rejects["path"]], rejects["reason"]))
    assert set(reasons) == {"bad_corrupt.jpg", "bad_empty.jpg"}
    assert "truncated" in reasons["bad_corrupt.jpg"] and "empty" in reasons["bad_empty.jpg"]
    assert sum(e["nsamples"] for e in index["shardlist"]) == 35 - 2
    # CMYK, 16-bit and RGBA were converted
    assert sum(e["converted"] for e in index["shardlist"]) >= 3
    assert json.loads((SHARDS_DIR / "index.json").read_text()) == index
    assert pl.read_parquet(MANIFEST).height == 35


def test_missing_source_folder_stops_before_work(in_tmp):
    with pytest.raises(ParamsError, match=r"sources.mine.path = '.*nowhere': no such folder"):
        check_source("mine", ImageFolderSource(kind="imagefolder", path=in_tmp / "nowhere"))
    assert not (in_tmp / "data").exists()
