"""Stage `train`: features of all backbones -> data/05_head/ (head, metrics, per-epoch history)."""

from __future__ import annotations

import polars as pl
from prefect import flow, get_run_logger

from flows._cli import main
from tasks.params.variants import VariantsParams, head_backbones
from tasks.params.train import TrainParams
from tasks.schemas.io import atomic_path, write_json
from tasks.schemas.paths import HEAD_DIR
from tasks.features import MappedFeatures
from tasks.train import load_training_inputs, resolve_device, save_head, train_head


@flow(name="train")
def train(variants: list[str], params: TrainParams) -> dict:
    """Train Dropout + Linear-64 + L2 with ArcFace on the concatenated, per-backbone normalised
    features of the training classes; early stopping watches the validation classes."""
    log = get_run_logger()
    inputs = load_training_inputs(variants, params.max_memory_gb)
    streamed = isinstance(inputs.train, MappedFeatures)
    log.info("train: %d train rows %s, on %s", len(inputs.train.keys),
             "streamed from the memory-mapped features (over train.max_memory_gb)" if streamed
             else "in RAM", resolve_device(params.device))
    result = train_head(inputs.train, inputs.val, params, inputs.validation, inputs.class_images)
    save_head(result.head, HEAD_DIR, variants, params)
    write_json(HEAD_DIR / "metrics.json", result.metrics)
    with atomic_path(HEAD_DIR / "history.csv") as tmp:
        pl.DataFrame(result.history).write_csv(tmp)
    m = result.metrics
    log.info("train: %s head, %s loss, kept epoch %d of %d run: loss %.3f, train acc %.3f, "
             "validation classes mP@5 %s", params.head, params.loss, m["epoch_kept"],
             m["epochs_run"], m["train_loss"], m["train_acc"], m["validation_classes_mP@5"])
    return result.metrics


if __name__ == "__main__":
    main(lambda p, _key: train(head_backbones(p.variants, p.train.backbones),
                               p.train),
         {"variants": VariantsParams, "train": TrainParams})
