"""Bring any image file to an upright 8-bit RGB JPEG, or say precisely why it can't be.

Real datasets hold CMYK JPEGs, 16-bit PNGs, palette images with
transparency, truncated downloads and empty files. Each is converted or
rejected with a reason; none crashes a stage and none vanishes silently.
Phone and camera photos store their pixels as the sensor saw them and an
EXIF orientation tag saying how to display them; the tag is applied here,
so shards (whose JPEGs carry no tag) and the embedder see what a person sees.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import ExifTags, Image, ImageFile, ImageOps

# A truncated file is an error to record, not an image to pad with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False


# File endings treated as images when a folder is walked (user folders, embed CLI).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})


# Where PIL keeps metadata that may hold an orientation (EXIF block, PNG text, XMP).
_METADATA_KEYS = ("exif", "Raw profile type exif", "XML:com.adobe.xmp", "xmp")


class BadImage(ValueError):
    """The bytes are not a usable image; str(exc) is the reason recorded in rejects."""


def _to_rgb(im: Image.Image) -> tuple[Image.Image, str | None]:
    """Convert any PIL mode to 8-bit RGB; returns the image and what was converted, if anything."""
    mode = im.mode
    if mode == "RGB":
        return im, None
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        im8 = Image.fromarray(np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
        return im8.convert("RGB"), f"{mode} to 8-bit RGB"
    if mode == "P" and "transparency" in im.info:
        im, mode = im.convert("RGBA"), "P+alpha"
    if im.mode in ("RGBA", "LA", "PA", "RGBa"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB"), f"{mode} composited on white"
    return im.convert("RGB"), f"{mode} to RGB"


def _upright(im: Image.Image) -> tuple[Image.Image, str | None]:
    """Apply the EXIF orientation tag (2..8); returns the image and a note if it turned.

    Decoders hand over the stored pixels, and browsers, phones and viewers
    show them turned by the tag; an unreadable or out-of-range tag is shown
    as stored by them, so it is here too.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Corrupt EXIF data": shown as stored
        orientation = im.getexif().get(ExifTags.Base.Orientation)
    if orientation not in range(2, 9):
        return im, None
    # exif_transpose rewrites the metadata it finds without the tag, and a hostile
    # block (a tag of the wrong type) fails that rewrite; the JPEG written from
    # here carries no metadata, so it is given the orientation alone.
    only_tag = Image.Exif()
    only_tag[ExifTags.Base.Orientation] = int(orientation)
    for key in _METADATA_KEYS:
        im.info.pop(key, None)
    im.info["exif"] = only_tag.tobytes()
    return ImageOps.exif_transpose(im), f"EXIF orientation {int(orientation)} applied"


def normalize_image(data: bytes, max_side: int, quality: int) -> tuple[bytes, str | None]:
    """Return (JPEG bytes, conversion note or None); raise BadImage with a reason.

    An upright RGB JPEG that already fits is passed through byte for byte, so
    shards don't add a second round of compression to what the source
    published; one with an orientation tag is turned and re-encoded without it.
    """
    if not data:
        raise BadImage("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            fmt, size = im.format, im.size
            if fmt == "JPEG":
                im.draft(im.mode, (max_side, max_side))  # decode huge JPEGs at reduced scale
            im.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadImage(f"image too large to decode safely: {exc}") from None
    except Image.UnidentifiedImageError:
        # Pillow's own message names the buffer's memory address: a reason that differed
        # on every run would make rejects.parquet (a DVC output) change for nothing.
        raise BadImage("corrupt or truncated image: not a format Pillow can identify") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadImage(f"corrupt or truncated image: {exc}") from None
    if min(size) < 1:
        raise BadImage(f"degenerate size {size}")
    im, turned = _upright(im)
    if fmt == "JPEG" and im.mode == "RGB" and max(size) <= max_side and turned is None:
        return data, None
    rgb, note = _to_rgb(im)
    note = "; ".join(filter(None, [note, turned])) or None
    if max(rgb.size) > max_side:
        rgb.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        note = "; ".join(filter(None, [note, f"downscaled from {size[0]}x{size[1]}"]))
    out = io.BytesIO()
    rgb.save(out, format="JPEG", quality=quality)
    return out.getvalue(), note or f"{fmt} re-encoded as JPEG"
