"""Does each stage's cost per image stay flat from 10^3 to 10^5 images?

For each size N this makes a synthetic imagefolder of N small JPEGs (N / 20
classes, 20 images each, 48-64 px, cached under .cache/bench-scale/ between
runs), a project folder with its own params.yaml, and a tiny random-init
open_clip ViT (32 px, 256-d output) in the layout the models stage writes, so the
model is not what is measured. Then it runs the real stage commands, the ones
`dvc repro` runs, one process each, against one shared Prefect server:

    python -m flows.download images / sample / shard / extract tiny / train / evaluate

(train twice: with the whole ArcFace softmax, the default, and with Partial FC's
256 classes a step, `train.class_sample`), and reads each process's wall time and
peak RSS (`os.wait4`; for a stage that starts processes of its own, the largest of
them, not their sum), and from the
Prefect server the stage flow run's own duration: the work, without the
interpreter's start and imports (seconds that vary with the machine's load).

Every stage still has a fixed cost (loading a model, Prefect's task runs,
fitting a PCA) that would make per-image figures fall with N. So a run of
FIXED_N images, in the same session, measures it, and per-image cost is
reported twice: raw (flow seconds / N) and marginal ((flow seconds - the
FIXED_N run's) / (N - FIXED_N)). The test of flat cost is the marginal figure
at the largest N over that at the size before it (`marginal_cost_ratio`): within
1.5x. At the smallest size a stage's work is a few hundredths of a second beside
its fixed cost, inside the timing noise, so a marginal figure there can be ~0 and
a ratio to it means nothing; `ms_per_image_ratio` is the raw figure's, largest
over smallest. Memory is compared with the features' own size (N x dim x 4 bytes).

Prints JSON. Run on demand: `python benchmarks/scale.py [--sizes 1000 10000 100000]`
(about 7 minutes for those three on 2 cores once the images are cached).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from orchestration import start_server  # noqa: E402

PER_CLASS = 20
FIXED_N = 100
# (name in the report, stage, foreach key, train params changed for this run)
STAGES = [("download", "download", "images", {}), ("sample", "sample", None, {}),
          ("shard", "shard", None, {}), ("extract", "extract", "tiny", {}),
          # Partial FC: a 256-class softmax a step, whatever the number of classes
          ("train_class_sample_256", "train", None, {"class_sample": 256}),
          ("train", "train", None, {}), ("evaluate", "evaluate", None, {})]
DIM = 256  # the backbone's output: 1 KiB of float32 features an image (2xclip: 6 KiB)
TINY = {"model_cfg": {"embed_dim": DIM,
                      "vision_cfg": {"image_size": 32, "layers": 2, "width": 32,
                                     "head_width": 16, "patch_size": 8},
                      "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16,
                                   "heads": 2, "layers": 1}},
        "preprocess_cfg": {"size": 32, "mean": [0.5] * 3, "std": [0.5] * 3}}


def make_images(root: Path, n: int) -> Path:
    """`n` JPEGs in n / PER_CLASS class folders: each class a colour and a pattern of its
    own plus per-image noise, so the head has something to learn. Made once per n."""
    folder = root / f"images-{n}"
    done = folder / ".complete"
    if done.exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    rng = np.random.default_rng(n)
    for c in range(n // PER_CLASS):
        cls = folder / f"c{c:06d}"
        cls.mkdir(parents=True)
        base = rng.integers(0, 256, size=(8, 8, 3)).astype(np.float32)
        for i in range(PER_CLASS):
            side = int(rng.integers(48, 65))
            img = np.kron(base, np.ones((8, 8, 1)))[:side, :side]
            img = np.clip(img + rng.normal(0, 24, size=img.shape), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(cls / f"{i:02d}.jpg", quality=85)
    done.touch()
    return folder


def write_model(project: Path) -> None:
    """The tiny backbone as data/00_models/tiny, the layout the models stage writes."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    from tasks.backbone import CONFIG_NAME, WEIGHTS_NAME
    from tasks.schemas.io import sha256_file

    d = project / "data" / "00_models" / "tiny"
    d.mkdir(parents=True)
    (d / CONFIG_NAME).write_text(json.dumps(TINY))
    torch.manual_seed(0)
    model = open_clip.create_model(f"local-dir:{d}")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / WEIGHTS_NAME))
    (d / "model.json").write_text(json.dumps({
        "model_name": "tiny-vit", "pretrained": "random-init",
        "checkpoint_sha256": sha256_file(d / WEIGHTS_NAME), "image_size": 32, "dim": DIM}))


def write_params(project: Path, images: Path) -> None:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["models"] = {"tiny": {"kind": "checkpoint", "arch": "ViT-S-32", "path": "unused"}}
    params["variants"] = {"tiny": "models"}
    params["sources"] = {"images": {"kind": "imagefolder", "path": str(images)}}
    params["sample"].update(samples=PER_CLASS, num_classes={"images": "all"})
    params["extract"]["cache_dir"] = ""  # a cache would make reruns free: measure the work
    params["train"].update(epochs=3, early_stopping_patience=0)
    params["evaluate"].update(pca_dim=8, bootstrap_resamples=200)
    params.pop("sweep", None)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def last_flow_seconds() -> float:
    """The duration of the latest top-level flow run on the benchmark's Prefect server."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentTaskRunId
    from prefect.client.schemas.sorting import FlowRunSort

    top = FlowRunFilter(parent_task_run_id=FlowRunFilterParentTaskRunId(is_null_=True))
    with get_client(sync_client=True) as client:
        (run,) = client.read_flow_runs(flow_run_filter=top, sort=FlowRunSort.START_TIME_DESC,
                                       limit=1)
    return (run.end_time - run.start_time).total_seconds()


def run_stage(project: Path, stage: str, key: str | None, env: dict) -> dict:
    """One stage as its own process: process and flow-run seconds, peak RSS (MiB)."""
    cmd = [sys.executable, "-m", f"flows.{stage}"] + ([key] if key else [])
    log = project / f"{stage}.log"
    start = time.perf_counter()
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, cwd=project, env=env, stdout=fh, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{stage} failed ({proc.returncode}):\n{tail}")
    return {"process_seconds": seconds, "seconds": last_flow_seconds(),
            "peak_rss_mib": usage.ru_maxrss / 1024}


def run_size(n: int, images_root: Path, env: dict) -> dict:
    images = make_images(images_root, n)
    with tempfile.TemporaryDirectory(prefix=f"scale-{n}-") as tmp:
        project = Path(tmp)
        write_params(project, images)
        write_model(project)
        results = {}
        for name, stage, key, train in STAGES:
            params = yaml.safe_load((project / "params.yaml").read_text())
            params["train"].update(base_train(project) | train)
            (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
            results[name] = run_stage(project, stage, key, env)
        return results


def base_train(project: Path) -> dict:
    """The train section write_params gave, kept apart so one run's changes don't leak."""
    saved = project / "train.base.yaml"
    if not saved.exists():
        saved.write_text(yaml.safe_dump(yaml.safe_load((project / "params.yaml").read_text())
                                        ["train"]))
    return yaml.safe_load(saved.read_text())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000, 100_000])
    parser.add_argument("--images", type=Path, default=REPO / ".cache" / "bench-scale")
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    with tempfile.TemporaryDirectory(prefix="scale-prefect-") as home:
        env["PREFECT_HOME"] = home
        server, url = start_server(env)
        env["PREFECT_API_URL"] = os.environ["PREFECT_API_URL"] = url
        try:
            run_size(FIXED_N, args.images, env)  # warm-up: page cache, Prefect's database
            fixed = run_size(FIXED_N, args.images, env)
            results = {n: run_size(n, args.images, env) for n in args.sizes}
        finally:
            server.terminate()
            server.wait(30)
    print(json.dumps(report(fixed, results), indent=2))


def report(fixed: dict, results: dict[int, dict]) -> dict:
    sizes = sorted(results)
    stages: dict[str, dict] = {}
    for stage, *_ in STAGES:
        rows = {}
        for n in sizes:
            r = results[n][stage]
            rows[n] = {"process_seconds": round(r["process_seconds"], 2),
                       "seconds": round(r["seconds"], 2),
                       "ms_per_image": round(1000 * r["seconds"] / n, 3),
                       "marginal_ms_per_image": round(
                           1000 * (r["seconds"] - fixed[stage]["seconds"]) / (n - FIXED_N), 3),
                       "peak_rss_mib": round(r["peak_rss_mib"], 1)}
        low, high = rows[sizes[0]], rows[sizes[-1]]
        before = rows[sizes[-2]] if len(sizes) > 1 else low
        stages[stage] = {
            "fixed_process_seconds": round(fixed[stage]["process_seconds"], 2),
            "fixed_seconds": round(fixed[stage]["seconds"], 2),
            "fixed_peak_rss_mib": round(fixed[stage]["peak_rss_mib"], 1),
            "sizes": rows,
            "marginal_cost_ratio": round(high["marginal_ms_per_image"]
                                         / max(before["marginal_ms_per_image"], 1e-9), 2),
            "ms_per_image_ratio": round(high["ms_per_image"] / max(low["ms_per_image"], 1e-9), 2),
            "rss_growth_mib": round(high["peak_rss_mib"] - fixed[stage]["peak_rss_mib"], 1)}
        # The bar: per-image cost within 1.5x from the smallest size to the largest,
        # raw, and (stricter, the fixed cost taken out) marginal between the two largest.
        stages[stage]["within_1_5x"] = {
            "raw": stages[stage]["ms_per_image_ratio"] <= 1.5,
            "marginal": stages[stage]["marginal_cost_ratio"] <= 1.5}
    return {"per_class": PER_CLASS, "fixed_n": FIXED_N, "cpu_count": os.cpu_count(),
            "features_mib": {n: round(n * DIM * 4 / 2**20, 2) for n in sizes}, "stages": stages}


if __name__ == "__main__":
    main()
