"""Tables a `download` stage writes into data/01_raw/<source>/: its catalog and what it skipped."""

from __future__ import annotations

import pyarrow as pa

CATALOG_SCHEMA = pa.schema(
    [
        pa.field("path", pa.string(), nullable=False),  # relative to the source root
        pa.field("label", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
    ]
)
SKIPPED_SCHEMA = pa.schema(
    [
        pa.field("path", pa.string(), nullable=False),
        pa.field("label", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
    ]
)
FAILURES_SCHEMA = pa.schema(
    [
        pa.field("url", pa.string(), nullable=False),
        pa.field("label", pa.string(), nullable=False),
        pa.field("error", pa.string(), nullable=False),
    ]
)
