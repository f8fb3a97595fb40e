"""Resolution steps of a fine-tuning run (`finetune.image_sizes`, the 1st place's 224 -> 280
-> 290), on the tiny towers and shards of test_finetune: the ViT's grid is resized as
open_clip resizes it when it loads a checkpoint at another size, the variant is written at
the last size, a run killed after a step resumes to the same bytes, and a tower whose
position embeddings cannot be resized is refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import open_clip
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from safetensors.torch import load_file
from torch import nn

from conftest import REPO
from tasks.backbone import CONFIG_NAME, WEIGHTS_NAME, load_backbone
from tasks.export import Embedder, export_embedder, load_exported
import tasks.finetune as finetune_module
from tasks.finetune import finetune
from tasks.finetune_resolution import check_resizable, set_image_size
from tasks.params.finetune import FinetuneRun
from test_finetune import KILLED_RUN, run_params, tune, world  # noqa: F401  (world: fixture)

X48 = torch.randn(3, 3, 48, 48, generator=torch.Generator().manual_seed(2))


def test_a_vit_at_a_new_size_is_what_open_clip_loads_at_that_size(world):  # noqa: F811
    """Independent reference: open_clip's own checkpoint loading with force_image_size,
    which interpolates the saved grid itself."""
    model, _, _ = load_backbone(world["vit"])
    set_image_size(model, 48)
    reference = open_clip.create_model(f"local-dir:{world['vit']}", force_image_size=48)
    reference.eval()
    assert model.visual.grid_size == reference.visual.grid_size == (3, 3)
    assert torch.equal(model.visual.positional_embedding, reference.visual.positional_embedding)
    with torch.no_grad():
        assert torch.equal(model.encode_image(X48), reference.encode_image(X48))
    assert model.visual.preprocess_cfg["size"] == 48


def test_a_run_with_resolution_steps_is_written_at_its_last_size(world, tmp_path):  # noqa: F811
    result = tune(world, tmp_path, schedule="end_to_end", image_sizes=[32, 48])
    out = tmp_path / "out"
    assert [row["image_size"] for row in result.history] == [32, 48]
    config = json.loads((out / CONFIG_NAME).read_text())
    assert config["model_cfg"]["vision_cfg"]["image_size"] == 48
    assert config["preprocess_cfg"]["size"] == 48
    model, _, transform = open_clip.create_model_and_transforms(f"local-dir:{out}")
    model.eval()
    assert model.visual.positional_embedding.shape[0] == 3 * 3 + 1
    assert transform.transforms[0].size == 48  # open_clip's own transform takes 48 px
    state = load_file(str(out / WEIGHTS_NAME))
    assert torch.equal(state["visual.positional_embedding"],
                       model.visual.positional_embedding)
    with torch.no_grad():
        assert torch.allclose(model.encode_image(X48), result.model.encode_image(X48),
                              atol=1e-6)
    loaded, preprocess, info = load_backbone(out)
    assert preprocess.size == 48 and info["image_size"] == 48
    # export ships it at that size: the exported program embeds as the eager tower does
    image = torch.randint(0, 256, (2, 3, 60, 70), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(3))
    export_embedder(Embedder([(preprocess, loaded.visual)], nn.Identity()), tmp_path / "e.pt2",
                    image)
    with torch.no_grad():
        eager = F.normalize(loaded.encode_image(preprocess(image)), dim=-1)
        assert torch.allclose(load_exported(tmp_path / "e.pt2")(image), eager, atol=1e-5)


def test_a_convolutional_tower_sees_each_epochs_size(world, tmp_path, monkeypatch):  # noqa: F811
    """Only the preprocessing changes; the tower's inputs are each epoch's size."""
    seen: list[tuple[int, ...]] = []

    def hooked(folder):
        model, preprocess, info = load_backbone(folder)
        model.visual.register_forward_pre_hook(lambda _, args: seen.append(args[0].shape[-2:]))
        return model, preprocess, info

    monkeypatch.setattr(finetune_module, "load_backbone", hooked)
    conv = tune(world, tmp_path, tower="efficientnet", out="conv", image_sizes=[40, 48])
    assert [row["image_size"] for row in conv.history] == [40, 48]
    half = len(seen) // 2
    assert len(seen) == 2 * half > 0
    assert set(seen[:half]) == {(40, 40)} and set(seen[half:]) == {(48, 48)}
    assert load_backbone(tmp_path / "conv")[1].size == 48


def test_a_step_restarts_the_position_embeddings_moments_only(world):  # noqa: F811
    """After AdamW steps, a size step drops the state of the (same) position-embedding
    parameter, now shaped for the new grid, and leaves every other parameter's moments."""
    model, _, _ = load_backbone(world["vit"])
    optimizer = torch.optim.AdamW(model.visual.parameters(), lr=1e-3)
    for _ in range(2):
        model.visual(torch.randn(2, 3, 32, 32)).square().sum().backward()
        optimizer.step()
    embedding = model.visual.positional_embedding
    before = {p: {k: v.clone() for k, v in optimizer.state[p].items()}
              for p in model.visual.parameters() if p is not embedding}
    assert embedding in optimizer.state
    set_image_size(model, 48, optimizer)
    assert embedding not in optimizer.state
    assert model.visual.positional_embedding is embedding  # the optimizer's own parameter
    assert embedding.shape == (3 * 3 + 1, 32)
    assert any(p is embedding for group in optimizer.param_groups for p in group["params"])
    for p, state in before.items():
        assert all(torch.equal(v, optimizer.state[p][k]) for k, v in state.items())
    model.visual(torch.randn(2, 3, 48, 48)).square().sum().backward()
    optimizer.step()  # the new grid trains, its moments started afresh
    assert optimizer.state[embedding]["exp_avg"].shape == embedding.shape


def test_a_run_killed_after_a_resolution_step_resumes_to_the_same_bytes(
        world, tmp_path):  # noqa: F811
    """Killed after epoch 2 (48 px): the checkpoint's grid is restored before its values,
    and epoch 3 steps up to 64 px as the run never interrupted did."""
    changes = {"schedule": "layerwise", "epochs": 3, "image_sizes": [32, 48, 64],
               "batch_size": 4, "accumulate": 2}
    tune(world, tmp_path / "a", **changes)
    run = run_params(tmp_path / "b", **changes)
    args = {"run": run.model_dump(), "base": str(world["vit"]),
            "out": str(tmp_path / "b" / "out"), "manifest": str(world["manifest"]),
            "shards": str(world["shards"]), "kill_after": 2}
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", KILLED_RUN, json.dumps(args)],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == -9, done.stderr[-3000:]
    epochs = []
    finetune(run, "ft", world["vit"], tmp_path / "b" / "out", manifest=world["manifest"],
             shards_dir=world["shards"], progress=lambda row: epochs.append(row["epoch"]))
    assert epochs == [3]
    for name in (WEIGHTS_NAME, "head.safetensors", "model.json", CONFIG_NAME):
        a = (tmp_path / "a" / "out" / name).read_bytes()
        assert a == (tmp_path / "b" / "out" / name).read_bytes(), name


def test_sizes_are_one_an_epoch_and_unresizable_towers_are_refused(world):  # noqa: F811
    with pytest.raises(ValidationError, match=r"image_sizes \[224, 280\]: one size an epoch"):
        FinetuneRun(epochs=3, image_sizes=[224, 280])
    with pytest.raises(ValidationError, match="greater than or equal to 16"):
        FinetuneRun(epochs=1, image_sizes=[8])
    assert FinetuneRun(epochs=2, image_sizes=[224, 280]).image_size(2, 224) == 280
    assert FinetuneRun(epochs=2).image_size(2, 224) == 224

    class AttentionPooled(nn.Module):  # ModifiedResNet's attention pool holds a grid
        def __init__(self):
            super().__init__()
            self.attnpool = nn.Module()
            self.attnpool.positional_embedding = nn.Parameter(torch.zeros(50, 8))

    with pytest.raises(ValueError, match=r"position embeddings open_clip cannot resize "
                                         r"\(attnpool.positional_embedding\)"):
        check_resizable(AttentionPooled(), {}, [224])
    vit, _, _ = load_backbone(world["vit"])
    with pytest.raises(ValueError, match="sin_cos_2d, not learned"):
        check_resizable(vit.visual, {"pos_embed_type": "sin_cos_2d"}, [32])
    check_resizable(vit.visual, {}, [32, 48])
    with pytest.raises(ValueError, match=r"40 is not a multiple of the patch size 16, so its "
                                         r"last 8 px would never be seen; use 32 or 48"):
        check_resizable(vit.visual, {}, [32, 40])
