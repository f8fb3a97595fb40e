"""Seeded random views of one photo: the copy-detection way to make many images of one object.

Parameters are drawn from a numpy Generator seeded per (photo, view) and
applied with torchvision's functional transforms, so a view is the same on
every machine and in every thread, whatever else draws random numbers.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F


def view_rng(seed: int, label: str, index: int) -> np.random.Generator:
    """A generator that depends only on (seed, photo label, view index)."""
    label_code = [b for b in label.encode("utf-8")]
    return np.random.default_rng([seed, index, *label_code])


def _perspective_points(w: int, h: int, strength: float, rng: np.random.Generator) -> tuple[list, list]:
    dx, dy = strength * w / 2, strength * h / 2
    start = [[0, 0], [w - 1, 0], [w - 1, h - 1], [0, h - 1]]
    jitter = rng.uniform(0, 1, size=(4, 2)) * [dx, dy]
    signs = np.array([[1, 1], [-1, 1], [-1, -1], [1, -1]])
    end = (np.array(start) + signs * jitter).round().astype(int).tolist()
    return start, end


def random_view(photo: Image.Image, rng: np.random.Generator, size: int) -> Image.Image:
    """One strong random view: perspective, rotation, crop, flip, colour, blur.

    Strong on purpose: with mild views a pretrained backbone already retrieves
    almost perfectly and there is nothing left for the head to learn.
    """
    img = photo.convert("RGB")
    w, h = img.size
    if rng.random() < 0.8:
        start, end = _perspective_points(w, h, rng.uniform(0.1, 0.5), rng)
        img = F.perspective(img, start, end, interpolation=InterpolationMode.BILINEAR)
    img = F.rotate(img, float(rng.uniform(-30, 30)), interpolation=InterpolationMode.BILINEAR)
    # Crop 15-60% of the area: different views of one photo overlap only partly.
    area = rng.uniform(0.15, 0.6) * w * h
    ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    cw = int(min(w, round(np.sqrt(area * ratio))))
    ch = int(min(h, round(np.sqrt(area / ratio))))
    top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    img = F.resized_crop(img, top, left, ch, cw, [size, size], interpolation=InterpolationMode.BICUBIC,
                         antialias=True)
    if rng.random() < 0.5:
        img = F.horizontal_flip(img)
    img = F.adjust_brightness(img, float(rng.uniform(0.6, 1.4)))
    img = F.adjust_contrast(img, float(rng.uniform(0.6, 1.4)))
    img = F.adjust_saturation(img, float(rng.uniform(0.5, 1.5)))
    img = F.adjust_hue(img, float(rng.uniform(-0.08, 0.08)))
    if rng.random() < 0.2:
        img = F.rgb_to_grayscale(img, num_output_channels=3)
    if rng.random() < 0.3:
        img = F.gaussian_blur(img, kernel_size=5, sigma=float(rng.uniform(0.3, 1.5)))
    return img
