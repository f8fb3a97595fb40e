"""`finetune`: backbone fine-tuning runs, each writing a new backbone variant.

The section holds the settings every run shares and `runs`, a dict of named runs, each a
set of changes to those settings (a seed, an lr, a schedule; not the base), validated like
the section itself. Overrides rather than one class per run because a sweep of five seeds
should read as five one-line entries, not five copies of fifteen keys, and because it is
how `sweep.recipes` already changes `train`: one pattern for "a base plus changes".
Each run's cache key and provenance are its resolved settings (`FinetuneParams.run`), so
editing one run's entry leaves the others' checkpoints and outputs alone.

```yaml
finetune:
  base: lite0
  schedule: layerwise
  epochs: 4
  lr_backbone: 1.0e-5
  runs:
    lite0_ft: {}
    lite0_ft_seed1: {seed: 1}
    lite0_ft_last_half: {schedule: last_blocks, trainable_fraction: 0.5}
```
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal, Optional

from pydantic import Field, ValidationError, create_model, model_validator

from tasks.params.base import _describe, _Section

SCHEDULES = ("head_then_backbone", "end_to_end", "layerwise", "last_blocks")


class FinetuneRun(_Section):
    """One fine-tuning run, fully resolved: what `tasks.finetune` trains with."""

    # Where checkpoints wait, how often and how many processes decode: the trained bytes
    # are the same (tested), so they are not DVC params of finetune@<run>, nor in its
    # checkpoints' key or model.json.
    SPEED_ONLY: ClassVar[frozenset[str]] = frozenset({"cache_dir", "workers",
                                                      "checkpoint_steps"})

    # The backbone variant to start from (a key of `models`); the run's output is a new
    # variant folder beside it, in the same layout.
    base: str = "lite0"
    # head_then_backbone (1st place): the head alone for head_epochs, then the backbone
    # alone at lr_backbone. end_to_end (2nd): both at once, each at its own lr.
    # layerwise (4th): block i of D at lr_backbone * layer_decay**(D-1-i), the stem one
    # step lower still. last_blocks (6th): only the last trainable_fraction of the blocks.
    schedule: Literal["head_then_backbone", "end_to_end", "layerwise", "last_blocks"] = (
        "end_to_end")
    epochs: int = Field(3, ge=1)
    # head_then_backbone only: epochs of the first phase; the backbone trains for the rest.
    head_epochs: int = Field(1, ge=1)
    # head_then_backbone only: the first phase's optimizer (1st place: SGD), with `momentum`
    # for sgd; the backbone's phase, and every other schedule, use AdamW.
    head_optimizer: Literal["adamw", "sgd"] = "adamw"
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    # Images per forward pass; an optimizer step takes `accumulate` of them, so the
    # effective batch is batch_size * accumulate within what the device's memory holds.
    batch_size: int = Field(32, ge=1)
    accumulate: int = Field(1, ge=1)
    # The head learns from scratch; the backbone is already good and is easily wrecked, so
    # its lr is orders lower (2nd place: 1e-4 head, 1e-7 ViT-H backbone).
    lr_head: float = Field(1e-4, gt=0.0)
    lr_backbone: float = Field(1e-6, gt=0.0)
    # layerwise only: each block closer to the input gets this factor more (4th place: 0.6-0.8).
    layer_decay: float = Field(0.7, gt=0.0, le=1.0)
    # layerwise only, instead of layer_decay: lrs in steps by block depth, {bound: lr} for
    # the blocks numbered below each bound and at or above the one before (4th place's code:
    # {10: 1.25e-6, 20: 2.5e-6, 26: 5.0e-6, 32: 1.0e-5}); the stem takes the first step's lr,
    # the top lr_backbone. The last bound must cover every block of the tower.
    block_lrs: dict[Annotated[int, Field(ge=1)], Annotated[float, Field(gt=0.0)]] = Field(
        default_factory=dict)
    # last_blocks only: the share of the blocks that train, the last ones, rounded up.
    trainable_fraction: float = Field(0.5, gt=0.0, le=1.0)
    # BatchNorm in the parts that train (EfficientNet; a ViT has none): `train` re-estimates
    # its running statistics from each batch, as a module in train mode does; `frozen` keeps
    # the base's statistics (eval-mode BatchNorm) while its scale and shift still learn, the
    # usual choice when batches are small or the set is small beside the pretraining data.
    batchnorm: Literal["train", "frozen"] = "train"
    # Each epoch's input size, in order (1st place: 224 -> 280 -> 290), one per epoch; empty:
    # the base's size throughout. A ViT's position embeddings are interpolated to each new
    # grid; the variant is written at the last size (tasks/finetune_resolution.py).
    image_sizes: list[Annotated[int, Field(ge=16, le=1024)]] = Field(default_factory=list)
    # Share of each phase's optimizer steps with a linear warm-up, then a half cosine to 0.
    warmup_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    # The projection head's and ArcFace centres' weight decay; null: weight_decay
    # (4th place: 1e-3 for the tower, 1e-5 for the head).
    weight_decay_head: Optional[float] = Field(None, ge=0.0)
    # The projection head's size (GUIE caps embeddings at 64) and its ArcFace loss.
    embedding_dim: int = Field(64, ge=2, le=64)
    arcface_scale: float = Field(30.0, gt=0.0)
    arcface_margin: float = Field(0.3, ge=0.0, lt=1.5)
    # arcface: one margin (arcface_margin) for every class; dynamic_arcface (4th place, as
    # `train` has it): each class's margin from margin_min (its most frequent training class)
    # to margin_max (its rarest), linear in images^(-1/4).
    loss: Literal["arcface", "dynamic_arcface"] = "arcface"
    margin_min: float = Field(0.2, ge=0.0, lt=1.5)
    margin_max: float = Field(0.45, ge=0.0, lt=1.5)
    # Added to the margin at each epoch after the first (2nd place raised its margin every
    # epoch): epoch k trains at arcface_margin + (k - 1) * margin_step.
    margin_step: float = Field(0.0, ge=0.0)
    # Centres a class (sub-center ArcFace, 2nd place: a class scores by its closest one).
    subcenters: int = Field(1, ge=1)
    seed: int = 0
    # auto: the GPU when torch sees one, else the CPU; cpu; cuda; cuda:N.
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    # Autocast dtype on CUDA (fp16 with a gradient scaler); the CPU always runs fp32.
    precision: Literal["fp16", "bf16", "fp32"] = "fp16"
    # CPU threads: a float sum's order, and so the trained bytes, depend on it; fixed, a
    # rerun (or a resumed run) with the same params gives the same weights.
    threads: int = Field(2, ge=1)
    # Processes decoding and preprocessing images ahead of the model (extract's decode
    # pool); 0 decodes in the training process. The trained bytes are the same for any.
    workers: int = Field(2, ge=0)
    # Per-epoch checkpoints, outside DVC's outputs (DVC deletes those before a stage runs),
    # in a folder per run keyed by its settings and inputs; deleted when the run finishes.
    cache_dir: str = ".cache/finetune"
    # Also a checkpoint every this many optimizer steps within an epoch (0: after each epoch
    # only): a one-epoch ViT-H run loses at most this many steps to a kill, not the epoch.
    # A ViT-H checkpoint (weights and AdamW moments) is ~7.5 GB, so not every step.
    checkpoint_steps: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _phases(self) -> "FinetuneRun":
        if self.schedule == "head_then_backbone" and self.head_epochs >= self.epochs:
            raise ValueError(f"head_epochs = {self.head_epochs} leaves no epoch of the "
                             f"{self.epochs} for the backbone: make it < epochs")
        if self.image_sizes and len(self.image_sizes) != self.epochs:
            raise ValueError(f"image_sizes {self.image_sizes}: one size an epoch, "
                             f"{self.epochs} of them (or none: the base's size)")
        if self.margin(self.epochs) >= 1.5:
            raise ValueError(f"margin_step = {self.margin_step} raises the margin to "
                             f"{self.margin(self.epochs):g} by epoch {self.epochs}: keep it < 1.5")
        if self.loss == "dynamic_arcface" and self.margin_min > self.margin_max:
            raise ValueError(f"margin_min = {self.margin_min} > margin_max = {self.margin_max}: "
                             "the rarest class's margin must be the larger")
        if self.head_optimizer != "adamw" and self.schedule != "head_then_backbone":
            raise ValueError(f"head_optimizer = {self.head_optimizer!r} is for the head phase "
                             f"of head_then_backbone; schedule = {self.schedule!r} has none")
        if self.block_lrs:
            if self.schedule != "layerwise":
                raise ValueError(f"block_lrs is a layerwise schedule; schedule = "
                                 f"{self.schedule!r}: leave it empty")
            if list(self.block_lrs) != sorted(self.block_lrs):
                raise ValueError(f"block_lrs {self.block_lrs}: give the bounds in rising order")
        return self

    def image_size(self, epoch: int, base: int) -> int:
        """The input size during epoch `epoch` (from 1) of a base taking `base`."""
        return self.image_sizes[epoch - 1] if self.image_sizes else base

    def margin(self, epoch: int) -> float:
        """ArcFace's largest margin during epoch `epoch` (from 1)."""
        top = self.margin_max if self.loss == "dynamic_arcface" else self.arcface_margin
        return top + (epoch - 1) * self.margin_step


def _optional(field) -> tuple[object, None]:
    """A run's change to one setting: the setting's type and bounds, or not given."""
    kind = Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation
    return Optional[kind], None


# The changes one run makes: any FinetuneRun setting but `base`, with the same types and
# bounds, so a bad value names its own key (finetune.runs.<run>.<key>); unknown keys are
# refused. The base is the section's: dvc.yaml's finetune@<run> depends on exactly that
# variant's folder (data/00_models/${finetune.base}), and a soup's runs share one base.
RunChanges = create_model("RunChanges", __base__=_Section,
                          **{name: _optional(f) for name, f in FinetuneRun.model_fields.items()
                             if name != "base"})


class FinetuneParams(FinetuneRun):
    """The shared settings and the named runs (each: changes to them)."""

    runs: dict[str, RunChanges] = Field(default_factory=dict)  # type: ignore[valid-type]

    @model_validator(mode="after")
    def _runs_valid(self) -> "FinetuneParams":
        for name in self.runs:
            if not name.replace("_", "").isalnum():
                raise ValueError(f"runs.{name}: use letters, digits and '_' only "
                                 "(it names the output variant's folder)")
            try:
                self.run(name)
            except ValidationError as exc:
                problems = "; ".join(_describe(e) for e in exc.errors())
                raise ValueError(f"runs.{name}: {problems}") from None
        return self

    def run(self, name: str) -> FinetuneRun:
        """Run `name`: the shared settings with its changes, validated as one run."""
        if name not in self.runs:
            raise KeyError(f"finetune run {name!r}: allowed are {sorted(self.runs)}")
        shared = self.model_dump(exclude={"runs"})
        changes = self.runs[name].model_dump(exclude_unset=True)
        return FinetuneRun.model_validate({**shared, **changes})


def check_runs(finetune: FinetuneParams, models: list[str]) -> None:
    """The runs start from a built backbone (a `models` key) and take none's name (a name
    must say which stage group makes a variant)."""
    if finetune.runs and finetune.base not in models:
        raise ValueError(f"finetune.base = {finetune.base!r}: allowed are {models} (models)")
    for name in finetune.runs:
        if name in models:
            raise ValueError(f"finetune.runs.{name}: the name of a models variant; a variant "
                             "name must say which stage group makes it")
