"""Stanford Cars (196 car models) in its published layout, read from its MATLAB devkit.

    devkit/cars_train_annos.mat   `annotations`: a 1xN struct array with fields
                                  bbox_x1, bbox_y1, bbox_x2, bbox_y2, class (1-based), fname
    devkit/cars_meta.mat          `class_names`: a 1x196 cell array of strings
    cars_train/<fname>            the training images

The Kaggle mirror (jessicali9530/stanford-cars-dataset) nests each folder
once more, car_devkit/devkit/ and cars_train/cars_train/; the original
archives (car_devkit.tgz, cars_train.tgz) unpack to devkit/ and cars_train/.
Both are read from the one root that holds them. The label is the class
name from cars_meta.mat. Images are kept whole, not cropped to their box:
the recipes this serves (mdfe) train on whole images, and the bounding box
is not part of the catalog.

.mat files are read with scipy.io (MATLAB v5 data, no pickle, no code);
a file's variables are listed first, so a wrong or oversized file is
refused before its data is read.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.io

from tasks.layout_rows import LayoutError, Row, Skip, rows_if_present

DEVKITS = ("devkit", "car_devkit/devkit")
IMAGE_DIRS = ("cars_train/cars_train", "cars_train")
ANNOTATIONS = "cars_train_annos.mat"
META = "cars_meta.mat"
FIELDS = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")
EXPECTED = ("devkit/cars_train_annos.mat (or car_devkit/devkit/) and cars_train/ "
            "(or cars_train/cars_train/)")
MAX_MAT_BYTES = 64 << 20  # the real devkit files are under 1 MB
MAX_ENTRIES = 1_000_000   # Stanford Cars has 8,144 training images and 196 classes


def _devkit(folder: Path) -> Path | None:
    return next((folder / d for d in DEVKITS if (folder / d / ANNOTATIONS).is_file()), None)


def is_root(folder: Path) -> bool:
    """The dataset's root holds the devkit, in either nesting."""
    return _devkit(folder) is not None


def load_variable(path: Path, name: str, kind: str) -> np.ndarray:
    """One MATLAB variable of class `kind` ('struct', 'cell'), checked by its header first.

    The header check (scipy.io.whosmat reads names, shapes and classes, not
    data) turns a wrong file into a message naming what it holds, and keeps
    an oversized array from being read at all.
    """
    if not path.is_file():
        raise LayoutError(f"{path}: missing; Stanford Cars needs {EXPECTED}")
    if path.stat().st_size > MAX_MAT_BYTES:
        raise LayoutError(f"{path.name}: {path.stat().st_size} bytes, more than a devkit file "
                          "can be")
    try:
        found = {n: (shape, cls) for n, shape, cls in scipy.io.whosmat(str(path))}
        shape, cls = found.get(name, ((), None))
        if cls != kind or int(np.prod(shape)) > MAX_ENTRIES:
            raise LayoutError(f"{path.name}: expected a variable {name!r} ({kind} array of at "
                              f"most {MAX_ENTRIES} entries); it has {found}")
        return scipy.io.loadmat(str(path), variable_names=[name])[name]
    except LayoutError:
        raise
    except Exception as exc:  # scipy raises MatReadError, IndexError, zlib.error... on damage
        raise LayoutError(f"{path.name}: not a readable MATLAB v5 file "
                          f"({type(exc).__name__}: {exc})") from None


def _one(value: object) -> object:
    """The single element MATLAB wraps a struct field or cell in (a 1x1 array), else None."""
    flat = np.asarray(value).ravel()
    if flat.size != 1:
        return None
    item = flat[0].item() if isinstance(flat[0], np.generic) else flat[0]
    return int(item) if isinstance(item, float) and item.is_integer() else item


def class_names(path: Path) -> list[str]:
    """cars_meta.mat's class names in class-id order (id 1 is the first)."""
    names = [_one(c) for c in load_variable(path, "class_names", "cell").ravel()]
    bad = [i for i, n in enumerate(names) if not isinstance(n, str) or not n.strip()]
    if bad:
        raise LayoutError(f"{path.name}: class_names[{bad[0]}] is {names[bad[0]]!r}; "
                          "every class needs a name")
    return names


def annotations(path: Path) -> tuple[list[tuple[str, int]], list[Skip]]:
    """(fname, class id) of each cars_train_annos.mat entry in file order; bad entries as skips."""
    annos = load_variable(path, "annotations", "struct")
    fields = list(annos.dtype.names or ())
    missing = [f for f in FIELDS if f not in fields]
    if missing:
        raise LayoutError(f"{path.name}: `annotations` lacks the fields {missing}; it has "
                          f"{fields} (cars_test_annos.mat has no class: give the train file)")
    entries, skips = [], []
    for i, entry in enumerate(annos.ravel()):
        fname, cls = _one(entry["fname"]), _one(entry["class"])
        if isinstance(fname, str) and isinstance(cls, int) and not isinstance(cls, bool):
            entries.append((fname, cls))
        else:
            skips.append(Skip(f"{path.name}:annotations[{i}]", str(cls), "fname must be one "
                              f"string and class one integer, got {fname!r} and {cls!r}"))
    return entries, skips


def read(root: Path) -> tuple[list[Row], list[Skip]]:
    """Catalog rows (cars_train/... relative to `root`, class name).

    Entries with a class id outside cars_meta.mat, a name that would leave
    the dataset, or no image on disk are skips with the reason.
    """
    devkit = _devkit(root)
    images = next((d for d in IMAGE_DIRS if (root / d).is_dir()), None)
    if devkit is None or images is None:
        raise LayoutError(f"{root}: expected {EXPECTED}")
    names = class_names(devkit / META)
    entries, skips = annotations(devkit / ANNOTATIONS)
    pairs = []
    for fname, cls in entries:
        if 1 <= cls <= len(names):
            pairs.append((fname, names[cls - 1]))
        else:
            skips.append(Skip(f"{images}/{fname}", str(cls),
                              f"class {cls} is not in {META} (1..{len(names)})"))
    rows, more = rows_if_present(root, pairs, prefix=f"{images}/")
    return rows, skips + more
