"""Backbone fine-tuning on tiny random-init towers (an open_clip ViT and a timm EfficientNet)
and tiny real shards: what each schedule freezes, the layer-wise lrs, the output variant
as open_clip loads it, resuming after a SIGKILL, and gradient accumulation."""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import ValidationError
from safetensors.torch import load_file

from conftest import REPO
from tasks.backbone import CONFIG_NAME, WEIGHTS_NAME, load_backbone
from tasks.finetune import finetune
from tasks.finetune_steps import make_optimizer
from tasks.finetune_blocks import tower_parts
from tasks.finetune_state import load_checkpoint
from tasks.heads import ArcFace, EmbeddingHead, load_head
from tasks.backbone import save_variant
from tasks.models import _model_from_config
from tasks.params.finetune import FinetuneRun
from tasks.params.shard import ShardParams
from tasks.schemas.io import write_json, write_table
from tasks.schemas.manifest import MANIFEST_SCHEMA
from tasks.shard import plan_shards, write_shards

TEXT = {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 1, "layers": 1}
PRE = {"size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic",
       "resize_mode": "shortest"}
VIT = {"model_cfg": {"embed_dim": 16, "text_cfg": TEXT, "vision_cfg": {
    "image_size": 32, "layers": 3, "width": 32, "patch_size": 16, "head_width": 16}},
    "preprocess_cfg": PRE}
EFFICIENTNET = {"model_cfg": {"embed_dim": 256, "text_cfg": TEXT, "vision_cfg": {
    "timm_model_name": "test_efficientnet", "timm_model_pretrained": False, "timm_pool": "avg",
    "timm_proj": "none", "image_size": 32}}, "preprocess_cfg": PRE}
# class colours of the separable toy set: training classes 0-3, validation classes 4-5
COLOURS = [(220, 30, 30), (30, 200, 40), (40, 60, 220), (230, 220, 40), (200, 40, 200),
           (40, 210, 210)]


def make_variant(folder: Path, config: dict) -> Path:
    """A random-init tower written by the `models` stage's own writer."""
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    model = _model_from_config(folder, config)
    save_variant(folder, config, model, {"model_name": "tiny", "pretrained": "random-init"})
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """Two base variants, and real shards + manifest: 4 training classes of 6 train and 1
    val image each, 2 validation classes of 4 query/index images (never trained on)."""
    root = tmp_path_factory.mktemp("finetune")
    rows, rng = [], np.random.default_rng(0)
    for c, colour in enumerate(COLOURS):
        for i in range(7 if c < 4 else 4):
            arr = np.clip(np.array(colour) + rng.normal(0, 25, (40, 48, 3)), 0, 255)
            buf = io.BytesIO()
            Image.fromarray(arr.astype(np.uint8)).save(buf, format="JPEG", quality=90)
            path = root / "raw" / "toy" / f"{c}_{i}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(buf.getvalue())
            split = ("train" if i < 6 else "val") if c < 4 else ("query" if i < 2 else "index")
            rows.append({"key": f"toy-{c}{i:03d}", "source": "toy", "label": f"c{c}",
                         "class_id": c, "path": path.name, "split": split,
                         "group": "train" if c < 4 else "validation", "class_images": 7})
    manifest = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
    write_table(root / "manifest.parquet", manifest, MANIFEST_SCHEMA)
    index, rejects = write_shards(plan_shards(manifest, 10), root / "raw", root / "shards",
                                  ShardParams(processes=1))
    assert not rejects
    write_json(root / "shards" / "index.json", index)
    return {"root": root, "manifest": root / "manifest.parquet", "shards": root / "shards",
            "vit": make_variant(root / "vit", VIT),
            "efficientnet": make_variant(root / "efficientnet", EFFICIENTNET)}


def run_params(tmp: Path, **changes) -> FinetuneRun:
    settings = {"epochs": 2, "batch_size": 8, "lr_head": 1e-2, "lr_backbone": 1e-3,
                "warmup_fraction": 0.0, "device": "cpu", "threads": 2,
                "cache_dir": str(tmp / "cache"), **changes}
    return FinetuneRun(**settings)


def tune(world, tmp: Path, tower: str = "vit", out: str = "out", progress=None, **changes):
    return finetune(run_params(tmp, **changes), "ft", world[tower], tmp / out,
                    manifest=world["manifest"], shards_dir=world["shards"], progress=progress)


def tower_state(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(str(folder / WEIGHTS_NAME)).items()}


def changed(before: dict, after: dict) -> set[str]:
    assert before.keys() == after.keys()
    return {k for k in before if not torch.equal(before[k], after[k])}


def part_names(state: dict, prefixes: list[str]) -> set[str]:
    """State-dict entries (parameters and BatchNorm buffers) under the given visual paths."""
    return {k for k in state if any(k.startswith(f"visual.{p}.") or k == f"visual.{p}"
                                    for p in prefixes)}


def trainable_entries(state: dict) -> set[str]:
    """Entries training may change: float tensors (not BatchNorm's batch counters)."""
    return {k for k, v in state.items() if v.is_floating_point()}


CPU = torch.device("cpu")
VIT_STEM = ["conv1", "class_embedding", "positional_embedding", "ln_pre"]
VIT_TOP = ["ln_post", "proj"]
VIT_BLOCKS = [f"transformer.resblocks.{i}" for i in range(3)]


@pytest.mark.parametrize("schedule, trains", [
    ("end_to_end", VIT_STEM + VIT_BLOCKS + VIT_TOP),
    ("layerwise", VIT_STEM + VIT_BLOCKS + VIT_TOP),
    ("last_blocks", VIT_BLOCKS[1:] + VIT_TOP),  # ceil(0.5 * 3) = 2 of 3 blocks
])
def test_a_schedule_changes_exactly_the_parts_it_trains(world, tmp_path, schedule, trains):
    tune(world, tmp_path, schedule=schedule, layer_decay=0.5, trainable_fraction=0.5)
    before, after = tower_state(world["vit"]), tower_state(tmp_path / "out")
    expected = part_names(before, trains)
    assert expected and changed(before, after) == expected  # never the text tower


def test_last_blocks_keeps_frozen_efficientnet_blocks_batchnorm_statistics(world, tmp_path):
    """Frozen blocks run in eval mode: their BatchNorm running statistics stay bit-equal."""
    tune(world, tmp_path, tower="efficientnet", schedule="last_blocks", trainable_fraction=0.4)
    before, after = tower_state(world["efficientnet"]), tower_state(tmp_path / "out")
    trains = ["trunk.blocks.3", "trunk.blocks.4", "trunk.conv_head", "trunk.bn2", "head"]
    frozen = part_names(before, ["trunk.conv_stem", "trunk.bn1", "trunk.blocks.0",
                                 "trunk.blocks.1", "trunk.blocks.2"])
    assert not changed(before, after) & frozen
    assert any("running_mean" in k for k in frozen)
    want = part_names(before, trains) & trainable_entries(before)
    assert changed(before, after) & trainable_entries(before) == want


@pytest.mark.parametrize("batchnorm", ["train", "frozen"])
def test_frozen_batchnorm_keeps_the_base_statistics_while_scale_and_shift_learn(
        world, tmp_path, batchnorm):
    """`batchnorm: frozen`: every running mean and variance of the trained tower equals the
    base's, bit for bit, while the BatchNorm weights and biases change; `train` changes them."""
    tune(world, tmp_path, tower="efficientnet", schedule="end_to_end", epochs=1,
         batchnorm=batchnorm)
    before, after = tower_state(world["efficientnet"]), tower_state(tmp_path / "out")
    stats = {k for k in before if k.startswith("visual.")
             and k.endswith((".running_mean", ".running_var"))}
    affine = {k.rsplit(".", 1)[0] + suffix for k in stats for suffix in (".weight", ".bias")}
    assert len(stats) > 20 and affine <= before.keys()
    moved = changed(before, after)
    assert affine <= moved
    assert (moved & stats) == (set() if batchnorm == "frozen" else stats)


def test_head_then_backbone_trains_the_head_alone_then_the_backbone_alone(world, tmp_path):
    """After phase one (read from its checkpoint) the tower is the base's, bit for bit; the
    backbone phase then changes every tower part and leaves head and ArcFace centres be."""
    at_epoch_one = {}

    def grab(row):
        if row["epoch"] == 1:
            [path] = (tmp_path / "cache").glob("*/checkpoint.pt")
            at_epoch_one.update(load_checkpoint(path.parent))

    result = tune(world, tmp_path, schedule="head_then_backbone", epochs=3, head_epochs=1,
                  progress=grab)
    assert [r["phase"] for r in result.history] == ["head", "backbone", "backbone"]
    assert set(result.history[0]["lr"]) == {"head"}  # phase one: no tower group at all
    assert set(result.history[1]["lr"]) == {"stem", "block.0", "block.1", "block.2", "top"}
    base = tower_state(world["vit"])
    visual = {k: v for k, v in base.items() if k.startswith("visual.")}
    assert not changed(visual, {f"visual.{k}": v for k, v in at_epoch_one["visual"].items()})
    assert changed(base, tower_state(tmp_path / "out")) == set(visual)
    head = load_file(str(tmp_path / "out" / "head.safetensors"))
    assert not changed(head, at_epoch_one["head"])
    assert not changed(dict(result.head.state_dict()), at_epoch_one["head"])
    torch.manual_seed(0)  # the head as the run initialised it: it did train in phase one
    initial = EmbeddingHead(16, 64, dropout=0.0).state_dict()
    assert changed(dict(initial), at_epoch_one["head"]) == set(initial)


def test_the_margin_rises_each_epoch_by_its_step_and_subcentres_give_k_centres_a_class(
        world, tmp_path):
    """Epoch k's checkpoint holds margin 0.3 + 0.2 (k - 1) for every class; epoch 1 (same
    margin) leaves the same bytes as a run without a step, epoch 2 does not; 3 sub-centres
    give 4 classes 12 centres."""
    grabbed: dict[str, list[dict]] = {"flat": [], "rising": []}

    def grab(into):
        def hook(row):
            [path] = (tmp_path / into / "cache").glob("*/checkpoint.pt")
            grabbed[into].append(load_checkpoint(path.parent))
        return hook

    for name, step in (("flat", 0.0), ("rising", 0.2)):
        result = tune(world, tmp_path / name, progress=grab(name), epochs=2, margin_step=step,
                      subcenters=3)
        margins = [row["margin"] for row in result.history]
        assert margins == pytest.approx([0.3, 0.3 + step])
    for epoch, state in enumerate(grabbed["rising"], start=1):
        assert torch.allclose(state["arc"]["margins"], torch.full((4,), 0.3 + 0.2 * (epoch - 1)))
        assert state["arc"]["weight"].shape == (4 * 3, 64)
    flat, rising = grabbed["flat"], grabbed["rising"]
    assert not changed(flat[0]["visual"], rising[0]["visual"])
    assert changed(flat[1]["visual"], rising[1]["visual"])
    with pytest.raises(ValidationError, match="margin_step"):
        FinetuneRun(epochs=5, arcface_margin=0.5, margin_step=0.3)


def test_layerwise_lrs_follow_the_closed_form_by_depth(world):
    run = FinetuneRun(schedule="layerwise", lr_backbone=2e-4, layer_decay=0.6, lr_head=1e-3)
    for tower, depth in (("vit", 3), ("efficientnet", 5)):
        model, _, _ = load_backbone(world[tower])
        assert len(tower_parts(model.visual).blocks) == depth
        opt = make_optimizer(model, [EmbeddingHead(16, 64), ArcFace(64, 4)], run, "all")
        lrs = {g["name"]: g["lr"] for g in opt.param_groups}
        want = {f"block.{i}": 2e-4 * 0.6 ** (depth - 1 - i) for i in range(depth)}
        want.update(stem=2e-4 * 0.6 ** depth, top=2e-4, head=1e-3)
        assert lrs.keys() == want.keys()
        assert all(math.isclose(lrs[k], want[k], rel_tol=1e-12) for k in want)
        grouped = [id(p) for g in opt.param_groups for p in g["params"]]
        assert len(grouped) == len(set(grouped))  # no parameter in two groups
        visual = {id(p) for p in model.visual.parameters()}
        assert visual <= set(grouped)
        assert not any(p.requires_grad for p in model.transformer.parameters())


def test_lrs_the_run_used_keep_the_layerwise_ratios(world, tmp_path):
    result = tune(world, tmp_path, schedule="layerwise", layer_decay=0.5, epochs=3)
    lr = result.history[0]["lr"]  # mid-run, after the schedule's first epoch
    assert lr["block.1"] == pytest.approx(0.5 * lr["block.2"], rel=1e-12)
    assert lr["block.0"] == pytest.approx(0.25 * lr["block.2"], rel=1e-12)
    assert lr["stem"] == pytest.approx(0.125 * lr["block.2"], rel=1e-12)
    assert lr["top"] == pytest.approx(lr["block.2"], rel=1e-12)


def test_an_unknown_tower_is_refused_by_name(tmp_path):
    config = {"model_cfg": {"embed_dim": 16, "text_cfg": TEXT, "vision_cfg": {
        "image_size": 32, "layers": [1, 1, 1, 1], "width": 8}}, "preprocess_cfg": PRE}
    folder = make_variant(tmp_path / "rn", config)
    model, _, _ = load_backbone(folder)
    with pytest.raises(ValueError, match="cannot fine-tune a ModifiedResNet image tower"):
        tower_parts(model.visual)


def vit_forward(state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """open_clip's ViT image tower written out from its state dict (patchify, class token,
    pre-LN blocks of multi-head attention and a GELU MLP, LN on the class token, proj)."""
    p = {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
    width, heads = p["class_embedding"].shape[0], 2
    x = F.conv2d(x, p["conv1.weight"], stride=p["conv1.weight"].shape[-1])
    x = x.flatten(2).transpose(1, 2)
    n, tokens = len(x), x.shape[1] + 1
    x = torch.cat([p["class_embedding"].expand(n, 1, width), x], 1) + p["positional_embedding"]

    def ln(t, name):
        return F.layer_norm(t, (width,), p[f"{name}.weight"], p[f"{name}.bias"])

    x = ln(x, "ln_pre")
    for i in range(3):
        b = f"transformer.resblocks.{i}."
        q, k, v = (ln(x, b + "ln_1") @ p[b + "attn.in_proj_weight"].T
                   + p[b + "attn.in_proj_bias"]).chunk(3, -1)
        q, k, v = (t.view(n, tokens, heads, -1).transpose(1, 2) for t in (q, k, v))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(width // heads), -1) @ v
        att = att.transpose(1, 2).reshape(n, tokens, width)
        x = x + att @ p[b + "attn.out_proj.weight"].T + p[b + "attn.out_proj.bias"]
        h = F.gelu(ln(x, b + "ln_2") @ p[b + "mlp.c_fc.weight"].T + p[b + "mlp.c_fc.bias"])
        x = x + h @ p[b + "mlp.c_proj.weight"].T + p[b + "mlp.c_proj.bias"]
    return ln(x, "ln_post")[:, 0] @ p["proj"]


def test_output_is_a_variant_open_clip_loads_with_the_finetuned_weights(world, tmp_path):
    result = tune(world, tmp_path, schedule="layerwise")
    out = tmp_path / "out"
    base_files = {p.name for p in world["vit"].iterdir()}
    assert {p.name for p in out.iterdir()} == base_files | {"head.safetensors", "head.json"}
    assert (out / CONFIG_NAME).read_bytes() == (world["vit"] / CONFIG_NAME).read_bytes()
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out}")
    model.eval()
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    state = load_file(str(out / WEIGHTS_NAME))
    with torch.no_grad():
        got = model.encode_image(x)
        assert torch.allclose(got, vit_forward(state, x), atol=1e-5)
        assert torch.allclose(got, result.model.encode_image(x), atol=1e-6)
        base, _, _ = load_backbone(world["vit"])
        assert not torch.allclose(got, base.encode_image(x), atol=1e-4)  # it did change
    loaded, preprocess, info = load_backbone(out)
    base_info = json.loads((world["vit"] / "model.json").read_text())
    assert base_info.keys() <= info.keys()
    assert info["base_variant"] == "vit" and info["schedule"] == "layerwise"
    assert info["params"]["schedule"] == "layerwise" and info["epochs_done"] == 2
    assert len(info["loss"]) == 2 and info["dim"] == 16 and preprocess.size == 32
    assert info["checkpoint_sha256"] != base_info["checkpoint_sha256"]
    head, variants = load_head(out)
    assert variants == ["ft"] and head.linear.in_features == 16
    assert not result.checkpoints.exists()  # removed once the output is written


KILLED_RUN = """
import json, os, signal, sys
from pathlib import Path
from tasks.finetune import finetune
from tasks.params.finetune import FinetuneRun
a = json.loads(sys.argv[1])
def die(row):
    if row["epoch"] == a.get("kill_after", 1):  # its checkpoint is on disk: die as OOM kills
        os.kill(os.getpid(), signal.SIGKILL)
finetune(FinetuneRun(**a["run"]), "ft", Path(a["base"]), Path(a["out"]),
         manifest=Path(a["manifest"]), shards_dir=Path(a["shards"]), progress=die)
"""


@pytest.mark.parametrize("tower, schedule", [("efficientnet", "end_to_end"),
                                             ("vit", "head_then_backbone")])
def test_a_run_killed_after_an_epoch_resumes_to_the_same_bytes(world, tmp_path, tower,
                                                                schedule):
    changes = {"schedule": schedule, "epochs": 3, "head_epochs": 2, "accumulate": 2,
               "batch_size": 4}
    tune(world, tmp_path / "a", tower=tower, **changes)
    run = run_params(tmp_path / "b", **changes)
    args = {"run": run.model_dump(), "base": str(world[tower]), "out": str(tmp_path / "b" / "out"),
            "manifest": str(world["manifest"]), "shards": str(world["shards"])}
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", KILLED_RUN, json.dumps(args)], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == -9, done.stderr[-3000:]
    [checkpoint] = (tmp_path / "b" / "cache").glob("*/checkpoint.pt")
    assert len(load_checkpoint(checkpoint.parent)["history"]) == 1
    assert not (tmp_path / "b" / "out" / "model.json").exists()
    epochs = []
    finetune(run, "ft", world[tower], tmp_path / "b" / "out", manifest=world["manifest"],
             shards_dir=world["shards"], progress=lambda row: epochs.append(row["epoch"]))
    assert epochs == [2, 3]  # resumed, not restarted
    for name in (WEIGHTS_NAME, "head.safetensors", "head.json", "model.json", CONFIG_NAME):
        a = (tmp_path / "a" / "out" / name).read_bytes()
        assert a == (tmp_path / "b" / "out" / name).read_bytes(), name


def test_decoding_processes_train_the_same_bytes_as_decoding_in_the_loop(world, tmp_path):
    """workers=2 (extract's decode pool, images read from the shards as batches come) and
    workers=0 (each batch decoded in the training process) write identical weights."""
    for workers in (0, 2):
        tune(world, tmp_path / str(workers), tower="efficientnet", epochs=1, workers=workers)
    for name in (WEIGHTS_NAME, "head.safetensors"):
        assert ((tmp_path / "0" / "out" / name).read_bytes()
                == (tmp_path / "2" / "out" / name).read_bytes()), name


def test_loss_falls_on_a_separable_toy_set(world, tmp_path):
    result = tune(world, tmp_path, schedule="end_to_end", epochs=5, batch_size=6)
    loss = [row["loss"] for row in result.history]
    assert loss[-1] < 0.5 * loss[0], loss
    assert result.history[0]["images"] == 24 and result.history[0]["classes"] == 4


def first_step_gradients(world, tmp: Path, **changes) -> list[torch.Tensor]:
    """The gradient of a run's one optimizer step, read back from its checkpoint: AdamW's
    first moment after one step is (1 - beta1) * gradient."""
    moments = []

    def grab(row):
        [path] = (tmp / "cache").glob("*/checkpoint.pt")
        state = load_checkpoint(path.parent)["trainer"]["optimizer"]["state"]
        moments.extend(state[i]["exp_avg"] / 0.1 for i in sorted(state))

    tune(world, tmp, schedule="end_to_end", epochs=1, progress=grab, **changes)
    return moments


@pytest.mark.parametrize("batch_size, accumulate", [(12, 2), (10, 3)])
def test_accumulated_batches_give_the_gradient_of_one_batch_of_them_all(world, tmp_path,
                                                                        batch_size, accumulate):
    """On the ViT, which has no batch-dependent layer (LayerNorm, and no dropout): 24 images
    as one batch, as 2 x 12, or as 10 + 10 + 4 (each weighted by its share) give the same
    step's gradient to float rounding. Compared as gradients, not as weights: Adam's first
    step is about sign(gradient), so a weight whose gradient is at rounding level moves
    by +-lr either way."""
    one = first_step_gradients(world, tmp_path / "one", batch_size=24)
    many = first_step_gradients(world, tmp_path / "many", batch_size=batch_size,
                                accumulate=accumulate)
    assert len(one) == len(many) > 40  # every tower tensor, head and ArcFace centres
    for a, b in zip(one, many):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), (a - b).abs().max()
    assert max(a.abs().max().item() for a in one) > 0.1


def test_the_flow_writes_a_variant_beside_the_others_and_checks_its_run(world, in_tmp,
                                                                         monkeypatch):
    """The stage's flow, under Prefect, from the project's own data/ layout."""
    import shutil

    from flows import finetune as stage
    from tasks.params.base import ParamsError, load_sections
    from tasks.params.finetune import FinetuneParams
    from tasks.schemas.paths import FINETUNED_DIR, MANIFEST, MODELS_DIR, SHARDS_DIR

    shutil.copytree(world["vit"], MODELS_DIR / "vit")
    shutil.copytree(world["shards"], SHARDS_DIR)
    MANIFEST.parent.mkdir(parents=True)
    shutil.copy(world["manifest"], MANIFEST)
    (in_tmp / "params.yaml").write_text(
        "models: {vit: {kind: checkpoint, arch: ViT-B-32, path: x.pt}}\n"
        "finetune:\n  base: vit\n  epochs: 2\n  batch_size: 8\n  device: cpu\n"
        "  runs: {vit_ft: {schedule: last_blocks}}\n")
    params = load_sections({"models": dict, "finetune": FinetuneParams})
    summary = stage.finetune("vit_ft", params.finetune)
    assert summary["schedule"] == "last_blocks" and len(summary["loss"]) == 2
    model, _, info = load_backbone(FINETUNED_DIR / "vit_ft")
    assert info["base_variant"] == "vit" and info["run"] == "vit_ft"
    assert not (MODELS_DIR / "vit_ft").exists()  # beside the built ones, not among them
    assert not any((in_tmp / ".cache" / "finetune").iterdir())  # checkpoints removed
    monkeypatch.setattr(sys, "argv", ["flows.finetune", "vit_ft"])
    elsewhere = params.finetune.model_copy(update={"base": "nope"})
    with pytest.raises(ParamsError, match=r"finetune.base = 'nope': allowed are \['vit'\]"):
        stage.run(type(params)(models=params.models, finetune=elsewhere), None)
    monkeypatch.setattr(sys, "argv", ["flows.finetune", "other"])
    with pytest.raises(ParamsError, match=r"finetune run 'other': allowed are"):
        stage.run(params, None)


def test_runs_are_the_shared_settings_with_their_changes_and_bad_values_name_their_key():
    from tasks.params.base import ParamsError, validate
    from tasks.params.finetune import FinetuneParams, check_runs

    params = validate(FinetuneParams, {"base": "lite0", "lr_backbone": 1e-5, "runs": {
        "a": {}, "b": {"seed": 1, "schedule": "layerwise"}}}, "params.yaml")
    assert params.run("a") == FinetuneRun(base="lite0", lr_backbone=1e-5)
    assert params.run("b") == FinetuneRun(base="lite0", lr_backbone=1e-5, seed=1,
                                          schedule="layerwise")
    check_runs(params, ["lite0", "lite2"])
    with pytest.raises(ValueError, match=r"finetune.base = 'lite0': allowed are \['lite2'\]"):
        check_runs(params, ["lite2"])
    with pytest.raises(ValueError, match="finetune.runs.a: the name of a models variant"):
        check_runs(validate(FinetuneParams, {"runs": {"a": {}}}, "p"), ["lite0", "a"])
    bad = {"runs.a.lr_head = -1: allowed is a value > 0.0": {"a": {"lr_head": -1}},
           "runs.a.bogus = 1: unknown key": {"a": {"bogus": 1}},
           "runs.a.device = 'gpu'": {"a": {"device": "gpu"}},
           "runs.a: head_epochs = 1 leaves no epoch of the 1": {
               "a": {"schedule": "head_then_backbone", "epochs": 1}},
           "runs.a-b: use letters, digits and '_' only": {"a-b": {}},
           "runs.a.base = 'lite2': unknown key": {"a": {"base": "lite2"}}}
    for message, runs in bad.items():
        with pytest.raises(ParamsError, match=re.escape(message)):
            validate(FinetuneParams, {"runs": runs}, "params.yaml")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["fp16", "bf16", "fp32"])
def test_cuda_autocast_with_accumulation_trains_and_resumes_to_the_same_bytes(
        world, tmp_path, precision):
    """On the GPU: autocast (+ GradScaler for fp16), two batches per step, and a run
    stopped after an epoch resumes to the bytes of one never stopped (same GPU)."""
    changes = {"schedule": "layerwise", "epochs": 3, "batch_size": 4, "accumulate": 2,
               "device": "cuda", "precision": precision}
    whole = tune(world, tmp_path / "a", tower="efficientnet", **changes)
    assert all(math.isfinite(row["loss"]) for row in whole.history)

    class Stop(Exception):
        pass

    def stop(row):
        if row["epoch"] == 1:
            raise Stop

    with pytest.raises(Stop):
        tune(world, tmp_path / "b", tower="efficientnet", progress=stop, **changes)
    tune(world, tmp_path / "b", tower="efficientnet", **changes)
    for name in (WEIGHTS_NAME, "head.safetensors"):
        assert ((tmp_path / "a" / "out" / name).read_bytes()
                == (tmp_path / "b" / "out" / name).read_bytes()), name


def test_the_checkpoint_folder_is_keyed_by_settings_and_inputs_and_stale_ones_go(world,
                                                                                  tmp_path):
    from tasks.finetune_state import cache_key, run_folder, training_images

    samples = training_images(world["manifest"], world["shards"])
    assert len(samples) == 24 and {s.class_id for s in samples} == {0, 1, 2, 3}
    run = FinetuneRun(cache_dir="one")
    key = cache_key(run, world["vit"], samples, world["shards"], CPU)
    assert key == cache_key(FinetuneRun(cache_dir="two"), world["vit"], samples, world["shards"],
                            CPU)
    assert key != cache_key(FinetuneRun(seed=1), world["vit"], samples, world["shards"], CPU)
    assert key != cache_key(run, world["efficientnet"], samples, world["shards"], CPU)
    assert key != cache_key(run, world["vit"], samples[:-1], world["shards"], CPU)
    assert key == cache_key(FinetuneRun(cache_dir="one", workers=0), world["vit"], samples,
                            world["shards"], CPU)
    assert key != cache_key(run, world["vit"], samples, world["shards"], torch.device("cuda"))
    shards = tmp_path / "shards"  # the same tars, but index.json says one has other bytes
    shutil.copytree(world["shards"], shards)
    index = json.loads((shards / "index.json").read_text())
    index["shardlist"][0]["sha256"] = "0" * 64
    (shards / "index.json").write_text(json.dumps(index))
    moved = training_images(world["manifest"], shards)
    assert key != cache_key(run, world["vit"], moved, shards, CPU)
    for old in ("ft-0123", "ft_b-4567"):
        (tmp_path / old).mkdir()
    assert run_folder(tmp_path, "ft", key) == tmp_path / f"ft-{key}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ft_b-4567", "shards"]  # kept


@pytest.mark.parametrize("damage", ["cut", "empty", "not_a_dict"])
def test_an_unreadable_checkpoint_is_named_set_aside_and_the_run_starts_afresh(
        world, tmp_path, damage):
    """A checkpoint cut short (a crash mid-write on a disk that lost it), empty, or a torch
    file that is not a checkpoint: a warning names it and the run trains from scratch, to the
    bytes of a run that never had one (rather than failing at every rerun)."""
    clean = tune(world, tmp_path / "clean", epochs=1)
    assert clean.history
    grabbed = {}

    def keep(row):
        [path] = (tmp_path / "hurt" / "cache").glob("*/checkpoint.pt")
        grabbed["folder"], grabbed["bytes"] = path.parent, path.read_bytes()

    tune(world, tmp_path / "hurt", epochs=1, progress=keep)
    folder = grabbed["folder"]
    folder.mkdir(parents=True)  # the finished run removed it; put the damaged file back
    data = {"cut": grabbed["bytes"][:len(grabbed["bytes"]) // 2], "empty": b""}.get(damage)
    if data is None:
        torch.save([1, 2, 3], folder / "checkpoint.pt")
    else:
        (folder / "checkpoint.pt").write_bytes(data)
    with pytest.warns(UserWarning, match=r"checkpoint\.pt: unreadable checkpoint"):
        tune(world, tmp_path / "hurt", epochs=1, out="again")
    for name in (WEIGHTS_NAME, "head.safetensors"):
        assert ((tmp_path / "clean" / "out" / name).read_bytes()
                == (tmp_path / "hurt" / "again" / name).read_bytes()), name


def test_dvc_yaml_lists_every_setting_a_run_trains_with_as_a_param():
    """finetune@<run> reruns when any setting that changes its bytes changes: every
    FinetuneRun field is a param dep but where checkpoints wait and how many processes
    decode."""
    import yaml
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["finetune"]["do"]
    listed = {p.split(".", 1)[1] for p in stage["params"]
              if isinstance(p, str) and p.startswith("finetune.") and "${" not in p}
    assert listed == set(FinetuneRun.model_fields) - FinetuneRun.SPEED_ONLY
