"""File layouts, table schemas and atomic writes: the one package that owns artifacts on disk.

One module per artifact family, so a change to one stage's format makes stale only the
stages that read it (their dvc.yaml deps list the modules they import):
`paths` (where), `io` (atomic writes, tables, digests), `raw` (download's catalogs),
`manifest` (sample), `shards` (shard's rejects), `features` (extract's Arrow files).
"""
