"""How a greedy soup is scored: a variant folder -> its mP@k on the validation classes, as
the evaluate stage scores a backbone's zero-shot line, each image embedded as extract embeds
it (tasks/soup.py averages the runs; this only scores what it makes)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from tasks.backbone import load_backbone
from tasks.evaluate import fit_pca, score_line
from tasks.extract import Embedder, batches, resolve_device
from tasks.features import GroupData, SplitFeatures, read_manifest, require_images, seeded_rows
from tasks.params.evaluate import EvaluateParams
from tasks.params.extract import ExtractParams
from tasks.schemas.shards import Sample, SampleRef, index_split

# The settings a greedy soup's score reads, and so the params dvc.yaml's soup@ stages list:
# which neighbours (k, search), the PCA (dim, the fit sample's seed) and the embeddings' bytes
# on the CPU (batch and thread counts). The rest of both sections cannot change a score (the
# bootstrap, the query block: bit-identical ids), so the scorer is given those at their
# defaults (`score_settings`) and editing them reruns no soup. extract.num_workers is passed
# as it is: it sets how fast images decode, never their bytes (tested), so it is no param.
SCORE_FIELDS = {"evaluate": ("k", "pca_dim", "pca_train_max", "seed", "threads",
                             "exact_max_index", "approximate_index", "approximate_search"),
                "extract": ("batch_size", "cpu_threads")}


def score_settings(evaluate: EvaluateParams, extract: ExtractParams,
                   ) -> tuple[EvaluateParams, ExtractParams]:
    """What a greedy soup is scored with: the SCORE_FIELDS of both sections, every other
    setting at its default, on the CPU (fp32): the same runs kept on every machine of one CPU
    family, and a change to a setting the score does not read cannot change it."""
    kept = {section: {f: getattr(params, f) for f in SCORE_FIELDS[section]}
            for section, params in (("evaluate", evaluate), ("extract", extract))}
    return (EvaluateParams(**kept["evaluate"]),
            ExtractParams(**kept["extract"], num_workers=extract.num_workers, device="cpu",
                          precision="fp32"))


def embed_samples(model_dir: Path | str, splits: list[list[Sample]] | list[list[SampleRef]],
                  extract: ExtractParams) -> list[np.ndarray]:
    """Each list of samples embedded by the variant with extraction's own loader, decoding
    and Embedder (padded batches, `extract.cpu_threads` threads on the CPU): an image gets
    the bytes `extract` would write for it. One model load for all the lists."""
    device = resolve_device(extract.device)
    model, preprocess, info = load_backbone(model_dir, device="cpu")
    embedder = Embedder(model, device, extract.precision, batch_size=extract.batch_size,
                        cpu_threads=extract.cpu_threads)
    empty = np.zeros((0, int(info["dim"])), np.float32)
    return [np.concatenate([empty] + [embedder(b) for b in
                                      batches(samples, preprocess, extract, device)])
            for samples in splits]


def _features(samples: list[SampleRef], embeddings: np.ndarray) -> SplitFeatures:
    return SplitFeatures([s.key for s in samples],
                         np.array([s.class_id for s in samples], np.int64), embeddings)


def validation_scorer(shards_dir: Path, manifest: Path, evaluate: EvaluateParams,
                      extract: ExtractParams, fit_images: int | None = None,
                      ) -> Callable[[Path], float]:
    """A `score` for greedy_soup: a variant folder -> its mP@k on the validation classes.

    Scored as the evaluate stage scores a backbone's zero-shot line (`score_line` on a PCA
    to `evaluate.pca_dim` fitted on the train split's embeddings), on the validation
    classes' queries against their index only: a test class's image is never decoded. The
    shards' headers are indexed once, here; each call reads and embeds the images with its
    variant, a batch at a time, so no split's bytes are held in memory. `fit_images`
    caps the train images the PCA is fitted on (a seeded sample; None: as evaluate fits it,
    all of them up to `evaluate.pca_train_max`, beyond it a sample drawn as evaluate draws
    one). Returns the unrounded mean of the per-query scores.
    """
    meta = read_manifest(manifest)
    held = {}
    for split in ("query", "index"):
        samples = list(index_split(shards_dir, split))
        groups = meta.column([s.key for s in samples], "group").to_list()
        held[split] = [s for s, g in zip(samples, groups) if g == "validation"]
    empty = np.zeros((0, 0), np.float32)
    require_images(GroupData(_features(held["query"], empty), _features(held["index"], empty),
                             []), "validation")
    train = list(index_split(shards_dir, "train"))
    cap = evaluate.pca_train_max if fit_images is None else fit_images
    if len(train) > cap:  # drawn as evaluate's train_rows_for_fit draws its rows
        train = [train[i] for i in seeded_rows(len(train), cap, evaluate.seed)]
    sources = meta.column([s.key for s in held["query"]], "source").to_list()

    def score(variant_dir: Path) -> float:
        fit, query, index = embed_samples(variant_dir, [train, held["query"], held["index"]],
                                          extract)
        data = GroupData(_features(held["query"], query), _features(held["index"], index),
                         sources)
        return float(np.nanmean(score_line(fit_pca(fit, evaluate.pca_dim), data,
                                           evaluate)["per_query"]))

    return score


def validation_score(variant_dir: Path | str, shards_dir: Path, manifest: Path,
                     evaluate: EvaluateParams, extract: ExtractParams,
                     fit_images: int | None = None) -> float:
    """mP@k of one variant on the validation classes (never the test classes), as the
    evaluate stage scores a backbone's zero-shot line; see validation_scorer."""
    scorer = validation_scorer(shards_dir, manifest, evaluate, extract, fit_images)
    return scorer(Path(variant_dir))
