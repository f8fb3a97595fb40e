"""The embedding cache's namespace: all that decides an embedding, and nothing that doesn't."""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import sys
from pathlib import Path

import numpy as np
from safetensors.torch import load_file, save_file

from tasks import embedding_cache
from tasks.embedding_cache import EmbeddingCache, cache_key, code_fingerprint, image_digest
from tasks.backbone import CONFIG_NAME, WEIGHTS_NAME
from conftest import REPO

DIGEST = image_digest(b"one image")
# The batch shape and CPU threads the embeddings were computed with (torch picks kernels by them).
SHAPE = {"batch_size": 32, "cpu_threads": 2}


def _cache_with_one_row(root: Path, key: dict) -> None:
    EmbeddingCache(root, key, dim=4).put([DIGEST], np.ones((1, 4), np.float32))


def _hit(root: Path, key: dict) -> bool:
    return bool(EmbeddingCache(root, key, dim=4).get([DIGEST])[0][0])


def _edited_copy(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    edit(dst)
    return dst


def _change_weights(d: Path) -> None:
    state = load_file(str(d / WEIGHTS_NAME))
    name = sorted(state)[0]
    state[name] = state[name] + 1e-3
    save_file(state, str(d / WEIGHTS_NAME))


def _change_config(d: Path, section: str, key: str, value) -> None:
    config = json.loads((d / CONFIG_NAME).read_text())
    config[section][key] = value
    (d / CONFIG_NAME).write_text(json.dumps(config))


def test_each_input_of_an_embedding_is_a_miss(tmp_path, tiny_backbone, monkeypatch):
    root = tmp_path / "cache"
    _cache_with_one_row(root, cache_key(tiny_backbone, "cpu", "fp16", **SHAPE))
    assert _hit(root, cache_key(tiny_backbone, "cpu", "fp16", **SHAPE))
    others = {
        "checkpoint bytes": _edited_copy(tiny_backbone, tmp_path / "w", _change_weights),
        "activation": _edited_copy(
            tiny_backbone,
            tmp_path / "a",
            lambda d: _change_config(d, "model_cfg", "quick_gelu", True),
        ),
        "preprocessing": _edited_copy(
            tiny_backbone,
            tmp_path / "p",
            lambda d: _change_config(d, "preprocess_cfg", "interpolation", "bilinear"),
        ),
    }
    for what, model_dir in others.items():
        assert not _hit(root, cache_key(model_dir, "cpu", "fp16", **SHAPE)), what
    assert not _hit(root, cache_key(tiny_backbone, "cuda", "fp16", **SHAPE)), "numerics"
    for what, shape in {"batch size": {**SHAPE, "batch_size": 8},
                        "threads": {**SHAPE, "cpu_threads": 1}}.items():
        assert not _hit(root, cache_key(tiny_backbone, "cpu", "fp16", **shape)), what

    real_version = importlib.metadata.version
    for library in embedding_cache.LIBRARIES:
        with monkeypatch.context() as m:
            m.setattr(
                importlib.metadata,
                "version",
                lambda name, lib=library: "999.0" if name == lib else real_version(name),
            )
            assert not _hit(root, cache_key(tiny_backbone, "cpu", "fp16", **SHAPE)), library
    assert _hit(root, cache_key(tiny_backbone, "cpu", "fp16", **SHAPE))


def test_code_meaning_is_a_miss_and_a_comment_is_a_hit(tmp_path, tiny_backbone, monkeypatch):
    """A copy of the real preprocessing module stands in for the embedding code, then is edited."""
    module = tmp_path / "pkg" / "preprocess_copy.py"
    module.parent.mkdir()
    original = (REPO / "tasks" / "preprocess.py").read_text()
    module.write_text(original)
    monkeypatch.syspath_prepend(str(module.parent))
    monkeypatch.setattr(embedding_cache, "EMBEDDING_CODE", ("preprocess_copy",))
    root = tmp_path / "cache"
    _cache_with_one_row(root, cache_key(tiny_backbone, "cpu", "fp16", **SHAPE))

    commented = original.replace(
        "    def forward(self, images", "    # a new comment\n    def forward(self, images"
    )
    commented = commented.replace(
        '"""Image bytes -> uint8 RGB tensor', '"""Bytes of an image -> uint8 RGB'
    )
    assert commented != original
    module.write_text(commented)
    assert _hit(root, cache_key(tiny_backbone, "cpu", "fp16", **SHAPE))

    changed = original.replace("torch.floor(x + 0.5)", "torch.round(x)")
    assert changed != original
    module.write_text(changed)
    assert not _hit(root, cache_key(tiny_backbone, "cpu", "fp16", **SHAPE))
    sys.modules.pop("preprocess_copy", None)


def test_code_fingerprint_ignores_comments_docstrings_and_layout():
    assert code_fingerprint("x = 1  # one\n") == code_fingerprint("x = (1)\n")
    documented = 'def f():\n    """Docs."""\n    return 1\n'
    assert code_fingerprint(documented) == code_fingerprint("def f():\n    return 1\n")
    assert code_fingerprint("x = 2\n") != code_fingerprint("x = 1\n")


def test_the_default_key_covers_the_real_embedding_code(tiny_backbone):
    key = cache_key(tiny_backbone, "cpu", "fp32", **SHAPE)
    assert key["open_clip_config"] == json.loads((tiny_backbone / CONFIG_NAME).read_text())
    assert set(key["libraries"]) == {"torch", "torchvision", "open_clip_torch", "timm", "pillow"}
    assert key == cache_key(tiny_backbone, "cpu", "fp32", **SHAPE)  # stable between calls
    # decoding, preprocessing (both paths), loading and running the model
    assert set(embedding_cache.EMBEDDING_CODE) == {
        "tasks.preprocess",
        "tasks.extract:_Decoded",
        "tasks.decode:_decode",
        "tasks.extract:Embedder",
        "tasks.backbone:load_backbone",
    }
