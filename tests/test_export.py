"""The tensor preprocessing matches open_clip's, and the exported embedder reproduces the pipeline."""

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
from tasks.models import load_backbone
from tasks.preprocess import Preprocess
from tasks.train import embed_with_head

CFG = {"size": 64, "mean": [0.48, 0.45, 0.41], "std": [0.27, 0.26, 0.28]}


@pytest.mark.parametrize("shape", [(96, 96), (90, 140), (140, 90), (20, 30), (512, 512)])
def test_tensor_preprocess_equals_pil_bicubic_on_the_centre_square(shape):
    """Centre square, then PIL's antialiased bicubic to size x size: ours agrees to uint8 rounding."""
    h, w = shape
    arr = np.asarray(Image.fromarray(skimage.data.astronaut()).resize((w, h), Image.BICUBIC))
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    ref = np.asarray(Image.fromarray(arr).crop((left, top, left + s, top + s)).resize((64, 64), Image.BICUBIC)) / 255.0
    plain = Preprocess(64, [0.0] * 3, [1.0] * 3)
    ours = plain(torch.from_numpy(arr.copy()).permute(2, 0, 1)[None])[0].permute(1, 2, 0).numpy()
    assert np.abs(ours - ref).mean() < 0.003 and np.abs(ours - ref).max() < 0.03


@pytest.mark.parametrize("shape", [(96, 96), (90, 140), (140, 90), (20, 30), (512, 384), (64, 64)])
@pytest.mark.parametrize("mode", ["shortest", "squash"])
def test_fast_resize_equals_the_exportable_one(shape, mode):
    """Extraction resizes with torch's antialiased bicubic; export with dense matrices: the same numbers."""
    pre = Preprocess(64, CFG["mean"], CFG["std"], resize_mode=mode)
    x = torch.from_numpy(np.random.default_rng(0).random((2, 3, *shape), dtype=np.float32))
    fast, exportable = pre.resize_fast(x), pre.resize_exportable(x)
    assert fast.shape == exportable.shape == (2, 3, 64, 64)
    assert (fast - exportable).abs().max() < 5e-5


@pytest.mark.parametrize("size", [96, 20])
def test_tensor_preprocess_follows_open_clip_transform(size):
    # On square images open_clip's resize + centre crop is the same view; on others
    # torchvision rounds the resized long side down, a sub-pixel shift we don't copy.
    arr = np.asarray(Image.fromarray(skimage.data.astronaut()).resize((size, size), Image.BICUBIC))
    ref = image_transform(64, is_train=False, mean=CFG["mean"], std=CFG["std"], resize_mode="shortest")(Image.fromarray(arr))
    ours = Preprocess.from_cfg(CFG)(torch.from_numpy(arr.copy()).permute(2, 0, 1)[None])[0]
    assert ours.shape == ref.shape == (3, 64, 64)
    assert (ours - ref).abs().mean() < 0.02


def test_exported_embedder_equals_pipeline_and_loads_with_plain_torch(tmp_path, tiny_backbone):
    model, preprocess, _ = load_backbone(tiny_backbone)
    torch.manual_seed(0)
    head = build_head("multi_dropout", 32, 8, dropout=0.3, branches=2).eval()
    embedder = Embedder([(preprocess, model.visual), (preprocess, model.visual)], head)
    export_embedder(embedder, tmp_path / "e.pt2", torch.randint(0, 256, (2, 3, 40, 50), dtype=torch.uint8))
    loaded = torch.export.load(str(tmp_path / "e.pt2")).module()  # plain torch, no project code

    rng = np.random.default_rng(0)
    images = [torch.from_numpy(rng.integers(0, 256, size=(3, h, w), dtype=np.uint8)) for h, w in
              [(32, 32), (48, 20), (100, 64), (32, 32)]]
    # the pipeline's path: per-backbone features, normalised, concatenated, head
    with torch.no_grad():
        stored = np.concatenate([model.encode_image(preprocess(img[None])).numpy() for img in images])
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
    assert main(["--model", str(tmp_path / "e.pt2"), "index", str(folder), "--out", str(tmp_path / "i.parquet")]) == 0
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "i.parquet")
    assert table.num_rows == 6 and table.schema.field("embedding").type.list_size == 8
    assert "skipped class_00/broken.jpg" in capsys.readouterr().err
    query = folder / "class_02" / "img_001.jpg"
    assert main(["--model", str(tmp_path / "e.pt2"), "search", str(query), "--index", str(tmp_path / "i.parquet"), "-k", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3
    rank, dist, path = lines[0].split("\t")
    assert path == "class_02/img_001.jpg" and float(dist) < 1e-3  # an image finds itself first
