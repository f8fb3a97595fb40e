"""Each dataset's published layout -> catalog rows (path relative to the dataset root, label).

One reader per source kind, each checking the files it expects and saying
which are missing, and a finder that locates the dataset root inside
whatever an archive unpacked (Kaggle zips often add a top-level folder).
Rows whose image is missing, or whose listed name would leave the dataset,
are returned as skips with the reason, never silently dropped. Datasets
with their own annotation formats have a module each (tasks/deepfashion.py,
tasks/stanford_cars.py), registered here.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import polars as pl

from tasks import deepfashion, stanford_cars
from tasks.images import IMAGE_SUFFIXES
from tasks.layout_rows import LayoutError, Row, Skip, rows_if_present


def _images_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _read_table(path: Path) -> pl.DataFrame:
    if path.suffix.lower() == ".parquet":
        return pl.read_parquet(path)
    # every column as text: ids keep their leading zeros
    return pl.read_csv(path, infer_schema_length=0)


def _need_columns(table: pl.DataFrame, path: Path, columns: list[str]) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise LayoutError(f"{path.name}: missing columns {missing}; it has {table.columns}")


def read_imagefolder(root: Path) -> tuple[list[Row], list[Skip]]:
    """<class>/**/<image>: the class is the top folder's name."""
    rows = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        rows += [{"path": p.relative_to(root).as_posix(), "label": class_dir.name}
                 for p in _images_under(class_dir)]
    return rows, []


def read_imagenet(root: Path) -> tuple[list[Row], list[Skip]]:
    """ILSVRC/Data/CLS-LOC/train/<wnid>/<wnid>_<n>.JPEG; wnids must be in LOC_synset_mapping.txt."""
    mapping = root / "LOC_synset_mapping.txt"
    train = root / "ILSVRC" / "Data" / "CLS-LOC" / "train"
    if not mapping.is_file() or not train.is_dir():
        raise LayoutError(f"{root}: expected LOC_synset_mapping.txt and ILSVRC/Data/CLS-LOC/train/")
    lines = mapping.read_text(encoding="utf-8").splitlines()
    wnids = {line.split(maxsplit=1)[0] for line in lines if line.strip()}
    rows, skips = [], []
    for class_dir in sorted(p for p in train.iterdir() if p.is_dir()):
        images = [p.relative_to(root).as_posix() for p in _images_under(class_dir)]
        if class_dir.name not in wnids:
            skips += [Skip(p, class_dir.name, "synset not in LOC_synset_mapping.txt")
                      for p in images]
            continue
        rows += [{"path": p, "label": class_dir.name} for p in images]
    return rows, skips


def read_products10k(root: Path) -> tuple[list[Row], list[Skip]]:
    """train.csv (name, class, group) naming images in train/; the label is `class`."""
    table_path = root / "train.csv"
    table = _read_table(table_path)
    _need_columns(table, table_path, ["name", "class", "group"])
    return rows_if_present(root, list(zip(table["name"], table["class"])), prefix="train/")


def landmark_path(image_id: str) -> str:
    """GLDv2's sharding: train/<id[0]>/<id[1]>/<id[2]>/<id>.jpg."""
    return f"train/{image_id[0]}/{image_id[1]}/{image_id[2]}/{image_id}.jpg"


def read_landmarks(root: Path) -> tuple[list[Row], list[Skip]]:
    """train.csv (id, landmark_id); images at train/<a>/<b>/<c>/<id>.jpg; label = landmark_id."""
    table_path = root / "train.csv"
    table = _read_table(table_path)
    _need_columns(table, table_path, ["id", "landmark_id"])
    ids = zip(table["id"], table["landmark_id"])
    return rows_if_present(root, [(landmark_path(i), label) for i, label in ids])


def read_rp2k(root: Path) -> tuple[list[Row], list[Skip]]:
    """train/<class name>/*.jpg: class names are Chinese product names (UTF-8 paths)."""
    rows, skips = read_imagefolder(root / "train")
    return [{"path": f"train/{r['path']}", "label": r["label"]} for r in rows], skips


def read_table_source(root: Path, table: str, path_column: str,
                      label_column: str) -> tuple[list[Row], list[Skip]]:
    """A CSV/Parquet listing image paths (relative to the table's folder) and labels."""
    table_path = root / table
    frame = _read_table(table_path)
    _need_columns(frame, table_path, [path_column, label_column])
    base = Path(table).parent.as_posix()
    pairs = [(str(p), str(label)) for p, label in zip(frame[path_column], frame[label_column])]
    return rows_if_present(root, pairs, prefix="" if base == "." else f"{base}/")


def _has_table_with(columns: list[str]) -> Callable[[Path], bool]:
    def check(folder: Path) -> bool:
        path = folder / "train.csv"
        if not path.is_file():
            return False
        with open(path, encoding="utf-8") as fh:
            header = [c.strip() for c in fh.readline().split(",")]
        return all(c in header for c in columns)
    return check


Reader = Callable[[Path], tuple[list[Row], list[Skip]]]


@dataclass(frozen=True)
class Layout:
    """How to recognise a dataset's root folder, what to say when none is found, how to read it."""

    is_root: Callable[[Path], bool]
    expected: str
    read: Reader


LAYOUTS: dict[str, Layout] = {
    "imagenet": Layout(lambda d: ((d / "LOC_synset_mapping.txt").is_file()
                                  and (d / "ILSVRC").is_dir()),
                       "LOC_synset_mapping.txt and ILSVRC/Data/CLS-LOC/train/<wnid>/",
                       read_imagenet),
    "products10k": Layout(_has_table_with(["name", "class", "group"]),
                          "train.csv with columns name,class,group and a train/ folder",
                          read_products10k),
    "landmarks": Layout(_has_table_with(["id", "landmark_id"]),
                        "train.csv with columns id,landmark_id and train/<a>/<b>/<c>/<id>.jpg",
                        read_landmarks),
    "rp2k": Layout(lambda d: (d / "train").is_dir() and not (d / "train.csv").exists(),
                   "a train/ folder with one sub-folder per product", read_rp2k),
    "stanford_cars": Layout(stanford_cars.is_root, stanford_cars.EXPECTED, stanford_cars.read),
}


def deepfashion_layout(statuses: Collection[str]) -> Layout:
    """The `deepfashion_c2s` kind's layout: the pairs whose evaluation status is in `statuses`."""
    return Layout(deepfashion.is_root, deepfashion.EXPECTED,
                  lambda root: deepfashion.read(root, statuses))


def table_layout(table: str, path_column: str, label_column: str) -> Layout:
    """The `csv` kind's layout: the folder holding `table`."""
    return Layout(lambda d: (d / table).is_file(), f"the table {table!r}",
                  lambda root: read_table_source(root, table, path_column, label_column))


def find_root(bases: list[Path], is_root: Callable[[Path], bool],
              max_depth: int = 3) -> Path | None:
    """The shallowest folder under any base (depth <= max_depth) that holds the dataset."""
    frontier = list(bases)
    for _ in range(max_depth + 1):
        for folder in frontier:
            if is_root(folder):
                return folder
        frontier = sorted(p for f in frontier for p in f.iterdir()
                          if p.is_dir() and not p.name.startswith("."))
    return None
