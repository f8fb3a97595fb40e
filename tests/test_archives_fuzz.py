"""Seeded fuzz test: thousands of small hostile archives, none of which may write outside.

Each run builds a random tar, tar.gz or zip (member names from a pool of traversal, absolute,
drive-letter, percent-escaped, Unicode look-alike, control, over-long, deep, duplicate and
colliding names; member types file, folder, symlink, hard link, devices, FIFO; sizes from
empty to very compressible; archives nested in archives; sometimes truncated or with a byte
flipped) and extracts it with random low limits. Every run must end either extracted inside
the destination (regular files and folders only) or with UnsafeArchive / UnsafeName /
ArchiveLimitError; the folder around the destination must be exactly as it was.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import shutil
import stat
import tarfile
import zipfile
from collections import Counter
from pathlib import Path

import pytest

from tasks.archives import ArchiveLimitError, ArchiveLimits, UnsafeArchive, safe_extract
from tasks.names import UnsafeName, check_relative_path

SEED = 1111
RUNS = 3000
# Member types: plain ones, and the links and special files that must be refused.
TAR_PLAIN = [tarfile.REGTYPE] * 3 + [tarfile.DIRTYPE]
TAR_SPECIAL = [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE, tarfile.BLKTYPE,
               tarfile.FIFOTYPE]
ZIP_PLAIN = [stat.S_IFREG | 0o644] * 2 + [0, stat.S_IFDIR | 0o755]
ZIP_SPECIAL = [stat.S_IFLNK | 0o777, stat.S_IFIFO | 0o644, stat.S_IFCHR | 0o644]


# Pieces of member names: ordinary ones (a few collide often: duplicates, a file where a folder
# is), ones that are odd but harmless, and hostile ones.
SAFE = ["a", "a", "b", "img.jpg", "训练", "d", ".", "", "%2F..%2Fx", "%00", "%5C", "\uff41",
        "e\u0301", "\u00e9", "x" * 255]
HOSTILE = ["..", "../x", "../../x", "/etc/x", "C:", "c:\\x", "\uff0e\uff0e", "a\uff0fb",
           "\u2024\u2024", "evil\x00.sh", "\x1b", "a\\b", "x" * 256, "caf\udce9"]


def name_pool(box: Path) -> tuple[list[str], list[str]]:
    """(safe, hostile) name pieces; one hostile name is absolute into the watched folder."""
    return SAFE, HOSTILE + [str(box / "evil")]


def random_name(rng: random.Random, pool: tuple[list[str], list[str]], hostility: float) -> str:
    if rng.random() < 0.02:
        return "d/" * rng.randint(30, 90) + "f"  # deep nesting
    return "/".join(rng.choice(pool[rng.random() < hostility])
                    for _ in range(rng.randint(1, 3)))


class Draw:
    """One archive's random choices: how hostile its names are, how often a type is special."""

    def __init__(self, rng: random.Random, pool: tuple[list[str], list[str]]):
        self.rng, self.pool = rng, pool
        self.hostility = rng.choice([0.0, 0.0, 0.02, 0.3])
        self.special = rng.choice([0.0, 0.0, 0.05, 0.3])

    def name(self) -> str:
        return random_name(self.rng, self.pool, self.hostility)

    def kind(self, plain: list, special: list):
        return self.rng.choice(special if self.rng.random() < self.special else plain)


def random_data(rng: random.Random, depth: int, pool: tuple) -> tuple[bytes, str]:
    """(content, a suffix for the name): random bytes, zeros, or a whole nested archive."""
    roll = rng.random()
    if roll < 0.1 and depth < 2:
        fmt = rng.choice(["tar", "tar.gz", "zip"])
        return build(rng, fmt, depth + 1, pool), "." + fmt
    if roll < 0.3:
        return bytes(rng.randint(0, 40_000)), ""
    return rng.randbytes(rng.randint(0, 64)), ""


def build(rng: random.Random, fmt: str, depth: int, pool: tuple) -> bytes:
    """A random archive's bytes; members the library itself cannot write are left out."""
    buf, draw = io.BytesIO(), Draw(rng, pool)
    count = rng.randint(1, 8)
    if fmt == "zip":
        method = rng.choice([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
        with zipfile.ZipFile(buf, "w", method) as zf:
            for _ in range(count):
                data, suffix = random_data(rng, depth, pool)
                info = zipfile.ZipInfo("placeholder")
                info.filename = info.orig_filename = draw.name() + suffix
                info.external_attr = draw.kind(ZIP_PLAIN, ZIP_SPECIAL) << 16
                try:
                    zf.writestr(info, data)
                except (UnicodeError, ValueError):
                    pass
        return buf.getvalue()
    tar_format = rng.choice([tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
    mode = "w:gz" if fmt == "tar.gz" else "w"
    with tarfile.open(fileobj=buf, mode=mode, format=tar_format) as tf:
        for _ in range(count):
            data, suffix = random_data(rng, depth, pool)
            info = tarfile.TarInfo(draw.name() + suffix)
            info.type = draw.kind(TAR_PLAIN, TAR_SPECIAL)
            info.linkname = draw.name() if info.issym() or info.islnk() else ""
            info.size = len(data) if info.isreg() else 0
            try:
                tf.addfile(info, io.BytesIO(data) if info.isreg() else None)
            except (UnicodeError, ValueError):
                pass
    return buf.getvalue()


def snapshot(root: Path, skip: Path) -> dict[str, tuple]:
    """Every path under `root` but `skip`, with its type and (files) content hash; links kept."""
    seen = {}
    for here, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if Path(here, d) != skip]
        for name in dirs + files:
            path = Path(here, name)
            st = path.lstat()
            regular = stat.S_ISREG(st.st_mode)
            content = hashlib.sha256(path.read_bytes()).hexdigest() if regular else ""
            seen[str(path.relative_to(root))] = (stat.S_IFMT(st.st_mode), content)
    return seen


def check_extracted(dest: Path, files: int) -> None:
    """Only folders and regular files, all inside `dest`, with names that pass the checks."""
    found = 0
    for here, dirs, names in os.walk(dest):
        for name in dirs + names:
            path = Path(here, name)
            mode = path.lstat().st_mode
            assert stat.S_ISDIR(mode) or stat.S_ISREG(mode), path
            assert os.path.realpath(path).startswith(str(dest) + os.sep), path
            check_relative_path(path.relative_to(dest).as_posix(), source="t", entry="t")
            found += stat.S_ISREG(mode)
    assert found == files


@pytest.mark.filterwarnings("ignore:Duplicate name")  # zipfile warns; duplicates are on purpose
def test_random_archives_extract_inside_or_fail_clearly(tmp_path):
    rng = random.Random(SEED)
    box = tmp_path / "box"
    (box / "out").mkdir(parents=True)
    (box / "sentinel.txt").write_text("keep")
    (box / "out" / "x").write_text("a sibling the archives aim at")
    dest, archives = box / "out" / "dest", tmp_path / "archives"
    archives.mkdir()
    pool, before = name_pool(box), snapshot(box, dest)
    outcomes: Counter[str] = Counter()
    for run in range(RUNS):
        fmt = rng.choice(["tar", "tar.gz", "zip"])
        raw = bytearray(build(rng, fmt, 0, pool))
        if rng.random() < 0.05:
            raw = raw[:rng.randint(0, len(raw))]
        elif rng.random() < 0.05 and raw:
            raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
        archive = archives / f"{run}.{fmt}"
        archive.write_bytes(bytes(raw))
        limits = ArchiveLimits(max_entries=rng.randint(2, 12), max_bytes=rng.randint(100, 200_000),
                               max_ratio=rng.uniform(1.5, 100.0), grace_bytes=rng.randint(0, 5000))
        try:
            files = safe_extract(archive, dest, limits, source="fuzz")
        except ArchiveLimitError:
            outcomes["limit"] += 1
        except UnsafeName:
            outcomes["name"] += 1
        except UnsafeArchive as exc:
            outcomes["corrupt" if "corrupt" in str(exc) else "refused"] += 1
        else:
            outcomes["extracted"] += 1
            check_extracted(dest, files)
            shutil.rmtree(dest)
        assert not dest.exists(), f"run {run}: a refused archive left {dest}"
        assert snapshot(box, dest) == before, f"run {run} ({fmt}) wrote outside {dest}"
        archive.unlink()
    assert all(outcomes[k] > RUNS // 50 for k in ("limit", "name", "refused", "corrupt",
                                                  "extracted")), outcomes
