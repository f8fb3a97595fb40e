"""Seeded random views of one photo: the copy-detection way to make many images of one object.

Parameters are drawn from a numpy Generator seeded per (photo, view), so a
view is the same in every thread, whatever else draws random numbers.

Every view shows its object. A view that is mostly black fill (what a
perspective or a rotation leaves outside the photo), plain backdrop, painted
occluder or empty sky shows little of it, and retrieving it measures noise
more than the model; so the content statistic below, the share of "flat"
pixels, both places each crop and checks each finished view. The
perspective, the rotation and the crop are one projective map: the crop is
drawn among the windows of the transformed photo that are all photo and
mostly content, and the map is applied once, straight from the photo to the
view (much cheaper than transforming the whole photo twice).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageFilter
from torchvision.transforms.v2 import functional as F

# A pixel is flat when the grey levels of the square around it (FLAT_WINDOW of
# the image's shorter side: 9x9 in a 256 px view) vary by less than FLAT_REL of
# the whole image's standard deviation, or by less than FLAT_ABS grey levels
# (0-255). Relative, so that a darker or low-contrast view of the same content
# (the colour jitter may halve both) is not called flat.
FLAT_WINDOW = 9 / 256
FLAT_REL = 0.05
FLAT_ABS = 1.0
# A view may be at most this flat: "mostly" flat is over half.
MAX_FLAT_VIEW = 0.5


def window_sums(values: np.ndarray, kh: int, kw: int) -> np.ndarray:
    """Sum of `values` over every kh x kw window (top-left anchored), from one integral image."""
    s = np.zeros((values.shape[0] + 1, values.shape[1] + 1), dtype=values.dtype)
    s[1:, 1:] = values.cumsum(0).cumsum(1)
    return s[kh:, kw:] - s[:-kh, kw:] - s[kh:, :-kw] + s[:-kh, :-kw]


def flat_map(grey: np.ndarray, reference_std: float | None = None,
             window: int | None = None) -> np.ndarray:
    """True where a pixel of `grey` (uint8, H x W) is flat; same shape.

    The square is `window` pixels wide (default FLAT_WINDOW of the shorter
    side) and the relative limit is taken of `reference_std` (default the
    image's own). Sums are exact integers, so the map is the same on every
    machine; edge pixels take the nearest full window's value.
    """
    g = grey.astype(np.int64)
    k = window or round(FLAT_WINDOW * min(g.shape))
    k = max(3, min(k | 1, *g.shape))  # odd, so the window has a centre
    n = k * k
    if reference_std is None:
        reference_std = float(g.std())
    limit = max(FLAT_ABS, FLAT_REL * reference_std)
    s1, s2 = window_sums(g, k, k), window_sums(g * g, k, k)
    flat = (n * s2 - s1 * s1) < (limit * n) ** 2  # n^2 * variance, exact
    top = (k - 1) // 2
    return np.pad(flat, ((top, k - 1 - top), (top, k - 1 - top)), mode="edge")


def flat_fraction(img: Image.Image) -> float:
    """Share of an image's pixels that are flat: 0 for a textured photo, 1 for a blank one.

    Every view the download stage writes stays at or below MAX_FLAT_VIEW (a
    flatter one is drawn again; tests/test_views.py checks the default's photos).
    """
    return float(flat_map(np.asarray(img.convert("L"))).mean())


# A crop's share of pixels inside the transformed photo, at least: all of them.
MIN_VALID = 1.0
# A crop's share of flat pixels, at most, when placed; occluders add at most MAX_OCCLUDED.
MAX_FLAT_CROP = 0.25
MAX_OCCLUDED = 0.25
# A view flatter than MAX_FLAT_VIEW is drawn again, at most this many times in all.
MAX_DRAWS = 8
# The crop is placed on a copy of the transformed photo about this many pixels wide.
PLACEMENT_SIDE = 192


def view_rng(seed: int, label: str, index: int) -> np.random.Generator:
    """A generator that depends only on (seed, photo label, view index)."""
    label_code = [b for b in label.encode("utf-8")]
    return np.random.default_rng([seed, index, *label_code])


class NoContent(ValueError):
    """Every draw of a view was mostly flat: the photo is mostly backdrop, sky or blank."""


def random_view(photo: Image.Image, rng: np.random.Generator, size: int) -> bytes:
    """One strong random view with content, as the JPEG the catalog stores: perspective,
    rotation, small crop, flip, colour, blur, occlusion, JPEG noise.

    Strong on purpose: with mild views an ImageNet backbone already retrieves
    almost perfectly (about 0.97 mP@5) and there is nothing left to learn. A
    view flatter than MAX_FLAT_VIEW (checked on the JPEG's own pixels) is
    drawn again from the same generator, so it still depends on nothing but
    the seed; after MAX_DRAWS flat draws NoContent is raised.
    """
    img = photo.convert("RGB")
    flats = []
    for _ in range(MAX_DRAWS):
        jpeg, view = _draw_view(img, rng, size)
        flats.append(flat_fraction(view))
        if flats[-1] <= MAX_FLAT_VIEW:
            return jpeg
    raise NoContent(f"{MAX_DRAWS} draws of a view were all mostly flat (the least "
                    f"{min(flats):.0%} > {MAX_FLAT_VIEW:.0%}): too little content for its crops")


def _draw_view(img: Image.Image, rng: np.random.Generator, size: int) -> tuple[bytes, Image.Image]:
    """One draw of every transform's parameters from `rng`, applied to an RGB `img`: the JPEG
    and its decoded pixels."""
    img = geometric_view(img, rng, size)
    if rng.random() < 0.5:
        img = F.horizontal_flip(img)
    img = F.adjust_brightness(img, float(rng.uniform(0.5, 1.5)))
    img = F.adjust_contrast(img, float(rng.uniform(0.5, 1.5)))
    img = F.adjust_saturation(img, float(rng.uniform(0.3, 1.7)))
    img = F.adjust_hue(img, float(rng.uniform(-0.12, 0.12)))
    if rng.random() < 0.25:
        img = F.rgb_to_grayscale(img, num_output_channels=3)
    if rng.random() < 0.4:
        img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 2.5))))
    if rng.random() < 0.5:
        img = _occlude(img, rng)
    return _jpeg(img, int(rng.integers(30, 91)))


def geometric_view(img: Image.Image, rng: np.random.Generator, size: int) -> Image.Image:
    """The perspective, rotation and crop of a view (the first draws from `rng`), size x size.

    The crop lies inside the transformed photo, so the view has no black fill.
    """
    w, h = img.size
    to_photo = np.eye(3)  # maps a point of the transformed canvas to the photo
    if rng.random() < 0.9:
        to_photo = _perspective(w, h, rng.uniform(0.2, 0.6), rng)
    to_photo = to_photo @ _rotation(float(rng.uniform(-45, 45)), w, h)
    # Crop 6-35% of the area: two views of one photo often share little content.
    area = rng.uniform(0.06, 0.35)
    ratio = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
    top, left, ch, cw = content_crop(img, to_photo, area, ratio, rng)
    # Render at twice the size and halve it: the map shrinks parts of the photo, and
    # the extra samples keep them from aliasing (bilinear so: bicubic costs twice as much).
    crop = np.array([[cw / (2 * size), 0, left], [0, ch / (2 * size), top], [0, 0, 1]])
    return _warp(img, to_photo @ crop, (2 * size, 2 * size), Image.Resampling.BILINEAR).reduce(2)


def _perspective(w: int, h: int, strength: float, rng: np.random.Generator) -> np.ndarray:
    """The map from the tilted canvas to the photo: corners moved inward by up to `strength`/2."""
    start = np.array([[0, 0], [w - 1, 0], [w - 1, h - 1], [0, h - 1]], dtype=np.float64)
    jitter = rng.uniform(0, 1, size=(4, 2)) * [strength * w / 2, strength * h / 2]
    signs = np.array([[1, 1], [-1, 1], [-1, -1], [1, -1]])
    end = (start + signs * jitter).round()
    rows, rhs = [], []
    for (xs, ys), (xe, ye) in zip(start, end):
        rows += [[xe, ye, 1, 0, 0, 0, -xs * xe, -xs * ye],
                 [0, 0, 0, xe, ye, 1, -ys * xe, -ys * ye]]
        rhs += [xs, ys]
    return np.append(np.linalg.solve(np.array(rows), np.array(rhs)), 1.0).reshape(3, 3)


def _rotation(degrees: float, w: int, h: int) -> np.ndarray:
    """The map from the canvas turned by `degrees` (anticlockwise, about its centre) back."""
    t = np.radians(degrees)
    cx, cy = w / 2, h / 2
    turn = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    back = np.array([[1, 0, cx], [0, 1, cy], [0, 0, 1]])
    there = np.array([[1, 0, -cx], [0, 1, -cy], [0, 0, 1]])
    return back @ turn @ there


def _warp(img: Image.Image, out_to_in: np.ndarray, size: tuple[int, int],
          resample: Image.Resampling) -> Image.Image:
    """`img` seen through a projective map from output pixels to input pixels (black outside)."""
    m = out_to_in / out_to_in[2, 2]
    return img.transform(size, Image.Transform.PERSPECTIVE, tuple(m.flatten()[:8]), resample)


def content_crop(img: Image.Image, to_photo: np.ndarray, area: float, ratio: float,
                 rng: np.random.Generator) -> tuple[float, float, float, float]:
    """(top, left, height, width), on the transformed canvas, of a crop of `area` (share of the
    canvas) and aspect `ratio` that lies inside the photo and is not mostly flat.

    The canvas is rendered small (PLACEMENT_SIDE) with a mask of where it shows
    the photo; the position is drawn uniformly among the windows that qualify,
    with one draw from `rng` whatever the photo. Where no window of that size
    qualifies (a narrow photo after a strong tilt, a small object on a
    backdrop) the crop shrinks; where none does at all, the least flat window
    inside the photo is taken (and the view's own check may draw again).
    """
    w, h = img.size
    scale = max(1.0, max(w, h) / PLACEMENT_SIDE)
    sw, sh = max(1, round(w / scale)), max(1, round(h / scale))
    small = np.diag([scale, scale, 1.0])
    to_small_photo = np.diag([1 / scale, 1 / scale, 1.0]) @ to_photo @ small
    grey = img.convert("L").resize((sw, sh), Image.Resampling.BOX)
    canvas = np.asarray(_warp(grey, to_small_photo, (sw, sh), Image.Resampling.BILINEAR))
    # where the canvas shows the photo, less a pixel of margin for the small scale
    inside = np.asarray(_warp(Image.new("L", (sw, sh), 255), to_small_photo, (sw, sh),
                              Image.Resampling.BILINEAR).filter(ImageFilter.MinFilter(3))) == 255
    # flat as the view's check will see it: against the photo's own contrast, with the
    # window the crop will have once resized to the view
    window = round(FLAT_WINDOW * np.sqrt(area * sw * sh))
    flat = flat_map(canvas, float(canvas[inside].std()) if inside.any() else None, window)
    flat |= ~inside
    inside_i, flat_i = inside.astype(np.int64), flat.astype(np.int64)
    u = float(rng.random())  # the one draw for the position
    fallback: tuple[tuple[bool, float], tuple[float, ...]] | None = None
    for shrink in (1.0, 0.7, 0.5, 0.35, 0.25):
        kw = max(1, min(sw, round(np.sqrt(area * shrink * sw * sh * ratio))))
        kh = max(1, min(sh, round(np.sqrt(area * shrink * sw * sh / ratio))))
        inside_share = window_sums(inside_i, kh, kw) / (kh * kw)
        flat_share = window_sums(flat_i, kh, kw) / (kh * kw)
        within = inside_share >= MIN_VALID
        ok = np.flatnonzero(within & (flat_share <= MAX_FLAT_CROP))
        if ok.size:
            pick = int(ok[min(int(u * ok.size), ok.size - 1)])
        else:  # the least flat window inside the photo; failing that, the most inside one
            pick = int(np.argmin(np.where(within, flat_share, 2.0 - inside_share)))
        top, left = divmod(pick, flat_share.shape[1])
        found = (top * scale, left * scale, kh * scale, kw * scale)
        if ok.size:
            return found
        rank = (not within.flat[pick], float(flat_share.flat[pick] if within.flat[pick]
                                              else -inside_share.flat[pick]))
        if fallback is None or rank < fallback[0]:
            fallback = (rank, found)
    return fallback[1]


def _occlude(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Paint 1-3 rectangles of 5-20% of the area in random colours (occluders).

    A rectangle that would take the painted share past MAX_OCCLUDED is drawn
    but not painted: the view keeps most of its content.
    """
    arr = np.array(img)
    h, w = arr.shape[:2]
    painted = np.zeros((h, w), dtype=bool)
    for _ in range(int(rng.integers(1, 4))):
        a = rng.uniform(0.05, 0.2) * w * h
        rw = int(min(w, np.sqrt(a) * rng.uniform(0.6, 1.6)))
        rh = int(min(h, a / max(rw, 1)))
        y, x = int(rng.integers(0, h - rh + 1)), int(rng.integers(0, w - rw + 1))
        colour = rng.integers(0, 256, size=3)
        union = painted.copy()
        union[y:y + rh, x:x + rw] = True
        if union.mean() <= MAX_OCCLUDED:
            painted = union
            arr[y:y + rh, x:x + rw] = colour
    return Image.fromarray(arr)


def _jpeg(img: Image.Image, quality: int) -> tuple[bytes, Image.Image]:
    """`img` encoded as JPEG at `quality`, and the pixels that file decodes to."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    with Image.open(io.BytesIO(buf.getvalue())) as out:
        return buf.getvalue(), out.convert("RGB")
