"""`train`: the ArcFace-family head on the concatenated features."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from tasks.params.base import _Section


class TrainParams(_Section):
    # Settings that change how fast the stage runs, never a byte it writes (tested: the
    # streamed split trains the in-RAM head's bytes): not DVC params of the stage.
    SPEED_ONLY: ClassVar[frozenset[str]] = frozenset({"max_memory_gb"})

    # The backbones (names in `variants`) whose features the head concatenates, in this
    # order; null: every variant, in the order `variants` lists them.
    backbones: list[str] | None = None
    seed: int = 0
    epochs: int = Field(ge=1)
    batch_size: int = Field(128, ge=2)
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    # Share of all steps spent warming the learning rate up linearly.
    warmup_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    dropout: float = Field(0.2, ge=0.0, lt=1.0)
    embedding_dim: int = Field(64, ge=2, le=64)
    # dropout_linear (default), bn_linear (5th place), multi_dropout (3rd place).
    head: Literal["dropout_linear", "bn_linear", "multi_dropout"] = "dropout_linear"
    branches: int = Field(4, ge=1, le=32)  # multi_dropout only
    # arcface; subcenter_arcface (k centres per class); dynamic_arcface (rarer classes,
    # larger margin).
    loss: Literal["arcface", "subcenter_arcface", "dynamic_arcface"] = "arcface"
    arcface_scale: float = Field(30.0, gt=0.0)
    arcface_margin: float = Field(0.3, ge=0.0, lt=1.5)
    subcenters: int = Field(3, ge=1, le=16)  # subcenter_arcface only
    # dynamic_arcface: margins from the most frequent class to the rarest.
    margin_min: float = Field(0.2, ge=0.0, lt=1.5)
    margin_max: float = Field(0.45, ge=0.0, lt=1.5)
    # After the linear warm-up: linear decay, half cosine, or x step_gamma every step_epochs.
    schedule: Literal["linear", "cosine", "step"] = "linear"
    step_epochs: int = Field(100, ge=1)
    step_gamma: float = Field(0.1, gt=0.0, le=1.0)
    # adamw (decoupled weight decay) or adam (L2 in the gradient, as 2xCLIP's Adam).
    optimizer: Literal["adamw", "adam"] = "adamw"
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    # Partial FC: the ArcFace softmax of each step over this many classes (the batch's own and
    # random others) instead of all; 0 = all. Only the drawn centres are updated (sparse
    # gradients, SparseAdam), so a step's cost stops growing with the number of classes
    # (benchmarks/partial_fc.py); the centres then take no weight decay. train_acc in the
    # history is each step's accuracy among the classes it drew (val_acc: over all).
    class_sample: int = Field(0, ge=0)
    # Val-split queries the per-epoch monitor (val_acc, val_loss, val_mP@5 against the whole
    # train split) scores: 0 = all; else a seeded sample of that many, so its search grows
    # with the train split, not with its square. Early stopping never reads the monitor.
    monitor_queries: int = Field(2000, ge=0)
    # The monitor runs after every monitor_every-th epoch and the last (1: every epoch); in
    # between its history entries are null. At the 2xclip preset's size it is the costliest
    # part of an epoch on a GPU (CPU faiss search against ~864,000 train rows).
    monitor_every: int = Field(1, ge=1)
    # Validation-classes queries early stopping scores each epoch against all their index
    # images: 0 = all; else a seeded sample of that many, the same every epoch, so the
    # search grows with the index, not with its square (benchmarks/scale.py). The embedded
    # default has far fewer: it scores them all.
    selection_queries: int = Field(5000, ge=0)
    # Stop when the validation classes' mP@5 has not improved for this many epochs
    # (0: never) and keep the best epoch.
    early_stopping_patience: int = Field(0, ge=0)
    # CPU threads: a float sum's order, and so the trained bytes, depend on it;
    # fixed, a rerun with the same params gives the same head.
    threads: int = Field(1, ge=1)
    # cpu: the committed bytes on any machine with this CPU family. auto: the GPU when torch
    # sees one (the 2xclip preset's ~950,000 x 1,536 features, 17,850 classes: hours on a CPU),
    # else the CPU; cuda: the GPU or an error. A GPU's head is reproducible on that GPU model,
    # not bit-equal to the CPU's.
    device: Literal["auto", "cpu", "cuda"] = "cpu"
    # On CUDA only: off (fp32) or bf16 autocast. Off by default: ArcFace multiplies cosines by
    # arcface_scale (30), and bf16's 8-bit mantissa puts ~0.004 x 30 = 0.1 of noise on each
    # logit, the size of the margin's effect; the head's matmuls (batch x 1,536 x 64, batch x
    # 64 x classes) are too small for bf16's FLOPs to matter next to per-step overheads.
    amp: Literal["off", "bf16"] = "off"
    # GiB the concatenated train features may take in RAM; over it, batches are read from the
    # memory-mapped feature files each step (same order, same bytes). null: half the RAM
    # available when training starts. Val, query and index features are always read into RAM.
    max_memory_gb: float | None = Field(None, gt=0.0)

    @field_validator("amp", mode="before")
    @classmethod
    def _yaml_off(cls, value: object) -> object:
        """`amp: off` unquoted is YAML 1.1's false to PyYAML, and DVC (`dvc exp run -S`)
        rewrites params.yaml without the quotes: read false as off."""
        return "off" if value is False else value

    @model_validator(mode="after")
    def _margin_order(self) -> "TrainParams":
        if self.margin_min > self.margin_max:
            raise ValueError(f"train.margin_min = {self.margin_min} > train.margin_max = "
                             f"{self.margin_max}: the rarest class's margin must be the larger")
        return self
