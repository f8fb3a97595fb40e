"""What a fine-tuning run reads and what survives its interruption.

The training images (the training classes' train split, from the shards), the run's cache
key (its settings and exactly those inputs) and its per-epoch checkpoint: DVC deletes a
stage's outputs before it runs, so the checkpoint lives in `<cache_dir>/<key>/`, where a
rerun of the same run on the same inputs finds it and resumes after its last epoch.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import torch

from tasks.backbone import CONFIG_NAME
from tasks.params.finetune import FinetuneRun
from tasks.schemas.io import atomic_path, read_table
from tasks.schemas.manifest import MANIFEST_SCHEMA
from tasks.schemas.shards import SampleRef, index_split, read_index

CHECKPOINT = "checkpoint.pt"
# Raised when the checkpoint's content or the training loop changes meaning, so an old
# checkpoint is never resumed by code that would read it differently.
STATE_VERSION = 1


def training_images(manifest: Path, shards_dir: Path) -> list[SampleRef]:
    """The training classes' train-split images, in shard order: where each one's JPEG
    lies, read when its batch comes (a split's bytes are never all in memory at once).

    Only images the manifest lists as split `train` of group `train`: validation and test
    classes never reach the backbone, as they never reach the head.
    """
    table = read_table(manifest, MANIFEST_SCHEMA)
    chosen = pc.and_(pc.equal(table["split"], "train"), pc.equal(table["group"], "train"))
    keys = set(table.filter(chosen)["key"].to_pylist())
    return [s for s in index_split(shards_dir, "train") if s.key in keys]


def effective_precision(run: FinetuneRun, device: torch.device) -> str:
    """What the tower computes in: `precision` under CUDA autocast; fp32 on the CPU."""
    return run.precision if device.type == "cuda" else "fp32"


def cache_key(run: FinetuneRun, base_dir: Path, samples: list[SampleRef],
              shards_dir: Path, device: torch.device) -> str:
    """sha256 of the run's settings (but where its cache lives and how many processes
    decode, which change no byte), the device kind and precision it really trains in (so
    `device: auto` never resumes a CPU run on a GPU or back), the base variant (its
    config and weights' digest), every training image (key, class, shard, place in it) in
    order and the sha256 that index.json records for each shard they come from."""
    digest = hashlib.sha256()
    shards = {shards_dir / e["url"]: e["sha256"] for e in read_index(shards_dir)["shardlist"]}
    used = sorted({s.shard for s in samples})
    settings = {"version": STATE_VERSION, "run": run.model_dump(exclude=set(run.SPEED_ONLY)),
                "device": device.type, "precision": effective_precision(run, device),
                "base_config": json.loads((base_dir / CONFIG_NAME).read_text()),
                "base_weights": json.loads((base_dir / "model.json").read_text())
                ["checkpoint_sha256"],
                "shards": [[shard.name, shards[shard]] for shard in used]}
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for s in samples:
        digest.update(f"{s.key}\0{s.class_id}\0{s.shard.name}\0{s.offset}\0{s.size}\0".encode())
    return digest.hexdigest()[:32]


def run_folder(cache_dir: Path, name: str, key: str) -> Path:
    """`<cache_dir>/<run>-<key>`, the run's checkpoint folder. The run's folders of other keys
    are deleted: their settings or inputs have changed, so nothing would resume them."""
    for old in cache_dir.glob(f"{name}-*"):  # run names have no '-': no other run's folder
        if old.name != f"{name}-{key}" and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
    return cache_dir / f"{name}-{key}"


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    """Every random state training draws from: the batch order's generator and torch's
    global CPU and CUDA generators (dropout, drop-path)."""
    state = {"generator": generator.get_state(), "cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any], generator: torch.Generator) -> None:
    generator.set_state(state["generator"])
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(folder: Path, state: dict[str, Any]) -> None:
    """Write the state after an epoch (or, with `partial`, after a step inside one),
    atomically: a kill mid-write leaves the previous one."""
    with atomic_path(folder / CHECKPOINT) as tmp:
        torch.save({"version": STATE_VERSION, **state}, tmp)


def load_checkpoint(folder: Path) -> dict[str, Any] | None:
    """The last completed epoch's state, or None to start afresh. Loaded without unpickling
    code (`weights_only`): tensors, numbers, strings, lists and dicts only.

    A checkpoint that cannot be read (cut short by a crash, or not one of ours) is named in
    a warning and set aside: the same key would otherwise fail on it at every rerun."""
    path = folder / CHECKPOINT
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, EOFError, UnpicklingError...
        state, why = None, f"{type(exc).__name__}: {str(exc)[:200]}"
    else:
        why = "not a checkpoint of this code" if not isinstance(state, dict) else ""
    if why:
        warnings.warn(f"{path}: unreadable checkpoint ({why}); starting the run afresh",
                      stacklevel=2)
        path.unlink()
        return None
    return state if state.get("version") == STATE_VERSION else None
