"""Presets: every recipe in presets/ validates on top of params.yaml, and the command applies one
safely."""

from __future__ import annotations

import re
import shutil

import pytest
import yaml

from conftest import REPO
from tasks.params.base import ParamsError
from tasks.params.project import parse_params
from tasks.presets import apply_overlay, list_presets, preset_params

BASE = yaml.safe_load((REPO / "params.yaml").read_text())


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_validates(name):
    params = parse_params(preset_params(name, BASE))
    assert params.models and params.sources


def test_clip_presets_name_the_real_backbones():
    wanted = {("ViT-H-14", "laion2b_s32b_b79k"), ("ViT-L-14", "openai"), ("ViT-L-14-336", "openai"),
              ("ViT-B-32", "laion2b_s34b_b79k")}
    got = set()
    for name in list_presets():
        if name.startswith("clip_"):
            models = parse_params(preset_params(name, BASE)).models
            got |= {(m.arch, m.pretrained) for m in models.values()}
    assert wanted <= got


def test_overlay_replaces_named_sets_and_merges_sections():
    model = {"kind": "open_clip", "arch": "ViT-B-32", "pretrained": "openai"}
    merged = apply_overlay(BASE, {"models": {"x": model}, "extract": {"batch_size": 7}})
    assert list(merged["models"]) == ["x"]
    assert (merged["extract"]["batch_size"] == 7
            and merged["extract"]["device"] == BASE["extract"]["device"])
    assert BASE["extract"]["batch_size"] != 7  # the base is not modified


def test_preset_command_applies_validates_and_refuses(tmp_path, monkeypatch, capsys):
    from flows.preset import main

    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    assert main(["clip_vit_b32_laion", "--check"]) == 0
    assert (tmp_path / "params.yaml").read_text() == (REPO / "params.yaml").read_text()
    assert main(["clip_vit_b32_laion"]) == 0
    applied = yaml.safe_load((tmp_path / "params.yaml").read_text())
    assert list(applied["models"]) == ["vit_b32_laion"] and applied["sources"] == BASE["sources"]
    before = (tmp_path / "params.yaml").read_text()
    assert main(["no_such_preset"]) == 2
    assert "allowed are" in capsys.readouterr().err
    assert (tmp_path / "params.yaml").read_text() == before
    with pytest.raises(ParamsError):
        parse_params(apply_overlay(BASE, {"extract": {"runner": "dask"}}))


def test_competition_recipes_match_the_write_ups():
    two = parse_params(preset_params("2xclip", BASE))
    assert {(m.arch, m.pretrained) for m in two.models.values()} == {
        ("ViT-L-14-336", "openai"), ("ViT-L-14", "laion2b_s32b_b82k")}
    assert dict(two.sample.num_classes) == {"imagenet": 1000, "landmarks": 10000,
                                            "products10k": 5000, "rp2k": 1850}
    assert two.sample.samples == 55 and round(two.sample.val_fraction * 55) == 5
    assert two.sample.pick == {"landmarks": "most_populous"}
    t = two.train
    assert (t.head, t.dropout, t.loss, t.optimizer, t.lr, t.schedule, t.step_epochs, t.step_gamma,
            t.epochs, t.batch_size) == (
        "dropout_linear", 0.3, "subcenter_arcface", "adam", 1e-3, "step", 100, 0.1, 300, 128)
    dense = parse_params(preset_params("dense64", BASE))
    assert dense.sample.samples == 50 and dense.sample.val_fraction == 0.1
    assert (dense.sample.num_classes["landmarks"] == 7000
            and dense.sample.pick["landmarks"] == "most_populous")
    assert {s.kind for s in dense.sources.values()} == {"imagenet", "landmarks", "products10k"}
    assert (dense.train.schedule, dense.train.epochs, dense.train.embedding_dim) == (
        "linear", 10, 64)


def lrs_of_blocks(lrs: dict[str, float]) -> list[float]:
    return [lrs[f"block.{i}"] for i in range(sum(k.startswith("block.") for k in lrs))]


def test_seed004_matches_its_notebook():
    """train_vit_h_224.ipynb and utilities.py of IvanAer/G-Universal-CLIP (4th place), value
    by value: its CFG (lrs by block, decays, batch, accumulation, epochs, margins, scale),
    its sub-center ArcFace (k=3) and its 9,691 classes of GLDv2-2020 and of Products-10K."""
    import open_clip

    from tasks.finetune_blocks import check_block_lrs, part_lrs, tower_parts
    from tasks.heads import dynamic_margins

    p = parse_params(preset_params("finetune_vit_h14_seed004", BASE))
    assert [(m.arch, m.pretrained) for m in p.models.values()] == [
        ("ViT-H-14", "laion2b_s32b_b79k")]
    vision = open_clip.get_model_config("ViT-H-14")["vision_cfg"]
    assert (vision["image_size"], vision["layers"]) == (224, 32)
    assert {name: s.uri for name, s in p.sources.items()} == {
        "landmarks": "kaggle://competitions/landmark-recognition-2020",
        "products10k": "/datasets/products10k"}
    s = p.sample
    assert (s.samples, s.min_images, s.pick, s.val_fraction) == (50, 4, {}, 0.0)
    for n in s.num_classes.values():  # about 9,691 a source left to train on
        assert abs(n * (1 - s.eval_fraction) - 9691) < 1
    runs = [p.finetune.run(name) for name in p.finetune.runs]
    assert [r.seed for r in runs] == [0, 1, 2, 3]
    r = runs[0]
    assert (r.schedule, r.epochs, r.batch_size, r.accumulate, r.image_sizes) == (
        "layerwise", 1, 8, 4, [])
    assert (r.lr_head, r.weight_decay, r.weight_decay_head) == (3e-4, 1e-3, 1e-5)
    assert (r.loss, r.margin_min, r.margin_max, r.arcface_scale, r.subcenters) == (
        "dynamic_arcface", 0.05, 0.5, 30.0, 3)
    assert abs(r.warmup_fraction - 1000 / 8930) < 1e-3  # 1,000 warm-up steps of 8,930
    # open_clip's own ViT tower with ViT-H-14's 32 blocks (narrow, so it builds at once):
    # every parameter's lr as the optimizer gets it
    from open_clip.transformer import VisionTransformer
    from torch import nn

    from tasks.finetune_steps import make_optimizer
    from tasks.heads import ArcFace, EmbeddingHead

    model = nn.Module()
    model.visual = VisionTransformer(image_size=28, patch_size=14, width=16, layers=32, heads=1,
                                     mlp_ratio=1.0, output_dim=8)
    model.transformer = nn.Linear(1, 1)  # a text tower, which never trains
    parts = tower_parts(model.visual)
    check_block_lrs(parts, r)
    opt = make_optimizer(model, [EmbeddingHead(8, 64), ArcFace(64, 4)], r, "all")
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    notebook = {"10": 1.25e-6, "20": 2.5e-6, "26": 5e-6, "32": 10e-6}  # CFG.vit_bb_lr
    for name, param in model.visual.named_parameters():
        block = name.split(".")[2] if name.startswith("transformer.resblocks.") else None
        if block is not None:
            want = next(v for k, v in notebook.items() if int(block) < int(k))
        else:  # stem at the first step (as its loop gave them), the top at the last
            want = 1e-5 if name.startswith(("ln_post", "proj")) else 1.25e-6
        assert lr_of[id(param)] == want, name
    assert {g["lr"] for g in opt.param_groups if g["name"] == "head"} == {3e-4}
    assert lrs_of_blocks(part_lrs(parts, r, "all")) == [
        next(v for k, v in notebook.items() if i < int(k)) for i in range(32)]
    # Its margins: tmp = sqrt(1 / sqrt(counts)), min-max scaled into [0, 0.45], + 0.05.
    counts = [50, 50, 12, 4, 31]
    tmp = [c ** -0.25 for c in counts]
    theirs = [(t - min(tmp)) / (max(tmp) - min(tmp)) * 0.45 + 0.05 for t in tmp]
    ours = dynamic_margins(counts, r.margin_min, r.margin_max).tolist()
    assert ours == pytest.approx(theirs, abs=1e-6)
    soup = p.soup["vit_h14_soup"]
    assert (soup.kind, list(soup.runs)) == ("uniform", list(p.finetune.runs))
    assert set(p.finetune.runs) | {"vit_h14_laion", "vit_h14_soup"} == set(p.variants)


def test_siglip_so400m_matches_mdfe_config():
    """configs/lp_siglip-sovit400m_arcface3_m4d35k.yaml of morrisfl/mdfe, value by value."""
    p = parse_params(preset_params("siglip_so400m", BASE))
    models = [(m.arch, m.pretrained) for m in p.models.values()]
    assert models == [("ViT-SO400M-14-SigLIP-384", "webli")]
    kinds = {s.kind for s in p.sources.values()}
    assert kinds == {"products10k", "landmarks", "deepfashion_c2s", "stanford_cars"}
    assert p.sources["deepfashion"].statuses == ["train"]
    assert dict(p.sample.num_classes) == {"products10k": "all", "landmarks": 10000,
                                          "deepfashion": "all", "stanford_cars": "all"}
    s = p.sample
    assert (s.min_images, s.samples, s.val_fraction, s.pick) == (3, 100, 0.0, {})
    t = p.train
    assert (t.embedding_dim, t.head, t.dropout) == (64, "dropout_linear", 0.2)
    assert (t.loss, t.subcenters, t.arcface_scale, t.arcface_margin) == (
        "subcenter_arcface", 3, 30.0, 0.5)
    assert (t.optimizer, t.lr, t.weight_decay, t.epochs, t.batch_size) == (
        "adam", 2e-2, 1e-4, 10, 128)
    assert (t.schedule, t.warmup_fraction, t.seed) == ("cosine", 0.1, 42)  # warm-up: 1 epoch of 10


def _node(params: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(params, dict) or part not in params:
            raise KeyError(dotted)
        params = params[part]
    return params


def _resolve(text: str, params: dict, key: str | None) -> str | None:
    """A dvc.yaml string with its ${...} filled from `params` (${key}: the foreach key);
    None for a templated one of a foreach that makes no stage."""
    if key is None and "${" in text:
        return None
    return re.sub(r"\$\{([^}]+)\}",
                  lambda m: key if m.group(1) == "key" else str(_node(params, m.group(1))), text)


@pytest.mark.parametrize("name", [None, *list_presets()])
def test_every_param_a_stage_lists_is_in_the_params_it_runs_with(name):
    """DVC refuses to run a stage whose listed param is missing from params.yaml. A stage
    group that params.yaml leaves empty (finetune runs, soups) is checked too: a preset
    fills it, merging into params.yaml's section, so every plain key must be there."""
    params = BASE if name is None else preset_params(name, BASE)
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for stage, body in stages.items():
        keys: list[str | None] = ["-"]  # a stage of its own: no ${key} in it
        if "foreach" in body:
            keys = list(_node(params, body["foreach"][2:-1])) or [None]
        for key in keys:
            for entry in body.get("do", body).get("params", []):
                dotted = _resolve(entry, params, key)
                if dotted is not None:
                    try:
                        _node(params, dotted)
                    except KeyError:
                        pytest.fail(f"{stage}@{key}: param {dotted} is not in the params "
                                    f"({name or 'params.yaml'})")
