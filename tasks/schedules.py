"""Learning-rate shapes and deterministic kernels, shared by `train` (the head) and
`finetune` (the backbone), so that neither stage depends on the other's code."""

from __future__ import annotations

import math
import os
from contextlib import contextmanager

import torch


def warmup_linear_decay(total_steps: int, warmup_steps: int):
    """LR multiplier: 0 -> 1 linearly over warm-up, then 1 -> 0 linearly to the last step."""
    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        remaining = max(total_steps - warmup_steps, 1)
        return max(0.0, 1.0 - (step - warmup_steps) / remaining)
    return factor


def warmup_step(warmup_steps: int, steps_per_epoch: int, step_epochs: int, gamma: float):
    """LR multiplier: linear warm-up, then x`gamma` every `step_epochs` epochs (2xCLIP: x0.1
    every 100)."""
    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        return gamma ** (step // (steps_per_epoch * step_epochs))
    return factor


def warmup_cosine(total_steps: int, warmup_steps: int):
    """LR multiplier: linear warm-up, then half a cosine from 1 down to 0."""
    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(total_steps - warmup_steps, 1))
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return factor


@contextmanager
def deterministic(device: torch.device):
    """Deterministic kernels; on CUDA a kernel without a deterministic version warns rather
    than stops a long run (GPU results are reproducible on one GPU model, not bit-equal to
    the CPU's), and cuBLAS gets the fixed workspace its determinism needs."""
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    previous = (torch.are_deterministic_algorithms_enabled(),
                torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
