"""Every open_clip backbone the presets name embeds as open_clip itself does (tasks/parity.py).

Config-level parity (modules, shapes, preprocessing config and transform on
real photos) for every (arch, tag) in presets/ plus the SigLIP pair, built on
the meta device; output parity, end to end from the `models` stage through
`load_backbone`, on one smaller architecture of each family, with random
weights placed in a temporary Hugging Face cache.
"""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import REPO
from hf_cache import place_weights, run_offline

SIGLIP = [("ViT-B-16-SigLIP", "webli"), ("ViT-SO400M-14-SigLIP-384", "webli")]


def preset_backbones() -> list[tuple[str, str]]:
    pairs = set(SIGLIP)
    for preset in sorted((REPO / "presets").glob("*.yaml")):
        for spec in (yaml.safe_load(preset.read_text()).get("models") or {}).values():
            if spec.get("kind") == "open_clip":
                pairs.add((spec["arch"], spec["pretrained"]))
    return sorted(pairs)


def _results(done) -> list[dict]:
    assert done.returncode in (0, 1), done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def test_presets_name_the_backbones_the_issue_lists():
    pairs = preset_backbones()
    for expected in [
        ("ViT-L-14-336", "openai"),
        ("ViT-L-14", "laion2b_s32b_b82k"),
        ("ViT-L-14", "openai"),
        ("ViT-H-14", "laion2b_s32b_b79k"),
        *SIGLIP,
    ]:
        assert expected in pairs


def test_every_preset_backbone_has_open_clips_config_and_preprocessing(tmp_path):
    pairs = preset_backbones()
    for arch, tag in pairs:
        place_weights(tmp_path / "hf", arch, tag, seed=None)  # resolvable; never read
    done = run_offline(["-m", "flows.parity", *[f"{a}/{t}" for a, t in pairs]], tmp_path / "hf")
    results = {(r["arch"], r["pretrained"]): r for r in _results(done)}
    assert set(results) == set(pairs)
    for pair, r in results.items():
        assert r["modules_equal"] and r["shapes_equal"] and r["preprocess_cfg_equal"], pair
        # uint8 rounding between PIL's two passes, see README "Parity with open_clip"
        assert r["preprocess_max_levels"] <= 8 and r["export_preprocess_max_levels"] <= 8, pair
        assert r["preprocess_mean_levels"] < 0.1, pair
        assert r["passed"], pair
    openai = results[("ViT-L-14-336", "openai")]["preprocess_cfg"]
    assert openai["size"] == [336, 336] and openai["resize_mode"] == "shortest"
    laion = results[("ViT-L-14", "laion2b_s32b_b82k")]["preprocess_cfg"]
    assert laion["mean"] == [0.5, 0.5, 0.5]
    siglip = results[("ViT-SO400M-14-SigLIP-384", "webli")]["preprocess_cfg"]
    assert siglip["resize_mode"] == "squash" and siglip["size"] == [384, 384]


@pytest.mark.parametrize(
    "arch, tag",
    [
        ("ViT-B-32", "openai"),  # QuickGELU tags: ViT-L-14(-336)/openai
        ("ViT-B-32", "laion2b_s34b_b79k"),  # GELU LAION tags: ViT-L-14, ViT-H-14
        ("ViT-B-16-SigLIP", "webli"),  # timm SigLIP towers, squash resize: SO400M-14-384
    ],
)
def test_models_stage_variant_embeds_as_open_clip(tmp_path, arch, tag):
    place_weights(tmp_path / "hf", arch, tag)
    done = run_offline(["-m", "flows.parity", "--outputs", f"{arch}/{tag}"], tmp_path / "hf")
    [r] = _results(done)
    assert r["preprocess_cfg_equal"]
    assert r["same_input_max_abs_diff"] <= 1e-5 * r["same_input_max_abs"]
    assert r["photo_min_cosine"] >= 0.999 and r["photos"] >= 20
    assert r["passed"] and done.returncode == 0


def test_a_local_weights_file_for_a_tag_keeps_the_tags_activation_and_preprocessing(tmp_path):
    """models.<variant>.path: the file's weights, the tag's QuickGELU and preprocessing."""
    weights = place_weights(tmp_path / "hf", "ViT-B-32", "openai")
    done = run_offline(
        ["-m", "flows.parity", "--outputs", "--path", str(weights), "ViT-B-32/openai"],
        tmp_path / "empty-hf",
    )  # nothing to find there: the file is the only source
    [r] = _results(done)
    assert (
        r["preprocess_cfg_equal"] and r["same_input_max_abs_diff"] <= 1e-5 * r["same_input_max_abs"]
    )
    assert r["passed"] and done.returncode == 0
