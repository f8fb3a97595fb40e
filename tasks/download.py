"""Turn each source kind into files under data/01_raw/<source>/ plus its catalog.

A source's folder is built in a staging folder beside it and moved into
place only when complete, so an interrupted download never looks finished.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

import numpy as np
import pyarrow as pa
from PIL import Image

from tasks import fashion_mnist
from tasks.images import IMAGE_SUFFIXES
from tasks.params import FashionMnistSource, ImageFolderSource, ParamsError, SourceParams
from tasks.photos import Photo
from tasks.schemas import CATALOG_NAME, CATALOG_SCHEMA, write_table
from tasks.views import random_view, view_rng

Row = dict[str, str]


def check_source(name: str, spec: SourceParams) -> None:
    """Fail before any work when a source's local path is missing (a typo, an uninstalled package)."""
    if isinstance(spec, ImageFolderSource) and not Path(spec.path).is_dir():
        raise ParamsError(f"sources.{name}.path = '{spec.path}': no such folder; give a folder with one sub-folder per class")
    if isinstance(spec, FashionMnistSource):
        parsed = urlparse(spec.uri)
        if parsed.scheme not in ("", "file", "http", "https"):
            raise ParamsError(f"sources.{name}.uri = '{spec.uri}': allowed schemes are file://, http://, https://")
        local = Path(parsed.path if parsed.scheme else spec.uri)
        if parsed.scheme in ("", "file") and not local.is_dir():
            raise ParamsError(f"sources.{name}.uri = '{spec.uri}': no such folder ({fashion_mnist.DEBIAN_HINT})")


@contextmanager
def staged_dir(final: Path) -> Iterator[Path]:
    """Yield an empty staging folder; on success it replaces `final` in one rename."""
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.parent / f".{final.name}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def render_photo_views(photo: Photo, root: Path, views: int, size: int, seed: int) -> list[Row]:
    """Write `views` seeded random views of one photo as JPEGs; returns catalog rows."""
    with Image.open(photo.path) as im:
        im.draft("RGB", (4 * size, 4 * size))  # JPEG: decode at reduced scale, much faster
        base = im.convert("RGB")
    base.thumbnail((3 * size, 3 * size), Image.Resampling.LANCZOS)
    rows = []
    for i in range(views):
        rel = Path("images") / photo.label / f"{i:04d}.jpg"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        random_view(base, view_rng(seed, photo.label, i), size).save(root / rel, quality=90)
        rows.append({"path": rel.as_posix(), "label": photo.label})
    return rows


def write_fashion_mnist(uri: str, root: Path, per_class: int) -> list[Row]:
    """Write the first `per_class` training images of each class as PNGs."""
    images, labels = fashion_mnist.load_fashion_mnist(uri)
    rows = []
    for idx in fashion_mnist.first_per_class(labels, per_class):
        name = fashion_mnist.CLASS_NAMES[int(labels[idx])]
        rel = Path("images") / name / f"{idx:05d}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.asarray(images[idx])).save(root / rel, optimize=False)
        rows.append({"path": rel.as_posix(), "label": name})
    return rows


def copy_imagefolder(src: Path, root: Path) -> list[Row]:
    """Bring a class-per-folder tree under `root` (hard links where possible).

    Files are taken as they are: decoding problems are found and recorded by
    the shard stage, which sees every image anyway.
    """
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: no such folder")
    rows = []
    for class_dir in sorted(p for p in src.iterdir() if p.is_dir()):
        for path in sorted(class_dir.rglob("*")):
            if not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            rel = Path("images") / path.relative_to(src)
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(path, root / rel)
            except OSError:
                shutil.copy2(path, root / rel)
            rows.append({"path": rel.as_posix(), "label": class_dir.name})
    return rows


def write_catalog(rows: list[Row], root: Path, source: str) -> pa.Table:
    """Write `catalog.parquet` (path, label, source), sorted by path for stable bytes."""
    rows = sorted(rows, key=lambda r: r["path"])
    table = pa.table({
        "path": [r["path"] for r in rows],
        "label": [r["label"] for r in rows],
        "source": [source] * len(rows),
    })
    write_table(root / CATALOG_NAME, table, CATALOG_SCHEMA)
    return table
