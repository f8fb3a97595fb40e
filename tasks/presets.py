"""Named recipes as overlays on params.yaml (`presets/<name>.yaml`).

An overlay names only what it changes. Within a stage section each key it
gives replaces that key (`extract: {batch_size: 256}` changes one value);
`models`, `variants`, `sources`, `sample.num_classes`, `finetune.runs` and
`soup` are sets of named entries, so an overlay that gives them replaces the
whole set: a CLIP preset swaps the backbones instead of adding to the offline
ones. An overlay that gives `models` but no `variants` embeds every model it
gives, in its order (`variants` would otherwise still name the offline ones).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from tasks.params.base import ParamsError, load_yaml
from tasks.params.project import parse_params

PRESETS_DIR = Path(__file__).resolve().parents[1] / "presets"
_REPLACED_WHOLE = {("models",), ("variants",), ("sources",), ("sample", "num_classes"),
                   ("finetune", "runs"), ("soup",)}


def list_presets(directory: Path = PRESETS_DIR) -> list[str]:
    return sorted(p.stem for p in directory.glob("*.yaml"))


def load_preset(name: str, directory: Path = PRESETS_DIR) -> dict[str, Any]:
    path = directory / f"{name}.yaml"
    if not path.is_file():
        raise ParamsError(f"preset {name!r}: not found; allowed are {list_presets(directory)}")
    overlay = load_yaml(path) or {}
    if not isinstance(overlay, dict):
        raise ParamsError(f"{path}: must be a mapping of params sections")
    return overlay


def apply_overlay(base: dict[str, Any], overlay: dict[str, Any],
                  _at: tuple[str, ...] = ()) -> dict[str, Any]:
    """`base` with `overlay` merged in (the module docstring says how); inputs are not modified."""
    out = copy.deepcopy(base)
    for key, value in overlay.items():
        here = _at + (key,)
        merge = isinstance(value, dict) and isinstance(out.get(key), dict)
        if merge and here not in _REPLACED_WHOLE:
            out[key] = apply_overlay(out[key], value, here)
        else:
            out[key] = copy.deepcopy(value)
    return out


def preset_params(name: str, base: dict[str, Any], directory: Path = PRESETS_DIR) -> dict[str, Any]:
    """The params a preset gives on top of `base`, validated (ParamsError names the preset)."""
    overlay = load_preset(name, directory)
    if "models" in overlay and "variants" not in overlay:
        overlay = {**overlay, "variants": {m: "models" for m in overlay["models"]}}
    merged = apply_overlay(base, overlay)
    parse_params(merged, origin=f"params.yaml + presets/{name}.yaml")
    return merged
