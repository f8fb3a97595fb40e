"""Every dataset kind from a faithful miniature of its layout, fetched the way it is published,
then sampled and sharded."""

from __future__ import annotations

import hashlib
import json

import polars as pl
import pytest

import miniatures as mini
from conftest import jpeg_bytes
from loopback import Fault, Loopback
from tasks.params.sample import SampleParams
from tasks.params.shard import ShardParams
from tasks.params.sources import (CsvSource, DeepFashionC2sSource, Fetch, ImageNetSource,
                                  LandmarksSource, Products10kSource, Rp2kSource,
                                  StanfordCarsSource, UrlsSource)
from tasks.schemas.paths import RAW_DIR, SHARDS_DIR


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
    url, sha = serve(server, mini.zip_dir(in_tmp / "src" / "imagenet", in_tmp / "imagenet.zip"),
                     "imagenet.zip")
    assert download("imagenet", ImageNetSource(kind="imagenet", uri=url, sha256=sha)) == n
    cat = catalog("imagenet")
    assert cat["label"].unique().sort().to_list() == sorted(f"n0{1440764 + 17 * i}"
                                                            for i in range(5))
    assert all(p.startswith("ILSVRC/Data/CLS-LOC/train/") and p.endswith(".JPEG")
               for p in cat["path"])
    assert all((RAW_DIR / "imagenet" / p).is_file() for p in cat["path"])


def test_products10k_local_folder_read_in_place(in_tmp):
    from flows.download import download

    n = mini.products10k(in_tmp / "p10k")
    (in_tmp / "p10k" / "train" / "1.jpg").unlink()  # listed in train.csv, missing on disk
    spec = Products10kSource(kind="products10k", uri=str(in_tmp / "p10k"))
    assert download("p10k", spec) == n - 1
    assert sorted(catalog("p10k")["label"].unique().to_list()) == ["10", "11", "7", "8", "9"]
    assert skipped("p10k").rows() == [("train/1.jpg", "7", "listed in the table but not found")]
    assert not (RAW_DIR / "p10k" / "test").exists()  # only what the catalog names is linked in


def test_landmarks_tar_gz_with_a_top_folder_and_missing_files(in_tmp, server):
    from flows.download import download

    n = mini.landmarks(in_tmp / "glr" / "data")
    url, sha = serve(server, mini.tar_gz(in_tmp / "glr" / "data", in_tmp / "glr.tar.gz",
                                         top="landmark-recognition-2021"),
                     "glr.tar.gz")
    assert download("glr", LandmarksSource(kind="landmarks", uri=url, sha256=sha)) == n
    cat = catalog("glr")
    first = cat["path"][0]
    image_id = first.rsplit("/", 1)[1][:-4]
    assert first == ("landmark-recognition-2021/train/"
                     f"{image_id[0]}/{image_id[1]}/{image_id[2]}/{image_id}.jpg")
    assert (skipped("glr").height == 1
            and skipped("glr")["reason"][0] == "listed in the table but not found")


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
    url, _ = serve(server, mini.zip_dir(in_tmp / "rp2k", in_tmp / "rp2k.zip", top="all"),
                   "rp2k.zip")
    assert download("rp2k", Rp2kSource(kind="rp2k", uri=url)) == n
    assert sorted(catalog("rp2k")["label"].unique().to_list()) == sorted(mini.RP2K_CLASSES)
    assert all(p.startswith("all/train/") for p in catalog("rp2k")["path"])


def test_csv_source_records_paths_that_leave_the_folder(in_tmp):
    from flows.download import download

    n = mini.csv_table(in_tmp / "mine")
    archive = mini.tar_gz(in_tmp / "mine", in_tmp / "mine.tar.gz")
    assert download("mine", CsvSource(kind="csv", uri=f"file://{archive}")) == n
    assert skipped("mine").rows() == [
        ("../outside.jpg", "label 0", "path leaves the dataset folder")]


def test_layout_errors_say_what_was_expected(in_tmp):
    from flows.download import download
    from tasks.layouts import LayoutError

    (in_tmp / "empty").mkdir()
    with pytest.raises(LayoutError,
                       match="found no folder with train.csv with columns id,landmark_id"):
        download("glr", LandmarksSource(kind="landmarks", uri=str(in_tmp / "empty")))
    assert not (RAW_DIR / "glr").exists()


def test_deepfashion_c2s_as_released_partition_file_plus_img_zip(in_tmp, server):
    """The release: Eval/list_eval_partition.txt and Img/img.zip (entries img/...), as a list."""
    from flows.download import download

    n = mini.deepfashion_c2s(in_tmp / "src")
    partition = in_tmp / "src" / "Eval" / "list_eval_partition.txt"
    img_zip = mini.zip_dir(in_tmp / "src" / "img", in_tmp / "img.zip", top="img")
    url, sha = serve(server, img_zip, "img.zip")
    items = [Fetch(url=serve(server, partition, "list_eval_partition.txt")[0], into="Eval"),
             Fetch(url=url, sha256=sha)]
    assert download("df", DeepFashionC2sSource(kind="deepfashion_c2s", uri=items)) == n
    cat = catalog("df")
    assert cat["path"].n_unique() == cat.height == n  # a shop photo in several pairs counts once
    assert sorted(cat["label"].unique()) == [f"id_0000000{i}" for i in (1, 2, 5, 6)]  # train items
    assert all(p.startswith("img/") and p.split("/")[-2] == label
               for p, label in cat.select("path", "label").iter_rows())
    assert skipped("df").height == 0


def test_deepfashion_c2s_statuses_img_inside_Img_and_missing_images(in_tmp):
    from flows.download import download

    mini.deepfashion_c2s(in_tmp / "df", img_parent="Img")
    (in_tmp / "df" / "Img" / "img" / "DRESSES" / "Dress" / "id_00000002" / "shop_02.jpg").unlink()
    spec = DeepFashionC2sSource(kind="deepfashion_c2s", uri=str(in_tmp / "df"),
                                statuses=["train", "val"])
    assert download("df", spec) == 6 * 5 - 1  # items 1, 2, 3, 5, 6, 7; one photo gone
    assert all(p.startswith("Img/img/") for p in catalog("df")["path"])
    assert "id_00000003" in catalog("df")["label"].to_list()  # a val item
    gone = ("Img/img/DRESSES/Dress/id_00000002/shop_02.jpg", "id_00000002",
            "listed in the table but not found")
    assert skipped("df").rows() == [gone]


def test_deepfashion_c2s_names_that_leave_the_folder_are_recorded_not_read(in_tmp):
    from flows.download import download

    n = mini.deepfashion_c2s(in_tmp / "df")
    outside = in_tmp / "outside.jpg"
    outside.write_bytes(jpeg_bytes(1))
    partition = in_tmp / "df" / "Eval" / "list_eval_partition.txt"
    lines = partition.read_text().splitlines()
    lines += [f"../outside.jpg {outside} id_00000099 train"]
    partition.write_text("\n".join([str(len(lines) - 2), *lines[1:]]) + "\n")
    spec = DeepFashionC2sSource(kind="deepfashion_c2s", uri=str(in_tmp / "df"))
    assert download("df", spec) == n
    assert sorted(skipped("df").rows()) == sorted([
        ("../outside.jpg", "id_00000099", "path leaves the dataset folder"),
        (str(outside), "id_00000099", "path leaves the dataset folder")])
    assert not any(p.name == "outside.jpg" for p in (RAW_DIR / "df").rglob("*"))


@pytest.mark.parametrize("edit, message", [
    (lambda ls: ls[:3] + ["img/a/comsumer_01.jpg img/a/shop_01.jpg train"] + ls[4:],
     r"list_eval_partition.txt \(.*\) line 4: expected '<consumer image> <shop image> <item id>"),
    (lambda ls: ls[:8] + [ls[8].replace(" val", " validation")] + ls[9:],
     r"line 9: expected.*validation"),
    (lambda ls: [ls[0], "image_name item_id evaluation_status"] + ls[2:],  # In-shop's header
     r"line 2: expected the header"),
    (lambda ls: ls[:-3], r"line 1 says 24 pairs but 21 follow"),
    (lambda ls: ["pairs"] + ls[1:], r"line 1: expected the number of pairs"),
])
def test_deepfashion_c2s_malformed_partition_names_file_and_line(in_tmp, edit, message):
    from flows.download import download
    from tasks.layouts import LayoutError

    mini.deepfashion_c2s(in_tmp / "df")
    partition = in_tmp / "df" / "Eval" / "list_eval_partition.txt"
    partition.write_text("\n".join(edit(partition.read_text().splitlines())) + "\n")
    with pytest.raises(LayoutError, match=message):
        download("df", DeepFashionC2sSource(kind="deepfashion_c2s", uri=str(in_tmp / "df")))
    assert not (RAW_DIR / "df").exists()


def test_stanford_cars_kaggle_mirror_zip_over_http(in_tmp, server):
    """Kaggle's jessicali9530/stanford-cars-dataset: car_devkit/devkit/, cars_train/cars_train/."""
    from flows.download import download

    n = mini.stanford_cars(in_tmp / "src", kaggle=True)
    url, sha = serve(server, mini.zip_dir(in_tmp / "src", in_tmp / "cars.zip"), "cars.zip")
    assert download("cars", StanfordCarsSource(kind="stanford_cars", uri=url, sha256=sha)) == n
    cat = catalog("cars")
    assert sorted(cat["label"].unique()) == sorted(mini.CARS_CLASSES)  # names, not 1-based ids
    assert cat.filter(pl.col("path") == "cars_train/cars_train/00003.jpg")["label"].to_list() == [
        "Ram C/V Cargo Van Minivan 2012"]
    assert not any("cars_test" in p for p in cat["path"])


def test_stanford_cars_original_archives_fetched_as_a_list(in_tmp, server):
    """The original car_devkit.tgz (devkit/) and cars_train.tgz (cars_train/)."""
    from flows.download import download

    n = mini.stanford_cars(in_tmp / "src", kaggle=False)
    items = []
    for name in ("devkit", "cars_train"):
        archive = mini.tar_gz(in_tmp / "src" / name, in_tmp / f"{name}.tgz", top=name)
        url, sha = serve(server, archive, archive.name)
        items.append(Fetch(url=url, sha256=sha))
    assert download("cars", StanfordCarsSource(kind="stanford_cars", uri=items)) == n
    assert all(p.startswith("cars_train/") and p.count("/") == 1 for p in catalog("cars")["path"])


def test_stanford_cars_bad_entries_are_recorded_and_never_read_outside(in_tmp):
    from flows.download import download

    n = mini.stanford_cars(in_tmp / "cars", kaggle=False)
    outside = in_tmp / "outside.jpg"
    outside.write_bytes(jpeg_bytes(2))
    entries = [(f"{k + 1:05d}.jpg", k % 4 + 1) for k in range(n)]
    entries[0] = ("00001.jpg", 197)  # no such class
    entries[1] = ("../../outside.jpg", 1)
    entries[2] = (str(outside), 1)
    entries[3] = ("99999.jpg", 2)  # listed, not on disk
    mini.write_cars_annos(in_tmp / "cars" / "devkit" / "cars_train_annos.mat", entries)
    spec = StanfordCarsSource(kind="stanford_cars", uri=str(in_tmp / "cars"))
    assert download("cars", spec) == n - 4
    assert sorted(skipped("cars").rows()) == sorted([
        ("cars_train/00001.jpg", "197", "class 197 is not in cars_meta.mat (1..4)"),
        ("../../outside.jpg", "AM General Hummer SUV 2000", "path leaves the dataset folder"),
        (str(outside), "AM General Hummer SUV 2000", "path leaves the dataset folder"),
        ("cars_train/99999.jpg", "Acura RL Sedan 2012", "listed in the table but not found")])
    assert not any(p.name == "outside.jpg" for p in (RAW_DIR / "cars").rglob("*"))


@pytest.mark.parametrize("breakage, message", [
    ("no class field", r"cars_train_annos.mat: `annotations` lacks the fields \['class'\]"),
    ("no class_names", r"cars_meta.mat: expected a variable 'class_names' \(cell array"),
    ("not a .mat", r"cars_train_annos.mat: not a readable MATLAB v5 file"),
])
def test_stanford_cars_devkit_without_expected_variables_is_an_error(in_tmp, breakage, message):
    import numpy as np
    import scipy.io

    from flows.download import download
    from tasks.layouts import LayoutError

    mini.stanford_cars(in_tmp / "cars", kaggle=False)
    devkit = in_tmp / "cars" / "devkit"
    if breakage == "no class field":
        mini.write_cars_annos(devkit / "cars_train_annos.mat", [("00001.jpg", 1)],
                              with_class=False)
    elif breakage == "no class_names":
        scipy.io.savemat(devkit / "cars_meta.mat", {"names": np.array(["x"], dtype=object)})
    else:
        (devkit / "cars_train_annos.mat").write_bytes(b"<html>Not Found</html>")
    with pytest.raises(LayoutError, match=message):
        download("cars", StanfordCarsSource(kind="stanford_cars", uri=str(in_tmp / "cars")))


def test_sampling_most_populous_min_images_and_label_map_then_shard(in_tmp, server):
    from flows.download import download
    from flows.sample import sample
    from flows.shard import shard

    mini.landmarks(in_tmp / "glr")
    mini.products10k(in_tmp / "p10k")
    download("glr", LandmarksSource(kind="landmarks", uri=str(in_tmp / "glr")))
    download("p10k", Products10kSource(kind="products10k", uri=str(in_tmp / "p10k")))
    params = SampleParams(seed=0, samples=3, num_classes={"glr": 3, "p10k": "all"},
                          pick={"glr": "most_populous"}, min_images=3, eval_fraction=0.34,
                          label_map={"p10k/7": "shared", "p10k/8": "shared"})
    summary = sample(["glr", "p10k"], params)
    manifest = pl.read_parquet("data/02_sampled/manifest.parquet")
    glr = manifest.filter(pl.col("source") == "glr")
    # sizes 6, 5, 4: the top three
    assert sorted(glr["label"].unique().to_list()) == ["1000", "1001", "1002"]
    assert {s["label"] for s in summary["skipped_classes"]
            if s["source"] == "glr"} == {"1004", "1005"}  # 2 < 3
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
    spec = UrlsSource(kind="urls", uri=f"{server.url}/list.csv", concurrency=8, per_host=3,
                      backoff_s=0.01,
                      allow_private_addresses=True)  # the loopback server is on 127.0.0.1
    assert download("web", spec) == 24
    assert server.max_active <= 3 + 1  # per-host limit (+1: the list itself is fetched before)
    failures = pl.read_parquet(RAW_DIR / "web" / "failures.parquet")
    assert sorted(failures["url"].to_list()) == [f"{server.url}/gone/{i}.jpg" for i in range(2)]
    assert all("HTTP 404" in e for e in failures["error"])
    assert (len(server.requests_for("/img/3.jpg")) == 3
            and len(server.requests_for("/img/4.jpg")) == 2)

    # rerun: only what failed is asked for again; the rest comes from the download cache
    before = len(server.requests)
    server.files["/gone/0.jpg"] = jpeg_bytes(99, (40, 32))
    assert download("web", spec) == 25
    again = [r.path for r in server.requests[before:]]
    assert sorted(again) == ["/gone/0.jpg", "/gone/1.jpg", "/list.csv"]
    assert pl.read_parquet(RAW_DIR / "web" / "failures.parquet").height == 1
