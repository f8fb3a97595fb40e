"""Shared fixtures: tiny real images, clustered features, a tiny random-init open_clip backbone,
Prefect's test harness."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pytest
from PIL import Image

from tasks.features import SplitFeatures

REPO = Path(__file__).resolve().parents[1]
# No network here: don't let Prefect's server try to send telemetry.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


@pytest.fixture(scope="session", autouse=True)
def prefect_harness():
    """One temporary Prefect backend for the whole session (flows run for real against it)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def in_tmp(tmp_path, monkeypatch) -> Path:
    """Run in an empty folder, as a stage runs in its project root."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def clusters(classes: Iterable[int], per_class: int | Sequence[int], dim: int, seed: int,
             noise: float = 0.8) -> SplitFeatures:
    """Features of `classes`, `per_class` rows each (one count, or one per class): each class
    has a fixed random centre, the same in every call, plus Gaussian noise drawn from `seed`,
    so features from two seeds are two samples of the same classes."""
    ids = np.repeat(np.asarray(list(classes), dtype=np.int64), per_class)
    centres = np.random.default_rng(99).normal(size=(int(ids.max(initial=0)) + 1, dim))
    emb = centres[ids] + noise * np.random.default_rng(seed).normal(size=(len(ids), dim))
    return SplitFeatures([f"{seed}-{i}" for i in range(len(ids))], ids, emb.astype(np.float32))


def jpeg_bytes(seed: int, size=(40, 32), mode="RGB") -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_imagefolder(root: Path, classes: int, per_class: int, size=(40, 32)) -> Path:
    """A class-per-folder tree of small random JPEGs (colour differs per class)."""
    for c in range(classes):
        d = root / f"class_{c:02d}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            (d / f"img_{i:03d}.jpg").write_bytes(jpeg_bytes(1000 * c + i, size))
    return root


TINY_CONFIG = {
    "model_cfg": {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16,
                       "head_width": 16},
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 1, "layers": 1},
    },
    "preprocess_cfg": {"size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
}


@pytest.fixture
def tiny_backbone(tmp_path) -> Path:
    """A random-init tiny ViT saved in the same local-dir layout the models stage writes."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    from tasks.backbone import CONFIG_NAME, WEIGHTS_NAME
    from tasks.schemas.io import sha256_file

    d = tmp_path / "tiny_model"
    d.mkdir()
    (d / CONFIG_NAME).write_text(json.dumps(TINY_CONFIG))
    torch.manual_seed(0)
    model = open_clip.create_model(f"local-dir:{d}")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / WEIGHTS_NAME))
    (d / "model.json").write_text(json.dumps({
        "model_name": "tiny-vit", "pretrained": "random-init",
        "checkpoint_sha256": sha256_file(d / WEIGHTS_NAME), "image_size": 32, "dim": 16}))
    return d


@pytest.fixture(autouse=True)
def _cpu_threads():
    import torch

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
