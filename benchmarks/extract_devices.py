"""Several devices against one: what one process per device buys on this machine.

In one run, on the same shards, model and params (cache off):

- baseline: one device in this process, the stage's single-device path
  (`get_worker` + `embed_shard` shard after shard), model loaded beforehand;
- devices: `tasks.extract_devices.embed_on_devices`, one spawned process per
  device, timed from the start including the processes' start and model load
  (what a stage pays; with few images that start dominates).

Also checks every feature file is byte-identical to the baseline's. Prints JSON
with the ratios. Devices: every visible GPU (`--devices auto`), or e.g.
`--devices cpu,cpu --cpu-threads 1` for CPU processes. Run on demand:
`python benchmarks/extract_devices.py [--backbone vit_s32] [--images 1024]`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from extract import RANDOM_INIT, backbone_dir, write_shards  # noqa: E402 (benchmarks/extract.py)

from tasks.extract import embed_shard, get_worker, resolve_devices  # noqa: E402
from tasks.extract_devices import embed_on_devices  # noqa: E402
from tasks.params.extract import ExtractParams  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backbone", default="vit_s32", choices=["lite0", "lite2", *RANDOM_INIT])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--per-shard", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--devices", default="auto", help="extract.device: auto, cpu,cpu, ...")
    parser.add_argument("--cpu-threads", type=int, default=2)
    args = parser.parse_args()
    params = ExtractParams(batch_size=args.batch, cache_dir="", cpu_threads=args.cpu_threads,
                           device=args.devices)
    devices = resolve_devices(params.device)
    work = Path(tempfile.mkdtemp(prefix="guie-bench-devices-"))
    try:
        shards = write_shards(work / "shards", args.images, args.per_shard, seed=0)
        model_dir = backbone_dir(args.backbone, work)
        one = params.model_copy(update={"device": devices[0]})
        w = get_worker(str(model_dir), one)
        embed_shard(shards[0], work / "warm.arrow", w.embedder, w.preprocess, one, w.metadata)
        start = time.perf_counter()
        for s in shards:
            embed_shard(s, work / "one" / f"{s.stem}.arrow", w.embedder, w.preprocess, one,
                        w.metadata)
        single = args.images / (time.perf_counter() - start)

        jobs = [(str(s), str(work / "many" / f"{s.stem}.arrow")) for s in shards]
        start = time.perf_counter()
        per_device: dict[str, int] = {}
        for stats in embed_on_devices(jobs, str(model_dir), params, devices):
            name = f"{stats['device']} pid {stats['pid']}"
            per_device[name] = per_device.get(name, 0) + 1
        total = time.perf_counter() - start
        same = all((work / "one" / f"{s.stem}.arrow").read_bytes()
                   == (work / "many" / f"{s.stem}.arrow").read_bytes() for s in shards)
        print(json.dumps({
            "backbone": args.backbone, "images": args.images, "shards": len(shards),
            "devices": devices, "cpu_threads": args.cpu_threads,
            "single_device_images_per_s": round(single, 1),
            "devices_images_per_s_with_start": round(args.images / total, 1),
            "ratio_with_start": round(args.images / total / single, 3),
            "shards_per_process": per_device, "byte_identical_to_single_device": same,
        }, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
