"""Unpacking a source's archives so that a hostile one cannot hurt: names, links and bombs.

`safe_extract` reads zip and tar (plain, .gz/.tgz, .bz2, .xz).

- Names are checked by `tasks.names.check_relative_path` as the format decodes them (zip: CP437
  or UTF-8, before zipfile cuts at a NUL; tar: UTF-8, PAX and GNU long names): UnsafeName.
- Only regular files and folders are extracted. Symlinks, hard links, devices, FIFOs and other
  types are refused (UnsafeArchive), never created, so never followed: an image dataset has no
  use for them, and skipping one would leave a layout silently short of files. So are a second
  member of one name and a file where a folder is.
- Limits, per archive: entries, bytes written, and bytes written per byte of archive (ratio,
  past a small grace), counted chunk by chunk as written, so a header that lies gains nothing
  (a zip's directory is also checked first, to refuse early): ArchiveLimitError, naming the
  source, archive, entry and the params key of the limit.
- Nested archives are written as files, never opened: they count against the outer archive's
  budget like any file, and a bomb inside stays inert.
- Members go into a fresh folder beside `dest` that becomes `dest` in one rename (or is merged
  into an existing `dest` file by file: GLDv2's 500 tars fill one folder); on any error it is
  deleted, so no half-extracted folder looks complete, and one a killed run left is deleted by
  the next extraction beside `dest`. Modes and owners are the process's own.
"""

from __future__ import annotations

import errno
import lzma
import os
import stat
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Callable

from tasks.names import UnsafeName, check_relative_path
from tasks.schemas.io import scratch_dir

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
CHUNK = 1 << 20
# What a member costs on disk beyond its bytes (an inode and a block), charged per entry.
ENTRY_BYTES = 4096
# tarfile reads a GNU long name or a PAX header whole, before any limit sees it: cap them.
MAX_TAR_HEADER_BYTES = 1 << 20
# The ratio applies past this many bytes: a tiny archive of text (a CSV, a README) may expand
# 50:1 and more without being a bomb, and 1 MiB cannot fill a disk.
GRACE_BYTES = 1 << 20
# Folders a member may nest: datasets use under 10; a path 2,000 folders deep would only make
# every tree walk (ours, shutil.rmtree's, DVC's) recurse past Python's limit.
MAX_DEPTH = 64
# Errors that mean "cannot be written here" (not "the disk is full"), reported as a collision.
_PATH_ERRNOS = {errno.EEXIST, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG, errno.ELOOP}
# The machine's problems, not the archive's: raised as they are. Other OSErrors (a seek to a
# bad offset, gzip's or bzip2's "invalid data") mean a corrupt archive.
_HOST_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EIO,
                errno.EMFILE, errno.ENFILE, errno.ENOMEM}


class UnsafeArchive(ValueError):
    """An archive that was not extracted: a refused member, a collision, or a corrupt file."""


class ArchiveLimitError(UnsafeArchive):
    """An archive went over one of its limits (entries, bytes, ratio) while being extracted."""


@dataclass(frozen=True)
class ArchiveLimits:
    """One archive's limits; defaults live in params (DatasetSource), where a user raises them."""

    max_entries: int
    max_bytes: int
    max_ratio: float
    grace_bytes: int = GRACE_BYTES


def is_archive(path: Path) -> bool:
    """Whether the download step extracts `path` (zip or tar, known by its name).

    A plain .gz is not: a dataset's `x.csv.gz` stays as it is, and the one loader that
    reads gzip streams (Fashion-MNIST) stops at the size its IDX header announces.
    """
    name = path.name.lower()
    return name.endswith(".zip") or name.endswith(TAR_SUFFIXES)


class _Budget:
    """Counts entries and written bytes against the limits; raises naming what went over."""

    def __init__(self, limits: ArchiveLimits, archive: Path, source: str):
        self.limits, self.where = limits, f"{source}: {archive.name}"
        self.size = archive.stat().st_size
        self.by_ratio = limits.max_ratio * self.size + limits.grace_bytes
        self.entries = self.bytes = self.files = 0

    def _over(self, entry: str, key: str, limit: float, what: str) -> ArchiveLimitError:
        return ArchiveLimitError(
            f"{self.where}: {entry}: over the limit {key} = {limit:,} ({what}); nothing was kept "
            f"(raise {key} in params.yaml if the archive is genuine)")

    def entry(self, where: str, entries: int = 1) -> None:
        """Count members (files, folders, anything) before they are looked at: one entry, or
        all that a zip's central directory lists, to refuse early. Each costs a file system
        block against the byte and ratio limits too: 50,000 empty folders are no bytes of
        content but 200 MB of disk."""
        self.entries += entries
        if self.entries > self.limits.max_entries:
            raise self._over(where, "archive_max_entries", self.limits.max_entries, "entries")
        self.check(where, self.bytes + ENTRY_BYTES * entries)
        self.bytes += ENTRY_BYTES * entries

    def check(self, entry: str, total: int) -> None:
        """Raise when `total` bytes written would pass the byte or the ratio limit."""
        if total > self.limits.max_bytes:
            raise self._over(entry, "archive_max_bytes", self.limits.max_bytes,
                             "bytes uncompressed")
        if total > self.by_ratio:
            raise self._over(entry, "archive_max_ratio", self.limits.max_ratio,
                             f"expands past {total:,} bytes from {self.size:,} on disk")

    def write(self, src: IO[bytes], path: Path, name: str) -> None:
        """Stream one member into a new file, counting each chunk before it is written."""
        try:
            out = open(path, "xb")  # x: a second member of the same name is refused
        except OSError as exc:
            raise _collision(exc, self.where, name) from None
        with out:
            while chunk := src.read(CHUNK):
                self.check(f"entry {name!r}", self.bytes + len(chunk))
                self.bytes += len(chunk)
                out.write(chunk)
        self.files += 1


def _collision(exc: OSError, where: str, name: str) -> Exception:
    if exc.errno not in _PATH_ERRNOS:
        return exc  # a full disk or a permission problem is not the archive's fault
    return UnsafeArchive(f"{where}: entry {name!r} cannot be written ({exc.strerror}): a second "
                         "member of that name, a file where a folder is, or a path too long")


def _make_dirs(folder: Path, where: str, name: str) -> None:
    """Create `folder` and its parents inside the extraction folder (MAX_DEPTH bounds them)."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise _collision(exc, where, name) from None


def _member_path(name: str, is_dir: bool, source: str, archive: Path) -> PurePosixPath | None:
    """A member's checked relative path; None for a folder that is the archive's root (`./`)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # tar keeps undecodable bytes as surrogates
        raise UnsafeName(f"{source}: archive {archive.name}: refused name {name!r}: "
                         "not valid UTF-8") from None
    if is_dir and not name.startswith("/") and all(p in ("", ".") for p in name.split("/")):
        return None
    rel = check_relative_path(name, source=source, entry=f"archive {archive.name}")
    if len(rel.parts) > MAX_DEPTH:
        raise UnsafeName(f"{source}: archive {archive.name}: refused name {name[:60]!r}...: "
                         f"more than {MAX_DEPTH} folders deep")
    return rel


_ZIP_TYPES = {stat.S_IFLNK: "a symbolic link", stat.S_IFCHR: "a character device",
              stat.S_IFBLK: "a block device", stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket"}
_TAR_TYPES = {tarfile.SYMTYPE: "a symbolic link", tarfile.LNKTYPE: "a hard link",
              tarfile.CHRTYPE: "a character device", tarfile.BLKTYPE: "a block device",
              tarfile.FIFOTYPE: "a FIFO"}


def _refused_type(where: str, name: str, what: str) -> UnsafeArchive:
    return UnsafeArchive(f"{where}: entry {name!r} is {what}; links and special files are "
                         "refused, never created")


def _extract_zip(archive: Path, root: Path, budget: _Budget, source: str) -> None:
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        budget.entry("its directory", len(infos))  # what the zip declares: refused early,
        budget.check("its directory", sum(i.file_size for i in infos))
        budget.entries = 0  # then counted (and bytes measured) one by one as they are written
        for info in infos:
            budget.entry(f"entry {info.orig_filename!r}")
            kind = stat.S_IFMT(info.external_attr >> 16)
            is_dir = info.orig_filename.endswith("/") or kind == stat.S_IFDIR
            rel = _member_path(info.orig_filename, is_dir, source, archive)
            if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
                what = _ZIP_TYPES.get(kind, f"of unknown type {oct(kind)}")
                raise _refused_type(budget.where, info.orig_filename, what)
            if info.flag_bits & 0x1:
                raise UnsafeArchive(f"{budget.where}: entry {info.orig_filename!r} is encrypted")
            if rel is None:
                continue
            if is_dir:
                _make_dirs(root / rel, budget.where, str(rel))
                continue
            _make_dirs(root / rel.parent, budget.where, str(rel))
            with zf.open(info) as src:
                budget.write(src, root / rel, info.orig_filename)


class _BoundedTarInfo(tarfile.TarInfo):
    """TarInfo that refuses a long-name or PAX header over MAX_TAR_HEADER_BYTES unread."""

    def _proc_gnulong(self, tf):  # type: ignore[no-untyped-def]
        self._bounded()
        return super()._proc_gnulong(tf)

    def _proc_pax(self, tf):  # type: ignore[no-untyped-def]
        self._bounded()
        return super()._proc_pax(tf)

    def _bounded(self) -> None:
        if self.size > MAX_TAR_HEADER_BYTES:
            raise tarfile.SubsequentHeaderError(
                f"an extended header of {self.size:,} bytes (over {MAX_TAR_HEADER_BYTES:,})")


def _extract_tar(archive: Path, root: Path, budget: _Budget, source: str) -> None:
    # compression is detected from the bytes
    with tarfile.open(archive, tarinfo=_BoundedTarInfo) as tf:
        while (m := tf.next()) is not None:
            tf.members.clear()  # one pass, streaming: do not hold millions of TarInfos
            budget.entry(f"entry {m.name!r}")
            rel = _member_path(m.name, m.isdir(), source, archive)
            if not (m.isreg() or m.isdir()):
                what = _TAR_TYPES.get(m.type, f"of unknown type {m.type!r}")
                raise _refused_type(budget.where, m.name, what + (
                    f" (-> {m.linkname!r})" if m.linkname else ""))
            if rel is None:
                continue
            if m.isdir():
                _make_dirs(root / rel, budget.where, str(rel))
                continue
            _make_dirs(root / rel.parent, budget.where, str(rel))
            with tf.extractfile(m) as src:
                budget.write(src, root / rel, m.name)


def _merge(src: Path, dest: Path, where: str) -> None:
    """Move `src`'s tree into the existing folder `dest`: whole folders where `dest` has none,
    files one by one (a later archive's file replaces an earlier one's, as tar does)."""
    todo = [(src, dest)]
    while todo:
        here, there = todo.pop()
        for entry in os.scandir(here):
            target = there / entry.name  # os.replace onto a link replaces the link itself
            if entry.is_dir(follow_symlinks=False):
                try:
                    os.rename(entry.path, target)  # the whole folder, where `dest` has none yet
                    continue
                except OSError:
                    pass
                if not target.is_dir() or target.is_symlink():
                    raise UnsafeArchive(f"{where}: folder {entry.name!r} collides with a file "
                                        f"already in {there}")
                todo.append((Path(entry.path), target))
            elif target.is_dir():
                raise UnsafeArchive(f"{where}: file {entry.name!r} collides with a folder "
                                    f"already in {there}")
            else:
                os.replace(entry.path, target)


def _land(tmp: Path, dest: Path, where: str) -> None:
    """Make the finished `tmp` appear at `dest`: one rename when `dest` is new (or empty)."""
    try:
        os.rename(tmp, dest)
    except OSError:
        if dest.is_symlink() or not dest.is_dir():
            raise UnsafeArchive(f"{where}: {dest} exists and is not a folder") from None
        _merge(tmp, dest, where)


def _unpacked(archive: Path, dest: Path, source: str, work: Callable[[Path], None]) -> None:
    """Run `work(tmp)` in a fresh folder beside `dest`, then land it; delete it on any error.

    The folder is a `schemas.scratch_dir`: one left by a killed run is deleted by the next
    extraction beside `dest`. Read errors of the formats become UnsafeArchive ("corrupt"); the
    machine's own (a full disk) are left as they are.
    """
    with scratch_dir(dest.parent, f".{dest.name}.extracting-") as tmp:
        os.chmod(tmp, 0o755)
        try:
            work(tmp)
        except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, lzma.LZMAError,
                NotImplementedError, UnicodeDecodeError, RecursionError, OSError) as exc:
            if isinstance(exc, OSError) and exc.errno in _HOST_ERRNOS:
                raise
            raise UnsafeArchive(f"{source}: {archive.name}: corrupt, truncated or unsupported "
                                f"({type(exc).__name__}: {exc}); nothing was kept") from None
        _land(tmp, dest, f"{source}: {archive.name}")


def safe_extract(archive: Path, dest: Path, limits: ArchiveLimits, *, source: str) -> int:
    """Extract a zip or tar into `dest` under `limits`, or raise; returns the number of files.

    Raises UnsafeName (a refused member name), ArchiveLimitError (a limit) or UnsafeArchive
    (a link or special member, a collision, a corrupt archive); then nothing was written to
    `dest` (unless merging into an existing `dest` met a file where a folder is: the caller's
    staging folder, `tasks.download.staged_dir`, then discards the whole source).
    """
    archive, dest = Path(archive), Path(dest).resolve()
    if not is_archive(archive):
        raise UnsafeArchive(f"{source}: {archive.name}: not a zip or tar archive (by its name)")
    budget = _Budget(limits, archive, source)
    extract = _extract_zip if archive.name.lower().endswith(".zip") else _extract_tar
    _unpacked(archive, dest, source, lambda tmp: extract(archive, tmp, budget, source))
    return budget.files
