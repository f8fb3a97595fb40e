"""A fine-tuning phase's optimizer, schedule and gradient scaler, and its steps.

Which parameters train in a phase, and at which lr, is the schedule's
(tasks/finetune_blocks.py); this module turns that into an optimizer (AdamW, or SGD for
the 1st place's head phase) with a warm-up-then-cosine schedule, and runs an epoch of
optimizer steps over groups of accumulated batches, under autocast on CUDA. The run around
it (data, checkpoints, resolution steps, the written variant) is tasks/finetune.py's.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from tasks.finetune_blocks import HEAD, configure, phases, tower_parts
from tasks.heads import ArcFace, EmbeddingHead
from tasks.params.finetune import FinetuneRun
from tasks.schedules import warmup_cosine


def make_optimizer(model: nn.Module, heads: list[nn.Module], run: FinetuneRun,
                   phase: str) -> torch.optim.Optimizer:
    """The optimizer of what trains in `phase`, one param group per tower part (named, at the
    schedule's lr) and one for the heads; everything else frozen (`configure`).

    AdamW, but SGD with momentum in head_then_backbone's head phase when `head_optimizer`
    says so (1st place). The heads' group takes `weight_decay_head` where it is given.
    """
    groups = configure(model, tower_parts(model.visual), heads, run, phase)
    if run.weight_decay_head is not None:
        for group in groups:
            if group["name"] == "head":
                group["weight_decay"] = run.weight_decay_head
    if phase == HEAD and run.head_optimizer == "sgd":
        return torch.optim.SGD(groups, lr=run.lr_head, momentum=run.momentum,
                               weight_decay=run.weight_decay)
    return torch.optim.AdamW(groups, weight_decay=run.weight_decay)


class Trainer:
    """One phase's optimizer, schedule and gradient scaler, and one epoch of steps."""

    def __init__(self, model: nn.Module, head: EmbeddingHead, arc: ArcFace, run: FinetuneRun,
                 phase: str, steps_per_epoch: int, device: torch.device):
        self.model, self.head, self.arc, self.run, self.phase = model, head, arc, run, phase
        self.opt = make_optimizer(model, [head, arc], run, phase)
        total = steps_per_epoch * dict(phases(run))[phase]
        self.sched = LambdaLR(self.opt, warmup_cosine(total, int(run.warmup_fraction * total)))
        cuda = device.type == "cuda"
        self.dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(run.precision)
        self.autocast = (torch.autocast("cuda", dtype=self.dtype)
                         if cuda and self.dtype is not None else nullcontext())
        self.scaler = torch.amp.GradScaler("cuda", enabled=cuda and run.precision == "fp16")
        self.device = device

    def state_dict(self) -> dict[str, Any]:
        return {"phase": self.phase, "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])

    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """ArcFace loss of a batch: the tower under autocast, head and loss in fp32 (ArcFace
        scales cosines by ~30, where half precision's rounding is the size of the margin)."""
        with self.autocast:
            feats = self.model.encode_image(images.to(self.device, non_blocking=True))
        emb = self.head(F.normalize(feats.float(), dim=-1))
        return self.arc(emb, labels.to(self.device))

    def epoch(self, groups: list[list[torch.Tensor]],
              batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
              done: tuple[int, float, int] = (0, 0.0, 0),
              on_step: Callable[[int, float, int], None] | None = None) -> float:
        """One optimizer step per group of `accumulate` batches (rows of the training set;
        `batches` yields each one's images and labels, in the groups' order, from the first
        group not yet done); returns the mean loss.

        `done` is (groups already stepped, their loss sum, their images) when an epoch
        resumes from a checkpoint taken inside it; `on_step` gets the same three after
        each step.

        Each batch's loss is weighted by its share of its group's images, so the summed
        gradients are those of one batch of the whole group (a short last group too), as far
        as the tower has no layer that mixes a batch's rows: BatchNorm in train mode
        normalises each batch by its own statistics, so with `batchnorm: train` the sum is
        `accumulate` smaller batches' gradients, not one large batch's.

        With fp16 the gradient scaler skips a step whose gradients overflowed (and lowers its
        scale); the schedule then does not advance either, so no warm-up step is spent on
        an update that never happened.
        """
        start, total_loss, images = done
        for step, group in enumerate(groups[start:], start=start + 1):
            size = sum(len(idx) for idx in group)
            for idx in group:
                loss = self.loss(*next(batches))
                self.scaler.scale(loss * (len(idx) / size)).backward()
                total_loss, images = total_loss + loss.item() * len(idx), images + len(idx)
            scale = self.scaler.get_scale() if self.scaler.is_enabled() else None
            self.scaler.step(self.opt)
            self.scaler.update()
            self.opt.zero_grad(set_to_none=True)
            if scale is None or self.scaler.get_scale() >= scale:
                self.sched.step()
            if on_step is not None:
                on_step(step, total_loss, images)
        return total_loss / max(images, 1)
