"""How close extraction gets to the bare model, and what the embedding cache saves.

For each backbone, in one run, with the same model, batch size and threads:

- bare: `model.encode_image` on batches that were decoded and preprocessed
  beforehand (the ceiling: pure model time);
- pipeline: `tasks.extract.embed_shard` on WebDataset shards of JPEGs, the
  stage's own code (tar reading, hashing, DataLoader decode + preprocess in a
  worker process, model, Arrow writing), with the cache off;
- incremental: a full run into an empty cache, then a run over the same
  images plus 10% new ones; prints its time as a fraction of the full run.

Images are real photographs (scikit-image's), cropped and saved as JPEG at
up to 512 px, the shard stage's default size. Both sides are warmed up
before timing. Prints JSON. Run on demand:
`python benchmarks/extract.py [--backbones lite0 vit_s32] [--images 512]`.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import open_clip
import skimage.data
import torch
import webdataset as wds
from PIL import Image

from tasks.extract import Embedder, embed_shard, get_worker, resolve_device
from tasks.models import _model_from_config, _save_variant, build_variant, open_clip_variant_config
from tasks.backbone import load_backbone
from tasks.params.extract import ExtractParams
from tasks.params.models import EfficientNetLiteModel
from tasks.preprocess import decode_rgb
from tasks.schemas.shards import read_shard

# name -> (open_clip architecture, tag whose preprocessing it takes)
RANDOM_INIT = {"vit_s32": ("ViT-S-32", None),
               "vit_b32": ("ViT-B-32", "laion2b_s34b_b79k"),
               "vit_l14": ("ViT-L-14", "laion2b_s32b_b82k"),
               "vit_l14_336": ("ViT-L-14-336", "openai"),
               "siglip_so400m": ("ViT-SO400M-14-SigLIP-384", "webli")}
PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry",
          "hubble_deep_field", "cat"]


def write_shards(out: Path, images: int, per_shard: int, seed: int, start: int = 0) -> list[Path]:
    """`images` JPEG crops of real photos (<= 512 px side) in tars of `per_shard`."""
    rng = np.random.default_rng(seed)
    photos = [getattr(skimage.data, n)() for n in PHOTOS]
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(0, images, per_shard):
        path = out / f"bench-{(start + s) // per_shard:06d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for i in range(start + s, start + min(s + per_shard, images)):
                photo = Image.fromarray(photos[i % len(photos)]).convert("RGB")
                w, h = photo.size
                cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
                x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
                crop = photo.crop((x, y, x + cw, y + ch))
                crop.thumbnail((512, 512), Image.BICUBIC)
                buf = io.BytesIO()
                crop.save(buf, format="JPEG", quality=92)
                sink.write({"__key__": f"img-{i:06d}", "cls": str(i % 10).encode(),
                            "jpg": buf.getvalue()})
        paths.append(path)
    return paths


def backbone_dir(name: str, work: Path) -> Path:
    """lite0/lite2: the offline weights; the others: open_clip architectures, random init (speed
    only), with the preprocessing of the tag the presets use."""
    out = work / name
    if name in ("lite0", "lite2"):
        build_variant(name, EfficientNetLiteModel(kind="efficientnet_lite", arch=name), out)
    else:
        arch, tag = RANDOM_INIT[name]
        pretrained_cfg = open_clip.get_pretrained_cfg(arch, tag) if tag else {}
        config = open_clip_variant_config(arch, pretrained_cfg)
        torch.manual_seed(0)
        out.mkdir(parents=True, exist_ok=True)
        model = _model_from_config(out, config)
        _save_variant(out, config, model, {"model_name": arch, "pretrained": "random-init"})
    return out


def bare_images_per_s(embedder: Embedder, batches: list[torch.Tensor]) -> float:
    for b in batches[:2]:  # warm-up
        embedder(b)
    start = time.perf_counter()
    n = sum(len(embedder(b)) for b in batches)
    return n / (time.perf_counter() - start)


def pipeline_seconds(shards: list[Path], out: Path, model_dir: Path,
                     params: ExtractParams) -> tuple[float, int]:
    w = get_worker(str(model_dir), params)
    start = time.perf_counter()
    embedded = sum(embed_shard(s, out / f"{s.stem}.arrow", w.embedder, w.preprocess, params,
                               w.metadata, cache=w.cache)["embedded"] for s in shards)
    return time.perf_counter() - start, embedded


def bench(name: str, images: int, per_shard: int, batch: int, workers: str, repeats: int,
          work: Path) -> dict:
    model_dir = backbone_dir(name, work / "models")
    shards = write_shards(work / name / "shards", images, per_shard, seed=0)
    model, preprocess, info = load_backbone(model_dir)
    device = resolve_device("auto")
    params = ExtractParams(batch_size=batch, device="auto", cache_dir="",
                           num_workers=workers if workers == "auto" else int(workers))
    embedder = Embedder(model, device, "fp16", batch_size=batch, cpu_threads=params.cpu_threads)
    # bare: every image decoded and preprocessed up front
    samples = [s for shard in shards for s in read_shard(shard)]
    with torch.no_grad():
        tensors = [preprocess(decode_rgb(s.jpeg)[None])[0] for s in samples]
    batches = [torch.stack(tensors[i:i + batch]) for i in range(0, len(tensors), batch)]
    warm = write_shards(work / name / "warm", 2 * batch, 2 * batch, seed=1)
    pipeline_seconds(warm, work / name / "feat-warm", model_dir, params)  # warm-up
    # alternate the two, `repeats` times each, and take the medians: these CPUs drift by ~5%
    # run to run
    bares, pipes = [], []
    for _ in range(repeats):
        bares.append(bare_images_per_s(embedder, batches))
        pipes.append(images / pipeline_seconds(shards, work / name / "feat", model_dir, params)[0])
    bare, piped = float(np.median(bares)), float(np.median(pipes))

    # incremental: full run into an empty cache, then 10% new images on top
    cached = params.model_copy(update={"cache_dir": str(work / name / "cache")})
    full_s, full_n = pipeline_seconds(shards, work / name / "feat-full", model_dir, cached)
    extra = write_shards(work / name / "shards", images // 10, per_shard, seed=2, start=images)
    incr_s, incr_n = pipeline_seconds(shards + extra, work / name / "feat-incr", model_dir, cached)
    return {"backbone": name, "model": info["model_name"], "device": str(device), "images": images,
            "images_per_shard": per_shard, "batch_size": batch, "num_workers": workers,
            "threads": params.cpu_threads,
            "bare_images_per_s": round(bare, 1), "pipeline_images_per_s": round(piped, 1),
            "pipeline_over_bare": round(piped / bare, 3), "repeats": repeats,
            "full_run_s": round(full_s, 2), "full_run_embedded": full_n,
            "incremental_run_s": round(incr_s, 2), "incremental_run_embedded": incr_n,
            "incremental_over_full": round(incr_s / full_s, 3)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backbones", nargs="+", default=["lite0", "vit_s32"],
                        choices=["lite0", "lite2", *RANDOM_INIT])
    parser.add_argument("--images", type=int, default=512)
    # the embedded default's shard.max_samples
    parser.add_argument("--per-shard", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", default="auto", help="extract.num_workers: auto, or a number")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="guie-bench-extract-"))
    try:
        results = [bench(b, args.images, args.per_shard, args.batch, args.workers, args.repeats,
                         work) for b in args.backbones]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
