"""A retrieval gallery a person can check at a glance.

One row per query (taken round-robin over sources, so every domain shows):
the query framed blue, then its top-k results framed green when they are
the same object or class and red when they are not.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from tasks.schemas.io import atomic_path

BLUE, GREEN, RED, WHITE = (40, 90, 220), (30, 170, 60), (210, 40, 40), (255, 255, 255)


def pick_queries(sources: list[str], count: int) -> list[int]:
    """Indices of `count` queries, alternating between sources in sorted order (stable)."""
    by_source: dict[str, list[int]] = {}
    for i, s in enumerate(sources):
        by_source.setdefault(s, []).append(i)
    picked: list[int] = []
    queues = [list(v) for _, v in sorted(by_source.items())]
    while len(picked) < count and any(queues):
        for q in queues:
            if q and len(picked) < count:
                picked.append(q.pop(0))
    return picked


def _tile(jpeg: bytes, size: int, colour: tuple[int, int, int], border: int = 5) -> Image.Image:
    with Image.open(io.BytesIO(jpeg)) as im:
        thumb = ImageOps.fit(im.convert("RGB"), (size - 2 * border, size - 2 * border))
    return ImageOps.expand(thumb, border=border, fill=colour)


def render_gallery(rows: list[dict], out: Path, tile: int = 112) -> None:
    """Draw `rows` as a PNG at `out`.

    A row is {"query": bytes, "label": str, "results": [(bytes, correct: bool), ...]}.
    """
    k = max((len(r["results"]) for r in rows), default=0)
    caption, gap = 16, 8
    width = tile * (k + 1) + gap
    canvas = Image.new("RGB", (width, len(rows) * (tile + caption)), WHITE)
    draw = ImageDraw.Draw(canvas)
    for r, row in enumerate(rows):
        y = r * (tile + caption)
        draw.text((4, y + 2), row["label"], fill=(0, 0, 0))
        canvas.paste(_tile(row["query"], tile, BLUE), (0, y + caption))
        for j, (jpeg, correct) in enumerate(row["results"]):
            framed = _tile(jpeg, tile, GREEN if correct else RED)
            canvas.paste(framed, (tile + gap + j * tile, y + caption))
    with atomic_path(out) as tmp:
        canvas.save(tmp, format="PNG")


def gallery_keys(query_idx: list[int], neighbours: np.ndarray, query_keys: list[str],
                 index_keys: list[str], k: int = 5) -> set[str]:
    """The keys of the images a gallery shows: its queries and their top-k results."""
    return ({query_keys[q] for q in query_idx}
            | {index_keys[j] for q in query_idx for j in neighbours[q, :k]})


def gallery_rows(query_idx: list[int], neighbours: np.ndarray, query_keys: list[str],
                 query_labels: np.ndarray, index_keys: list[str], index_labels: np.ndarray,
                 captions: list[str], images: dict[str, bytes], k: int = 5) -> list[dict]:
    """Assemble gallery rows from retrieval results and the shards' image bytes."""
    rows = []
    for q in query_idx:
        results = [(images[index_keys[j]], bool(index_labels[j] == query_labels[q]))
                   for j in neighbours[q, :k]]
        rows.append({"query": images[query_keys[q]], "label": captions[q], "results": results})
    return rows
