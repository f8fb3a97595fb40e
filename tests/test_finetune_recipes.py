"""The competition recipes' finer settings: the 1st place's SGD head phase, the 4th place's
stepped block lrs, per-group weight decay and per-class margins, and a gradient scaler's
skipped steps leaving the schedule where it was."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from tasks.backbone import load_backbone
from tasks.finetune import class_margins
from tasks.finetune_steps import Trainer, make_optimizer
from tasks.finetune_blocks import check_block_lrs, tower_parts
from tasks.finetune_state import load_checkpoint
from tasks.heads import ArcFace, EmbeddingHead, dynamic_margins
from tasks.params.finetune import FinetuneRun
from test_finetune import tune, world  # noqa: F401  (world: fixture)


def checkpoint(tmp_path) -> dict:
    [path] = (tmp_path / "cache").glob("*/checkpoint.pt")
    return load_checkpoint(path.parent)


def test_sgd_head_phase_then_adamw_for_the_backbone(world, tmp_path):  # noqa: F811
    """head_optimizer sgd: the head phase's checkpoint holds SGD's momentum buffers and no
    Adam moments; the backbone phase then starts an AdamW of its own."""
    states = []
    result = tune(world, tmp_path, schedule="head_then_backbone", epochs=2, head_epochs=1,
                  head_optimizer="sgd", momentum=0.8,
                  progress=lambda row: states.append(checkpoint(tmp_path)["trainer"]))
    head_phase, backbone_phase = states
    assert head_phase["phase"] == "head" and backbone_phase["phase"] == "backbone"
    sgd = head_phase["optimizer"]
    assert {g["momentum"] for g in sgd["param_groups"]} == {0.8}
    assert all("momentum_buffer" in s and "exp_avg" not in s for s in sgd["state"].values())
    adam = backbone_phase["optimizer"]
    assert all("exp_avg" in s for s in adam["state"].values()) and adam["state"]
    assert [r["phase"] for r in result.history] == ["head", "backbone"]
    with pytest.raises(ValidationError, match="head_optimizer"):
        FinetuneRun(schedule="end_to_end", head_optimizer="sgd")


def test_an_sgd_head_phase_trains_other_bytes_than_adamw(world, tmp_path):  # noqa: F811
    sgd = tune(world, tmp_path / "sgd", schedule="head_then_backbone", epochs=2,
               head_optimizer="sgd")
    adamw = tune(world, tmp_path / "adamw", schedule="head_then_backbone", epochs=2)
    assert not torch.equal(sgd.head.linear.weight, adamw.head.linear.weight)


def test_block_lrs_step_by_depth_and_must_cover_every_block(world):  # noqa: F811
    model, _, _ = load_backbone(world["vit"])  # 3 blocks
    run = FinetuneRun(schedule="layerwise", lr_backbone=9e-4, lr_head=1e-2,
                      block_lrs={1: 1e-4, 3: 4e-4})
    opt = make_optimizer(model, [EmbeddingHead(16, 64), ArcFace(64, 4)], run, "all")
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs == {"stem": 1e-4, "block.0": 1e-4, "block.1": 4e-4, "block.2": 4e-4,
                   "top": 9e-4, "head": 1e-2}
    short = FinetuneRun(schedule="layerwise", block_lrs={1: 1e-4, 2: 4e-4})
    with pytest.raises(ValueError, match="has 3 blocks: make the last bound 3"):
        check_block_lrs(tower_parts(model.visual), short)
    with pytest.raises(ValidationError, match="rising order"):
        FinetuneRun(schedule="layerwise", block_lrs={3: 1e-4, 1: 4e-4})
    with pytest.raises(ValidationError, match="block_lrs is a layerwise schedule"):
        FinetuneRun(schedule="end_to_end", block_lrs={3: 1e-4})


def test_a_short_block_lrs_is_refused_before_any_image_is_read(world, tmp_path):  # noqa: F811
    with pytest.raises(ValueError, match="make the last bound 3"):
        tune(world, tmp_path, schedule="layerwise", block_lrs={2: 1e-4})
    assert not (tmp_path / "cache").exists()


def test_the_head_takes_its_own_weight_decay(world):  # noqa: F811
    model, _, _ = load_backbone(world["vit"])
    heads = [EmbeddingHead(16, 64), ArcFace(64, 4)]
    run = FinetuneRun(schedule="end_to_end", weight_decay=1e-3, weight_decay_head=1e-5)
    decay = {g["name"]: g["weight_decay"] for g in make_optimizer(model, heads, run, "all")
             .param_groups}
    assert decay.pop("head") == 1e-5 and set(decay.values()) == {1e-3}
    same = FinetuneRun(schedule="end_to_end", weight_decay=1e-3)
    assert {g["weight_decay"] for g in make_optimizer(model, heads, same, "all")
            .param_groups} == {1e-3}


def test_dynamic_margins_follow_class_sizes_and_rise_by_the_step(world, tmp_path):  # noqa: F811
    """The toy set's 4 training classes have 6 train images each, so dynamic margins are all
    margin_min; uneven counts spread them as `train` does. The margin_step adds to each."""
    labels = torch.tensor([0] * 50 + [1] * 12 + [2] * 4)
    run = FinetuneRun(loss="dynamic_arcface", margin_min=0.05, margin_max=0.5)
    margins = class_margins(run, labels, 3)
    assert margins.dtype == torch.float64
    assert torch.equal(margins.float(), dynamic_margins([50, 12, 4], 0.05, 0.5))
    assert margins[0] == pytest.approx(0.05) and margins[2] == pytest.approx(0.5)
    flat = class_margins(FinetuneRun(arcface_margin=0.3), labels, 3)
    assert flat.tolist() == [0.3] * 3
    states = []
    result = tune(world, tmp_path, epochs=2, loss="dynamic_arcface", margin_min=0.1,
                  margin_max=0.4, margin_step=0.05,
                  progress=lambda row: states.append(checkpoint(tmp_path)["arc"]["margins"]))
    assert torch.equal(states[0], torch.full((4,), 0.1))  # equal counts: all the smallest
    assert torch.equal(states[1], torch.full((4,), 0.1 + 0.05, dtype=torch.float64).float())
    assert [row["margin"] for row in result.history] == pytest.approx([0.4, 0.45])
    with pytest.raises(ValidationError, match="margin_min"):
        FinetuneRun(loss="dynamic_arcface", margin_min=0.5, margin_max=0.2)


class _SkippingScaler:
    """A GradScaler's contract as _Trainer uses it, skipping (and halving its scale on) the
    steps listed, as torch's does when a step's gradients hold inf or NaN."""

    def __init__(self, skip: set[int]):
        self.skip, self.calls, self.scale_value = skip, 0, 65536.0

    def is_enabled(self) -> bool:
        return True

    def get_scale(self) -> float:
        return self.scale_value

    def scale(self, loss):
        return loss

    def step(self, opt):
        self.calls += 1
        if self.calls not in self.skip:
            opt.step()

    def update(self):
        if self.calls in self.skip:
            self.scale_value /= 2


def test_a_step_the_scaler_skips_does_not_advance_the_schedule(world):  # noqa: F811
    model, _, _ = load_backbone(world["vit"])
    head, arc = EmbeddingHead(16, 64), ArcFace(64, 4)
    run = FinetuneRun(schedule="end_to_end", batch_size=2, warmup_fraction=0.5, device="cpu")
    trainer = Trainer(model, head, arc, run, "all", steps_per_epoch=4,
                       device=torch.device("cpu"))
    trainer.scaler = _SkippingScaler(skip={1, 2})
    images = torch.rand(2, 3, 32, 32)
    groups = [[torch.arange(2)] for _ in range(4)]
    batches = iter([(images, torch.tensor([0, 1]))] * 4)
    trainer.epoch(groups, batches)
    assert trainer.sched.last_epoch == 2  # 4 steps, 2 of them skipped


KILLED_INSIDE = """
import json, os, signal, sys
from pathlib import Path
import tasks.finetune as ft
from tasks.params.finetune import FinetuneRun
a = json.loads(sys.argv[1])
save = ft.save_checkpoint
def save_then_die(folder, state):  # die as the OOM killer would, once a chosen one is down
    save(folder, state)
    part = state.get("partial")
    if part and (part["epoch"], part["steps"]) == tuple(a["kill_at"]):
        os.kill(os.getpid(), signal.SIGKILL)
ft.save_checkpoint = save_then_die
ft.finetune(FinetuneRun(**a["run"]), "ft", Path(a["base"]), Path(a["out"]),
            manifest=Path(a["manifest"]), shards_dir=Path(a["shards"]))
"""


@pytest.mark.parametrize("kill_at, changes", [
    ((1, 2), {}),
    ((2, 4), {"image_sizes": [32, 48]}),
    ((2, 2), {"schedule": "head_then_backbone", "head_epochs": 1, "accumulate": 2})])
def test_a_run_killed_inside_an_epoch_resumes_at_its_step_to_the_same_bytes(
        world, tmp_path, monkeypatch, kill_at, changes):  # noqa: F811
    """checkpoint_steps 2: SIGKILL right after the checkpoint at step 2 of epoch 1, at step 4
    of epoch 2 that raises the input size, or at step 2 of head_then_backbone's backbone
    phase with 2 batches a step; the rerun decodes only the images of the steps not done
    and ends with the uninterrupted run's bytes, model.json included (checkpoint_steps,
    speed only, is not in it)."""
    import json
    import os
    import subprocess
    import sys

    import tasks.finetune as ft
    from conftest import REPO
    from tasks.backbone import WEIGHTS_NAME
    from test_finetune import run_params

    changes = {"schedule": "end_to_end", "epochs": 2, "batch_size": 4, "workers": 0, **changes}
    tune(world, tmp_path / "a", **changes)
    run = run_params(tmp_path / "b", checkpoint_steps=2, **changes)
    args = {"run": run.model_dump(), "base": str(world["vit"]), "kill_at": kill_at,
            "out": str(tmp_path / "b" / "out"), "manifest": str(world["manifest"]),
            "shards": str(world["shards"])}
    done = subprocess.run([sys.executable, "-c", KILLED_INSIDE, json.dumps(args)],
                          env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == -9, done.stderr[-3000:]
    state = checkpoint(tmp_path / "b")
    assert (state["partial"]["epoch"], state["partial"]["steps"]) == kill_at
    decoded = []
    decode = ft.decode_rgb
    monkeypatch.setattr(ft, "decode_rgb", lambda data: decoded.append(1) or decode(data))
    ft.finetune(run, "ft", world["vit"], tmp_path / "b" / "out", manifest=world["manifest"],
                shards_dir=world["shards"])
    epoch, steps = kill_at
    per_step = 4 * run.accumulate  # 24 train images an epoch
    assert len(decoded) == (2 - epoch + 1) * 24 - steps * per_step
    for name in (WEIGHTS_NAME, "head.safetensors", "model.json", "open_clip_config.json"):
        a = (tmp_path / "a" / "out" / name).read_bytes()
        assert a == (tmp_path / "b" / "out" / name).read_bytes(), name
