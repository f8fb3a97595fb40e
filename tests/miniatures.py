"""Faithful miniature copies of the real datasets' layouts: same file names, CSV columns, depth, UTF-8 names.

Each builder writes a tiny dataset under `root` and returns the number of
images a reader should catalogue, so tests can package it the way the
dataset is published (Kaggle zip, tar.gz, loose files) and read it back.
"""

from __future__ import annotations

import hashlib
import tarfile
import zipfile
from pathlib import Path

from conftest import jpeg_bytes

# Real RP2K product names look like these (UTF-8 folder names).
RP2K_CLASSES = ["安慕希原味酸奶", "农夫山泉550ml", "旺仔牛奶245ml", "康师傅红烧牛肉面", "百事可乐330ml"]


def _img(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(jpeg_bytes(seed, (40, 32)))


def imagenet(root: Path, classes: int = 5, per_class: int = 4) -> int:
    """Kaggle ImageNet Object Localization Challenge: LOC_synset_mapping.txt + ILSVRC/Data/CLS-LOC/{train,val,test}."""
    wnids = [f"n0{1440764 + 17 * i}" for i in range(classes)]
    (root / "LOC_synset_mapping.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "LOC_synset_mapping.txt").write_text("".join(f"{w} thing {i}, other name\n" for i, w in enumerate(wnids)))
    (root / "LOC_train_solution.csv").write_text("ImageId,PredictionString\n")
    (root / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n")
    for c, w in enumerate(wnids):
        for n in range(per_class):
            _img(root / "ILSVRC" / "Data" / "CLS-LOC" / "train" / w / f"{w}_{n + 10}.JPEG", 100 * c + n)
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
