"""The manifest `sample` writes (data/02_sampled/manifest.parquet).

It lists every image, its split and its group.
"""

from __future__ import annotations

import pyarrow as pa

SPLITS = ("train", "val", "query", "index")
# Class groups, disjoint: training classes (train/val images), validation classes
# (query/index, every choice is made on them) and test classes (query/index, reported).
GROUPS = ("train", "validation", "test")
MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),  # <source>-<hash of path>, no dots
        pa.field("source", pa.string(), nullable=False),
        pa.field("label", pa.string(), nullable=False),
        pa.field("class_id", pa.int32(), nullable=False),  # global across sources
        pa.field("path", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("group", pa.string(), nullable=False),  # one of GROUPS, the same for a whole class
        # Images of the class in its source catalog(s) before sampling capped it:
        # how common the class is, which dynamic ArcFace margins follow.
        pa.field("class_images", pa.int64(), nullable=False),
    ]
)
