"""Faithful miniature copies of the real datasets' layouts: same file names, CSV columns,
depth, UTF-8 names.

Each builder writes a tiny dataset under `root` and returns the number of
images a reader should catalogue, so tests can package it the way the
dataset is published (Kaggle zip, tar.gz, loose files) and read it back.
"""

from __future__ import annotations

import hashlib
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import scipy.io

from conftest import jpeg_bytes

# Real RP2K product names look like these (UTF-8 folder names).
RP2K_CLASSES = ["安慕希原味酸奶", "农夫山泉550ml", "旺仔牛奶245ml",
                "康师傅红烧牛肉面", "百事可乐330ml"]
# DeepFashion consumer-to-shop <CATEGORY>/<Sub> folders (img/TOPS/T_Shirt/id_00000218/ is a
# real one), and real Stanford Cars class names (one with a slash: fine in a label).
DEEPFASHION_FOLDERS = ["TOPS/T_Shirt", "DRESSES/Dress", "TROUSERS/Skirt", "CLOTHING/Coat"]
CARS_CLASSES = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012",
                "Ram C/V Cargo Van Minivan 2012", "smart fortwo Convertible 2012"]


def _img(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(jpeg_bytes(seed, (40, 32)))


def imagenet(root: Path, classes: int = 5, per_class: int = 4) -> int:
    """Kaggle ImageNet Object Localization Challenge: LOC_synset_mapping.txt +
    ILSVRC/Data/CLS-LOC/{train,val,test}."""
    wnids = [f"n0{1440764 + 17 * i}" for i in range(classes)]
    (root / "LOC_synset_mapping.txt").parent.mkdir(parents=True, exist_ok=True)
    mapping = "".join(f"{w} thing {i}, other name\n" for i, w in enumerate(wnids))
    (root / "LOC_synset_mapping.txt").write_text(mapping)
    (root / "LOC_train_solution.csv").write_text("ImageId,PredictionString\n")
    (root / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n")
    for c, w in enumerate(wnids):
        for n in range(per_class):
            _img(root / "ILSVRC" / "Data" / "CLS-LOC" / "train" / w / f"{w}_{n + 10}.JPEG",
                 100 * c + n)
    _img(root / "ILSVRC" / "Data" / "CLS-LOC" / "val" / "ILSVRC2012_val_00000001.JPEG", 9999)
    _img(root / "ILSVRC" / "Data" / "CLS-LOC" / "test" / "ILSVRC2012_test_00000001.JPEG", 9998)
    (root / "ILSVRC" / "Annotations" / "CLS-LOC" / "train").mkdir(parents=True)
    return classes * per_class


def products10k(root: Path, classes: int = 5, per_class: int = 4) -> int:
    """Products-10K: train.csv (name,class,group) + train/<name>.jpg."""
    lines = ["name,class,group"]
    for c in range(classes):
        for n in range(per_class):
            name = f"{c * 1000 + n}.jpg"
            _img(root / "train" / name, 200 * c + n)
            lines.append(f"{name},{c + 7},{c % 3}")
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    (root / "test").mkdir()
    return classes * per_class


def landmark_id(n: int) -> str:
    return hashlib.sha1(str(n).encode()).hexdigest()[:16]


def landmarks(root: Path, sizes: tuple[int, ...] = (6, 5, 4, 3, 2, 2), missing: int = 1) -> int:
    """GLDv2 / GLR2021: train.csv (id,landmark_id) + train/<id[0]>/<id[1]>/<id[2]>/<id>.jpg.

    The last `missing` ids are listed but have no file (a partial download).
    """
    lines, n = ["id,landmark_id"], 0
    for lm, size in enumerate(sizes):
        for _ in range(size):
            i = landmark_id(n)
            lines.append(f"{i},{1000 + lm}")
            _img(root / "train" / i[0] / i[1] / i[2] / f"{i}.jpg", 300 + n)
            n += 1
    for m in range(missing):
        lines.append(f"{landmark_id(10_000 + m)},{1000}")
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    return n


def rp2k(root: Path, per_class: int = 4) -> int:
    """RP2K: train/<Chinese product name>/<n>.jpg (and test/ alike)."""
    for c, name in enumerate(RP2K_CLASSES):
        for n in range(per_class):
            _img(root / "train" / name / f"{name}_{n}.jpg", 400 * c + n)
        _img(root / "test" / name / f"{name}_t.jpg", 400 * c + 99)
    return len(RP2K_CLASSES) * per_class


def csv_table(root: Path, classes: int = 4, per_class: int = 3) -> int:
    lines = ["path,label"]
    for c in range(classes):
        for n in range(per_class):
            rel = f"pics/{c}_{n}.jpg"
            _img(root / rel, 500 * c + n)
            lines.append(f"{rel},label {c}")
    lines.append("../outside.jpg,label 0")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return classes * per_class


def deepfashion_c2s(root: Path, items: int = 8, consumers: int = 3, img_parent: str = "") -> int:
    """Consumer-to-shop: Eval/list_eval_partition.txt and
    img/<CATEGORY>/<Sub>/id_<8 digits>/{comsumer,shop}_NN.jpg.

    Each item has `consumers` consumer photos, each paired with one of two shop
    photos (so a shop photo is listed in several pairs); items cycle through
    train, train, val, test. `img_parent` = "Img" puts img/ where the release's
    Img/img.zip unpacks. Returns the number of distinct train images.
    """
    rows, train_images = [], 0
    for i in range(items):
        item = f"id_{i + 1:08d}"
        folder = f"img/{DEEPFASHION_FOLDERS[i % len(DEEPFASHION_FOLDERS)]}/{item}"
        status = ("train", "train", "val", "test")[i % 4]
        for c in range(consumers):
            _img(root / img_parent / folder / f"comsumer_{c + 1:02d}.jpg", 600 * i + c)
            shop = f"{folder}/shop_{c % 2 + 1:02d}.jpg"
            rows.append(f"{folder}/comsumer_{c + 1:02d}.jpg {shop} {item} {status}")
        for s in range(2):
            _img(root / img_parent / folder / f"shop_{s + 1:02d}.jpg", 600 * i + 50 + s)
        train_images += (consumers + 2) * (status == "train")
    header = "image_pair_name_1 image_pair_name_2 item_id evaluation_status"
    (root / "Eval").mkdir(parents=True, exist_ok=True)
    partition = "\n".join([str(len(rows)), header, *rows]) + "\n"
    (root / "Eval" / "list_eval_partition.txt").write_text(partition)
    (root / "Anno").mkdir(exist_ok=True)
    ids = "".join(f"id_{i + 1:08d}\n" for i in range(items))
    (root / "Anno" / "list_item_consumer2shop.txt").write_text(f"{items}\nitem_id\n{ids}")
    return train_images


def write_cars_annos(path: Path, entries: list[tuple[str, int]], with_class: bool = True) -> None:
    """A devkit annotation file: `annotations`, a 1xN MATLAB struct array (bbox_*, class, fname).

    Integers are stored in the smallest type that holds them, as the real
    files load (uint8 / uint16). with_class=False is cars_test_annos.mat's shape.
    """
    names = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", *(["class"] * with_class), "fname")
    annos = np.empty((1, len(entries)), dtype=[(n, "O") for n in names])
    for i, (fname, cls) in enumerate(entries):
        values = {"bbox_x1": 3 + i, "bbox_y1": 5, "bbox_x2": 300 + i, "bbox_y2": 120, "class": cls}
        for n in names:
            if n == "fname":
                annos[0, i][n] = np.array([fname])
            else:
                annos[0, i][n] = np.array([[values[n]]], dtype=np.min_scalar_type(values[n]))
    scipy.io.savemat(path, {"annotations": annos}, do_compression=True)


def stanford_cars(root: Path, per_class: int = 4, kaggle: bool = True) -> int:
    """Stanford Cars: the devkit (.mat files) + cars_train/ + cars_test/.

    kaggle=True is the jessicali9530 mirror's nesting (car_devkit/devkit/,
    cars_train/cars_train/); False the original archives' (devkit/, cars_train/).
    """
    devkit = root / ("car_devkit/devkit" if kaggle else "devkit")
    train = root / ("cars_train/cars_train" if kaggle else "cars_train")
    test = root / ("cars_test/cars_test" if kaggle else "cars_test")
    devkit.mkdir(parents=True)
    meta = np.empty((1, len(CARS_CLASSES)), dtype=object)
    for i, name in enumerate(CARS_CLASSES):
        meta[0, i] = np.array([name])
    scipy.io.savemat(devkit / "cars_meta.mat", {"class_names": meta})
    count = per_class * len(CARS_CLASSES)
    entries = [(f"{n + 1:05d}.jpg", n % len(CARS_CLASSES) + 1) for n in range(count)]
    for n, (fname, _) in enumerate(entries):
        _img(train / fname, 700 + n)
    write_cars_annos(devkit / "cars_train_annos.mat", entries)
    write_cars_annos(devkit / "cars_test_annos.mat", [("00001.jpg", 0)], with_class=False)
    _img(test / "00001.jpg", 799)
    (devkit / "README.txt").write_text("This file gives documentation for the cars 196 dataset.\n")
    return len(entries)


def tar_gz(folder: Path, out: Path, top: str | None = None) -> Path:
    with tarfile.open(out, "w:gz") as tf:
        for p in sorted(folder.rglob("*")):
            tf.add(p, arcname=str(Path(top or "") / p.relative_to(folder)), recursive=False)
    return out


def zip_dir(folder: Path, out: Path, top: str | None = None) -> Path:
    with zipfile.ZipFile(out, "w") as zf:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                zf.write(p, arcname=str(Path(top or "") / p.relative_to(folder)))
    return out
