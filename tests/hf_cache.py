"""Checkpoints in a Hugging Face cache, laid out as huggingface_hub reads it offline.

open_clip resolves a pretrained tag to a Hub repo (`get_pretrained_cfg(arch,
tag)["hf_hub"]`) and asks huggingface_hub for `open_clip_model.safetensors`
there; with HF_HUB_OFFLINE=1 that is answered from
`$HF_HOME/hub/models--<org>--<name>/snapshots/<rev>/`, with `refs/main`
naming the revision. Tests put random weights there (or an empty
placeholder where only the tag's config is read) and run the code in a
process whose environment points at that cache.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import open_clip
import torch
from safetensors.torch import save_file

from conftest import REPO

REVISION = "0" * 40


def place_weights(hf_home: Path, arch: str, tag: str, seed: int | None = 0) -> Path:
    """Random weights of `arch` (seeded; fp16, as the Hub's files mostly are) under the tag's repo.
    seed=None writes an empty placeholder: enough where the file is resolved but not read."""
    hub = open_clip.get_pretrained_cfg(arch, tag)["hf_hub"].rstrip("/")
    org, name, *rest = hub.split("/")
    filename = rest[0] if rest else "open_clip_model.safetensors"
    repo = hf_home / "hub" / f"models--{org}--{name}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(REVISION)
    target = repo / "snapshots" / REVISION / filename
    target.parent.mkdir(parents=True, exist_ok=True)
    if seed is None:
        save_file({}, str(target))
        return target
    torch.manual_seed(seed)
    model = open_clip.create_model(arch, pretrained_text=False)
    save_file({k: v.half().contiguous() for k, v in model.state_dict().items()}, str(target))
    return target


def offline_env(hf_home: Path) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(hf_home), "PYTHONPATH": str(REPO)}


def run_offline(args: list[str], hf_home: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python <args>` in the repo, offline, reading this cache (in a new process:
    huggingface_hub reads the environment when it is imported)."""
    return subprocess.run(
        [sys.executable, *args],
        env=offline_env(hf_home),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
