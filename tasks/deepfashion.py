"""DeepFashion's Consumer-to-shop Clothes Retrieval Benchmark in its published layout.

    Eval/list_eval_partition.txt   line 1: the number of pairs; line 2: the header
                                   `image_pair_name_1 image_pair_name_2 item_id evaluation_status`;
                                   then one pair a line: consumer image, shop image, item id,
                                   train | val | test
    img/<CATEGORY>/<Sub>/id_XXXXXXXX/comsumer_NN.jpg, shop_NN.jpg   (the dataset's own spelling)

The release ships the images as Img/img.zip; unzipped beside Eval/ or
inside Img/, both are found. A class is an item (`item_id`): its consumer
photos and its shop photos, which is what a retrieval embedding must bring
together. Each image counts once, however many pairs list it.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

from tasks.layout_rows import LayoutError, Row, Skip, rows_if_present

PARTITION = "Eval/list_eval_partition.txt"
HEADER = ["image_pair_name_1", "image_pair_name_2", "item_id", "evaluation_status"]
STATUSES = ("train", "val", "test")
EXPECTED = f"{PARTITION} and img/<CATEGORY>/<Sub>/id_<n>/ (or Img/img/...)"


def is_root(folder: Path) -> bool:
    """The benchmark's root holds the evaluation partition."""
    return (folder / PARTITION).is_file()


def read_partition(path: Path, statuses: Collection[str]) -> list[tuple[str, str]]:
    """(image path, item id) for both images of each pair whose status is in `statuses`, once each.

    The format is checked line by line, and a line that does not fit stops
    the read with the file and line number: a truncated or foreign file (the
    In-shop benchmark's partition has other columns) must not pass as a
    smaller dataset.
    """
    where = f"{PARTITION} ({path})"
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise LayoutError(f"{where}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if len(lines) < 2 or not lines[0].strip().isdigit():
        first = lines[0][:80] if lines else ""
        raise LayoutError(f"{where} line 1: expected the number of pairs, got {first!r}")
    if lines[1].split() != HEADER:
        raise LayoutError(f"{where} line 2: expected the header {' '.join(HEADER)!r}, "
                          f"got {lines[1][:120]!r}")
    pairs: dict[str, str] = {}
    count = 0
    for number, line in enumerate(lines[2:], start=3):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != len(HEADER) or fields[3] not in STATUSES:
            raise LayoutError(f"{where} line {number}: expected '<consumer image> <shop image> "
                              f"<item id> <{'|'.join(STATUSES)}>', got {line[:200]!r}")
        count += 1
        if fields[3] in statuses:
            for image in fields[:2]:
                pairs.setdefault(image, fields[2])  # a shop photo is in several pairs
    if count != int(lines[0]):
        raise LayoutError(f"{where}: line 1 says {int(lines[0])} pairs but {count} follow "
                          "(a truncated file?)")
    return list(pairs.items())


def read(root: Path, statuses: Collection[str] = ("train",)) -> tuple[list[Row], list[Skip]]:
    """Catalog rows (path relative to `root`, item id) of the pairs whose status is in `statuses`.

    Paths in the partition are relative to the folder holding img/; a name
    that would leave the dataset, or an image that is not there, is a skip.
    """
    if (root / "img").is_dir():
        base = ""
    elif (root / "Img" / "img").is_dir():
        base = "Img/"
    else:
        raise LayoutError(f"{root}: found {PARTITION} but no img/ beside it "
                          "(unzip Img/img.zip here)")
    return rows_if_present(root, read_partition(root / PARTITION, statuses), prefix=base)
