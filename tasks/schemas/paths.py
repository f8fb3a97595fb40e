"""Where each stage's artifacts live under data/, and their file names."""

from __future__ import annotations

from pathlib import Path

DATA = Path("data")
INPUTS_DIR = DATA / "00_inputs"  # fingerprints of what stages read from outside the project
MODELS_DIR = DATA / "00_models"          # backbones built from weights (models@<name>)
FINETUNED_DIR = DATA / "00_finetuned"    # backbones fine-tuned on the shards (finetune@<run>)
SOUPS_DIR = DATA / "00_soups"            # weight averages of fine-tuned runs (soup@<name>)
RAW_DIR = DATA / "01_raw"
MANIFEST = DATA / "02_sampled" / "manifest.parquet"
SHARDS_DIR = DATA / "03_shards"
FEATURES_DIR = DATA / "04_features"
HEAD_DIR = DATA / "05_head"
EVAL_DIR = DATA / "06_eval"
EXPORT_DIR = DATA / "07_export"
CATALOG_NAME = "catalog.parquet"
SHARD_INDEX = "index.json"
REJECTS_NAME = "rejects.parquet"
SKIPPED_NAME = "skipped.parquet"    # download: catalogued images that could not be used, with why
FAILURES_NAME = "failures.parquet"  # download (urls): every URL that could not be fetched, with why
