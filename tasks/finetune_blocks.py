"""An open_clip image tower as stem, blocks and top, and what each fine-tuning schedule trains.

The GUIE schedules differ only in which parts of the tower train and at which lr, so they
are one table here (`part_lrs`) over one split of the tower (`tower_parts`), for the two
tower kinds the `models` stage builds: open_clip's VisionTransformer and its TimmModel
around a timm EfficientNet. Anything else is refused by name rather than split by a guess:
a part the split does not know would silently train (or never train) in every schedule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from open_clip.timm_model import TimmModel
from open_clip.transformer import VisionTransformer
from timm.models.efficientnet import EfficientNet
from torch import nn

from tasks.params.finetune import FinetuneRun

# Phases of a run: head_then_backbone has two, every other schedule one ("all").
HEAD, BACKBONE, ALL = "head", "backbone", "all"


@dataclass(frozen=True)
class TowerParts:
    """Paths under `model.visual` (modules or parameters) of the stem, each block, the top."""

    kind: str
    stem: tuple[str, ...]
    blocks: tuple[str, ...]
    top: tuple[str, ...]

    def labelled(self) -> list[tuple[str, tuple[str, ...]]]:
        """(label, paths) from the input up: stem, block.0 ... block.D-1, top."""
        return ([("stem", self.stem)] + [(f"block.{i}", (b,)) for i, b in enumerate(self.blocks)]
                + [("top", self.top)])


def tower_parts(visual: nn.Module) -> TowerParts:
    """Split an image tower; every one of its parameters falls in exactly one part."""
    if isinstance(visual, VisionTransformer) and getattr(visual, "attn_pool", None) is None:
        parts = TowerParts("vit", ("conv1", "class_embedding", "positional_embedding", "ln_pre"),
                           tuple(f"transformer.resblocks.{i}"
                                 for i in range(len(visual.transformer.resblocks))),
                           ("ln_post", "proj"))
    elif isinstance(visual, TimmModel) and isinstance(visual.trunk, EfficientNet):
        parts = TowerParts("timm_efficientnet", ("trunk.conv_stem", "trunk.bn1"),
                           tuple(f"trunk.blocks.{i}" for i in range(len(visual.trunk.blocks))),
                           ("trunk.conv_head", "trunk.bn2", "trunk.classifier", "head"))
    else:
        inner = type(getattr(visual, "trunk", None)).__name__
        raise ValueError(
            f"cannot fine-tune a {type(visual).__name__} image tower"
            f"{f' around a timm {inner}' if hasattr(visual, 'trunk') else ''}: known are "
            "open_clip's VisionTransformer (without attentional pooling) and TimmModel "
            "around a timm EfficientNet")
    owners = [(label, path) for label, paths in parts.labelled() for path in paths]
    for name, _ in visual.named_parameters():
        owned = [label for label, path in owners if name == path or name.startswith(path + ".")]
        if len(owned) != 1:
            raise ValueError(f"{parts.kind} tower parameter {name!r} belongs to "
                             f"{owned or 'no part'}: the tower's layout is not the one expected")
    return parts


def phases(run: FinetuneRun) -> list[tuple[str, int]]:
    """(phase, epochs) in order: the head alone then the backbone alone, or both at once."""
    if run.schedule == "head_then_backbone":
        return [(HEAD, run.head_epochs), (BACKBONE, run.epochs - run.head_epochs)]
    return [(ALL, run.epochs)]


def phase_of(run: FinetuneRun, epoch: int) -> str:
    """The phase epoch `epoch` (from 1) belongs to."""
    end = 0
    for phase, epochs in phases(run):
        end += epochs
        if epoch <= end:
            return phase
    raise ValueError(f"epoch {epoch} is past the run's {run.epochs} epochs")


def part_lrs(parts: TowerParts, run: FinetuneRun, phase: str) -> dict[str, float]:
    """lr of each tower part that trains in `phase` (label -> lr); the others are frozen.

    layerwise: block i of D at lr_backbone * layer_decay**(D-1-i), the top with the deepest
    block, the stem one factor below the first block; or, with block_lrs, block i at the lr
    of the first bound above i, the stem at the first bound's, the top at lr_backbone.
    last_blocks: the last ceil(trainable_fraction * D) blocks and the top.
    """
    labels = [label for label, _ in parts.labelled()]
    depth = len(parts.blocks)
    if phase == HEAD:
        return {}
    if run.schedule == "layerwise" and run.block_lrs:
        check_block_lrs(parts, run)
        steps = sorted(run.block_lrs.items())
        lrs = {f"block.{i}": next(lr for bound, lr in steps if i < bound) for i in range(depth)}
        return {"stem": steps[0][1], **lrs, "top": run.lr_backbone}
    if run.schedule == "layerwise":
        lrs = {f"block.{i}": run.lr_backbone * run.layer_decay ** (depth - 1 - i)
               for i in range(depth)}
        return {"stem": run.lr_backbone * run.layer_decay ** depth, **lrs, "top": run.lr_backbone}
    if run.schedule == "last_blocks":
        keep = math.ceil(run.trainable_fraction * depth - 1e-9)
        return {label: run.lr_backbone for label in labels[1 + depth - keep:]}
    return {label: run.lr_backbone for label in labels}


def check_block_lrs(parts: TowerParts, run: FinetuneRun) -> None:
    """block_lrs must give every block of this tower an lr: its last bound >= the depth."""
    if run.block_lrs and max(run.block_lrs) < len(parts.blocks):
        raise ValueError(f"finetune.block_lrs {run.block_lrs} ends at block "
                         f"{max(run.block_lrs)}, but the {parts.kind} tower has "
                         f"{len(parts.blocks)} blocks: make the last bound "
                         f"{len(parts.blocks)}")


def head_trains(phase: str) -> bool:
    """The projection head and the ArcFace centres train in every phase but the backbone's."""
    return phase != BACKBONE


def _target(visual: nn.Module, path: str) -> nn.Module | nn.Parameter | None:
    obj: object = visual
    for attr in path.split("."):
        obj = getattr(obj, attr, None)
    return obj  # type: ignore[return-value]


def freeze_batchnorm_statistics(module: nn.Module) -> None:
    """Every BatchNorm under `module` to eval mode: it normalises with its running statistics
    and no longer updates them; its affine weight and bias still get gradients."""
    for sub in module.modules():
        if isinstance(sub, nn.modules.batchnorm._BatchNorm):
            sub.eval()


def configure(model: nn.Module, parts: TowerParts, heads: list[nn.Module], run: FinetuneRun,
              phase: str) -> list[dict]:
    """Freeze and unfreeze for `phase`; returns the optimizer's param groups (name, lr).

    Frozen parameters get requires_grad False and are in no group, and frozen modules are
    put in eval mode, so their BatchNorm statistics stay as they were too: a frozen part
    leaves the run bit-equal. With `batchnorm: frozen` the training parts' BatchNorm layers
    are in eval mode too (their statistics stay the base's; their scale and shift learn).
    The text tower and everything outside `visual` never train.
    """
    lrs = part_lrs(parts, run, phase)
    model.eval()
    model.requires_grad_(False)
    groups = []
    for label, paths in parts.labelled():
        if label not in lrs:
            continue
        params = []
        for path in paths:
            target = _target(model.visual, path)
            if isinstance(target, nn.Module):
                target.train().requires_grad_(True)
                if run.batchnorm == "frozen":
                    freeze_batchnorm_statistics(target)
                params += list(target.parameters())
            elif isinstance(target, nn.Parameter):
                target.requires_grad_(True)
                params.append(target)
        if params:
            groups.append({"name": label, "params": params, "lr": lrs[label]})
    trains = head_trains(phase)
    for head in heads:
        head.train(trains).requires_grad_(trains)
    if trains:
        groups.append({"name": "head", "lr": run.lr_head,
                       "params": [p for head in heads for p in head.parameters()]})
    return groups
