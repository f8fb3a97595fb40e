"""Where `train`'s tensors live, and its per-epoch searches on a GPU.

On the CPU `train` keeps what it always did: the train split in one tensor (or read from
the memory-mapped shards a batch at a time) and faiss for the monitor's and early
stopping's searches, whose bytes the committed metrics hold. On a GPU two things change:

- the train split goes to GPU memory whole only when it takes at most `GPU_SHARE` of the
  memory free there (a split that fits the host's RAM can still exceed a 16-24 GB card);
  otherwise it stays on the host and each batch is gathered there and copied over as it is
  needed (not pinned: pinning the split would copy it, twice the host memory);
- the searches run on the GPU too (`knn_ids`: exact squared-L2 distances and top-k in
  blocks of queries sized to a memory budget), with the head's embeddings of the train
  split made from the same rows training reads, so no epoch copies the split again.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Callable

import numpy as np
import torch
from torch import nn

from tasks.features import MappedFeatures, SplitFeatures
from tasks.heads import embed_with_head
from tasks.metrics import precision_at_k

EMBED_CHUNK = 65_536  # rows embedded at a time when the train split is streamed or on a GPU
GPU_SHARE = 0.5  # of the GPU's free memory the train split may take there
SEARCH_BYTES = 256 * 2**20  # one block's distance matrix, at most, in a GPU search

Rows = Callable[[torch.Tensor], torch.Tensor]


def resolve_device(device: str) -> torch.device:
    """`auto`: the GPU when torch sees one, else the CPU; `cuda` without a GPU is an error."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device = cuda but torch sees no CUDA device: use auto or cpu")
    return torch.device(device)


def fits_on_gpu(nbytes: int, device: torch.device, share: float = GPU_SHARE) -> bool:
    """Whether `nbytes` take at most `share` of the memory free on `device` now."""
    free, _total = torch.cuda.mem_get_info(device)
    return nbytes <= share * free


def batch_rows(train: SplitFeatures | MappedFeatures, device: torch.device) -> Rows:
    """`rows(index) -> tensor on device`: from one tensor in RAM (on a GPU, moved there whole
    if it fits, else kept on the host, a batch copied at a time), or read from the
    memory-mapped shards and normalised per batch; the same values every way."""
    if isinstance(train, MappedFeatures):
        return lambda idx: torch.from_numpy(train.rows(idx.numpy())).to(device, non_blocking=True)
    x = torch.from_numpy(train.embeddings)
    if device.type == "cuda" and not fits_on_gpu(x.nbytes, device):
        return host_rows(x, device)
    x = x.to(device)
    return lambda idx: x[idx.to(device)]


def host_rows(x: torch.Tensor, device: torch.device) -> Rows:
    """Rows gathered on the host, then copied to `device`."""
    return lambda idx: x[idx.cpu()].to(device)


def embed_rows(head: nn.Module, rows: Rows, count: int, device: torch.device) -> torch.Tensor:
    """The head's embeddings of rows 0..count-1, on `device`, `EMBED_CHUNK` rows a call."""
    head.eval()
    with torch.no_grad():
        out = [head(rows(torch.arange(a, min(a + EMBED_CHUNK, count))))
               for a in range(0, count, EMBED_CHUNK)]
    return torch.cat(out) if out else torch.zeros((0, 0), device=device)


def embed_cpu(head: nn.Module, features: SplitFeatures | MappedFeatures) -> np.ndarray:
    """The head's embeddings of every row, on the CPU: features in RAM in one call, as always
    (the bytes of the committed metrics); streamed ones in chunks read from the shards."""
    if isinstance(features, SplitFeatures):
        return embed_with_head(head, features.embeddings)
    cpu = torch.device("cpu")
    return embed_rows(head, batch_rows(features, cpu), len(features.keys), cpu).numpy()


def embed_array(head: nn.Module, features: np.ndarray, device: torch.device) -> torch.Tensor:
    """The head's embeddings of features in RAM, on `device`."""
    x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    return embed_rows(head, host_rows(x, device), len(x), device)


def mean_precision_on_device(index: torch.Tensor, index_labels: np.ndarray,
                             queries: torch.Tensor, query_labels: np.ndarray,
                             k: int = 5) -> tuple[float, np.ndarray]:
    """(mP@k, per-query P@k) as `tasks.metrics.mean_precision_at_k` scores them, from an
    exact search where the tensors are (`knn_ids`); NaN when no query can be scored."""
    per_query = precision_at_k(index_labels[knn_ids(index, queries, k)], query_labels,
                               index_labels, k)
    scored = not np.isnan(per_query).all()
    return (float(np.nanmean(per_query)) if scored else math.nan), per_query


def amp_context(device: torch.device, amp: str):
    """The head's forward pass under bf16 autocast on CUDA with `amp: bf16`; else fp32."""
    if device.type == "cuda" and amp == "bf16":
        return torch.autocast("cuda", torch.bfloat16)
    return nullcontext()


def knn_ids(index: torch.Tensor, queries: torch.Tensor, k: int,
            budget: int = SEARCH_BYTES) -> np.ndarray:
    """Exact k nearest index rows of each query by squared L2, computed where the tensors
    are (a GPU's), as row ids on the host. Distances are ||x||^2 - 2 q.x (a query's own
    norm ranks nothing), a block of queries at a time so that a block's distance matrix
    stays within `budget` bytes. Ties may order otherwise than faiss's on the CPU."""
    k = min(k, len(index))
    if k == 0 or len(queries) == 0:
        return np.zeros((len(queries), k), np.int64)
    norms = (index * index).sum(dim=1)
    block = max(1, budget // (4 * len(index)))
    ids = [(norms[None, :] - 2 * queries[a:a + block] @ index.T).topk(k, dim=1, largest=False)
           .indices.cpu() for a in range(0, len(queries), block)]
    return torch.cat(ids).numpy()
