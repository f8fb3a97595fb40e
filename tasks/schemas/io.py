"""Atomic writes, scratch folders, Parquet tables checked against their schema, file digests.

Every artifact is written through these, so an interrupted stage never leaves a file that
looks complete, and a table on disk always has the columns its schema declares.
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq


@contextmanager
def atomic_path(target: Path | str) -> Iterator[Path]:
    """Yield a temp path beside `target`; rename it over `target` only on success.

    An interrupted stage therefore never leaves a file that looks complete.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".tmp{target.suffix}",
                               dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600; give the usual file mode
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextmanager
def scratch_dir(parent: Path, prefix: str) -> Iterator[Path]:
    """Yield a fresh folder `parent/<prefix><random>` to build something in; deleted after.

    A run killed outright (SIGKILL, the OOM killer) runs no cleanup, and its folder may hold a
    155 GiB download. So the folder is held with an advisory lock (flock on the folder itself)
    while in use, which the kernel drops however its process ends, and every `<prefix>*` folder
    that nobody holds is deleted before a new one is made: a killed run's is gone by the next.
    The caller renames the result out of it into place; until then, nothing inside is read as
    finished. Folders of one prefix in use at once (threads, processes) leave each other be.
    """
    parent.mkdir(parents=True, exist_ok=True)
    remove_stale_scratch(parent, prefix)
    while True:
        path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            continue  # another cleaner deleted it before we could lock it: make another
        fcntl.flock(fd, fcntl.LOCK_EX)  # waits only while a cleaner that saw it first deletes it
        if _same_folder(path, fd):
            break
        os.close(fd)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        os.close(fd)


def _same_folder(path: Path, fd: int) -> bool:
    try:
        return os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def remove_stale_scratch(parent: Path, prefix: str) -> list[Path]:
    """Delete the `<prefix>*` folders in `parent` that no live process holds; returns them."""
    removed = []
    for path in sorted(parent.glob(glob.escape(prefix) + "*")):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:
            continue  # not a folder (or gone): not ours to delete
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        except BlockingIOError:
            pass  # in use
        finally:
            os.close(fd)
    return removed


def write_bytes(target: Path | str, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def write_json(target: Path | str, obj: Any) -> None:
    text = json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n"
    write_bytes(target, text.encode("utf-8"))


def write_table(target: Path | str, table: pa.Table, schema: pa.Schema) -> None:
    """Write a Parquet table after casting it to its declared schema."""
    table = table.select(schema.names).cast(schema)
    with atomic_path(target) as tmp:
        pq.write_table(table, tmp)


def read_table(path: Path | str, schema: pa.Schema) -> pa.Table:
    """Read a Parquet table and check it has the declared schema's columns."""
    table = pq.read_table(path)
    missing = [n for n in schema.names if n not in table.column_names]
    if missing:
        raise ValueError(f"{path}: missing columns {missing}; expected {schema.names}")
    return table.select(schema.names).cast(schema)


def sha256_file(path: Path | str, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()
