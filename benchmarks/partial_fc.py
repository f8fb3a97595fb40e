"""What a Partial FC training step costs as the class count grows, with the centres stepped
sparsely (SparseAdam over the drawn rows, as `train` does) against densely (Adam over every
centre, as `train` did before), both measured in this run.

A step is `train`'s: the 2xclip preset's head (dropout_linear, 1,536 -> 64) and sub-center
ArcFace (3 centres a class), batch 128, `class_sample` classes in each step's softmax, one
thread. For 2,000 / 17,850 (the preset) / 100,000 classes it times `--steps` steps after a
warm-up and prints ms a step for each optimizer, and the ratio of the largest class count's
step to the smallest's (flat: about 1). Prints JSON. Run on demand:
`python benchmarks/partial_fc.py [--class-sample 1024] [--steps 40]`.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from tasks.heads import ArcFace, build_head
from tasks.params.train import TrainParams
from tasks.train import make_optimizers

CLASSES = (2_000, 17_850, 100_000)
DIM, EMBEDDING_DIM, BATCH, SUBCENTERS = 1_536, 64, 128, 3


def ms_per_step(classes: int, class_sample: int, sparse: bool, steps: int) -> float:
    torch.manual_seed(0)
    params = TrainParams(epochs=1, optimizer="adam", lr=1e-3, embedding_dim=EMBEDDING_DIM,
                         class_sample=class_sample, weight_decay=0.0)
    head = build_head("dropout_linear", DIM, EMBEDDING_DIM, 0.3)
    arc = ArcFace(EMBEDDING_DIM, classes, subcenters=SUBCENTERS, sample_classes=class_sample)
    if sparse:
        opts = make_optimizers(head, arc, params)
    else:  # the baseline: Adam over the head and every centre (a dense gradient)
        arc.cosines = _dense_cosines(arc)
        opts = [torch.optim.Adam([*head.parameters(), *arc.parameters()], lr=params.lr)]
    x = torch.randn(BATCH, DIM)

    def step() -> None:
        labels = torch.randint(0, classes, (BATCH,))
        loss = arc(head(x), labels)
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in opts:
            opt.step()

    for _ in range(5):  # warm-up: the first steps on these CPUs run slower
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return 1000 * (time.perf_counter() - start) / steps


def _dense_cosines(arc: ArcFace):
    """ArcFace.cosines with the drawn centres gathered by indexing: a dense gradient, as the
    module computed it before it gathered them sparsely."""
    import torch.nn.functional as F

    def cosines(emb, classes=None):
        weight, n = arc.weight, arc.num_classes
        if classes is not None:
            weight = weight.view(n, arc.subcenters, -1)[classes].flatten(0, 1)
            n = len(classes)
        cos = F.linear(F.normalize(emb, dim=-1), F.normalize(weight, dim=-1))
        cos = cos.view(-1, n, arc.subcenters).max(dim=-1).values
        return cos.clamp(-1 + 1e-7, 1 - 1e-7)

    return cosines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--class-sample", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(1)
    out: dict = {"class_sample": args.class_sample, "batch": BATCH, "subcenters": SUBCENTERS,
                 "threads": 1, "ms_per_step": {}}
    for name, sparse in (("sparse_adam", True), ("dense_adam", False)):
        out["ms_per_step"][name] = {c: round(ms_per_step(c, args.class_sample, sparse,
                                                         args.steps), 2) for c in CLASSES}
    for name, row in out["ms_per_step"].items():
        out[f"{name}_largest_over_smallest"] = round(row[CLASSES[-1]] / row[CLASSES[0]], 2)
    preset = CLASSES[1]
    out["dense_over_sparse_at_17850"] = round(out["ms_per_step"]["dense_adam"][preset]
                                              / out["ms_per_step"]["sparse_adam"][preset], 2)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
