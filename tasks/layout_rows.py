"""What every layout reader returns, and the one check that a listed path stays in its dataset.

Readers of every source kind (tasks/layouts.py and the per-dataset modules it
registers) turn a dataset's own files into catalog rows (path relative to
the dataset root, label) plus skips: rows that could not be used, with the
reason, so nothing is silently dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from tasks.names import UnsafeName, check_relative_path

Row = dict[str, str]

LEAVES_FOLDER = "path leaves the dataset folder"
NOT_FOUND = "listed in the table but not found"
NO_NAME = "no file name given"


@dataclass(frozen=True)
class Skip:
    path: str
    label: str
    reason: str


class LayoutError(ValueError):
    """The files are not laid out as the source kind expects; the message says what is missing."""


def leaves_folder(name: str) -> bool:
    """True for a name read from a dataset's own files that must not become a path.

    Annotation files are outside input: the names are checked as every name
    from a source is (tasks/names.py: absolute paths, `..`, drive letters,
    backslashes, control characters, look-alikes after NFKC, over-long names).
    """
    try:
        check_relative_path(name, source="table", entry="path")
    except UnsafeName:
        return True
    return False


def rows_if_present(root: Path, pairs: list[tuple[str, str]],
                    prefix: str = "") -> tuple[list[Row], list[Skip]]:
    """(name, label) pairs as rows (path `prefix + name`) when that file exists under `root`.

    The others are skips with the reason: a name that would leave the dataset
    (checked before `prefix` is joined, recorded as read), or a missing file.
    """
    rows, skips = [], []
    for name, label in pairs:
        if not name:  # an empty cell
            skips.append(Skip("", label, NO_NAME))
            continue
        rel = PurePosixPath(prefix + name).as_posix()  # "./a.jpg" and "a.jpg" are one image
        if leaves_folder(name) or leaves_folder(rel):
            skips.append(Skip(name, label, LEAVES_FOLDER))
        elif (root / rel).is_file():
            rows.append({"path": rel, "label": label})
        else:
            skips.append(Skip(rel, label, NOT_FOUND))
    return rows, skips
