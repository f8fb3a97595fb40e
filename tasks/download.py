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

from tasks import fashion_mnist, layouts
from tasks.archives import ArchiveLimits, is_archive, safe_extract
from tasks.fetch import KAGGLE_HELP, kaggle_credentials, local_path, parse_kaggle
from tasks.http_guard import ByteLimit, TimeLimit
from tasks.layouts import Skip
from tasks.names import check_component, check_relative_path, url_file_name
from tasks.params.base import ParamsError
from tasks.params.sources import (CsvSource, DatasetSource, DeepFashionC2sSource,
                                  FashionMnistSource, Fetch, ImageFolderSource, SourceParams,
                                  UrlsSource)
from tasks.photos import Photo
from tasks.schemas.io import write_table
from tasks.schemas.paths import CATALOG_NAME, FAILURES_NAME, SKIPPED_NAME
from tasks.schemas.raw import CATALOG_SCHEMA, FAILURES_SCHEMA, SKIPPED_SCHEMA
from tasks.urls import Fetched
from tasks.views import NoContent, random_view, view_rng

Row = dict[str, str]


def check_source(name: str, spec: SourceParams) -> None:
    """Fail before any work when a source's local path is missing.

    That is a typo, or a package that is not installed.
    """
    if isinstance(spec, ImageFolderSource) and not Path(spec.path).is_dir():
        raise ParamsError(f"sources.{name}.path = '{spec.path}': no such folder; "
                          "give a folder with one sub-folder per class")
    if isinstance(spec, FashionMnistSource):
        if urlparse(spec.uri).scheme not in ("", "file", "http", "https"):
            raise ParamsError(f"sources.{name}.uri = '{spec.uri}': "
                              "allowed schemes are file://, http://, https://")
        local = local_path(spec.uri)
        if local is not None and not local.is_dir():
            raise ParamsError(f"sources.{name}.uri = '{spec.uri}': "
                              f"no such folder ({fashion_mnist.DEBIAN_HINT})")
    if not isinstance(spec, (DatasetSource, UrlsSource)):
        return
    for url in [f.url for f in spec.fetches()] if isinstance(spec, DatasetSource) else [spec.uri]:
        try:
            local = local_path(url)
        except ValueError as exc:
            raise ParamsError(f"sources.{name}.uri = {exc}") from None
        if local is not None and not local.exists():
            raise ParamsError(f"sources.{name}.uri = '{url}': no such file or folder")
        if urlparse(url).scheme == "kaggle":
            try:
                parse_kaggle(url)
            except ValueError as exc:
                raise ParamsError(f"sources.{name}.uri = {exc}") from None
            if not kaggle_credentials():
                raise ParamsError(f"sources.{name}.uri = '{url}': "
                                  f"no Kaggle credentials found. {KAGGLE_HELP}")


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


def render_photo_views(photo: Photo, root: Path, views: int, size: int, seed: int,
                       ) -> tuple[list[Row], list[Skip]]:
    """Write `views` seeded random views of one photo as JPEGs; returns catalog rows, or no rows
    and the reason when a view cannot be given content (tasks/views.NoContent)."""
    with photo.open() as im:
        im.draft("RGB", (4 * size, 4 * size))  # JPEG: decode at reduced scale, much faster
        base = im.convert("RGB")
    base.thumbnail((3 * size, 3 * size), Image.Resampling.LANCZOS)
    label = check_component(photo.label, source="package_photos", entry=photo.origin)  # a folder
    files = {}
    for i in range(views):
        try:
            files[Path("images") / label / f"{i:04d}.jpg"] = random_view(
                base, view_rng(seed, photo.label, i), size)
        except NoContent as exc:  # the whole photo or none: a class is all its views
            return [], [Skip(photo.origin, photo.label, f"view {i}: {exc}")]
    for rel, jpeg in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(jpeg)
    return [{"path": rel.as_posix(), "label": photo.label} for rel in files], []


def write_fashion_mnist(spec: FashionMnistSource, root: Path, source: str) -> list[Row]:
    """Write the first `per_class` training images of each class as PNGs.

    The files come through the shared fetcher (cache, retries, sha256, the source's byte and
    time limits).
    """
    images, labels = fashion_mnist.load_fashion_mnist(
        spec.uri, Path(spec.download_cache).resolve(), source=f"sources.{source}",
        limit=ByteLimit(spec.max_download_bytes, f"sources.{source}.max_download_bytes"),
        time_limit=TimeLimit(spec.max_download_seconds, f"sources.{source}.max_download_seconds"),
        sha256=dict(spec.sha256))
    per_class = spec.per_class
    rows = []
    for idx in fashion_mnist.first_per_class(labels, per_class):
        name = fashion_mnist.CLASS_NAMES[int(labels[idx])]
        rel = Path("images") / name / f"{idx:05d}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.asarray(images[idx])).save(root / rel, optimize=False)
        rows.append({"path": rel.as_posix(), "label": name})
    return rows


def link_imagefolder(src: Path, root: Path) -> list[Row]:
    """Bring a class-per-folder tree under `root` as images/<class>/... (hard links where possible).

    Files are taken as they are: decoding problems are found and recorded by
    the shard stage, which sees every image anyway.
    """
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: no such folder")
    rows, _ = layouts.read_imagefolder(src)
    for r in rows:  # names from disk, but labels become folders of a DVC output: checked
        rel = check_relative_path(r["path"], source=f"imagefolder {src}", entry=r["path"])
        link_or_copy(src / rel, root / "images" / rel)
    return [{"path": f"images/{r['path']}", "label": r["label"]} for r in rows]


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


# ------------------------------------------------------- datasets in their layouts


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard link (instant, no extra space) where the filesystem allows, else copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def place_fetched(path: Path, fetch: Fetch, stage: Path, spec: DatasetSource,
                  source: str) -> Path | None:
    """Put one fetched file into the staging folder: archives extracted, files linked.

    Archives are extracted within the source's limits (`archive_max_*` in params.yaml).
    A local folder is not copied: it is returned, to be read in place (only
    the images the catalog names are then linked in).
    """
    if path.is_dir():
        return path
    target = stage / fetch.into
    if is_archive(path):
        limits = ArchiveLimits(spec.archive_max_entries, spec.archive_max_bytes,
                               spec.archive_max_ratio)
        safe_extract(path, target, limits, source=f"sources.{source}")
    else:
        # the URL's file name, decoded then checked: `%2F..%2F` cannot leave the source's folder
        link_or_copy(path, target / url_file_name(fetch.url, source=f"sources.{source}",
                                                  default=path.name))
    return None


def layout_of(kind: str, spec: SourceParams) -> layouts.Layout:
    """The layout a dataset source is read with: kinds with options build theirs from the spec."""
    if isinstance(spec, CsvSource):
        return layouts.table_layout(spec.table, spec.path_column, spec.label_column)
    if isinstance(spec, DeepFashionC2sSource):
        return layouts.deepfashion_layout(spec.statuses)
    return layouts.LAYOUTS[kind]


def read_layout(kind: str, spec: SourceParams,
                bases: list[Path]) -> tuple[Path, list[Row], list[Skip]]:
    """Find the dataset root among `bases`; read its catalog rows (paths relative to the root)."""
    layout = layout_of(kind, spec)
    root = layouts.find_root(bases, layout.is_root)
    if root is None:
        searched = [str(b) for b in bases]
        raise layouts.LayoutError(f"{kind}: found no folder with {layout.expected} in {searched}")
    return (root, *layout.read(root))


def adopt_rows(root: Path, rows: list[Row], skips: list[Skip],
               stage: Path) -> tuple[list[Row], list[Skip]]:
    """Rows with paths relative to the source folder; files outside it are linked in."""
    if root.resolve().is_relative_to(stage.resolve()):
        prefix = root.resolve().relative_to(stage.resolve())
        rebase = lambda p: (prefix / p).as_posix()  # noqa: E731
        return ([{**r, "path": rebase(r["path"])} for r in rows],
                [Skip(rebase(s.path), s.label, s.reason) for s in skips])
    for r in rows:
        link_or_copy(root / r["path"], stage / r["path"])
    return rows, skips


def write_skips(skips: list[Skip], root: Path) -> None:
    rows = sorted(({"path": s.path, "label": s.label, "reason": s.reason} for s in skips),
                  key=lambda r: r["path"])
    table = pa.Table.from_pylist(rows, schema=SKIPPED_SCHEMA)
    write_table(root / SKIPPED_NAME, table, SKIPPED_SCHEMA)


# ------------------------------------------------------------------- URL lists


def adopt_urls(fetched: list[Fetched], stage: Path) -> tuple[list[Row], list[dict]]:
    """Link fetched images into images/<h[:2]>/<h>.<ext>; returns catalog rows and failure rows."""
    rows, failures = [], []
    for f in fetched:
        if f.path is None:
            failures.append({"url": f.url, "label": f.label, "error": f.error})
            continue
        rel = Path("images") / f.path.parent.name / f.path.name
        link_or_copy(f.path, stage / rel)
        rows.append({"path": rel.as_posix(), "label": f.label})
    return rows, failures


def write_failures(failures: list[dict], root: Path) -> None:
    rows = sorted(failures, key=lambda r: r["url"])
    table = pa.Table.from_pylist(rows, schema=FAILURES_SCHEMA)
    write_table(root / FAILURES_NAME, table, FAILURES_SCHEMA)
