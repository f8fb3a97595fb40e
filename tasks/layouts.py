"""Each dataset's published layout -> catalog rows (path relative to the dataset root, label).

One reader per source kind, each checking the files it expects and saying
which are missing, and a finder that locates the dataset root inside
whatever an archive unpacked (Kaggle zips often add a top-level folder).
Rows whose image is missing are returned as skips with the reason, never
silently dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import polars as pl

from tasks.images import IMAGE_SUFFIXES

Row = dict[str, str]


@dataclass(frozen=True)
class Skip:
    path: str
    label: str
    reason: str


class LayoutError(ValueError):
    """The files are not laid out as the source kind expects; the message says what is missing."""


def _images_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _read_table(path: Path) -> pl.DataFrame:
    if path.suffix.lower() == ".parquet":
        return pl.read_parquet(path)
    return pl.read_csv(path, infer_schema_length=0)  # every column as text: ids keep their leading zeros


def _need_columns(table: pl.DataFrame, path: Path, columns: list[str]) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise LayoutError(f"{path.name}: missing columns {missing}; it has {table.columns}")


def _rows_if_present(root: Path, pairs: list[tuple[str, str]]) -> tuple[list[Row], list[Skip]]:
    rows, skips = [], []
    for rel, label in pairs:
        if (root / rel).is_file():
            rows.append({"path": rel, "label": label})
        else:
            skips.append(Skip(rel, label, "listed in the table but not found"))
    return rows, skips


def read_imagefolder(root: Path) -> tuple[list[Row], list[Skip]]:
    """<class>/**/<image>: the class is the top folder's name."""
    rows = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        rows += [{"path": p.relative_to(root).as_posix(), "label": class_dir.name} for p in _images_under(class_dir)]
    return rows, []


def read_imagenet(root: Path) -> tuple[list[Row], list[Skip]]:
    """ILSVRC/Data/CLS-LOC/train/<wnid>/<wnid>_<n>.JPEG; wnids must be in LOC_synset_mapping.txt."""
    mapping = root / "LOC_synset_mapping.txt"
    train = root / "ILSVRC" / "Data" / "CLS-LOC" / "train"
    if not mapping.is_file() or not train.is_dir():
        raise LayoutError(f"{root}: expected LOC_synset_mapping.txt and ILSVRC/Data/CLS-LOC/train/")
    wnids = {line.split(maxsplit=1)[0] for line in mapping.read_text(encoding="utf-8").splitlines() if line.strip()}
    rows, skips = [], []
    for class_dir in sorted(p for p in train.iterdir() if p.is_dir()):
        images = [p.relative_to(root).as_posix() for p in _images_under(class_dir)]
        if class_dir.name not in wnids:
            skips += [Skip(p, class_dir.name, "synset not in LOC_synset_mapping.txt") for p in images]
            continue
        rows += [{"path": p, "label": class_dir.name} for p in images]
    return rows, skips


def read_products10k(root: Path) -> tuple[list[Row], list[Skip]]:
    """train.csv (name, class, group) naming images in train/; the label is `class`."""
    table_path = root / "train.csv"
    table = _read_table(table_path)
    _need_columns(table, table_path, ["name", "class", "group"])
    return _rows_if_present(root, [(f"train/{n}", c) for n, c in zip(table["name"], table["class"])])


def landmark_path(image_id: str) -> str:
    """GLDv2's sharding: train/<id[0]>/<id[1]>/<id[2]>/<id>.jpg."""
    return f"train/{image_id[0]}/{image_id[1]}/{image_id[2]}/{image_id}.jpg"


def read_landmarks(root: Path) -> tuple[list[Row], list[Skip]]:
    """train.csv (id, landmark_id); images at train/<a>/<b>/<c>/<id>.jpg; the label is landmark_id."""
    table_path = root / "train.csv"
    table = _read_table(table_path)
    _need_columns(table, table_path, ["id", "landmark_id"])
    return _rows_if_present(root, [(landmark_path(i), l) for i, l in zip(table["id"], table["landmark_id"])])


def read_rp2k(root: Path) -> tuple[list[Row], list[Skip]]:
    """train/<class name>/*.jpg: class names are Chinese product names (UTF-8 paths)."""
    rows, skips = read_imagefolder(root / "train")
    return [{"path": f"train/{r['path']}", "label": r["label"]} for r in rows], skips


def read_table_source(root: Path, table: str, path_column: str, label_column: str) -> tuple[list[Row], list[Skip]]:
    """A CSV/Parquet listing image paths (relative to the table's folder) and labels."""
    table_path = root / table
    frame = _read_table(table_path)
    _need_columns(frame, table_path, [path_column, label_column])
    base = Path(table).parent
    pairs = []
    skips = []
    for p, label in zip(frame[path_column], frame[label_column]):
        rel = (base / p).as_posix()
        if Path(p).is_absolute() or ".." in Path(rel).parts:
            skips.append(Skip(str(p), str(label), "path leaves the dataset folder"))
        else:
            pairs.append((rel, str(label)))
    rows, missing = _rows_if_present(root, pairs)
    return rows, skips + missing


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
    """How to recognise a dataset's root folder, what to say when none is found, and how to read it."""

    is_root: Callable[[Path], bool]
    expected: str
    read: Reader


LAYOUTS: dict[str, Layout] = {
    "imagenet": Layout(lambda d: (d / "LOC_synset_mapping.txt").is_file() and (d / "ILSVRC").is_dir(),
                       "LOC_synset_mapping.txt and ILSVRC/Data/CLS-LOC/train/<wnid>/", read_imagenet),
    "products10k": Layout(_has_table_with(["name", "class", "group"]),
                          "train.csv with columns name,class,group and a train/ folder", read_products10k),
    "landmarks": Layout(_has_table_with(["id", "landmark_id"]),
                        "train.csv with columns id,landmark_id and train/<a>/<b>/<c>/<id>.jpg", read_landmarks),
    "rp2k": Layout(lambda d: (d / "train").is_dir() and not (d / "train.csv").exists(),
                   "a train/ folder with one sub-folder per product", read_rp2k),
}


def table_layout(table: str, path_column: str, label_column: str) -> Layout:
    """The `csv` kind's layout: the folder holding `table`."""
    return Layout(lambda d: (d / table).is_file(), f"the table {table!r}",
                  lambda root: read_table_source(root, table, path_column, label_column))


def find_root(bases: list[Path], is_root: Callable[[Path], bool], max_depth: int = 3) -> Path | None:
    """The shallowest folder under any base (depth <= max_depth) that holds the dataset."""
    frontier = list(bases)
    for _ in range(max_depth + 1):
        for folder in frontier:
            if is_root(folder):
                return folder
        frontier = sorted(p for f in frontier for p in f.iterdir() if p.is_dir() and not p.name.startswith("."))
    return None
