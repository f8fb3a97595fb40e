"""Stage `train`: features of all backbones -> data/05_head/ (head, metrics, per-epoch history)."""

from __future__ import annotations

import polars as pl
from prefect import flow, get_run_logger

from flows._cli import main
from tasks.features import load_concat
from tasks.params import TrainParams
from tasks.schemas import HEAD_DIR, atomic_path, write_json
from tasks.train import save_head, train_head


@flow(name="train")
def train(variants: list[str], params: TrainParams) -> dict:
    """Train Dropout + Linear-64 + L2 with ArcFace on the concatenated, per-backbone normalised features."""
    log = get_run_logger()
    result = train_head(load_concat(variants, "train"), load_concat(variants, "val"), params)
    save_head(result.head, HEAD_DIR, variants, params)
    write_json(HEAD_DIR / "metrics.json", result.metrics)
    with atomic_path(HEAD_DIR / "history.csv") as tmp:
        pl.DataFrame(result.history).write_csv(tmp)
    log.info("train: %s head, %s loss, %d epochs, loss %.3f, train acc %.3f, val acc %.3f, val mP@5 %.3f",
             params.head, params.loss, result.metrics["epochs_run"], result.metrics["train_loss"],
             result.metrics["train_acc"], result.metrics["val_acc"], result.metrics["val_mP@5"])
    return result.metrics


if __name__ == "__main__":
    main(lambda p, _key: train(list(p.models), p.train))
