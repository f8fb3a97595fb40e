"""The real photographs that installed packages ship, one object class each.

scikit-image, scikit-learn and matplotlib carry sample photos inside their
wheels, and Debian's opencv-doc carries OpenCV's example data; together they
make an offline instance-level dataset. Near-identical photos (a stereo pair,
the same chessboard shot fourteen times) would make two classes the same
object, so they are collapsed to one.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

OPENCV_DATA = Path("/usr/share/doc/opencv-doc/examples/data")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


@dataclass(frozen=True)
class Photo:
    label: str  # "<package>-<file stem>": unique, stable, path-safe
    path: Path


def photo_dirs() -> dict[str, Path]:
    """Folders of sample photos, per package, that exist on this machine."""
    import matplotlib
    import skimage.data
    import sklearn.datasets

    dirs = {
        "skimage": Path(skimage.data.__file__).parent,
        "sklearn": Path(sklearn.datasets.__file__).parent / "images",
        "matplotlib": Path(matplotlib.get_data_path()) / "sample_data",
        "opencv": OPENCV_DATA,
    }
    return {name: d for name, d in dirs.items() if d.is_dir()}


def _family(stem: str) -> str:
    """Name shared by shots of one object: 'left07' -> 'left', 'aloeL' -> 'aloe', 'graf3' -> 'graf'."""
    s = re.sub(r"[\d_\-]+$", "", stem)
    s = re.sub(r"(_left|_right|_l|_r)$", "", s, flags=re.IGNORECASE)
    s = re.sub(r"(?<=[a-z])[LRAB]$", "", s)
    return s.lower() or stem.lower()


def _thumbnail(path: Path) -> np.ndarray | None:
    try:
        with Image.open(path) as im:
            im.draft("L", (64, 64))
            return np.asarray(im.convert("L").resize((16, 16), Image.Resampling.BOX), dtype=np.float32)
    except (OSError, ValueError):
        return None


def find_photos(dirs: dict[str, Path], exclude: list[str], duplicate_threshold: float) -> list[Photo]:
    """Every distinct photo under `dirs`, minus excluded globs, one per family and per look.

    Two photos are the same object when their file names share a family or
    their 16x16 grey thumbnails differ by less than `duplicate_threshold` on
    average; the first in sorted order is kept.
    """
    kept: list[Photo] = []
    thumbs: list[np.ndarray] = []
    families: set[tuple[str, str]] = set()
    for package in sorted(dirs):
        for path in sorted(dirs[package].iterdir()):
            if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
                continue
            if any(fnmatch.fnmatch(path.name, pat) for pat in exclude):
                continue
            family = (package, _family(path.stem))
            if family in families:
                continue
            thumb = _thumbnail(path)
            if thumb is None:
                continue
            if any(np.abs(thumb - t).mean() < duplicate_threshold for t in thumbs):
                continue
            families.add(family)
            thumbs.append(thumb)
            stem = re.sub(r"[^A-Za-z0-9_]+", "_", path.stem).strip("_")
            kept.append(Photo(label=f"{package}-{stem}", path=path))
    return kept
