"""Views with content (issue 12): the flat-pixel statistic, crops inside the photo, and the views
the download stage writes for the default's own photos."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import yaml
from PIL import Image
from torchvision.transforms.v2 import functional as F

from conftest import REPO
from tasks.download import render_photo_views
from tasks.photos import Photo, find_photos, photo_dirs
from tasks.views import (MAX_FLAT_VIEW, NoContent, flat_fraction, geometric_view, random_view,
                         view_rng)

SPEC = yaml.safe_load((REPO / "params.yaml").read_text())["sources"]["package_photos"]


def noise(h: int, w: int, low: int = 0, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(low, 256, size=(h, w, 3), dtype=np.uint8))


def test_flat_fraction_tells_fill_and_backdrop_from_content():
    textured = noise(128, 128)
    assert flat_fraction(textured) == 0.0
    assert flat_fraction(Image.new("RGB", (128, 128), (40, 90, 200))) == 1.0
    dim = Image.fromarray((np.asarray(textured) // 8 + 100).astype(np.uint8))
    assert flat_fraction(dim) == 0.0  # a dark, low-contrast view of content is still content
    # what a crop into a turned photo's corner used to give: mostly black fill
    turned = F.rotate(noise(256, 256), 45.0)
    corner = np.asarray(turned.crop((0, 0, 64, 64)))
    black = (corner.max(-1) == 0).mean()
    assert flat_fraction(Image.fromarray(corner)) == pytest.approx(black, abs=0.05)
    assert flat_fraction(Image.fromarray(corner)) > MAX_FLAT_VIEW


@pytest.mark.parametrize("h, w", [(577, 768), (768, 400), (192, 144)])
def test_crops_lie_inside_the_turned_and_tilted_photo(h, w):
    """No view shows the black the perspective and the rotation leave outside the photo."""
    photo = noise(h, w, low=100, seed=h)
    for i in range(100):
        view = np.asarray(geometric_view(photo, view_rng(0, "x", i), 64))
        assert view.min() >= 100, f"view {i} shows fill"


def test_views_are_the_same_in_any_thread():
    photo = noise(300, 400, seed=3)
    serial = [random_view(photo, view_rng(7, "p", i), 96) for i in range(8)]
    with ThreadPoolExecutor(4) as pool:
        threaded = list(pool.map(lambda i: random_view(photo, view_rng(7, "p", i), 96), range(8)))
    assert threaded == serial and len(set(serial)) == 8


def test_a_small_object_on_a_backdrop_is_left_out(tmp_path):
    backdrop = Image.new("RGB", (400, 300), "white")
    backdrop.paste(noise(12, 12), (200, 150))
    with pytest.raises(NoContent):
        random_view(backdrop, view_rng(0, "dot", 0), 128)
    path = tmp_path / "dot.png"
    backdrop.save(path)
    rows, skips = render_photo_views(Photo("pkg-dot", path), tmp_path / "out", 4, 128, 0)
    assert rows == [] and [s.label for s in skips] == ["pkg-dot"] and "flat" in skips[0].reason
    assert not (tmp_path / "out").exists()  # none of its views was written


@pytest.fixture(scope="module")
def default_photos() -> list[Photo]:
    return find_photos(photo_dirs(), SPEC["exclude"], SPEC["duplicate_threshold"])


def check_written_views(photos: list[Photo], root, views: int) -> list[str]:
    """Render as the download stage does; every file it writes must pass. Returns the skipped."""
    skipped = []
    for photo in photos:
        rows, skips = render_photo_views(photo, root, views, SPEC["max_side"], SPEC["seed"])
        skipped += [s.label for s in skips]
        assert len(rows) in (0, views)
        for row in rows:
            with Image.open(root / row["path"]) as view:
                flat = flat_fraction(view)
            assert flat <= MAX_FLAT_VIEW, f"{row['path']}: {flat:.0%} flat"
    return skipped


def test_first_view_of_every_default_photo_has_content(default_photos, tmp_path):
    skipped = check_written_views(default_photos, tmp_path, 1)
    # only photos that are mostly backdrop are left out (a product on white, a blank slate)
    assert len(skipped) <= 0.05 * len(default_photos), skipped


def test_every_view_of_a_representative_set_has_content(default_photos, tmp_path):
    """Every 10th default photo and the ones closest to the limit, all their views."""
    hardest = {"gcompris-measuringTape1", "gcompris-nailCutter", "gcompris-northern_harrier",
               "gcompris-windmill6", "gcompris-dolphin", "opencv-building", "sklearn-flower"}
    chosen = default_photos[::10] + [p for p in default_photos if p.label in hardest]
    check_written_views(chosen, tmp_path, SPEC["views"])
