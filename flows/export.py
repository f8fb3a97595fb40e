"""Stage `export`: backbones + head -> data/07_export/embedder.pt2, verified.

The file maps uint8 images to 64-d embeddings.
"""

from __future__ import annotations

from itertools import islice

import numpy as np
import torch
from prefect import flow, get_run_logger

from flows._cli import main
from tasks.export import Embedder, embed_images, export_embedder, load_exported
from tasks.schemas.shards import read_split
from tasks.features import load_concat
from tasks.backbone import load_backbone
from tasks.params.base import NAMES
from tasks.params.variants import VariantsParams, head_backbones, variant_dir
from tasks.params.export import ExportParams
from tasks.preprocess import decode_rgb
from tasks.schemas.io import write_json
from tasks.schemas.features import read_features
from tasks.schemas.paths import EXPORT_DIR, FEATURES_DIR, HEAD_DIR, SHARDS_DIR
from tasks.heads import embed_with_head, load_head

EMBEDDER = EXPORT_DIR / "embedder.pt2"


def check_same_weights(variant: str, info: dict) -> None:
    """The backbone's weights are the ones its features were embedded with (their sha256 is
    in both model.json and the features' metadata). dvc.yaml gives `export` the built
    backbones' folder and every variant's features, not the fine-tuned or soup folders
    (a dependency on those would need them to exist in every project): a fine-tuned or
    averaged backbone that changed has new features, so export reruns, and this check
    makes sure it then reads the weights those features came from."""
    first = next(iter(sorted((FEATURES_DIR / variant).rglob("*.arrow"))), None)
    if first is None:
        raise FileNotFoundError(f"no features of {variant!r} under {FEATURES_DIR}: run extract")
    _, meta = read_features(first)
    if meta.get("checkpoint_sha256") != info["checkpoint_sha256"]:
        raise ValueError(f"{variant}: its features were embedded with weights "
                         f"{meta.get('checkpoint_sha256', '?')[:12]}, its folder holds "
                         f"{info['checkpoint_sha256'][:12]}; rerun extract@{variant}")


@flow(name="export")
def export(params: ExportParams, sources: dict[str, str], backbones: list[str]) -> dict:
    """Export preprocessing + backbones + head as one program, then check it against the
    pipeline. `sources`: each variant's stage group (params `variants`)."""
    log = get_run_logger()
    torch.set_num_threads(params.threads)
    head, variants = load_head(HEAD_DIR)
    if variants != backbones:
        raise ValueError(f"head was trained on {variants}, train.backbones are {backbones}; "
                         "rerun train")
    towers = []
    for v in variants:
        model, preprocess, info = load_backbone(variant_dir(v, sources))
        check_same_weights(v, info)
        towers.append((preprocess, model.visual))
    # The first eval (query) images, straight from the shards the pipeline embedded.
    samples = list(islice(read_split(SHARDS_DIR, "query"), params.verify_images))
    images = [decode_rgb(s.jpeg) for s in samples]
    # Batch 2 and H != W in the example, so neither dimension gets specialised.
    example = torch.randint(0, 256, (2, 3, 64, 80), dtype=torch.uint8,
                            generator=torch.Generator().manual_seed(0))
    export_embedder(Embedder(towers, head), EMBEDDER, example)

    # The pipeline's own embeddings of the same images: stored features through the head.
    query = load_concat(variants, "query")
    row = {k: i for i, k in enumerate(query.keys)}
    expected = embed_with_head(head, query.embeddings[[row[s.key] for s in samples]])
    got = embed_images(load_exported(EMBEDDER), images)
    diff = float(np.abs(got - expected).max())
    report = {"file": EMBEDDER.name, "variants": variants,
              "input": "uint8 RGB (N, 3, H, W), any H, W >= 16",
              "output": f"float32 (N, {got.shape[1]}), L2-normalised",
              "verified_images": len(samples),
              "max_abs_diff_vs_pipeline": diff, "tolerance": params.tolerance,
              "torch": torch.__version__}
    write_json(EXPORT_DIR / "embedder.json", report)
    if diff > params.tolerance:
        raise RuntimeError(f"exported embedder differs from the pipeline by {diff:.2e} "
                           f"> {params.tolerance:.0e}")
    log.info("export: %s verified on %d eval images, max |diff| %.2e", EMBEDDER, len(samples), diff)
    return report


if __name__ == "__main__":
    main(lambda p, _key: export(p.export, dict(p.variants),
                                head_backbones(p.variants, p.train.get("backbones"))),
         {"variants": VariantsParams, "train": NAMES, "export": ExportParams})
