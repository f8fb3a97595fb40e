"""Shard-stage throughput in one process vs N, and the cost of planning a 10^6-row manifest.

Writes N synthetic images (photo-sized JPEGs from 320 to 1,280 px, some PNG, some
EXIF-rotated, so most are decoded, downscaled to `max_side` and re-encoded, as real
photos are) and times `tasks.shard.write_shards` with `processes=1` and with
`--processes` (default: every core), alternating, each run in a fresh forked process
so its peak RSS (and its workers') is its own. Every run's index must equal the first's
(byte-identical tars: their sha256 are in it). Then plans a synthetic manifest of
`--plan-rows` rows with today's Arrow `plan_shards` and with the Python-dict sort it
replaced, and reports seconds and RSS growth for each. Prints JSON.
Run on demand: `python benchmarks/shard.py [--images 3000] [--processes 2] [--repeats 2]`.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tasks.params.shard import ShardParams  # noqa: E402
from tasks.schemas.manifest import MANIFEST_SCHEMA, SPLITS  # noqa: E402
from tasks.shard import plan_shards, write_shards  # noqa: E402

SIZES = [(320, 240), (640, 480), (800, 600), (1024, 768), (600, 800), (1280, 960)]


def synthetic_image(i: int) -> tuple[str, bytes]:
    """A smooth random picture with some noise (compresses like a photo); every 10th a PNG,
    every 20th a JPEG with EXIF orientation 6."""
    rng = np.random.default_rng(i)
    w, h = SIZES[i % len(SIZES)]
    small = Image.fromarray(rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8))
    arr = np.asarray(small.resize((w, h), Image.BILINEAR)).astype(np.int16)
    arr = np.clip(arr + rng.integers(-12, 13, size=arr.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    if i % 10 == 5:
        Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
        return f"{i:06d}.png", buf.getvalue()
    exif = Image.Exif()
    if i % 20 == 7:
        exif[0x0112] = 6
    Image.fromarray(arr).save(buf, format="JPEG", quality=90, exif=exif)
    return f"{i:06d}.jpg", buf.getvalue()


def make_dataset(root: Path, images: int) -> pa.Table:
    folder = root / "raw" / "synth" / "images"
    folder.mkdir(parents=True)
    rows = []
    for i in range(images):
        name, data = synthetic_image(i)
        (folder / name).write_bytes(data)
        rows.append({"key": f"synth-{i:06d}", "source": "synth", "label": f"c{i % 50}",
                     "class_id": i % 50, "path": f"images/{name}", "split": SPLITS[i % 4],
                     "group": "train", "class_images": 1})
    return pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)


def rss_mib() -> tuple[float, float]:
    """This process's resident memory now and at its peak (Linux /proc), in MiB."""
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return tuple(round(int(status[k].split()[0]) / 1024, 1) for k in ("VmRSS", "VmHWM"))


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and its finished workers."""
    own, workers = (resource.getrusage(w) for w in (resource.RUSAGE_SELF,
                                                     resource.RUSAGE_CHILDREN))
    return own.ru_utime + own.ru_stime + workers.ru_utime + workers.ru_stime


def in_child(fn: Callable[[], dict]) -> dict:
    """Run `fn` in a fresh forked process; its result plus that process's RSS at start and
    peak (MiB), and the largest peak of its own worker processes (ru_maxrss: forked workers
    count the pages they still share with it)."""
    def target(conn) -> None:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # restart the peak here: a forked child inherits its parent's
        start = rss_mib()[0]
        cpu0 = cpu_seconds()
        out = fn()
        out["cpu_seconds"] = cpu_seconds() - cpu0
        out["rss_mib_at_start"], out["rss_mib_peak"] = start, rss_mib()[1]
        workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        out["worker_rss_mib_peak"] = round(workers / 1024, 1) if workers else None
        conn.send(out)

    parent, child = multiprocessing.get_context("fork").Pipe()
    proc = multiprocessing.get_context("fork").Process(target=target, args=(child,))
    proc.start()
    out = parent.recv()
    proc.join()
    return out


def time_shards(root: Path, manifest: pa.Table, processes: int, run: int) -> dict:
    def go() -> dict:
        params = ShardParams(max_samples=256, max_side=512, jpeg_quality=92, processes=processes)
        start = time.perf_counter()
        plans = plan_shards(manifest, params.max_samples)
        index, rejects = write_shards(plans, root / "raw", root / f"out-{processes}-{run}", params)
        return {"seconds": time.perf_counter() - start, "index": index, "rejects": len(rejects)}
    return in_child(go)


def plan_with_dicts(manifest: pa.Table, max_samples: int) -> list:
    """The planning this stage did before: the whole manifest as dicts, sorted in Python."""
    rows = sorted(manifest.to_pylist(), key=lambda r: r["key"])
    plans = []
    for split in SPLITS:
        split_rows = [r for r in rows if r["split"] == split]
        for i in range(0, len(split_rows), max_samples):
            plans.append((split, tuple(split_rows[i:i + max_samples])))
    return plans


def big_manifest(n: int) -> pa.Table:
    """A shuffled manifest shaped like the 2xclip preset's (17,850 classes, GLDv2-like paths)."""
    rng = np.random.default_rng(0)
    ids = rng.permutation(n)
    classes = ids % 17850
    return pa.table({
        "key": pa.array([f"gldv2-{i:016x}" for i in ids]),
        "source": pa.array(["gldv2"] * n),
        "label": pa.array([f"landmark_{c}" for c in classes]),
        "class_id": pa.array(classes, pa.int32()),
        "path": pa.array([f"train/{i % 16:x}/{i % 256:02x}/{i:016x}.jpg" for i in ids]),
        "split": pa.array(np.array(SPLITS)[rng.integers(0, 4, n)]),
        "group": pa.array(["train"] * n),
        "class_images": pa.array(np.full(n, 50), pa.int64()),
    }, schema=MANIFEST_SCHEMA)


def time_plan(manifest: pa.Table, how: str) -> dict:
    def go() -> dict:
        start = time.perf_counter()
        plans = (plan_shards if how == "arrow" else plan_with_dicts)(manifest, 1000)
        return {"seconds": round(time.perf_counter() - start, 2), "shards": len(plans)}
    out = in_child(go)
    out["rss_mib_growth"] = round(out["rss_mib_peak"] - out["rss_mib_at_start"], 1)
    del out["worker_rss_mib_peak"], out["cpu_seconds"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--plan-rows", type=int, default=1_000_000)
    args = ap.parse_args()
    if args.processes < 2:
        ap.error("--processes must be at least 2: the benchmark compares it with 1 process")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        manifest = make_dataset(root, args.images)
        made = time.perf_counter() - start
        runs: dict[int, list[dict]] = {1: [], args.processes: []}
        for run in range(args.repeats):
            for processes in runs:
                runs[processes].append(time_shards(root, manifest, processes, run))
        first = runs[1][0]["index"]
        assert all(r["index"] == first for rs in runs.values() for r in rs), "outputs differ"
        raw_mb = sum(p.stat().st_size for p in (root / "raw").rglob("*") if p.is_file()) / 1e6
    result = {"images": args.images, "raw_mb": round(raw_mb, 1), "make_seconds": round(made, 1),
              "cpus": os.cpu_count(), "load_avg_1min": round(os.getloadavg()[0], 2),
              "shards": len(first["shardlist"]), "identical_outputs": True}
    for processes, rs in runs.items():
        secs = statistics.median(r["seconds"] for r in rs)
        result[f"processes_{processes}"] = {
            "seconds": [round(r["seconds"], 2) for r in rs],
            "images_per_s": round(args.images / secs, 1),
            # the work itself, whatever else runs: equal at 1 and N means no pool overhead
            "cpu_ms_per_image": round(1000 * statistics.median(r["cpu_seconds"] for r in rs)
                                      / args.images, 2),
            "rss_mib_peak": max(r["rss_mib_peak"] for r in rs),
            "worker_rss_mib_peak": max((r["worker_rss_mib_peak"] or 0) for r in rs) or None,
        }
    one = result["processes_1"]["images_per_s"]
    result["ratio_vs_1_process"] = round(result[f"processes_{args.processes}"]["images_per_s"]
                                         / one, 2)
    if args.plan_rows:
        big = big_manifest(args.plan_rows)
        result["plan"] = {"rows": args.plan_rows, "arrow_table_mib": round(big.nbytes / 2**20, 1),
                          "arrow": time_plan(big, "arrow"),
                          "python_dicts_before": time_plan(big, "dicts")}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
