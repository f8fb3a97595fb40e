"""`train` on a GPU without a GPU: the search it runs there against faiss's exact search, the
decision to keep a train split on the host, and the host-side batch copy, all on the CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tasks.metrics import knn, mean_precision_at_k
from tasks.train_device import (embed_array, fits_on_gpu, host_rows, knn_ids,
                                mean_precision_on_device)


def points(n: int, dim: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


@pytest.mark.parametrize("budget", [256 * 2**20, 4 * 300 * 7, 1])  # one block; 7 queries; 1
def test_knn_ids_are_faiss_exact_neighbours(budget):
    index, queries = points(300, 16, 0), points(50, 16, 1)
    ours = knn_ids(torch.from_numpy(index), torch.from_numpy(queries), 5, budget=budget)
    _, theirs = knn(index, queries, 5)
    assert np.array_equal(ours, theirs)
    brute = np.argsort(((queries[:, None] - index[None]) ** 2).sum(-1), axis=1)[:, :5]
    assert np.array_equal(ours, brute)


def test_knn_ids_with_fewer_index_rows_than_k_or_no_queries():
    index = torch.from_numpy(points(3, 4, 0))
    assert knn_ids(index, torch.from_numpy(points(2, 4, 1)), 5).shape == (2, 3)
    assert knn_ids(index, torch.zeros(0, 4), 5).shape == (0, 3)


def test_gpu_precision_scores_as_the_cpu_path_does():
    index, queries = points(400, 8, 2), points(60, 8, 3)
    index_labels = np.arange(400) % 20
    query_labels = np.arange(60) % 25  # 5 classes with no index image: NaN, as on the CPU
    want_mean, want, _ = mean_precision_at_k(index, index_labels, queries, query_labels, k=5)
    got_mean, got = mean_precision_on_device(torch.from_numpy(index), index_labels,
                                             torch.from_numpy(queries), query_labels)
    assert got_mean == pytest.approx(want_mean)
    assert np.array_equal(np.isnan(got), np.isnan(want))
    assert np.allclose(got[~np.isnan(got)], want[~np.isnan(want)])


def test_a_split_over_half_the_free_gpu_memory_stays_on_the_host(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (8 * 2**30, 16 * 2**30))
    cuda = torch.device("cuda")
    assert fits_on_gpu(4 * 2**30, cuda)
    assert not fits_on_gpu(4 * 2**30 + 1, cuda)
    assert fits_on_gpu(6 * 2**30, cuda, share=0.75)


def test_host_rows_gather_the_rows_training_would_read():
    x = torch.from_numpy(points(50, 6, 4))
    rows = host_rows(x, torch.device("cpu"))
    idx = torch.tensor([7, 3, 49, 0])
    assert torch.equal(rows(idx), x[idx])


def test_embed_array_is_the_heads_output_in_chunks(monkeypatch):
    import tasks.train_device as train_device

    monkeypatch.setattr(train_device, "EMBED_CHUNK", 7)
    head = torch.nn.Linear(6, 3)
    features = points(20, 6, 5)
    with torch.no_grad():
        want = head(torch.from_numpy(features))
    assert torch.allclose(embed_array(head, features, torch.device("cpu")), want)


def test_batch_rows_keeps_a_split_too_big_for_the_gpu_on_the_host(monkeypatch):
    """Over half the free GPU memory, the split is not moved to the GPU (nor copied to
    pinned memory): batches are gathered on the host and copied one at a time."""
    import tasks.train_device as train_device
    from tasks.features import SplitFeatures

    split = SplitFeatures(["a", "b", "c"], np.zeros(3, np.int64), points(3, 4, 6))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (64, 2**30))
    chosen = []
    monkeypatch.setattr(train_device, "host_rows",
                        lambda x, device: chosen.append((x, device)) or "host")
    assert train_device.batch_rows(split, torch.device("cuda")) == "host"
    [(x, device)] = chosen
    assert device.type == "cuda" and not x.is_pinned()
    assert x.data_ptr() == torch.from_numpy(split.embeddings).data_ptr()  # no copy
