"""Train the 64-d head with an ArcFace-family loss on precomputed backbone embeddings.

Features are small next to images: on the default data the head trains on the CPU in
seconds, the whole train split in one tensor, an epoch a shuffled pass over it in
minibatches. At a million images (`2xclip`) it trains on the GPU (`train.device`), and a
train split bigger than `train.max_memory_gb` is read from the memory-mapped feature files
batch by batch, in the same order and with the same values as the in-memory path.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from tasks.features import (GroupData, MappedFeatures, SplitFeatures, class_group,
                            load_concat, load_or_map, read_manifest, seeded_rows, select)
from tasks.heads import HEAD_CONFIG, HEAD_WEIGHTS, ArcFace, build_head, dynamic_margins
from tasks.metrics import mean_precision_at_k
from tasks.params.train import TrainParams
from tasks.schedules import deterministic, warmup_cosine, warmup_linear_decay, warmup_step
from tasks.schemas.io import atomic_path, write_json
from tasks.train_device import (Rows, amp_context, batch_rows, embed_array, embed_cpu,
                                embed_rows, mean_precision_on_device, resolve_device)


@dataclass
class TrainingInputs:
    """What training reads: the training classes' train and val features, the validation
    classes' group (query and index features) and every class's catalog size."""
    train: SplitFeatures | MappedFeatures  # mapped: streamed, over the memory budget
    val: SplitFeatures
    validation: GroupData
    class_images: dict[int, int]


def load_training_inputs(variants: list[str], max_memory_gb: float | None = math.inf,
                         ) -> TrainingInputs:
    """The concatenated features of `variants`, split into groups by the manifest; the test
    classes' features are never read into it. A train split over `max_memory_gb` (None: half
    the available RAM) stays memory-mapped and training streams it; by default it is read
    into RAM (the sweep fits a PCA on all of it)."""
    meta = read_manifest()
    validation = class_group(load_concat(variants, "query"), load_concat(variants, "index"),
                             meta, "validation")
    class_images = meta.class_images()
    return TrainingInputs(load_or_map(variants, "train", max_memory_gb),
                          load_concat(variants, "val"), validation, class_images)


@dataclass
class TrainResult:
    head: nn.Module
    history: list[dict[str, float]]
    metrics: dict[str, float]


def _nan_to_none(value: float) -> float | None:
    return None if math.isnan(value) else value


def _val_scores(head: nn.Module, arc: ArcFace, train: SplitFeatures | MappedFeatures,
                rows: Rows, xv: torch.Tensor, yv: torch.Tensor, val_ids: np.ndarray,
                device: torch.device) -> dict[str, float]:
    """The val split's accuracy, loss and mP@5 with the train split as the index: how well
    the head knows the training classes (a monitor, not a selection signal). On a GPU the
    train split is embedded from the rows training reads and searched there."""
    if len(xv) == 0:
        return {"val_acc": math.nan, "val_loss": math.nan, "val_mP@5": math.nan}
    head.eval()
    with torch.no_grad():
        emb = head(xv)
        acc = (arc.predict(emb) == yv).float().mean().item()
        loss = arc(emb, yv, sample=False).item()
    if device.type == "cuda":
        index_emb = embed_rows(head, rows, len(train.keys), device)
        mp5, _ = mean_precision_on_device(index_emb, train.class_ids, emb, val_ids)
        return {"val_acc": acc, "val_loss": loss, "val_mP@5": mp5}
    index = embed_cpu(head, train)
    mp5, _, _ = mean_precision_at_k(index, train.class_ids, emb.cpu().numpy(), val_ids, k=5)
    return {"val_acc": acc, "val_loss": loss, "val_mP@5": mp5}


def _validation_classes_score(head: nn.Module, validation: GroupData | None,
                              device: torch.device) -> float:
    """mP@5 of the validation classes' queries against their index: classes the head never
    saw, like the test classes, so early stopping selects for what is reported."""
    if validation is None or not validation.query.keys or not validation.index.keys:
        return math.nan
    query, index = validation.query, validation.index
    if device.type == "cuda":
        _, per_query = mean_precision_on_device(
            embed_array(head, index.embeddings, device), index.class_ids,
            embed_array(head, query.embeddings, device), query.class_ids)
    else:
        _, per_query, _ = mean_precision_at_k(embed_cpu(head, index), index.class_ids,
                                              embed_cpu(head, query), query.class_ids, k=5)
    return float(np.nanmean(per_query)) if not np.isnan(per_query).all() else math.nan


def _selection_sample(validation: GroupData | None, params: TrainParams) -> GroupData | None:
    """The validation classes with at most `selection_queries` queries, a seeded sample fixed
    for the whole run (epochs are compared on the same queries): each epoch's search then
    grows with the index, not with its square. Every index image stays."""
    if (validation is None or not params.selection_queries
            or len(validation.query.keys) <= params.selection_queries):
        return validation
    count = len(validation.query.keys)
    keep = np.isin(np.arange(count), seeded_rows(count, params.selection_queries, params.seed))
    return replace(validation, query=select(validation.query, keep))


def make_loss(params: TrainParams, classes: np.ndarray, class_images: dict[int, int] | None,
              ) -> ArcFace:
    """The ArcFace-family loss over `classes` (global ids, in training order).

    dynamic_arcface takes each class's margin from how many images the class has
    in its source catalogs before sampling capped it (`class_images`, from the
    manifest): sampling gives every class the same count, so counting the
    training rows would give every class the same margin.
    """
    margins = None
    if params.loss == "dynamic_arcface":
        if class_images is None:
            raise ValueError("dynamic_arcface needs each class's catalog image count")
        counts = np.array([class_images[int(c)] for c in classes])
        margins = dynamic_margins(counts, params.margin_min, params.margin_max)
    return ArcFace(params.embedding_dim, len(classes), params.arcface_scale, params.arcface_margin,
                   subcenters=params.subcenters if params.loss == "subcenter_arcface" else 1,
                   margins=margins, label_smoothing=params.label_smoothing,
                   sample_classes=params.class_sample)


def make_optimizers(head: nn.Module, arc: ArcFace,
                    params: TrainParams) -> list[torch.optim.Optimizer]:
    """Adam or AdamW over the head and the ArcFace centres; with Partial FC, SparseAdam for
    the centres instead: their gradient is sparse (the drawn classes' rows) and SparseAdam
    updates only those rows and their moments, so a step's cost stays off the class count
    (a dense optimizer would step every centre, its moments carrying the undrawn ones).
    SparseAdam has no weight decay, so the centres then take none (`weight_decay` still
    applies to the head); and, as any lazy Adam, it corrects its moments' bias by the
    tensor's step count, so a centre drawn for the first time late in a run moves by
    about 3 lr (Adam's first step moves by lr)."""
    optimizer = torch.optim.Adam if params.optimizer == "adam" else torch.optim.AdamW
    dense = list(head.parameters()) + ([] if arc.samples else list(arc.parameters()))
    opts: list[torch.optim.Optimizer] = [
        optimizer(dense, lr=params.lr, weight_decay=params.weight_decay)]
    if arc.samples:
        opts.append(torch.optim.SparseAdam(list(arc.parameters()), lr=params.lr))
    return opts


def train_head(train: SplitFeatures | MappedFeatures, val: SplitFeatures, params: TrainParams,
               validation: GroupData | None = None,
               class_images: dict[int, int] | None = None) -> TrainResult:
    """Fit head + loss on the training classes; `validation` (the validation classes' query
    and index features) drives early stopping. The same inputs and params give the same
    bytes on the CPU, in RAM or streamed (`train` a `MappedFeatures`): seeded generators,
    deterministic algorithms, `params.threads` CPU threads. The head comes back on the CPU."""
    device = resolve_device(params.device)
    threads = torch.get_num_threads()
    torch.set_num_threads(params.threads)
    try:
        with deterministic(device):
            return _train(train, val, params, validation, class_images, device)
    finally:
        torch.set_num_threads(threads)


def _train(train: SplitFeatures | MappedFeatures, val: SplitFeatures, params: TrainParams,
           validation: GroupData | None, class_images: dict[int, int] | None,
           device: torch.device) -> TrainResult:
    if len(train.keys) == 0:
        raise ValueError("train split is empty: nothing to train on")
    torch.manual_seed(params.seed)
    classes = np.unique(train.class_ids)
    remap = {int(c): i for i, c in enumerate(classes)}
    n, dim = len(train.keys), (train.dim if isinstance(train, MappedFeatures)
                               else train.embeddings.shape[1])
    rows = batch_rows(train, device)
    y = torch.tensor([remap[int(c)] for c in train.class_ids]).to(device)
    known = np.isin(val.class_ids, classes)
    if params.monitor_queries and known.sum() > params.monitor_queries:
        # the monitor searches its queries against the whole train split every epoch: a
        # fixed sample keeps that linear in the train split (numpy's generator, not torch's)
        candidates = np.flatnonzero(known)
        keep = candidates[seeded_rows(len(candidates), params.monitor_queries, params.seed)]
        known = np.isin(np.arange(len(known)), keep)
    validation = _selection_sample(validation, params)
    xv = torch.from_numpy(val.embeddings[known]) if len(val.keys) else torch.zeros(0, dim)
    xv = xv.to(device)
    yv = torch.tensor([remap[int(c)] for c in val.class_ids[known]], dtype=torch.long).to(device)

    head = build_head(params.head, dim, params.embedding_dim, params.dropout,
                      params.branches).to(device)
    arc = make_loss(params, classes, class_images).to(device)
    autocast = amp_context(device, params.amp)
    opts = make_optimizers(head, arc, params)
    steps_per_epoch = -(-n // params.batch_size)
    total = steps_per_epoch * params.epochs
    warmup = int(params.warmup_fraction * total)
    if params.schedule == "step":
        shape = warmup_step(warmup, steps_per_epoch, params.step_epochs, params.step_gamma)
    else:
        decay = warmup_cosine if params.schedule == "cosine" else warmup_linear_decay
        shape = decay(total, warmup)
    scheds = [LambdaLR(opt, shape) for opt in opts]
    gen = torch.Generator().manual_seed(params.seed)

    history: list[dict[str, float]] = []
    best, best_state, best_epoch, since_best = -1.0, None, 0, 0
    for epoch in range(1, params.epochs + 1):
        head.train()
        order = torch.randperm(n, generator=gen)  # on the CPU: the same order on any device
        losses, correct = [], 0
        for i in range(0, n, params.batch_size):
            idx = order[i:i + params.batch_size]
            if len(idx) < 2 and params.head == "bn_linear":
                continue  # BatchNorm cannot normalise a batch of one
            labels = y[idx.to(device)]
            with autocast:
                emb = head(rows(idx))
            # ArcFace in fp32 (its margin is written into the cosines, whose dtype must
            # match; and bf16 would round the scaled logits by the margin's size)
            loss, nearest = arc.loss_and_predictions(emb.float(), labels)
            for opt in opts:
                opt.zero_grad(set_to_none=True)
            loss.backward()
            for opt, sched in zip(opts, scheds):
                opt.step()
                sched.step()
            hits = (nearest == labels).sum()
            if device.type == "cuda":  # kept on the GPU, read once per epoch: no sync per step
                losses.append(loss.detach().clone())
                correct += hits
            else:  # numbers, not tensors: a 0-d tensor per step pins freed memory on the CPU
                losses.append(loss.item())
                correct += hits.item()
        selection = _validation_classes_score(head, validation, device)
        stopping = params.early_stopping_patience and not math.isnan(selection)
        improves = bool(stopping and selection > best)
        stops = bool(stopping and not improves
                     and since_best + 1 >= params.early_stopping_patience)
        # every monitor_every-th epoch, the last, and every epoch early stopping may keep
        # or stops at: the kept epoch's scores are reported, and must have been measured
        monitored = (epoch % params.monitor_every == 0 or epoch == params.epochs or improves
                     or stops)
        monitor = (_val_scores(head, arc, train, rows, xv, yv, val.class_ids[known], device)
                   if monitored else dict.fromkeys(("val_acc", "val_loss", "val_mP@5"), math.nan))
        history.append({"epoch": epoch,
                        "train_loss": float(np.mean([float(v) for v in losses])),
                        "train_acc": int(correct) / n,
                        **monitor,
                        "validation_classes_mP@5": selection,
                        "lr": scheds[0].get_last_lr()[0]})
        if stopping:
            if improves:
                best, best_state, best_epoch, since_best = (
                    selection, copy.deepcopy(head.state_dict()), epoch, 0)
            else:
                since_best += 1
                if since_best >= params.early_stopping_patience:
                    break
    kept = len(history)
    if best_state is not None:
        head.load_state_dict(best_state)
        kept = best_epoch
    head.eval().cpu()
    # Every score reported is the kept epoch's, as it was measured at the end of that epoch:
    # the last epoch's train scores, or val scores of the kept head under the last epoch's
    # ArcFace weights (val_loss, val_acc), would describe no head that exists.
    scores = {name: value for name, value in history[kept - 1].items()
              if name not in ("epoch", "lr")}
    metrics = {**scores, "epochs_run": len(history), "epoch_kept": kept,
               "num_classes": len(classes), "train_images": n, "val_images": len(xv)}
    history = [{name: _nan_to_none(v) if isinstance(v, float) else v for name, v in row.items()}
               for row in history]
    metrics = {name: _nan_to_none(v) if isinstance(v, float) else v for name, v in metrics.items()}
    return TrainResult(head, history, metrics)


def save_head(head: nn.Module, out_dir: Path, variants: list[str], params: TrainParams) -> None:
    """Weights as safetensors plus the config needed to rebuild the head (no pickle)."""
    with atomic_path(out_dir / HEAD_WEIGHTS) as tmp:
        save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(tmp))
    in_dim = next(m for m in head.modules() if isinstance(m, nn.Linear)).in_features
    write_json(out_dir / HEAD_CONFIG, {"kind": params.head, "in_dim": in_dim,
                                       "out_dim": params.embedding_dim, "dropout": params.dropout,
                                       "branches": params.branches, "variants": variants})


