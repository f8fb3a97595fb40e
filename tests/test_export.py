"""The tensor preprocessing matches open_clip's, and the exported embedder reproduces the
pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data
import torch
from open_clip.transform import image_transform
from PIL import Image

from tasks.export import Embedder, embed_images, export_embedder, load_exported
from tasks.features import l2_normalize
from tasks.heads import build_head
from tasks.backbone import load_backbone
from tasks.preprocess import Preprocess
from tasks.heads import embed_with_head

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
SHAPES = [(96, 96), (90, 140), (140, 90), (20, 30), (512, 384), (64, 64), (300, 50), (65, 700)]


def _photo(h: int, w: int) -> Image.Image:
    return Image.fromarray(skimage.data.astronaut()).resize((w, h), Image.BICUBIC)


@pytest.mark.parametrize("mode", ["shortest", "squash"])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_tensor_preprocess_follows_open_clips_transform(mode, interpolation):
    """open_clip's PIL transform is the reference: resize, centre crop (or squash), normalise."""
    ref_transform = image_transform(64, is_train=False, mean=MEAN, std=STD, resize_mode=mode,
                                    interpolation=interpolation)
    ours = Preprocess(64, MEAN, STD, interpolation, mode)
    std = torch.tensor(STD).view(3, 1, 1)
    for h, w in SHAPES:
        image = _photo(h, w)
        ref = ref_transform(image)
        pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)[None]
        eager = ours(pixels)[0]
        exportable = (ours.resize_exportable(pixels)[0] / 255.0 - ours.mean[0]) / ours.std[0]
        for got in (eager, exportable):
            levels = ((got - ref) * std * 255).abs()
            # PIL rounds its weights finer than torch and picks the order of its passes itself
            # (README: parity with open_clip); the mean shows how rare a difference is.
            assert levels.max() <= (2.01 if mode == "shortest" else 8.01), (h, w)
            assert levels.mean() < (0.02 if mode == "shortest" else 0.3), (h, w)


@pytest.mark.parametrize("mode", ["shortest", "squash"])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_exportable_resize_computes_the_integers_extraction_computes(mode, interpolation):
    pre = Preprocess(64, MEAN, STD, interpolation, mode)
    for h, w in SHAPES:
        x = torch.from_numpy(np.asarray(_photo(h, w)).copy()).permute(2, 0, 1)[None]
        eager, exportable = pre.resize_fast(x).float(), pre.resize_exportable(x)
        assert eager.shape == exportable.shape == (1, 3, 64, 64)
        assert (eager - exportable).abs().max() <= 1 and (eager != exportable).float().mean() < 1e-3


@pytest.mark.parametrize("interpolation, mode", [("bicubic", "shortest"), ("bilinear", "squash")])
def test_exported_preprocessing_equals_its_eager_form_for_any_size(interpolation, mode):
    pre = Preprocess(64, MEAN, STD, interpolation, mode)
    example = torch.randint(0, 256, (2, 3, 50, 70), dtype=torch.uint8)
    program = torch.export.export(pre, (example,), dynamic_shapes=(
        {0: torch.export.Dim("n", max=64), 2: torch.export.Dim("h", min=16, max=4096),
         3: torch.export.Dim("w", min=16, max=4096)},)).module()
    for h, w in SHAPES[:-2] + [(17, 900)]:
        if min(h, w) < 16:
            continue
        x = torch.from_numpy(np.asarray(_photo(h, w)).copy()).permute(2, 0, 1)[None]
        expected = (pre.resize_exportable(x) / 255.0 - pre.mean) / pre.std
        assert torch.allclose(program(x), expected, atol=1e-5), (h, w)


def test_preprocess_refuses_what_open_clip_would_do_otherwise():
    with pytest.raises(ValueError, match="resize_mode 'longest'"):
        Preprocess(64, MEAN, STD, resize_mode="longest")
    with pytest.raises(ValueError, match="interpolation 'nearest'"):
        Preprocess(64, MEAN, STD, interpolation="nearest")
    with pytest.raises(TypeError, match="uint8"):
        Preprocess(64, MEAN, STD)(torch.zeros(1, 3, 8, 8))


def test_exported_embedder_equals_pipeline_and_loads_with_plain_torch(tmp_path, tiny_backbone):
    model, preprocess, _ = load_backbone(tiny_backbone)
    torch.manual_seed(0)
    head = build_head("multi_dropout", 32, 8, dropout=0.3, branches=2).eval()
    embedder = Embedder([(preprocess, model.visual), (preprocess, model.visual)], head)
    export_embedder(embedder, tmp_path / "e.pt2",
                    torch.randint(0, 256, (2, 3, 40, 50), dtype=torch.uint8))
    loaded = torch.export.load(str(tmp_path / "e.pt2")).module()  # plain torch, no project code

    rng = np.random.default_rng(0)
    images = [torch.from_numpy(rng.integers(0, 256, size=(3, h, w), dtype=np.uint8)) for h, w in
              [(32, 32), (48, 20), (100, 64), (32, 32)]]
    # the pipeline's path: per-backbone features, normalised, concatenated, head
    with torch.no_grad():
        stored = np.concatenate([model.encode_image(preprocess(img[None])).numpy()
                                 for img in images])
    pipeline = embed_with_head(head, np.concatenate([l2_normalize(stored)] * 2, axis=1))
    got = embed_images(load_exported(tmp_path / "e.pt2"), images)
    assert got.shape == (4, 8) and got.dtype == np.float32
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert np.abs(got - pipeline).max() <= 1e-3
    with torch.no_grad():
        batch = loaded(torch.stack([images[0], images[3]]))
    assert torch.allclose(batch, torch.from_numpy(got[[0, 3]]), atol=1e-5)


def test_embed_cli_indexes_a_folder_and_searches_it(tmp_path, tiny_backbone, capsys):
    from flows.embed import main
    from conftest import make_imagefolder

    model, preprocess, _ = load_backbone(tiny_backbone)
    head = build_head("dropout_linear", 16, 8, dropout=0.0).eval()
    export_embedder(Embedder([(preprocess, model.visual)], head), tmp_path / "e.pt2",
                    torch.randint(0, 256, (2, 3, 40, 50), dtype=torch.uint8))
    folder = make_imagefolder(tmp_path / "photos", classes=3, per_class=2, size=(40, 30))
    (folder / "class_00" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really")
    assert main(["--model", str(tmp_path / "e.pt2"), "index", str(folder),
                 "--out", str(tmp_path / "i.parquet")]) == 0
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "i.parquet")
    assert table.num_rows == 6 and table.schema.field("embedding").type.list_size == 8
    assert "skipped class_00/broken.jpg" in capsys.readouterr().err
    query = folder / "class_02" / "img_001.jpg"
    assert main(["--model", str(tmp_path / "e.pt2"), "search", str(query),
                 "--index", str(tmp_path / "i.parquet"), "-k", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3
    rank, dist, path = lines[0].split("\t")
    assert path == "class_02/img_001.jpg" and float(dist) < 1e-3  # an image finds itself first


def test_export_refuses_a_backbone_its_features_did_not_come_from(in_tmp):
    """export depends on every variant's features, not on the fine-tuned or soup folders:
    it checks the weights it loads are the ones the features were embedded with."""
    from flows.export import check_same_weights
    from tasks.schemas.features import write_features
    from tasks.schemas.paths import FEATURES_DIR

    meta = {"dim": "2", "model_name": "m", "pretrained": "", "checkpoint_sha256": "a" * 64,
            "image_size": "8"}
    write_features(FEATURES_DIR / "soup" / "query" / "query-000000.arrow", ["k"],
                   np.array([1]), np.ones((1, 2), np.float32), meta)
    check_same_weights("soup", {"checkpoint_sha256": "a" * 64})
    with pytest.raises(ValueError, match="rerun extract@soup"):
        check_same_weights("soup", {"checkpoint_sha256": "b" * 64})
    with pytest.raises(FileNotFoundError, match="no features of 'other'"):
        check_same_weights("other", {"checkpoint_sha256": "a" * 64})
