"""The real photographs that installed packages ship, one object class each.

scikit-image, scikit-learn and matplotlib carry sample photos inside their
wheels, Debian's opencv-doc carries OpenCV's example data, and Debian's
gcompris-qt-data carries photos of monuments, animals, fish, tools and
windmills in its activities' Qt resource bundles; together they make an
offline instance-level dataset. Near-identical photos (a stereo pair, the
same chessboard shot fourteen times) would make two classes the same object,
so they are collapsed to one.
"""

from __future__ import annotations

import fnmatch
import io
import re
import struct
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path, PurePosixPath
from typing import Iterator

import numpy as np
from PIL import Image

OPENCV_DATA = Path("/usr/share/doc/opencv-doc/examples/data")
GCOMPRIS_RCC = Path("/usr/share/gcompris-qt/rcc")
# GCompris activities whose images are photographs (others are drawings, maps or puzzle pieces).
GCOMPRIS_PHOTO_BUNDLES = ("explore_monuments", "erase", "explore_world_animals",
                          "explore_farm_animals", "categorization")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}

# ---- Qt resource bundles (.rcc): GCompris keeps each activity's images in one.
# Reading the format directly (a header, a tree of 14- or 22-byte nodes, a UTF-16
# name table, length-prefixed data, zlib for compressed entries) needs no Qt. Every
# offset is checked: a damaged file raises ValueError, never reads past its end or loops.

MAGIC = b"qres"
DIRECTORY, COMPRESSED, COMPRESSED_ZSTD = 0x02, 0x01, 0x04
MAX_ENTRY_BYTES = 64 * 2**20  # a photo in a bundle is a few MB; more is a damaged length


def _unpack(fmt: str, blob: bytes, offset: int) -> tuple:
    if offset < 0 or offset + struct.calcsize(fmt) > len(blob):
        raise ValueError(f"offset {offset} is outside the bundle ({len(blob)} bytes)")
    return struct.unpack_from(fmt, blob, offset)


def read_qt_resources(path: Path) -> dict[str, bytes]:
    """Every file in the bundle at `path`, by its resource path ('src/a/b.webp').

    zstd-compressed entries (a build option of newer Qt) are left out: the
    standard library cannot inflate them, and Debian's bundles use zlib.
    """
    blob = Path(path).read_bytes()
    if blob[:4] != MAGIC:
        raise ValueError(f"{path}: not a Qt resource bundle")
    version, tree, data, names = _unpack(">IIII", blob, 4)
    node_size = 14 if version == 1 else 22

    def name(offset: int) -> str:
        (length,) = _unpack(">H", blob, names + offset)
        start = names + offset + 6
        if start + 2 * length > len(blob):
            raise ValueError(f"{path}: a name runs past the end")
        return blob[start:start + 2 * length].decode("utf-16-be")

    files: dict[str, bytes] = {}
    seen: set[int] = set()
    stack = [(0, "")]  # the root is node 0 and has no name of its own
    while stack:
        index, parent = stack.pop()
        if index in seen:
            raise ValueError(f"{path}: node {index} is reached twice (a loop)")
        seen.add(index)
        base = tree + index * node_size
        name_offset, flags = _unpack(">IH", blob, base)
        here = f"{parent}/{name(name_offset)}".lstrip("/") if index else ""
        if flags & DIRECTORY:
            count, first = _unpack(">II", blob, base + 6)
            if count > len(blob) // node_size:
                raise ValueError(f"{path}: a folder claims {count} entries")
            stack.extend((child, here) for child in range(first, first + count))
            continue
        if flags & COMPRESSED_ZSTD:
            continue
        (data_offset,) = _unpack(">I", blob, base + 10)
        (size,) = _unpack(">I", blob, data + data_offset)
        start = data + data_offset + 4
        if size > MAX_ENTRY_BYTES or start + size > len(blob):
            raise ValueError(f"{path}: entry {here} claims {size} bytes")
        raw = blob[start:start + size]
        if flags & COMPRESSED:  # qCompress: the inflated length, then a zlib stream
            inflater = zlib.decompressobj()
            raw = inflater.decompress(raw[4:], MAX_ENTRY_BYTES)
            if inflater.unconsumed_tail:
                raise ValueError(f"{path}: entry {here} inflates past {MAX_ENTRY_BYTES} bytes")
        files[here] = raw
    return files


# A bundle is read whole; photos of one bundle are opened many times (thumbnails, views).
_bundle = lru_cache(maxsize=8)(read_qt_resources)


@dataclass(frozen=True)
class Photo:
    label: str  # "<package>-<file stem>": unique, stable, path-safe
    path: Path  # the image file, or the Qt resource bundle that holds it
    member: str = ""  # the image's resource path inside `path` when that is a bundle

    @property
    def origin(self) -> str:
        """Where the photo comes from, for messages: the file, or the bundle and resource path."""
        return f"{self.path}:{self.member}" if self.member else str(self.path)

    def open(self) -> Image.Image:
        """The photo as a PIL image (lazy: draft() still works on a JPEG)."""
        if self.member:
            return Image.open(io.BytesIO(_bundle(self.path)[self.member]))
        return Image.open(self.path)


@dataclass(frozen=True)
class PhotoSet:
    """Where one package keeps its photos, and how its file names relate to objects."""

    paths: tuple[Path, ...]  # folders of image files and Qt resource bundles (.rcc)
    # True: numbered or L/R names are shots of one object (left01..left14, aloeL/aloeR),
    # keep one. False where numbers tell different objects apart (fish1..fish28).
    families: bool = True


def photo_dirs() -> dict[str, PhotoSet]:
    """Where each package keeps sample photos, for the packages installed on this machine."""
    import matplotlib
    import skimage.data
    import sklearn.datasets

    sets = {
        "skimage": PhotoSet((Path(skimage.data.__file__).parent,)),
        "sklearn": PhotoSet((Path(sklearn.datasets.__file__).parent / "images",)),
        "matplotlib": PhotoSet((Path(matplotlib.get_data_path()) / "sample_data",)),
        "opencv": PhotoSet((OPENCV_DATA,)),
        "gcompris": PhotoSet(tuple(GCOMPRIS_RCC / f"{b}.rcc" for b in GCOMPRIS_PHOTO_BUNDLES),
                             families=False),
    }
    present = {name: PhotoSet(tuple(p for p in s.paths if p.exists()), s.families)
               for name, s in sets.items()}
    return {name: s for name, s in present.items() if s.paths}


def list_images(package: str, photos: PhotoSet) -> Iterator[tuple[str, Photo]]:
    """(file name, photo) for every image in a package's folders and bundles, in sorted order."""
    for place in photos.paths:
        if place.is_dir():
            entries = [(p.name, Photo("", p)) for p in sorted(place.iterdir()) if p.is_file()]
        else:
            entries = [(PurePosixPath(m).name, Photo("", place, m))
                       for m in sorted(_bundle(place))]
        for name, photo in entries:
            if PurePosixPath(name).suffix.lower() in IMAGE_SUFFIXES:
                stem = re.sub(r"[^A-Za-z0-9_]+", "_", PurePosixPath(name).stem).strip("_")
                yield name, Photo(f"{package}-{stem}", photo.path, photo.member)


def _family(stem: str) -> str:
    """Name shared by shots of one object: 'left07' -> 'left', 'aloeL' -> 'aloe'."""
    s = re.sub(r"[\d_\-]+$", "", stem)
    s = re.sub(r"(_left|_right|_l|_r)$", "", s, flags=re.IGNORECASE)
    s = re.sub(r"(?<=[a-z])[LRAB]$", "", s)
    return s.lower() or stem.lower()


def _thumbnail(photo: Photo) -> np.ndarray | None:
    try:
        with photo.open() as im:
            im.draft("L", (64, 64))
            small = im.convert("L").resize((16, 16), Image.Resampling.BOX)
            return np.asarray(small, dtype=np.float32)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def find_photos(dirs: dict[str, PhotoSet], exclude: list[str], duplicate_threshold: float,
                ) -> list[Photo]:
    """Every distinct photo in `dirs`, minus excluded globs, one per name, family and look.

    Two photos are the same object when their labels are equal but for case
    (two bundles of one package showing the Eiffel Tower), when their names
    share a family (in packages whose numbers mean shots of one object), or
    when their 16x16 grey thumbnails differ by less than `duplicate_threshold`
    on average; the first in sorted order is kept.
    """
    kept: list[Photo] = []
    thumbs: list[np.ndarray] = []
    taken: set[str] = set()
    for package in sorted(dirs):
        for name, photo in list_images(package, dirs[package]):
            if any(fnmatch.fnmatch(name, pat) for pat in exclude):
                continue
            stem = PurePosixPath(name).stem
            family = f"{package}\x1f{_family(stem)}" if dirs[package].families else ""
            if photo.label.lower() in taken or family in taken:
                continue
            thumb = _thumbnail(photo)
            if thumb is None:
                continue
            if any(np.abs(thumb - t).mean() < duplicate_threshold for t in thumbs):
                continue
            taken.update({photo.label.lower(), family} - {""})
            thumbs.append(thumb)
            kept.append(photo)
    return kept
