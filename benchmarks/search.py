"""k-NN search at the sizes of `evaluate`: exact flat search in one call against the same
search in blocks of queries, and the approximate index of params.yaml with its recall@5.

For each index size N (default 10^4, 10^5, 10^6) of 64-d L2-normalised features (the
head's output) and 10^4 queries, drawn from clustered data shaped like the `2xclip`
preset (about 53 images a class, as 950,000 images over 17,850 classes; each image its
class centre plus Gaussian noise), one fresh process per size measures:

- exact search, one faiss call over all queries (`knn` with a block >= Q) and in blocks
  (`knn` with `--block`): seconds and peak RSS above the RSS once the data is built
  (Linux's VmHWM, reset through /proc/self/clear_refs before each), and that both give
  the same ids and distances;
- the approximate index (`evaluate.approximate_index`, `evaluate.approximate_search`):
  build (train + add) and search seconds, its recall@5 against the exact ids of all
  queries, and mP@5 under exact and under approximate neighbours.

Everything runs on `evaluate.threads` faiss threads (1), as the stage does. Prints JSON,
with each size's blocked/one-call and approximate/exact time ratios. Timings on a shared,
loaded machine are noisy. Run on demand: `python benchmarks/search.py [--sizes 10000 100000]`.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tasks.metrics import approximate_index, knn, neighbour_recall, precision_at_k  # noqa: E402
from tasks.params.evaluate import EvaluateParams  # noqa: E402

DIM = 64
PER_CLASS = 53  # 950,000 images / 17,850 classes in the 2xclip preset
MODES = ("one_call", "blocked", "approximate")  # one_call: the reference of the others
DEPTH = 10  # neighbours searched, as evaluate does for its curves
CHUNK = 100_000  # rows generated at once, so building 10^6 rows holds no float64 copy


def clustered(n: int, classes: int, seed: int, noise: float) -> tuple[np.ndarray, np.ndarray]:
    """(L2-normalised float32 features [n, 64], class ids): class centre plus noise."""
    centres = np.random.default_rng(12345).normal(size=(classes, DIM)).astype(np.float32)
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, classes, size=n)
    emb = np.empty((n, DIM), dtype=np.float32)
    for a in range(0, n, CHUNK):
        b = min(a + CHUNK, n)
        emb[a:b] = centres[ids[a:b]] + noise * rng.standard_normal((b - a, DIM), np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return emb, ids


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)


def measured(fn):
    """(result, seconds, peak RSS MiB above the RSS when `fn` started)."""
    _reset_peak()
    base = _status_kib("VmRSS")
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    return result, seconds, (_status_kib("VmHWM") - base) / 1024


def one_run(mode: str, n: int, queries: int, block: int, noise: float,
            params: EvaluateParams) -> dict:
    """One search of `mode` ("one_call", "blocked", "approximate") over fresh data, in this
    process: its seconds, peak extra RSS, neighbour ids and mP@5."""
    import faiss

    faiss.omp_set_num_threads(params.threads)
    classes = max(n // PER_CLASS, 1)
    index, index_ids = clustered(n, classes, seed=1, noise=noise)
    query, query_ids = clustered(queries, classes, seed=2, noise=noise)
    out = {}
    if mode == "approximate":
        t0 = time.perf_counter()
        approx = approximate_index(index, params.approximate_index, params.approximate_search)
        out["build_seconds"] = round(time.perf_counter() - t0, 3)
        search = lambda: approx.search(query, DEPTH)  # noqa: E731
    else:
        size = queries if mode == "one_call" else block
        search = lambda: knn(index, query, DEPTH, size)  # noqa: E731
    (distances, ids), seconds, mib = measured(search)
    mp5 = float(np.nanmean(precision_at_k(index_ids[ids], query_ids, index_ids, 5)))
    return {**out, "seconds": round(seconds, 3), "peak_extra_mib": round(mib, 1),
            "mP@5": round(mp5, 4), "ids": ids, "distances": distances, "classes": classes}


def _child(conn, *args) -> None:
    conn.send(one_run(*args))


def one_size(n: int, queries: int, block: int, noise: float, params: EvaluateParams,
             modes: tuple[str, ...] = MODES) -> dict:
    """The three runs of one index size, each in a fresh process (so one's freed memory
    is not the next one's peak), and how they compare."""
    ctx = multiprocessing.get_context("spawn")
    runs = {}
    for mode in modes:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_child, args=(child, mode, n, queries, block, noise, params))
        proc.start()
        runs[mode] = parent.recv()
        proc.join()
    one, blocked, approx = (runs.get(m) for m in MODES)
    if blocked:
        blocked["same_as_one_call"] = bool(np.array_equal(one["ids"], blocked["ids"]) and
                                           np.array_equal(one["distances"], blocked["distances"]))
    if approx:
        approx["recall@5"] = round(neighbour_recall(approx["ids"], one["ids"], 5), 4)
    classes = one["classes"]
    for r in runs.values():
        del r["ids"], r["distances"], r["classes"]
    out = {"index": n, "queries": queries, "classes": classes,
           "index_mib": round(n * DIM * 4 / 2**20, 1), "exact_one_call": one}
    if blocked:
        out["exact_blocked"] = {"block": block, **blocked}
        out["blocked_over_one_call_time"] = round(blocked["seconds"] / one["seconds"], 3)
    if approx:
        out["approximate"] = {"index": params.approximate_index,
                              "setting": params.approximate_search, **approx}
        out["approximate_search_over_exact_time"] = round(approx["seconds"] / one["seconds"], 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10**4, 10**5, 10**6])
    parser.add_argument("--queries", type=int, default=10**4)
    parser.add_argument("--block", type=int, default=4096,
                        help="queries per call in the blocked run (the stage's default is "
                             "evaluate.query_block; 4096 makes blocks of 10^4 queries)")
    parser.add_argument("--noise", type=float, default=1.35,
                        help="per-dimension noise around unit-variance class centres; 1.35 "
                             "gives mP@5 ~0.6, as trained GUIE heads score")
    parser.add_argument("--index", default=None, help="factory string (default: params')")
    parser.add_argument("--setting", default=None, help="search setting (default: params')")
    parser.add_argument("--no-approximate", action="store_true",
                        help="exact runs only (building HNSW at 10^6 takes ~12 min here)")
    args = parser.parse_args()
    params = EvaluateParams()
    if args.index or args.setting:
        params = EvaluateParams(approximate_index=args.index or params.approximate_index,
                                approximate_search=args.setting or params.approximate_search)
    modes = MODES[:2] if args.no_approximate else MODES
    results = [one_size(n, args.queries, args.block, args.noise, params, modes)
               for n in args.sizes]
    print(json.dumps({"dim": DIM, "threads": params.threads, "sizes": results,
                      "note": "one shared, loaded machine: times are noisy"}, indent=2))


if __name__ == "__main__":
    main()
