"""URL-list download throughput against a loopback HTTP server, at 1, 8 and 64 connections.

Runs the `urls` source's own fetcher (`tasks.urls.fetch_urls`: pooled
connections, per-host limit, retries, atomic writes into the download
cache) over N small JPEGs served by the test suite's loopback server, which
runs in a process of its own. The server can add a fixed delay per response
to stand in for network latency (a real image CDN answers in tens of
milliseconds); with none, the figure is the fetcher's own overhead. Prints
JSON with images/s and each setting's speed-up over one connection. Run on
demand:
`python benchmarks/download.py [--images 600] [--latency-ms 0 20]`.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from loopback import Fault, Loopback  # noqa: E402

from tasks.urls import UrlRow, fetch_urls  # noqa: E402


def jpeg(i: int) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    arr = np.random.default_rng(i).integers(0, 256, size=(96, 128, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def serve(images: int, latency_ms: float, conn, stop) -> None:
    """The loopback server in a process of its own, so it does not share the fetcher's GIL."""
    with Loopback() as server:
        for i in range(images):
            server.files[f"/img/{i}.jpg"] = jpeg(i % 50)
            if latency_ms:
                server.faults[f"/img/{i}.jpg"] = Fault(delay_s=latency_ms / 1000)
        conn.send((server.url, sum(len(b) for b in server.files.values())))
        stop.wait()
        conn.send(server.max_active)


def run(images: int, latency_ms: float, connections: int) -> dict:
    parent, child = multiprocessing.Pipe()
    stop = multiprocessing.Event()
    proc = multiprocessing.Process(target=serve, args=(images, latency_ms, child, stop),
                                   daemon=True)
    proc.start()
    url, total = parent.recv()
    rows = [UrlRow(f"{url}/img/{i}.jpg", str(i % 10)) for i in range(images)]
    cache = Path(tempfile.mkdtemp(prefix="guie-bench-dl-"))
    try:
        start = time.perf_counter()
        fetched = fetch_urls(rows, cache, concurrency=connections, per_host=connections, retries=2,
                             timeout_s=30, backoff_s=0.1, allow_private=True)  # a loopback server
        seconds = time.perf_counter() - start
    finally:
        shutil.rmtree(cache, ignore_errors=True)
        stop.set()
    in_flight = parent.recv()
    proc.join()
    failed = sum(f.path is None for f in fetched)
    return {"latency_ms": latency_ms, "connections": connections, "images": images,
            "failed": failed, "seconds": round(seconds, 2),
            "images_per_s": round(images / seconds, 1),
            "mb_per_s": round(total / seconds / 1e6, 2), "max_in_flight": in_flight}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--latency-ms", type=float, nargs="+", default=[0.0, 20.0])
    parser.add_argument("--connections", type=int, nargs="+", default=[1, 8, 64])
    args = parser.parse_args()
    run(50, 0, 4)  # warm-up: imports, thread start-up
    results = []
    for latency in args.latency_ms:
        rows = [run(args.images, latency, c) for c in args.connections]
        base = rows[0]["images_per_s"]
        for r in rows:
            r["speedup_vs_first"] = round(r["images_per_s"] / base, 2)
        results += rows
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
