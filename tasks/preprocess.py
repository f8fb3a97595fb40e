"""Image preprocessing as a torch module on uint8 tensors, built from open_clip's PreprocessCfg.

open_clip's own transform works on PIL images, which an exported model
cannot hold. This module does the same steps (resize the shortest side,
centre-crop, scale, normalise) on tensors, so extraction and the exported
embedder run literally the same code and agree to float precision.
"""

from __future__ import annotations

import io
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.io import ImageReadMode, decode_jpeg

_MODES = {"bicubic": "bicubic", "bilinear": "bilinear"}


class Preprocess(nn.Module):
    """uint8 RGB images (N, 3, H, W) -> normalised float (N, 3, size, size)."""

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float], interpolation: str = "bicubic",
                 resize_mode: str = "shortest"):
        super().__init__()
        if interpolation not in _MODES:
            raise ValueError(f"interpolation {interpolation!r}: allowed are {sorted(_MODES)}")
        if resize_mode not in ("shortest", "squash"):
            raise ValueError(f"resize_mode {resize_mode!r}: allowed are 'shortest' and 'squash'")
        # Bicubic (Keys, a = -0.5) for both: bilinear configs are rare and the difference is small.
        self.size, self.resize_mode = int(size), resize_mode
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_cfg(cls, cfg: dict[str, Any]) -> "Preprocess":
        size = cfg["size"] if isinstance(cfg["size"], int) else cfg["size"][0]
        return cls(size, cfg["mean"], cfg["std"], cfg.get("interpolation", "bicubic"), cfg.get("resize_mode", "shortest"))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_exporting():
            x = self.resize_exportable(images.float() / 255.0)
        else:
            x = self.resize_fast(images)
        # PIL clamps bicubic overshoot when it writes uint8; do the same.
        return (x.clamp(0.0, 1.0) - self.mean) / self.std

    def resize_fast(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 or [0, 1] float -> [0, 1] float: torch's antialiased bicubic on the crop: the same kernel and weights
        as `resize_exportable` (equal to ~1e-5), several times faster on large
        images because it skips the zero weights; used in eager mode (extraction)."""
        h, w = x.shape[-2], x.shape[-1]
        if self.resize_mode == "shortest":
            short = min(h, w)
            top, left = (h - short) // 2, (w - short) // 2
            x = x[..., top:top + short, left:left + short]  # crop first: fewer pixels to convert
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
        return F.interpolate(x, size=(self.size, self.size), mode="bicubic", antialias=True, align_corners=False)

    def resize_exportable(self, x: torch.Tensor) -> torch.Tensor:
        """The resize as two dense matrix products, for torch.export (dynamic H, W)."""
        h, w = x.shape[-2], x.shape[-1]
        if self.resize_mode == "squash":
            rows, cols = resample_matrix(h, 0, h, self.size), resample_matrix(w, 0, w, self.size)
        else:
            # The centre square of side min(H, W), resampled to size x size: the
            # view "resize the shortest side, centre-crop" gives.
            short = torch.sym_min(h, w)
            rows = resample_matrix(h, (h - short) // 2, short, self.size)
            cols = resample_matrix(w, (w - short) // 2, short, self.size)
        return torch.einsum("oh,nchw,pw->ncop", rows, x, cols)


def _cubic(d: torch.Tensor, a: float = -0.5) -> torch.Tensor:
    """Keys' cubic convolution kernel (a = -0.5, as PIL's bicubic)."""
    d = d.abs()
    near = ((a + 2) * d - (a + 3)) * d * d + 1
    far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
    return torch.where(d <= 1, near, torch.where(d < 2, far, torch.zeros_like(d)))


def resample_matrix(n_in, start, length, n_out: int) -> torch.Tensor:
    """(n_out, n_in) weights that resample pixels [start, start + length) to n_out, antialiased.

    The resize is written as two small matrix products instead of
    `F.interpolate` + slicing: no branch depends on the image size, so one
    exported program serves every H and W, and downscaling widens the kernel
    (antialiasing) the way PIL does.
    """
    out_pos = torch.arange(n_out, dtype=torch.float32)
    in_pos = torch.arange(n_in, dtype=torch.float32) + 0.5
    scale = out_pos.new_ones(()) * length / n_out  # source pixels per output pixel
    support = torch.clamp(scale, min=1.0)
    centres = start + (out_pos + 0.5) * scale
    weights = _cubic((in_pos[None, :] - centres[:, None]) / support)
    inside = (in_pos >= start) & (in_pos < start + length)
    weights = weights * inside[None, :]
    return weights / weights.sum(dim=1, keepdim=True)


def decode_rgb(data: bytes) -> torch.Tensor:
    """Image bytes -> uint8 RGB tensor (3, H, W).

    JPEGs (every shard image) go through torchvision's libjpeg-turbo decoder:
    the same pixels as PIL's, in about half the time, which matters when
    decoding shares two cores with the model. Anything else, or a JPEG that
    decoder refuses, goes through PIL (and its error messages).
    """
    if data[:3] == b"\xff\xd8\xff":
        try:
            return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except RuntimeError:
            pass
    with Image.open(io.BytesIO(data)) as im:
        arr = np.asarray(im.convert("RGB"))
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)
