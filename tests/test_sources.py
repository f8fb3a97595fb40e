"""Every dataset kind from a faithful miniature of its layout, fetched the way it is published, then sampled and sharded."""

from __future__ import annotations

import hashlib
import json

import polars as pl
import pytest

import miniatures as mini
from conftest import jpeg_bytes
from loopback import Fault, Loopback
from tasks.params import (CsvSource, Fetch, ImageNetSource, LandmarksSource, Products10kSource, Rp2kSource,
                          SampleParams, ShardParams, UrlsSource)
from tasks.schemas import RAW_DIR, SHARDS_DIR


@pytest.fixture
def server():
    with Loopback() as srv:
        yield srv


def serve(server: Loopback, path, name: str) -> tuple[str, str]:
    data = path.read_bytes()
    server.files[f"/{name}"] = data
    return f"{server.url}/{name}", hashlib.sha256(data).hexdigest()


def catalog(source: str) -> pl.DataFrame:
    return pl.read_parquet(RAW_DIR / source / "catalog.parquet")


def skipped(source: str) -> pl.DataFrame:
    return pl.read_parquet(RAW_DIR / source / "skipped.parquet")


def test_imagenet_kaggle_zip_over_http(in_tmp, server):
    from flows.download import download

    n = mini.imagenet(in_tmp / "src" / "imagenet")
    url, sha = serve(server, mini.zip_dir(in_tmp / "src" / "imagenet", in_tmp / "imagenet.zip"), "imagenet.zip")
    assert download("imagenet", ImageNetSource(kind="imagenet", uri=url, sha256=sha)) == n
    cat = catalog("imagenet")
    assert cat["label"].unique().sort().to_list() == sorted(f"n0{1440764 + 17 * i}" for i in range(5))
    assert all(p.startswith("ILSVRC/Data/CLS-LOC/train/") and p.endswith(".JPEG") for p in cat["path"])
    assert all((RAW_DIR / "imagenet" / p).is_file() for p in cat["path"])


def test_products10k_local_folder_read_in_place(in_tmp):
    from flows.download import download

    n = mini.products10k(in_tmp / "p10k")
    (in_tmp / "p10k" / "train" / "1.jpg").unlink()  # listed in train.csv, missing on disk
    assert download("p10k", Products10kSource(kind="products10k", uri=str(in_tmp / "p10k"))) == n - 1
    assert sorted(catalog("p10k")["label"].unique().to_list()) == ["10", "11", "7", "8", "9"]
    assert skipped("p10k").rows() == [("train/1.jpg", "7", "listed in the table but not found")]
    assert not (RAW_DIR / "p10k" / "test").exists()  # only what the catalog names is linked in


def test_landmarks_tar_gz_with_a_top_folder_and_missing_files(in_tmp, server):
    from flows.download import download

    n = mini.landmarks(in_tmp / "glr" / "data")
    url, sha = serve(server, mini.tar_gz(in_tmp / "glr" / "data", in_tmp / "glr.tar.gz", top="landmark-recognition-2021"),
                     "glr.tar.gz")
    assert download("glr", LandmarksSource(kind="landmarks", uri=url, sha256=sha)) == n
    cat = catalog("glr")
    first = cat["path"][0]
    image_id = first.rsplit("/", 1)[1][:-4]
    assert first == f"landmark-recognition-2021/train/{image_id[0]}/{image_id[1]}/{image_id[2]}/{image_id}.jpg"
    assert skipped("glr").height == 1 and skipped("glr")["reason"][0] == "listed in the table but not found"


def test_landmarks_as_gldv2_publishes_it_csv_plus_image_tars(in_tmp, server):
    """GLDv2 on S3: train.csv and images_NNN.tar whose entries are a/b/c/<id>.jpg (into: train)."""
    from flows.download import download

    root = in_tmp / "gld"
    n = mini.landmarks(root, missing=0)
    ids = sorted((root / "train").rglob("*.jpg"))
    half = len(ids) // 2
    for k, part in enumerate((ids[:half], ids[half:])):
        staging = in_tmp / f"tar{k}"
        for p in part:
            dst = staging / p.relative_to(root / "train")
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(p.read_bytes())
        mini.tar_gz(staging, in_tmp / f"images_00{k}.tar")
    items = [Fetch(url=serve(server, root / "train.csv", "train.csv")[0])]
    for k in range(2):
        url, sha = serve(server, in_tmp / f"images_00{k}.tar", f"images_00{k}.tar")
        items.append(Fetch(url=url, sha256=sha, into="train"))
    assert download("gld", LandmarksSource(kind="landmarks", uri=items)) == n


def test_rp2k_zip_keeps_utf8_class_names(in_tmp, server):
    from flows.download import download

    n = mini.rp2k(in_tmp / "rp2k")
    url, _ = serve(server, mini.zip_dir(in_tmp / "rp2k", in_tmp / "rp2k.zip", top="all"), "rp2k.zip")
    assert download("rp2k", Rp2kSource(kind="rp2k", uri=url)) == n
    assert sorted(catalog("rp2k")["label"].unique().to_list()) == sorted(mini.RP2K_CLASSES)
    assert all(p.startswith("all/train/") for p in catalog("rp2k")["path"])


def test_csv_source_records_paths_that_leave_the_folder(in_tmp):
    from flows.download import download

    n = mini.csv_table(in_tmp / "mine")
    archive = mini.tar_gz(in_tmp / "mine", in_tmp / "mine.tar.gz")
    assert download("mine", CsvSource(kind="csv", uri=f"file://{archive}")) == n
    assert skipped("mine").rows() == [("../outside.jpg", "label 0", "path leaves the dataset folder")]


def test_layout_errors_say_what_was_expected(in_tmp):
    from flows.download import download
    from tasks.layouts import LayoutError

    (in_tmp / "empty").mkdir()
    with pytest.raises(LayoutError, match="found no folder with train.csv with columns id,landmark_id"):
        download("glr", LandmarksSource(kind="landmarks", uri=str(in_tmp / "empty")))
    assert not (RAW_DIR / "glr").exists()


def test_sampling_most_populous_min_images_and_label_map_then_shard(in_tmp, server):
    from flows.download import download
    from flows.sample import sample
    from flows.shard import shard

    mini.landmarks(in_tmp / "glr")
    mini.products10k(in_tmp / "p10k")
    download("glr", LandmarksSource(kind="landmarks", uri=str(in_tmp / "glr")))
    download("p10k", Products10kSource(kind="products10k", uri=str(in_tmp / "p10k")))
    params = SampleParams(seed=0, samples=3, num_classes={"glr": 3, "p10k": "all"}, pick={"glr": "most_populous"},
                          min_images=3, eval_fraction=0.34, label_map={"p10k/7": "shared", "p10k/8": "shared"})
    summary = sample(["glr", "p10k"], params)
    manifest = pl.read_parquet("data/02_sampled/manifest.parquet")
    glr = manifest.filter(pl.col("source") == "glr")
    assert sorted(glr["label"].unique().to_list()) == ["1000", "1001", "1002"]  # sizes 6, 5, 4: the top three
    assert {s["label"] for s in summary["skipped_classes"] if s["source"] == "glr"} == {"1004", "1005"}  # 2 < 3
    shared = manifest.filter(pl.col("label").is_in(["7", "8"]))
    assert shared["class_id"].n_unique() == 1  # two labels mapped to one class
    assert manifest["class_id"].n_unique() == 3 + 4  # 5 labels, two of them one class
    index = shard(ShardParams(max_samples=8))
    assert sum(e["nsamples"] for e in index["shardlist"]) == manifest.height
    assert json.loads((SHARDS_DIR / "index.json").read_text())["shardlist"]


def test_url_list_concurrent_per_host_limit_retries_failures_and_rerun(in_tmp, server):
    from flows.download import download

    lines = ["url,label"]
    for i in range(24):
        server.files[f"/img/{i}.jpg"] = jpeg_bytes(i, (40, 32))
        lines.append(f"{server.url}/img/{i}.jpg,class {i % 4}")
        server.faults[f"/img/{i}.jpg"] = Fault(delay_s=0.05)
    server.faults["/img/3.jpg"] = Fault(errors=[500, 500])
    server.faults["/img/4.jpg"] = Fault(errors=[429], retry_after="0")
    lines += [f"{server.url}/gone/{i}.jpg,class 0" for i in range(2)]  # 404: recorded, not retried
    server.files["/list.csv"] = ("\n".join(lines) + "\n").encode()
    spec = UrlsSource(kind="urls", uri=f"{server.url}/list.csv", concurrency=8, per_host=3, backoff_s=0.01)
    assert download("web", spec) == 24
    assert server.max_active <= 3 + 1  # per-host limit (+1: the list itself is fetched before)
    failures = pl.read_parquet(RAW_DIR / "web" / "failures.parquet")
    assert sorted(failures["url"].to_list()) == [f"{server.url}/gone/{i}.jpg" for i in range(2)]
    assert all("HTTP 404" in e for e in failures["error"])
    assert len(server.requests_for("/img/3.jpg")) == 3 and len(server.requests_for("/img/4.jpg")) == 2

    # rerun: only what failed is asked for again; the rest comes from the download cache
    before = len(server.requests)
    server.files["/gone/0.jpg"] = jpeg_bytes(99, (40, 32))
    assert download("web", spec) == 25
    again = [r.path for r in server.requests[before:]]
    assert sorted(again) == ["/gone/0.jpg", "/gone/1.jpg", "/list.csv"]
    assert pl.read_parquet(RAW_DIR / "web" / "failures.parquet").height == 1
