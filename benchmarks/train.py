"""How long a `train` epoch takes at the 2xclip preset's size on this CPU, in RAM and streamed,
and what a GPU would change (a projection, labelled as one).

The preset trains on ~950,000 images x 1,536-d (two ViT-L backbones of 768-d each), 17,850
classes, batch 128, 300 epochs (presets/2xclip.yaml). This writes `--fraction` of those rows
(default 5%, with all 17,850 classes) as two backbones' Arrow feature shards, then times one
epoch of `train_head` on them, with the preset's own `train` settings (sub-center ArcFace
with 3 centres a class, Adam, the step schedule), in three child processes, so each has its
own peak RSS:

- `ram`: the split read into one preallocated matrix (train.max_memory_gb above its size);
- `streamed`: every batch read from the memory-mapped shards (train.max_memory_gb tiny);
- `partial_fc`: in RAM, each step's ArcFace softmax over 1,024 classes (train.class_sample);
- `plain`: in RAM with params.yaml's defaults instead (plain ArcFace, AdamW, one centre a
  class): what this benchmark measured before it took the preset's settings, as a baseline
  for the ratio `preset_over_plain` (times on a busy machine vary; ratios in one run less).

The full epoch is extrapolated linearly from the fraction: the step count scales with rows,
and a step's work does not depend on the row count (the ArcFace weights are 17,850 x 64
either way). In the same run it times the head's matmuls alone on this CPU (GFLOP/s) and sets
them against published dense peak throughput of an A100 and an H100 (SXM): a projection of a
GPU epoch, not a measurement. Prints JSON. Run on demand:
`python benchmarks/train.py [--fraction 0.05]`.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PRESET = {"images": 950_000, "dims": (768, 768), "classes": 17_850, "batch": 128, "epochs": 300}
SHARD_ROWS = 10_000  # rows per feature file: extract writes one file per WebDataset shard
EMBEDDING_DIM = 64
# Published dense peak throughput, TFLOP/s (NVIDIA A100 and H100 SXM datasheets): fp32 on
# CUDA cores, TF32 and bf16 on tensor cores. Peaks: small matmuls reach a fraction of them.
GPU_PEAK_TFLOPS = {"A100": {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0},
                   "H100": {"fp32": 67.0, "tf32": 495.0, "bf16": 989.0}}
# Assumed per-step floor on a GPU: ~40 small kernel launches (forward, backward, AdamW) at
# ~5-10 us each, plus the host-to-device copy of one batch. An assumption, not a measurement.
GPU_STEP_FLOOR_S = 4e-4


def write_features(root: Path, rows: int, classes: int) -> None:
    """`rows` random features of two backbones, written as feature shards like `extract`'s."""
    from tasks.schemas.features import write_features as write

    rng = np.random.default_rng(0)
    ids = rng.integers(0, classes, size=rows)
    ids[:classes] = np.arange(min(classes, rows))  # every class present, as in the preset
    keys = [f"k{i}" for i in range(rows)]
    meta = {"model_name": "m", "pretrained": "", "checkpoint_sha256": "0", "image_size": "224"}
    for b, dim in enumerate(PRESET["dims"]):
        for start in range(0, rows, SHARD_ROWS):
            end = min(start + SHARD_ROWS, rows)
            emb = rng.standard_normal((end - start, dim), dtype=np.float32)
            write(root / f"b{b}" / "train" / f"train-{start // SHARD_ROWS:06d}.arrow",
                  keys[start:end], ids[start:end], emb, {**meta, "dim": str(dim)})


def rss_anon_bytes() -> int:
    """Anonymous resident memory now (heap, tensors): what a memory-mapped file's pages,
    which the kernel can drop and reread, do not count towards."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def child(root: Path, mode: str, batch: int) -> dict:
    """One epoch of train_head on the features under `root`, in RAM or streamed."""
    from tasks.features import SplitFeatures, load_or_map
    from tasks.params.train import TrainParams
    from tasks.train import train_head

    peak_anon = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak_anon[0] = max(peak_anon[0], rss_anon_bytes())
            time.sleep(0.05)

    threading.Thread(target=sample, daemon=True).start()
    variants = [f"b{b}" for b in range(len(PRESET["dims"]))]
    start = time.perf_counter()
    train = load_or_map(variants, "train", 1e-9 if mode == "streamed" else 1e6, root)
    load_s = time.perf_counter() - start
    dim = sum(PRESET["dims"])
    val = SplitFeatures([], np.zeros(0, np.int64), np.zeros((0, dim), np.float32))
    if mode == "plain":  # the baseline this benchmark measured before: params' defaults
        params = TrainParams(epochs=1, batch_size=batch, embedding_dim=EMBEDDING_DIM,
                             device="cpu", threads=preset_train()["threads"])
    else:
        params = TrainParams(**{**preset_train(), "epochs": 1, "device": "cpu",
                                "class_sample": PARTIAL_FC if mode == "partial_fc" else 0})
    assert (params.batch_size, params.embedding_dim) == (batch, EMBEDDING_DIM)
    # warm-up: the first batches on these CPUs run several times slower
    warm = np.random.default_rng(1).standard_normal((2_000, dim), dtype=np.float32)
    train_head(SplitFeatures([str(i) for i in range(2_000)], train.class_ids[:2_000], warm),
               val, params)
    head_start = time.perf_counter()
    train_head(train, val, params)
    epoch_s = time.perf_counter() - head_start
    stop.set()
    return {"mode": mode, "rows": len(train.keys), "load_s": round(load_s, 2),
            "epoch_s": round(epoch_s, 2), "threads": params.threads,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "peak_rss_anon_mb": round(peak_anon[0] / 2**20)}


PARTIAL_FC = 1024  # partial_fc mode: train.class_sample, classes in each step's softmax


def preset_train() -> dict:
    """The 2xclip preset's `train` section over params.yaml's: its loss (sub-center ArcFace,
    3 centres a class), head, optimizer and schedule, as `dvc repro` would train it."""
    from tasks.presets import preset_params

    base = yaml.safe_load((REPO / "params.yaml").read_text())
    return preset_params("2xclip", base)["train"]


def head_flops_per_step(batch: int, dim: int, classes: int) -> float:
    """Multiply-adds x 2 of one training step's matmuls: the 1,536 -> 64 projection (forward
    and weight gradient) and the 64 x (classes x centres) cosines (forward, input and weight
    gradients); `classes` counts every centre."""
    projection = 2 * batch * dim * EMBEDDING_DIM * 2
    cosines = 2 * batch * EMBEDDING_DIM * classes * 3
    return float(projection + cosines)


def cpu_matmul_gflops(batch: int, dim: int, classes: int, threads: int) -> float:
    """GFLOP/s this CPU sustains on the step's matmul shapes alone (fp32, `threads`)."""
    torch.set_num_threads(threads)
    x, w1 = torch.randn(batch, dim), torch.randn(dim, EMBEDDING_DIM)
    e, w2 = torch.randn(batch, EMBEDDING_DIM), torch.randn(EMBEDDING_DIM, classes)
    g = torch.randn(batch, classes)

    def step() -> None:
        x @ w1, x.T @ e  # projection forward, weight gradient
        e @ w2, g @ w2.T, e.T @ g  # cosines forward, input and weight gradients

    for _ in range(5):
        step()
    reps, start = 50, time.perf_counter()
    for _ in range(reps):
        step()
    return head_flops_per_step(batch, dim, classes) * reps / (time.perf_counter() - start) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fraction", type=float, default=0.05)
    parser.add_argument("--child", nargs=2, metavar=("ROOT", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    batch, classes, dim = PRESET["batch"], PRESET["classes"], sum(PRESET["dims"])
    if args.child:
        print(json.dumps(child(Path(args.child[0]), args.child[1], batch)))
        return
    if not 0 < args.fraction <= 1:
        sys.exit(f"--fraction = {args.fraction}: give a share of the preset's rows in (0, 1]")
    rows = int(PRESET["images"] * args.fraction)
    if rows < classes:  # fewer rows than classes: a smaller ArcFace, so a cheaper step
        sys.exit(f"--fraction = {args.fraction}: {rows} rows cannot hold all {classes} classes; "
                 f"give at least {classes / PRESET['images']:.3f}")
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        write_features(Path(tmp), rows, classes)
        for mode in ("ram", "streamed", "partial_fc", "plain"):
            out = subprocess.run([sys.executable, __file__, "--child", tmp, mode], check=True,
                                 capture_output=True, text=True).stdout
            runs[mode] = json.loads(out.strip().splitlines()[-1])
    scale = PRESET["images"] / rows
    steps = -(-PRESET["images"] // batch)
    centres = classes * preset_train()["subcenters"]
    flops_epoch = head_flops_per_step(batch, dim, centres) * steps
    gflops = cpu_matmul_gflops(batch, dim, centres, runs["ram"]["threads"])
    cpu_epoch = runs["ram"]["epoch_s"] * scale
    flop_bound = {name: {precision: round(flops_epoch / (tflops * 1e12), 2)
                         for precision, tflops in peaks.items()}
                  for name, peaks in GPU_PEAK_TFLOPS.items()}
    gpu = {name: {precision: round(max(t, steps * GPU_STEP_FLOOR_S), 1)
                  for precision, t in times.items()} for name, times in flop_bound.items()}
    measured_steps = -(-rows // batch)
    print(json.dumps({
        "preset": PRESET, "fraction": args.fraction, "rows_measured": rows,
        "measured": runs,
        "extrapolated_full_epoch_s": {m: round(r["epoch_s"] * scale) for m, r in runs.items()},
        "extrapolated_300_epochs_h": {m: round(r["epoch_s"] * scale * PRESET["epochs"] / 3600, 1)
                                      for m, r in runs.items()},
        "streamed_over_ram": round(runs["streamed"]["epoch_s"] / runs["ram"]["epoch_s"], 2),
        "preset_over_plain": round(runs["ram"]["epoch_s"] / runs["plain"]["epoch_s"], 2),
        f"partial_fc_{PARTIAL_FC}_over_ram": round(runs["partial_fc"]["epoch_s"]
                                                   / runs["ram"]["epoch_s"], 2),
        # the CPU time a step spends reading its batch from the mapped shards: on a GPU it
        # is not hidden behind the step unless read ahead
        "streamed_extra_ms_per_step": round(
            (runs["streamed"]["epoch_s"] - runs["ram"]["epoch_s"]) / measured_steps * 1e3, 2),
        "full_matrix_mb": round(PRESET["images"] * dim * 4 / 2**20),
        "head_gflop_per_epoch": round(flops_epoch / 1e9),
        "cpu_matmul_gflops": round(gflops, 1),
        "cpu_epoch_matmul_share": round(flops_epoch / (gflops * 1e9) / cpu_epoch, 2),
        "projection_gpu_flop_bound_epoch_s": flop_bound,
        "projection_gpu_epoch_s": gpu,
        "projection_note": "GPU epoch = max(epoch FLOPs / published dense peak, steps x "
                           f"{GPU_STEP_FLOOR_S * 1e3} ms assumed per-step floor); not measured",
    }, indent=2))


if __name__ == "__main__":
    main()
