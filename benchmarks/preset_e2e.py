"""A network preset end to end through the real `dvc repro`, on miniature data, on this machine.

Builds a temporary git + DVC project from this one's files (flows/, tasks/,
presets/, dvc.yaml, params.yaml, .dvc/plots), runs `python -m flows.preset
<preset>` in it, then points the preset's sources (2xclip: four) at miniature copies of
their published layouts (tests/miniatures.py), each source keeping its kind:
the two kaggle:// competitions as local copies of the zips Kaggle serves,
Products-10K as a local folder, RP2K as its local zip. Only sizes shrink
(classes, images per class, epochs, batches, shard size: "shrunk" in the
output gives each value and the preset's); the backbones stay the preset's
real architectures, with random-init weights placed in a private Hugging Face
cache (tests/hf_cache.py) that the `models` stage reads offline. Presets:
`2xclip` (two ViT-L) and `finetune_vit_h14_seed004` (ViT-H-14 fine-tuned as four
seeds, then their uniform soup, which the head trains on and export ships).
Then it times each stage of `dvc repro` (from DVC's "Running stage" lines),
checks that a second `dvc repro` runs nothing and that `dvc plots show
--json` reports no errors, and prints one JSON object. Any failure exits
non-zero. The project's DVC cache hardlinks its outputs (`cache.type`), so a
checkpoint is on disk once, not twice; still, 2xclip needs about 15 GB free
under the temp dir and the ViT-H preset about 40 GB (six 3.9 GB backbones, a
7.5 GB resumable checkpoint while a run trains).
Run on demand: `python benchmarks/preset_e2e.py [--preset NAME] [--keep DIR]`
(DIR: build the project there and keep it; otherwise it is deleted).
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
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import polars as pl
import torch
import yaml
from safetensors import safe_open

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "benchmarks")]
import miniatures  # noqa: E402  (tests/: the datasets' layouts)
from hf_cache import place_weights  # noqa: E402  (tests/: random weights in an HF cache)
from orchestration import start_server  # noqa: E402  (one shared Prefect server)
from tasks.backbone import WEIGHTS_NAME  # noqa: E402

BIN = Path(sys.executable).parent
PROJECT_FILES = ["flows", "tasks", "presets", "dvc.yaml", "params.yaml", ".gitignore"]
SOURCES = ("imagenet", "landmarks", "products10k", "rp2k")


@dataclass(frozen=True)
class Miniature:
    """How far a preset shrinks: classes per source, and (section, key) -> this run's value
    instead of the preset's (a dotted key reaches into a section's dict)."""

    classes: int
    shrink: dict[tuple[str, str], object]


PRESETS = {
    "2xclip": Miniature(5, {
        ("sample", "num_classes"): dict.fromkeys(SOURCES, 5),
        ("sample", "samples"): 8,
        ("sample", "val_fraction"): 0.125,  # 5 of 55 images a class for val: 1 of 8 keeps one
        ("sample", "eval_fraction"): 0.2,  # 0.02 of 5 classes holds none out: 1 of 5 a source
        ("shard", "max_samples"): 32,
        ("extract", "batch_size"): 16,
        ("train", "epochs"): 3,
        ("train", "step_epochs"): 1,  # x0.1 after 1/3 and 2/3 of training, as 100 of 300 epochs
    }),
    # ViT-H-14 trains at several seconds an image on 2 CPU cores, four times over: 4 classes
    # a source (2 train, 1 validation, 1 test), 4 images a class, so each run sees 12 train
    # images of its two sources in 2 optimizer steps of 4 accumulated batches of 2 (the
    # preset: 4 of 8).
    "finetune_vit_h14_seed004": Miniature(4, {
        ("sample", "num_classes"): dict.fromkeys(SOURCES, 4),
        ("sample", "samples"): 4,
        ("sample", "val_fraction"): 0.25,  # 1 of 4 images a class for val
        ("sample", "eval_fraction"): 0.5,  # 2 of 4 classes a source held out: 1 val, 1 test
        ("shard", "max_samples"): 16,
        ("extract", "batch_size"): 8,
        ("extract", "num_workers"): 2,
        ("finetune", "batch_size"): 2,
        ("finetune", "accumulate"): 4,
        ("train", "epochs"): 2,
        ("train", "batch_size"): 16,
        ("evaluate", "pca_dim"): 8,  # the zero-shot lines' PCA: 12 train images fit no 64-d one
    }),
}


def fail(message: str) -> None:
    print(f"preset_e2e: FAILED: {message}", file=sys.stderr)
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


def miniature_sources(root: Path, classes: int, slugs: dict[str, str]) -> dict[str, dict]:
    """The four datasets as published, in miniature; `sources` entries of the preset's kinds.
    `slugs`: the Kaggle competition a kaggle:// source names, for its zip's file name."""
    stage = root / "staging"
    with distinct_images(1):
        miniatures.imagenet(stage / "imagenet", classes=classes + 1, per_class=10)
    with distinct_images(2):
        miniatures.landmarks(stage / "glr", sizes=(10, 9, 9, 8, 8, 6, 3, 1))
    with distinct_images(3):
        miniatures.rp2k(stage / "rp2k", per_class=10)
    with distinct_images(4):
        miniatures.products10k(root / "products10k", classes=classes + 1, per_class=10)
    uris = {
        "imagenet": miniatures.zip_dir(stage / "imagenet", root / f"{slugs['imagenet']}.zip"),
        "landmarks": miniatures.zip_dir(stage / "glr", root / f"{slugs['landmarks']}.zip"),
        "products10k": root / "products10k",
        "rp2k": miniatures.zip_dir(stage / "rp2k", root / "rp2k_dataset.zip", top="all"),
    }
    shutil.rmtree(stage)
    return {name: {"kind": name, "uri": str(uri)} for name, uri in uris.items()}


def configure(repo: Path, data: Path, mini: Miniature) -> dict:
    """Shrink the preset's sizes and swap its sources; returns what changed, from what."""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    used = params["sources"]
    changed = {}
    for (section, key), value in mini.shrink.items():
        if (section, key) == ("sample", "num_classes"):
            value = {name: n for name, n in value.items() if name in used}
        changed[f"{section}.{key}"] = {"preset": params[section][key], "run": value}
        params[section][key] = value
    slugs = {name: str(used[name]["uri"]).rsplit("/", 1)[-1] if name in used else name
             for name in ("imagenet", "landmarks")}
    sources = {name: entry for name, entry in miniature_sources(data, mini.classes, slugs).items()
               if name in used}
    for name, entry in sources.items():
        was = params["sources"][name]
        assert was["kind"] == entry["kind"], (was, entry)
        changed[f"sources.{name}.uri"] = {"preset": was["uri"], "run": entry["uri"]}
        params["sources"][name] = {**was, **entry}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False, allow_unicode=True))
    return changed


def make_project(repo: Path, env: dict, preset: str) -> None:
    repo.mkdir(parents=True)
    for name in PROJECT_FILES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(REPO / name, repo / name)
    sh(["git", "init", "-q"], repo, env)
    sh([str(BIN / "dvc"), "init", "-q"], repo, env)
    # One copy of each output on disk, not two (cache + workspace): the ViT-H preset's six
    # backbones are 3.9 GB each. DVC then keeps outputs read-only, as a user's might be.
    sh([str(BIN / "dvc"), "config", "cache.type", "hardlink,copy"], repo, env)
    shutil.copytree(REPO / ".dvc" / "plots", repo / ".dvc" / "plots")  # the plot templates
    sh([sys.executable, "-m", "flows.preset", preset], repo, env)


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


def made_variants(repo: Path) -> dict[str, dict]:
    """What each fine-tuning run and soup wrote (from its model.json); for a soup, whether
    a few of its tensors are the mean of its runs' (read lazily: ViT-H runs are 3.9 GB)."""
    made = {}
    for folder in sorted([*repo.glob("data/00_finetuned/*/"), *repo.glob("data/00_soups/*/")]):
        info = read_json(folder / "model.json")
        keep = ("pretrained", "schedule", "epochs_done", "loss")
        entry = made[folder.name] = {k: info[k] for k in keep if k in info}
        entry["sha256"] = info["checkpoint_sha256"][:16]
        if "soup" in info:
            runs = [repo / run["path"] for run in info["soup"]["runs"]]
            entry["soup_of"] = [run.name for run in runs]
            entry["max_abs_diff_from_mean_of_runs"] = soup_gap(folder, runs)
    return made


def soup_gap(soup: Path, runs: list[Path]) -> float:
    """max |soup - mean(runs)| over three of the image tower's tensors (first, middle, last)."""
    with safe_open(soup / WEIGHTS_NAME, "pt") as f:
        names = [k for k in f.keys() if k.startswith("visual.")]
        names = [names[0], names[len(names) // 2], names[-1]]
        got = {k: f.get_tensor(k).double() for k in names}
    total = dict.fromkeys(names, 0.0)
    for run in runs:
        with safe_open(run / WEIGHTS_NAME, "pt") as f:
            for k in names:
                total[k] = total[k] + f.get_tensor(k).double()
    return max(float((got[k] - total[k] / len(runs)).abs().max()) for k in names)


def run(work: Path, preset: str, resume: bool = False) -> dict:
    """Set up the project in `work` and run it; with `resume`, run `dvc repro` again in the
    project a killed run left there (DVC skips the stages it finished; `stage_seconds` then
    has only the stages this run ran, and "resumed" says so)."""
    wall, load = time.perf_counter(), os.getloadavg()  # > cpus: others share the machine
    repo, hf_home, log = work / "project", work / "hf_home", work / "repro.log"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(work / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PATH=f"{BIN}{os.pathsep}{env['PATH']}", PYTHONUNBUFFERED="1",
               HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", GIT_AUTHOR_NAME="b",
               GIT_AUTHOR_EMAIL="b@b", GIT_COMMITTER_NAME="b", GIT_COMMITTER_EMAIL="b@b")
    if resume:
        setup = read_json(work / "setup.json")
        if setup["preset"] != preset:
            fail(f"--resume {work}: a run of preset {setup['preset']}, not {preset}")
        shrunk, setup_s = setup["shrunk"], setup["setup_seconds"]
        models = yaml.safe_load((repo / "params.yaml").read_text())["models"]
    else:
        make_project(repo, env, preset)
        shrunk = configure(repo, work / "datasets", PRESETS[preset])
        models = yaml.safe_load((repo / "params.yaml").read_text())["models"]
        for spec in models.values():  # the preset's (arch, tag)s, random-init
            place_weights(hf_home, spec["arch"], spec["pretrained"])
        sh(["git", "add", "-A"], repo, env)
        sh(["git", "commit", "-qm", f"{preset}, miniature"], repo, env)
        setup_s = round(time.perf_counter() - wall, 1)
        (work / "setup.json").write_text(json.dumps(
            {"preset": preset, "shrunk": shrunk, "setup_seconds": setup_s}))
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
    always = {name for name, stage in yaml.safe_load((repo / "dvc.yaml").read_text())
              ["stages"].items() if stage.get("always_changed")}  # `inputs`: it looks afresh
    if reran := [s for s in re.findall(r"Running stage '([^']+)'", again) if s not in always]:
        fail(f"the second `dvc repro` reran {reran}")
    plots = json.loads(sh([str(BIN / "dvc"), "plots", "show", "--json"], repo, env))
    if plots.get("errors"):
        fail(f"`dvc plots show --json` reports errors: {plots['errors']}")
    return {
        "preset": preset,
        "resumed": resume,
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
        "made_variants": made_variants(repo),
        "plots": sorted(plots.get("data", {})),
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
                    "platform": platform.platform(),
                    "load_avg_1_5_15_min": {"start": load, "end": os.getloadavg()}},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="2xclip")
    parser.add_argument("--keep", type=Path, metavar="DIR", help="build it in DIR and keep it")
    parser.add_argument("--resume", action="store_true",
                        help="go on with the run killed in --keep DIR")
    args = parser.parse_args()
    if args.resume and not (args.keep and (args.keep / "setup.json").is_file()):
        fail("--resume needs --keep DIR holding a run's setup.json")
    if args.keep and not args.resume and args.keep.exists() and any(args.keep.iterdir()):
        fail(f"--keep {args.keep}: not empty")
    work = (args.keep.resolve() if args.keep
            else Path(tempfile.mkdtemp(prefix=f"preset_{args.preset}_")))
    work.mkdir(parents=True, exist_ok=True)
    try:
        result = run(work, args.preset, args.resume)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
