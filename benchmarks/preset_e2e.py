"""The `2xclip` preset end to end through the real `dvc repro`, on miniature data, on this machine.

Builds a temporary git + DVC project from this one's files (flows/, tasks/,
presets/, dvc.yaml, params.yaml, .dvc/plots), runs `python -m flows.preset
2xclip` in it, then points the preset's four sources at miniature copies of
their published layouts (tests/miniatures.py), each source keeping its kind:
the two kaggle:// competitions as local copies of the zips Kaggle serves,
Products-10K as a local folder, RP2K as its local zip. Only sizes shrink
(classes, images per class, epochs, batches, shard size: "shrunk" in the
output gives each value and the preset's); the backbones stay the preset's
two real ViT-L architectures, with random-init weights placed in a private
Hugging Face cache (tests/hf_cache.py) that the `models` stage reads offline.
Then it times each stage of `dvc repro` (from DVC's "Running stage" lines),
checks that a second `dvc repro` runs nothing and that `dvc plots show
--json` reports no errors, and prints one JSON object. Any failure exits
non-zero. Needs about 15 GB free under the temp dir (several checkpoint copies).
Run on demand: `python benchmarks/preset_2xclip.py [--keep DIR]` (DIR: build
the project there and keep it; otherwise it is deleted).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import polars as pl
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "benchmarks")]
import miniatures  # noqa: E402  (tests/: the datasets' layouts)
from hf_cache import place_weights  # noqa: E402  (tests/: random weights in an HF cache)
from orchestration import start_server  # noqa: E402  (one shared Prefect server)

BIN = Path(sys.executable).parent
PRESET = "2xclip"
PROJECT_FILES = ["flows", "tasks", "presets", "dvc.yaml", "params.yaml", ".gitignore"]
CLASSES = 5  # per source
# (section, key) -> the value this run uses instead of the preset's
SHRINK = {
    ("sample", "num_classes"): dict.fromkeys(("imagenet", "landmarks", "products10k", "rp2k"),
                                             CLASSES),
    ("sample", "samples"): 8,
    ("sample", "val_fraction"): 0.125,  # 5 of 55 images a class for val: 1 of 8 keeps one
    ("sample", "eval_fraction"): 0.2,  # 0.02 of 5 classes holds none out: 1 of 5 per source
    ("shard", "max_samples"): 32,
    ("extract", "batch_size"): 16,
    ("train", "epochs"): 3,
    ("train", "step_epochs"): 1,  # x0.1 after 1/3 and 2/3 of training, as 100 of 300 epochs
}


def fail(message: str) -> None:
    print(f"preset_2xclip: FAILED: {message}", file=sys.stderr)
    raise SystemExit(1)


def sh(args: list[str], cwd: Path, env: dict) -> str:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode:
        output = proc.stdout[-4000:] + proc.stderr[-4000:]
        fail(f"`{' '.join(args)}` exited {proc.returncode}:\n{output}")
    return proc.stdout + proc.stderr


@contextmanager
def distinct_images(dataset: int) -> Iterator[None]:
    """The builders' image seeds overlap across datasets (imagenet 100*c+n, rp2k 400*c+n...):
    offset them, or the pipeline's per-image cache embeds a fifth of the images once for two."""
    image = miniatures._img
    miniatures._img = lambda path, seed: image(path, 1_000_000 * dataset + seed)
    try:
        yield
    finally:
        miniatures._img = image


def miniature_sources(root: Path) -> dict[str, dict]:
    """The four datasets as published, in miniature; `sources` entries of the preset's kinds."""
    stage = root / "staging"
    with distinct_images(1):
        miniatures.imagenet(stage / "imagenet", classes=CLASSES + 1, per_class=10)
    with distinct_images(2):
        miniatures.landmarks(stage / "glr", sizes=(10, 9, 9, 8, 8, 6, 3, 1))
    with distinct_images(3):
        miniatures.rp2k(stage / "rp2k", per_class=10)
    with distinct_images(4):
        miniatures.products10k(root / "products10k", classes=CLASSES + 1, per_class=10)
    uris = {
        "imagenet": miniatures.zip_dir(stage / "imagenet",
                                       root / "imagenet-object-localization-challenge.zip"),
        "landmarks": miniatures.zip_dir(stage / "glr", root / "landmark-recognition-2021.zip"),
        "products10k": root / "products10k",
        "rp2k": miniatures.zip_dir(stage / "rp2k", root / "rp2k_dataset.zip", top="all"),
    }
    shutil.rmtree(stage)
    return {name: {"kind": name, "uri": str(uri)} for name, uri in uris.items()}


def configure(repo: Path, data: Path) -> dict:
    """Shrink the preset's sizes and swap its sources; returns what changed, from what."""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    changed = {}
    for (section, key), value in SHRINK.items():
        changed[f"{section}.{key}"] = {"preset": params[section][key], "run": value}
        params[section][key] = value
    sources = miniature_sources(data)
    for name, entry in sources.items():
        was = params["sources"][name]
        assert was["kind"] == entry["kind"], (was, entry)
        changed[f"sources.{name}.uri"] = {"preset": was["uri"], "run": entry["uri"]}
        params["sources"][name] = {**was, **entry}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False, allow_unicode=True))
    return changed


def make_project(repo: Path, env: dict) -> None:
    repo.mkdir(parents=True)
    for name in PROJECT_FILES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(REPO / name, repo / name)
    sh(["git", "init", "-q"], repo, env)
    sh([str(BIN / "dvc"), "init", "-q"], repo, env)
    shutil.copytree(REPO / ".dvc" / "plots", repo / ".dvc" / "plots")  # the plot templates
    sh([sys.executable, "-m", "flows.preset", PRESET], repo, env)


def repro(repo: Path, env: dict, log: Path) -> tuple[dict[str, float], float]:
    """`dvc repro`, streamed; a stage's seconds run from its "Running stage" line to the next."""
    starts, lines = [], []
    begin = time.perf_counter()
    with log.open("a", buffering=1) as out, subprocess.Popen(
            [str(BIN / "dvc"), "repro"], cwd=repo, env=env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc:
        for line in proc.stdout:
            out.write(line)
            lines.append(line)
            if found := re.search(r"Running stage '([^']+)'", line):
                starts.append((found.group(1), time.perf_counter()))
    end = time.perf_counter()
    if proc.returncode:
        stage = starts[-1][0] if starts else "(before any stage)"
        fail(f"`dvc repro` exited {proc.returncode} in stage {stage} (log: {log}, kept with "
             f"--keep); its tail:\n" + "".join(lines[-80:]))
    ends = [t for _, t in starts[1:]] + [end]
    return {name: round(e - t, 1) for (name, t), e in zip(starts, ends)}, round(end - begin, 1)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def image_counts(repo: Path) -> dict:
    raw = {p.parent.name: pl.read_parquet(p).height
           for p in sorted((repo / "data/01_raw").glob("*/catalog.parquet"))}
    summary = read_json(repo / "data/02_sampled/summary.json")
    shards = read_json(repo / "data/03_shards/index.json")["shardlist"]
    return {"catalogued": raw, "sampled": summary["images"], "classes": summary["classes"],
            "per_source_split": summary["per_source_split"],
            "sharded": sum(s["nsamples"] for s in shards), "shards": len(shards),
            "rejected": pl.read_parquet(repo / "data/03_shards/rejects.parquet").height}


def run(work: Path) -> dict:
    wall, load = time.perf_counter(), os.getloadavg()  # > cpus: others share the machine
    repo, hf_home, log = work / "project", work / "hf_home", work / "repro.log"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(work / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PATH=f"{BIN}{os.pathsep}{env['PATH']}", PYTHONUNBUFFERED="1",
               HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", GIT_AUTHOR_NAME="b",
               GIT_AUTHOR_EMAIL="b@b", GIT_COMMITTER_NAME="b", GIT_COMMITTER_EMAIL="b@b")
    make_project(repo, env)
    shrunk = configure(repo, work / "datasets")
    models = yaml.safe_load((repo / "params.yaml").read_text())["models"]
    for spec in models.values():  # the preset's (arch, tag)s, random-init
        place_weights(hf_home, spec["arch"], spec["pretrained"])
    sh(["git", "add", "-A"], repo, env)
    sh(["git", "commit", "-qm", f"{PRESET}, miniature"], repo, env)
    setup_s = round(time.perf_counter() - wall, 1)
    server, url = start_server(env)
    try:
        env["PREFECT_API_URL"] = url
        stages, repro_s = repro(repo, env, log)
        begin = time.perf_counter()
        again = sh([str(BIN / "dvc"), "repro"], repo, env)
        noop_s = round(time.perf_counter() - begin, 1)
    finally:
        server.terminate()
        server.wait(timeout=30)
    if reran := re.findall(r"Running stage '([^']+)'", again):
        fail(f"the second `dvc repro` reran {reran}")
    plots = json.loads(sh([str(BIN / "dvc"), "plots", "show", "--json"], repo, env))
    if plots.get("errors"):
        fail(f"`dvc plots show --json` reports errors: {plots['errors']}")
    return {
        "preset": PRESET,
        "models": {name: {**spec, "weights": "random-init, offline HF cache"}
                   for name, spec in models.items()},
        "data": "miniatures of the published layouts (tests/miniatures.py); the kaggle:// "
                "sources are local copies of the competitions' zips, not downloads",
        "shrunk": shrunk,
        "stage_seconds": stages,
        "repro_seconds": repro_s,
        "noop_repro_seconds": noop_s,
        "setup_seconds": setup_s,
        "wall_seconds": round(time.perf_counter() - wall, 1),
        "images": image_counts(repo),
        "metrics": {"train": read_json(repo / "data/05_head/metrics.json"),
                    "evaluate": read_json(repo / "data/06_eval/metrics.json")},
        "export": read_json(repo / "data/07_export/embedder.json"),
        "plots": sorted(plots.get("data", {})),
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
                    "platform": platform.platform(),
                    "load_avg_1_5_15_min": {"start": load, "end": os.getloadavg()}},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, metavar="DIR", help="build it in DIR and keep it")
    args = parser.parse_args()
    if args.keep and args.keep.exists() and any(args.keep.iterdir()):
        fail(f"--keep {args.keep}: not empty")
    work = args.keep.resolve() if args.keep else Path(tempfile.mkdtemp(prefix="preset_2xclip_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        result = run(work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
