"""Fine-tune a backbone variant's image tower with a 64-d head and ArcFace, as the top GUIE
entries did, and write the result as a new variant in the layout the `models` stage writes.

The training classes' train-split images (from the shards, preprocessed by the variant's
own Preprocess, as extraction sees them) go through the tower, L2-normalised as `train`
normalises features, into Linear(D, 64) + L2 and ArcFace. Which parts of the tower train
and at which lr is the schedule's (tasks/finetune_blocks.py), the optimizer steps
tasks/finetune_steps.py's. On the CPU a run is deterministic (seeded, fixed threads,
deterministic kernels); each epoch ends with a checkpoint (tasks/finetune_state.py), and
with `checkpoint_steps` every so many steps inside one too, and a rerun resumes from the
last with the same bytes as a run never interrupted. The output folder loads through
`open_clip`'s `local-dir:` and `tasks.backbone.load_backbone`, so extract, train, evaluate
and export use it unchanged.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors.torch import save_file
from torch import nn

from tasks.backbone import CONFIG_NAME, load_backbone, save_variant
from tasks.decode import decode_pool, release_pool
from tasks.finetune_blocks import check_block_lrs, phase_of, tower_parts
from tasks.finetune_resolution import check_resizable, config_at, set_image_size
from tasks.finetune_state import (cache_key, effective_precision, load_checkpoint, restore_rng,
                                  rng_state, run_folder, save_checkpoint, training_images)
from tasks.finetune_steps import Trainer
from tasks.heads import HEAD_CONFIG, HEAD_WEIGHTS, ArcFace, EmbeddingHead, dynamic_margins
from tasks.params.finetune import FinetuneRun
from tasks.preprocess import Preprocess, decode_rgb
from tasks.schemas.io import atomic_path, write_json
from tasks.schemas.paths import MANIFEST, SHARDS_DIR
from tasks.schemas.shards import Jpegs, SampleRef
from tasks.schedules import deterministic


def resolve_device(choice: str) -> torch.device:
    """finetune.device -> the torch device; auto is the GPU when torch sees one."""
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"finetune.device = {choice!r} but torch sees no CUDA device: "
                           "use auto or cpu")
    return torch.device(choice)


@dataclass
class FinetuneResult:
    """The fine-tuned model (the whole open_clip model, on the CPU, eval mode), its head, and
    one row per epoch (epoch, phase, loss, images, lr of each param group at its end)."""

    model: nn.Module
    head: nn.Module
    history: list[dict[str, Any]]
    checkpoints: Path  # the run's checkpoint folder (removed once the output is written)
    device: str  # where it trained: cpu | cuda
    precision: str  # what the tower computed in (fp32 on the CPU whatever `precision` says)


def epoch_groups(images: int, run: FinetuneRun,
                 generator: torch.Generator) -> Iterator[list[torch.Tensor]]:
    """An epoch's batches (row indices, in an order drawn from the seeded generator), in
    groups of `accumulate`: one group per optimizer step."""
    order = torch.randperm(images, generator=generator)
    cuts = [order[i:i + run.batch_size] for i in range(0, images, run.batch_size)]
    for g in range(0, len(cuts), run.accumulate):
        yield cuts[g:g + run.accumulate]


def epoch_batches(samples: list[SampleRef], labels: torch.Tensor, cuts: list[torch.Tensor],
                  preprocess: Preprocess, workers: int, pin: bool,
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) of each batch of rows in `cuts`, in order: decoded and preprocessed
    as extraction does, by `workers` processes of its decode pool ahead of the model (0: in
    this process, one batch at a time). The bytes are read as the batches come."""
    if workers == 0:
        for idx in cuts:
            with torch.no_grad():
                x = torch.cat([preprocess(decode_rgb(samples[i].read())[None])
                               for i in idx.tolist()])
            yield x, labels[idx]
        return
    rows = torch.cat(cuts).tolist()
    batch_size = max(len(idx) for idx in cuts)  # every cut but the last has this many rows
    images = decode_pool(preprocess, workers).batches(
        Jpegs([samples[i] for i in rows]), batch_size, pin)
    for idx, x in zip(cuts, images, strict=True):
        yield x, labels[idx]


def class_margins(run: FinetuneRun, labels: torch.Tensor, classes: int) -> torch.Tensor:
    """Each class's ArcFace margin in the first epoch: arcface_margin for all, or with
    dynamic_arcface from margin_min (the class with most training images) to margin_max
    (the fewest), as `train` sets them (`tasks.heads.dynamic_margins`). In float64, so
    that adding an epoch's margin_step rounds once, into ArcFace's float32 buffer."""
    if run.loss == "dynamic_arcface":
        counts = torch.bincount(labels, minlength=classes).numpy()
        return dynamic_margins(counts, run.margin_min, run.margin_max).double()
    return torch.full((classes,), run.arcface_margin, dtype=torch.float64)


def steps_per_epoch(images: int, run: FinetuneRun) -> int:
    """Optimizer steps in one epoch: batches of batch_size, `accumulate` per step."""
    return math.ceil(math.ceil(images / run.batch_size) / run.accumulate)


def finetune(run: FinetuneRun, name: str, base_dir: Path, out_dir: Path, *,
             manifest: Path = MANIFEST, shards_dir: Path = SHARDS_DIR,
             progress: Callable[[dict[str, Any]], None] | None = None) -> FinetuneResult:
    """Fine-tune variant `base_dir` as run `name` and write variant `out_dir`.

    `progress` gets each epoch's history row once that epoch's checkpoint is on disk.
    A run interrupted after epoch k resumes at k+1; the checkpoint folder is removed once
    the output is written.
    """
    device = resolve_device(run.device)
    threads = torch.get_num_threads()
    torch.set_num_threads(run.threads)
    try:
        with deterministic(device):
            result = _finetune(run, name, base_dir, device, manifest, shards_dir, progress)
    finally:
        torch.set_num_threads(threads)
    write_variant(out_dir, result, run, name, base_dir)
    shutil.rmtree(result.checkpoints, ignore_errors=True)
    return result


def _finetune(run: FinetuneRun, name: str, base_dir: Path, device: torch.device,
              manifest: Path, shards_dir: Path,
              progress: Callable[[dict[str, Any]], None] | None) -> FinetuneResult:
    model, preprocess, info = load_backbone(base_dir)
    check_block_lrs(tower_parts(model.visual), run)  # refuse an unknown tower before any work
    if run.image_sizes:
        vision_cfg = json.loads((base_dir / CONFIG_NAME).read_text())["model_cfg"]["vision_cfg"]
        check_resizable(model.visual, vision_cfg, run.image_sizes)
    size = int(info["image_size"])
    samples = training_images(manifest, shards_dir)
    if not samples:
        raise ValueError(f"finetune {name}: no train-split images of training classes in "
                         f"{shards_dir}")
    classes = sorted({s.class_id for s in samples})
    remap = {c: i for i, c in enumerate(classes)}
    labels = torch.tensor([remap[s.class_id] for s in samples])
    key = cache_key(run, base_dir, samples, shards_dir, device)
    cache = run_folder(Path(run.cache_dir), name, key)

    margins = class_margins(run, labels, len(classes))
    torch.manual_seed(run.seed)
    head = EmbeddingHead(int(info["dim"]), run.embedding_dim, dropout=0.0)
    arc = ArcFace(run.embedding_dim, len(classes), run.arcface_scale, run.arcface_margin,
                  subcenters=run.subcenters)
    model, head, arc = model.to(device), head.to(device), arc.to(device)
    generator = torch.Generator().manual_seed(run.seed)
    history: list[dict[str, Any]] = []
    state = load_checkpoint(cache)
    partial = None  # where a checkpoint taken inside an epoch left it
    if state is not None:
        partial = state.get("partial")
        saved_size = (partial["image_size"] if partial
                      else state["history"][-1].get("image_size"))
        if saved_size:
            size = saved_size
            set_image_size(model, size)  # the checkpoint's grid, before its values load
            preprocess = Preprocess.from_cfg(model.visual.preprocess_cfg)
        model.visual.load_state_dict(state["visual"])
        head.load_state_dict(state["head"])
        arc.load_state_dict(state["arc"])
        restore_rng(state["rng"], generator)
        history = state["history"]
    steps = steps_per_epoch(len(samples), run)
    trainer, resume = None, state["trainer"] if state is not None else None
    for epoch in range(len(history) + 1, run.epochs + 1):
        phase = phase_of(run, epoch)
        if trainer is None or trainer.phase != phase:
            trainer = Trainer(model, head, arc, run, phase, steps, device)
            if resume is not None and resume["phase"] == phase:
                trainer.load_state_dict(resume)
            resume = None
        if run.image_size(epoch, size) != size:
            if run.workers:
                release_pool(preprocess, run.workers)  # the last size's decoding processes
            size = run.image_size(epoch, size)
            set_image_size(model, size, trainer.opt)  # and the tower's preprocess_cfg
            preprocess = Preprocess.from_cfg(model.visual.preprocess_cfg)
        arc.margins.copy_(margins + (epoch - 1) * run.margin_step)
        if partial is not None:  # this epoch's order again, as drawn when it began
            generator.set_state(partial["order"])
        order = generator.get_state()
        groups = list(epoch_groups(len(samples), run, generator))
        done = (partial["steps"], partial["loss"], partial["images"]) if partial else (0, 0.0, 0)
        partial = None
        batches = epoch_batches(samples, labels,
                                [idx for group in groups[done[0]:] for idx in group],
                                preprocess, run.workers, pin=device.type == "cuda")

        def inside(step: int, loss_sum: float, seen: int) -> None:
            if run.checkpoint_steps and step % run.checkpoint_steps == 0 and step < len(groups):
                save_checkpoint(cache, _checkpoint(model, head, arc, trainer, generator, history, {
                    "epoch": epoch, "steps": step, "loss": loss_sum, "images": seen,
                    "order": order, "image_size": size}))

        loss = trainer.epoch(groups, batches, done, inside)
        lrs = {g["name"]: g["lr"] for g in trainer.opt.param_groups}
        history.append({"epoch": epoch, "phase": phase, "loss": loss, "images": len(samples),
                        "classes": len(classes), "lr": lrs, "margin": run.margin(epoch),
                        "image_size": size})
        save_checkpoint(cache, _checkpoint(model, head, arc, trainer, generator, history))
        if progress:
            progress(history[-1])
    return FinetuneResult(model.eval().cpu(), head.eval().cpu(), history, cache, device.type,
                          effective_precision(run, device))


def _checkpoint(model: nn.Module, head: nn.Module, arc: nn.Module, trainer: Trainer,
                generator: torch.Generator, history: list[dict[str, Any]],
                partial: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a checkpoint holds: the tower, head, ArcFace, optimizer, schedule, scaler, every
    random state and the finished epochs' history; taken inside an epoch, also `partial`:
    that epoch, its steps done, their loss sum and images, the order generator's state
    when the epoch began (to draw its order again) and the input size."""
    state = {"visual": model.visual.state_dict(), "head": head.state_dict(),
             "arc": arc.state_dict(), "trainer": trainer.state_dict(),
             "rng": rng_state(generator), "history": history}
    return {**state, "partial": partial} if partial else state


def write_variant(out_dir: Path, result: FinetuneResult, run: FinetuneRun, name: str,
                  base_dir: Path) -> dict[str, Any]:
    """The fine-tuned model as a backbone variant (the `models` stage's writer, so the very
    same layout: config, safetensors weights, model.json last), the head beside it in the
    `train` stage's head format. model.json says where it came from and how it trained."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "model.json").unlink(missing_ok=True)  # incomplete until rewritten, last
    base = json.loads((base_dir / "model.json").read_text())
    head = result.head
    with atomic_path(out_dir / HEAD_WEIGHTS) as tmp:
        save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(tmp))
    write_json(out_dir / HEAD_CONFIG, {
        "kind": "dropout_linear", "in_dim": head.linear.in_features,
        "out_dim": head.linear.out_features, "dropout": 0.0, "branches": 1, "variants": [name]})
    history = result.history
    source = {"model_name": base["model_name"],
              "pretrained": f"{base['pretrained']}+finetune:{name}",
              "base_variant": base_dir.name, "base_checkpoint_sha256": base["checkpoint_sha256"],
              "schedule": run.schedule, "params": run.model_dump(exclude=set(run.SPEED_ONLY)),
              "run": name, "device": result.device, "precision_used": result.precision,
              "epochs_done": len(history), "loss": [row["loss"] for row in history],
              "history": history}
    config = json.loads((base_dir / CONFIG_NAME).read_text())
    if history[-1]["image_size"] != base["image_size"]:
        config = config_at(config, history[-1]["image_size"])
    return save_variant(out_dir, config, result.model, source)
