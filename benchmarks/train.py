"""How fast the head trains on precomputed embeddings (CPU).

Times one epoch of `train_head` over N random embeddings of dim D (default
100k x 2048, 1000 classes, batch 128: a GUIE-sized feature set), and in the
same run a bare loop doing only Linear + cross-entropy + AdamW steps on the
same batches, the floor any head pays. Prints JSON. Run on demand:
`python benchmarks/train.py [--n 100000 --dim 2048]`.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from tasks.features import SplitFeatures
from tasks.params.train import TrainParams
from tasks.train import train_head


def bare_epoch(x: torch.Tensor, y: torch.Tensor, classes: int, batch: int) -> float:
    lin = torch.nn.Linear(x.shape[1], classes)
    opt = torch.optim.AdamW(lin.parameters(), lr=1e-3)
    start = time.perf_counter()
    for i in range(0, len(x), batch):
        loss = torch.nn.functional.cross_entropy(lin(x[i:i + batch]), y[i:i + batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    ids = rng.integers(0, args.classes, size=args.n)
    emb = rng.standard_normal((args.n, args.dim), dtype=np.float32)
    train = SplitFeatures([str(i) for i in range(args.n)], ids, emb)
    val = SplitFeatures([], np.zeros(0, np.int64), np.zeros((0, args.dim), np.float32))
    params = TrainParams(epochs=1, batch_size=args.batch)
    # warm-up: the first batches on these CPUs run several times slower
    train_head(SplitFeatures(train.keys[:5000], ids[:5000], emb[:5000]), val, params)
    bare_epoch(torch.from_numpy(emb[:5000]), torch.from_numpy(ids[:5000]), args.classes, args.batch)
    start = time.perf_counter()
    train_head(train, val, params)
    head_s = time.perf_counter() - start
    bare_s = bare_epoch(torch.from_numpy(emb), torch.from_numpy(ids), args.classes, args.batch)
    print(json.dumps({"embeddings": args.n, "dim": args.dim, "classes": args.classes, "batch": args.batch,
                      "threads": torch.get_num_threads(), "head_epoch_s": round(head_s, 2),
                      "embeddings_per_s": round(args.n / head_s), "bare_linear_epoch_s": round(bare_s, 2),
                      "head_over_bare": round(head_s / bare_s, 2)}, indent=2))


if __name__ == "__main__":
    main()
