"""Image preprocessing as a torch module on uint8 tensors, built from open_clip's PreprocessCfg.

open_clip's own inference transform works on PIL images, which an exported
model cannot hold: resize (the shortest side to `size`, or both sides to
`size` for `squash`) with PIL's antialiased bicubic or bilinear filter, then
a centre crop of `size` x `size`, then ToTensor and Normalize. This module
takes the same steps in the same order on uint8 tensors, with the same
output sizes and crop offsets as torchvision computes them, so extraction
and the exported embedder see what open_clip sees (to one grey level, see
`Preprocess`).
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

INTERPOLATIONS = ("bicubic", "bilinear")
# open_clip's third mode, "longest" (fit inside, then pad), is used by no pretrained tag.
RESIZE_MODES = ("shortest", "squash")


class Preprocess(nn.Module):
    """uint8 RGB (N, 3, H, W) -> normalised float (N, 3, size, size), as open_clip's transform.

    Eager calls (extraction) resize with torch's uint8 antialiased kernels,
    a port of PIL's. torch.export cannot trace those with a dynamic image
    size, so the exported program resizes with dense matrices holding the
    same quantised weights, in the same order (horizontal pass, rounding to
    uint8, vertical pass, rounding): the same integers as extraction.
    Against PIL itself both differ by one or two grey levels on a few pixels
    in a thousand (PIL keeps 22 fraction bits in its weights, torch ~14), and
    in `squash` mode by up to ~7 levels at sharp edges where Pillow runs its
    vertical pass first (README: parity with open_clip).
    """

    def __init__(
        self,
        size: int,
        mean: Sequence[float],
        std: Sequence[float],
        interpolation: str = "bicubic",
        resize_mode: str = "shortest",
    ):
        super().__init__()
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation {interpolation!r}: allowed are {list(INTERPOLATIONS)}")
        if resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode {resize_mode!r}: allowed are {list(RESIZE_MODES)}")
        self.size, self.interpolation, self.resize_mode = int(size), interpolation, resize_mode
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("mean", mean_t, persistent=False)
        self.register_buffer("std", std_t, persistent=False)

    @classmethod
    def from_cfg(cls, cfg: dict[str, Any]) -> "Preprocess":
        """From open_clip's preprocess_cfg (a model's `visual.preprocess_cfg`)."""
        size = cfg["size"]
        if not isinstance(size, int):
            if len(set(size)) != 1:
                raise ValueError(f"preprocess size {size}: only square inputs are supported")
            size = size[0]
        if cfg.get("mode", "RGB") != "RGB":
            raise ValueError(f"preprocess mode {cfg['mode']!r}: only RGB is supported")
        return cls(
            size,
            cfg["mean"],
            cfg["std"],
            cfg.get("interpolation", "bicubic"),
            cfg.get("resize_mode", "shortest"),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise TypeError(f"Preprocess takes uint8 images, got {images.dtype}")
        if torch.compiler.is_exporting():
            x = self.resize_exportable(images)
        else:
            x = self.resize_fast(images).float()
        return (x / 255.0 - self.mean) / self.std

    def resize_fast(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 -> uint8 (N, 3, size, size): resize, then centre-crop, in torch's PIL-like
        kernels."""
        h, w = int(images.shape[-2]), int(images.shape[-1])
        (new_h, top), (new_w, left) = _geometry(h, w, self.size, self.resize_mode)
        x = images
        if (new_h, new_w) != (h, w):  # torchvision leaves an image of the target size untouched
            x = F.interpolate(
                images,
                size=(new_h, new_w),
                mode=self.interpolation,
                antialias=True,
                align_corners=False,
            )
        return x[..., top : top + self.size, left : left + self.size]

    def resize_exportable(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 -> float holding integers 0-255: the same resize and crop as dense matrix
        products, which torch.export traces for any H and W (no branch on the size)."""
        h, w = images.shape[-2], images.shape[-1]
        (new_h, top), (new_w, left) = _geometry(h, w, self.size, self.resize_mode)
        rows = resample_matrix(h, new_h, top, self.size, self.interpolation)
        cols = resample_matrix(w, new_w, left, self.size, self.interpolation)
        x = torch.einsum("nchw,pw->nchp", images.float(), cols)
        x = torch.floor(x + 0.5).clamp(0.0, 255.0)  # PIL rounds each pass to uint8, half up
        x = torch.einsum("oh,nchp->ncop", rows, x)
        return torch.floor(x + 0.5).clamp(0.0, 255.0)


def _geometry(h, w, size: int, resize_mode: str):
    """((resized H, crop top), (resized W, crop left)) as torchvision computes them.

    `shortest`: the short side becomes `size`, the long one
    int(size * long / short); `squash`: both become `size`. The crop offset is
    Python's round((resized - size) / 2), which rounds halves to even. Written
    with integer arithmetic only, so it works on torch.export's symbolic sizes.
    """
    if resize_mode == "squash":
        return (size, 0), (size, 0)
    short = torch.sym_min(h, w)
    new_h, new_w = (size * h) // short, (size * w) // short
    return (new_h, _half_to_even(new_h - size)), (new_w, _half_to_even(new_w - size))


def _half_to_even(d):
    """round(d / 2) for an integer d >= 0, halves to even, as Python's round()."""
    half = d // 2
    return half + (d % 2) * (half % 2)


def _kernel(x: torch.Tensor, interpolation: str) -> torch.Tensor:
    """PIL's filters: Keys' cubic (a = -0.5, support 2) and the triangle (support 1)."""
    x = x.abs()
    if interpolation == "bilinear":
        return torch.clamp(1.0 - x, min=0.0)
    a = -0.5
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return torch.where(x <= 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def _weights(n_in, n_resized, positions: torch.Tensor, interpolation: str) -> torch.Tensor:
    """PIL's normalised weights of the resized pixels at `positions` over the `n_in` input pixels.

    Output pixel r of the resized line is centred at (r + 0.5) * scale in the
    input; when shrinking, the kernel widens by the scale (antialiasing);
    weights are normalised over the pixels inside the image. float64, as
    torch computes them: in float32 their rounding to int16 flips now and then.
    """
    in_pos = torch.arange(n_in, dtype=torch.float64) + 0.5
    scale = in_pos.new_ones(()) * n_in / n_resized  # input pixels per resized pixel
    centres = (positions.double() + 0.5) * scale
    weights = _kernel(
        (in_pos[None, :] - centres[:, None]) / torch.clamp(scale, min=1.0), interpolation
    )
    return weights / weights.sum(dim=1, keepdim=True)


def resample_matrix(n_in, n_resized, offset, n_out: int, interpolation: str = "bicubic"):
    """(n_out, n_in) weights: pixels [offset, offset + n_out) of `n_in` resized to `n_resized`.

    The weights are quantised as torch's uint8 resize (extraction) quantises
    them: int16 with as many fraction bits as the largest weight of the whole
    resized line allows (at most 22), so with each pass rounded half up the
    exported program computes the very same integers.
    """
    window = _weights(n_in, n_resized, torch.arange(n_out) + offset, interpolation)
    # torch takes the largest weight of the whole line; the window's rows hold every phase of
    # the kernel a crop needs, and the border rows (the truncated, renormalised kernels) are
    # added. Not the whole line: a 32 x 4096 banner would need a 28672 x 4096 matrix.
    borders = _weights(
        n_in,
        n_resized,
        torch.stack(
            [torch.zeros((), dtype=torch.long), torch.ones((), dtype=torch.long) * (n_resized - 1)]
        ),
        interpolation,
    )
    largest = torch.maximum(window.max(), borders.max())
    bits = torch.clamp(torch.ceil(torch.log2(32767.5 / largest)) - 1, 0, 22)
    unit = torch.pow(2.0, bits)
    return (
        torch.trunc(window * unit + torch.sign(window) * 0.5) / unit
    ).float()  # exact in float32


def decode_rgb(data: bytes) -> torch.Tensor:
    """Image bytes -> uint8 RGB tensor (3, H, W).

    JPEGs (every shard image) go through torchvision's libjpeg-turbo decoder:
    the same pixels as PIL's, in about half the time, which matters when
    decoding shares two cores with the model. Anything else, or a JPEG that
    decoder refuses, goes through PIL (and its error messages).
    """
    if data[:3] == b"\xff\xd8\xff":
        try:
            return decode_jpeg(
                torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB
            )
        except RuntimeError:
            pass
    with Image.open(io.BytesIO(data)) as im:
        arr = np.asarray(im.convert("RGB"))
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)
