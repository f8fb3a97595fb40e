"""Does a backbone variant embed as open_clip's own (architecture, pretrained tag) does?

The reference is open_clip itself: `create_model_and_transforms(arch,
pretrained=tag)` with the tag's activation (`force_quick_gelu` where the tag
was trained with QuickGELU, as open_clip's warning advises) and the PIL
transform it returns. Two checks:

- `check_structure`: no weights are read; both models are built on the
  `meta` device, so even ViT-H-14 takes a second. The variant's config must
  give the same modules (activations included), the same parameter shapes
  and the same preprocessing config, and our tensor preprocessing must
  match open_clip's transform on real photos.
- `check_outputs`: the whole path with real (or random) weights: the
  `models` stage's `build_variant`, loaded as `extract` loads it, against the
  reference, on the same input tensor and end to end on JPEG bytes.
"""

from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image

from tasks.models import build_variant, open_clip_variant_config
from tasks.backbone import CONFIG_NAME, load_backbone
from tasks.params.models import OpenClipModel
from tasks.preprocess import Preprocess, decode_rgb


def tag_config(arch: str, tag: str) -> dict[str, Any]:
    cfg = open_clip.get_pretrained_cfg(arch, tag)
    if not cfg:
        raise ValueError(f"open_clip has no pretrained tag {tag!r} for {arch!r}")
    return cfg


def _normalised(cfg: dict[str, Any]) -> dict[str, Any]:
    """Tuples and lists compare equal (JSON turns one into the other)."""
    return json.loads(json.dumps(cfg, sort_keys=True, default=list))


def sample_photos() -> list[bytes]:
    """Real photos shipped with scikit-image, as JPEGs of varied sizes and aspect ratios
    (landscape, portrait, tiny, square, one side under and one over the model's input size)."""
    import skimage.data

    out = []
    for photo in (skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea()):
        image = Image.fromarray(photo)
        for size in [
            image.size,
            (301, 97),
            (97, 301),
            (640, 480),
            (123, 457),
            (20, 30),
            (300, 500),
        ]:
            buf = io.BytesIO()
            image.resize(size, Image.BICUBIC).save(buf, format="JPEG", quality=90)
            out.append(buf.getvalue())
    return out


def compare_preprocessing(
    preprocess: Preprocess, transform, photos: list[bytes]
) -> dict[str, float]:
    """Our uint8 tensor path (eager and exportable) against open_clip's PIL transform,
    in grey levels of 255."""
    std = preprocess.std[0]
    eager, exported, means = [], [], []
    with torch.no_grad():
        for data in photos:
            ref = transform(Image.open(io.BytesIO(data)))
            pixels = decode_rgb(data)[None]
            ours = preprocess(pixels)[0]
            via_export = (
                preprocess.resize_exportable(pixels)[0] / 255.0 - preprocess.mean[0]
            ) / std
            levels = ((ours - ref) * std * 255).abs()
            eager.append(levels.max().item())
            means.append(levels.mean().item())
            exported.append(((via_export - ref) * std * 255).abs().max().item())
    return {
        "preprocess_max_levels": max(eager),
        "preprocess_mean_levels": float(np.mean(means)),
        "export_preprocess_max_levels": max(exported),
    }


def check_structure(arch: str, tag: str, photos: list[bytes]) -> dict[str, Any]:
    """Config-level parity, without weights: modules, shapes, preprocessing config and transform.

    The reference is built by name with `load_weights=False`, so the tag's
    weights file only has to be resolvable (in the Hugging Face cache), not read.
    """
    cfg = tag_config(arch, tag)
    with tempfile.TemporaryDirectory() as tmp, torch.device("meta"):
        (Path(tmp) / CONFIG_NAME).write_text(json.dumps(open_clip_variant_config(arch, cfg)))
        ours = open_clip.create_model(f"local-dir:{tmp}", device="meta", pretrained_text=False)
        try:
            ref = open_clip.create_model(
                arch,
                pretrained=tag,
                load_weights=False,
                device="meta",
                force_quick_gelu=bool(cfg.get("quick_gelu")),
            )
        except RuntimeError as exc:  # open_clip resolves the tag's file even when it won't read it
            raise RuntimeError(
                f"{arch}/{tag}: open_clip could not resolve the tag's weights file ({exc}). The "
                "config check reads none of it, but open_clip looks it up: put the file (or an "
                "empty placeholder, as tests/hf_cache.py does) in the Hugging Face cache, or "
                "allow the download."
            ) from None
    shapes = lambda m: [(k, tuple(v.shape)) for k, v in m.state_dict().items()]  # noqa: E731
    ref_pp = dict(ref.visual.preprocess_cfg)
    transform = image_transform_v2(PreprocessCfg(**ref_pp), is_train=False)
    return {
        "arch": arch,
        "pretrained": tag,
        "modules_equal": repr(ours) == repr(ref),
        "shapes_equal": shapes(ours) == shapes(ref),
        "preprocess_cfg_equal": _normalised(ours.visual.preprocess_cfg) == _normalised(ref_pp),
        "preprocess_cfg": _normalised(ref_pp),
        **compare_preprocessing(Preprocess.from_cfg(ours.visual.preprocess_cfg), transform, photos),
    }


def check_outputs(
    arch: str,
    tag: str,
    photos: list[bytes],
    workdir: Path,
    path: Path | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Output parity: the `models` stage's variant, loaded as `extract` loads it, against open_clip.

    Weights come as the `models` stage finds them (`path`, else the Hugging
    Face cache, else a download). The reference resolves the tag itself; with
    `path` it loads that file by open_clip's own means, with the tag's
    published activation and preprocessing forced as open_clip's factory
    takes them (`force_quick_gelu`, `force_preprocess_cfg`).
    """
    cfg = tag_config(arch, tag)
    build_variant(
        "parity",
        OpenClipModel(kind="open_clip", arch=arch, pretrained=tag, path=path),
        workdir / "variant",
    )
    ours, preprocess, _ = load_backbone(workdir / "variant", device=device)
    quick_gelu = bool(cfg.get("quick_gelu"))
    if path is None:
        ref, _, transform = open_clip.create_model_and_transforms(
            arch, pretrained=tag, force_quick_gelu=quick_gelu, device=device
        )
    else:
        tag_preprocess = {
            k: cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in cfg
        }
        ref, _, transform = open_clip.create_model_and_transforms(
            arch,
            pretrained=str(path),
            force_quick_gelu=quick_gelu,
            device=device,
            image_mean=tag_preprocess.get("mean"),
            image_std=tag_preprocess.get("std"),
            image_interpolation=tag_preprocess.get("interpolation"),
            image_resize_mode=tag_preprocess.get("resize_mode"),
        )
    ref.eval()
    x = torch.randn(
        2, 3, preprocess.size, preprocess.size, generator=torch.Generator().manual_seed(0)
    )
    x = x.to(device)
    cosines = []
    with torch.no_grad():
        same_input = (ours.encode_image(x) - ref.encode_image(x)).abs().max().item()
        scale = ref.encode_image(x).abs().max().item()
        for data in photos:
            a = ours.encode_image(preprocess(decode_rgb(data)[None]).to(device))
            b = ref.encode_image(transform(Image.open(io.BytesIO(data)))[None].to(device))
            cosines.append(torch.nn.functional.cosine_similarity(a, b).item())
    return {
        "arch": arch,
        "pretrained": tag,
        "same_input_max_abs_diff": same_input,
        "same_input_max_abs": scale,
        "photos": len(photos),
        "photo_min_cosine": min(cosines),
        "preprocess_cfg_equal": _normalised(ours.visual.preprocess_cfg)
        == _normalised(ref.visual.preprocess_cfg),
        **compare_preprocessing(preprocess, transform, photos),
    }
