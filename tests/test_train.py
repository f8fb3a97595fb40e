"""Training's feature reading and devices: memory-mapped features, built once into one matrix
or streamed batch by batch, give the bytes the plain numpy recipe gives, and the same head."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from safetensors.torch import load_file

from conftest import clusters
from tasks.features import (GroupData, MappedFeatures, SplitFeatures, load_concat, load_or_map,
                            map_concat)
from tasks.params.train import TrainParams
from tasks.schemas.features import write_features
from tasks.train import resolve_device, save_head, train_head

DIMS = {"a": 6, "b": 3}  # two backbones of different widths
SHARD_ROWS = (7, 1, 12)  # uneven shards, one of a single row


def meta(dim: int) -> dict[str, str]:
    return {"dim": str(dim), "model_name": "m", "pretrained": "", "checkpoint_sha256": "0",
            "image_size": "8"}


def write_split(root: Path, split: str, features: SplitFeatures) -> dict[str, np.ndarray]:
    """Write `features` as each backbone's shards (backbone `b` scaled, so that per-backbone
    normalisation matters); returns each backbone's raw rows."""
    raw = {"a": features.embeddings[:, :DIMS["a"]] * 3.0,
           "b": features.embeddings[:, DIMS["a"]:] * 0.01}
    starts = np.cumsum((0,) + SHARD_ROWS)
    assert starts[-1] == len(features.keys)
    for variant, emb in raw.items():
        for s in range(len(SHARD_ROWS)):
            rows = slice(starts[s], starts[s + 1])
            write_features(root / variant / split / f"{split}-{s:06d}.arrow",
                           features.keys[rows], features.class_ids[rows], emb[rows],
                           meta(DIMS[variant]))
    return raw


def reference(raw: dict[str, np.ndarray]) -> np.ndarray:
    """The recipe written out in plain numpy: normalise each backbone, then concatenate."""
    parts = []
    for emb in raw.values():
        emb = emb.astype(np.float32)
        parts.append(emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12))
    return np.concatenate(parts, axis=1)


@pytest.fixture
def features(tmp_path) -> tuple[Path, SplitFeatures, dict[str, np.ndarray]]:
    data = clusters(range(4), 5, sum(DIMS.values()), seed=1)
    return tmp_path, data, write_split(tmp_path, "train", data)


def test_loaded_and_streamed_rows_equal_the_numpy_recipe(features):
    root, data, raw = features
    expected = reference(raw)
    loaded = load_concat(list(DIMS), "train", root)
    assert loaded.keys == data.keys and np.array_equal(loaded.class_ids, data.class_ids)
    assert loaded.embeddings.tobytes() == expected.tobytes()
    mapped = map_concat(list(DIMS), "train", root)
    order = np.random.default_rng(0).permutation(len(data.keys))
    for batch in (order[:3], order[3:], order[:1], np.array([19, 0, 19])):
        assert mapped.rows(batch).tobytes() == expected[batch].tobytes()
    assert mapped.nbytes == expected.nbytes
    with pytest.raises(IndexError, match="out of range"):
        mapped.rows(np.array([len(data.keys)]))


def test_the_pca_fit_reads_every_train_row_or_a_seeded_sample(features):
    """evaluate.pca_train_max: up to it, the rows the PCA was always fitted on (one
    backbone's as stored, several normalised and concatenated); beyond it, a seeded
    sample of rows, in file order, with the numpy recipe's values."""
    from tasks.features import train_rows_for_fit

    root, data, raw = features
    expected = reference(raw)
    assert np.array_equal(train_rows_for_fit(["a"], 20, 0, root), raw["a"].astype(np.float32))
    assert train_rows_for_fit(list(DIMS), 20, 0, root).tobytes() == expected.tobytes()
    sample = train_rows_for_fit(list(DIMS), 6, 3, root)
    picked = np.sort(np.random.default_rng(3).choice(20, 6, replace=False))
    assert sample.tobytes() == expected[picked].tobytes()
    assert train_rows_for_fit(list(DIMS), 6, 4, root).tobytes() != sample.tobytes()


def test_backbones_that_disagree_on_keys_are_refused(features):
    root, data, _ = features
    (root / "b" / "train" / "train-000001.arrow").unlink()
    with pytest.raises(ValueError, match="disagree on the train keys"):
        map_concat(list(DIMS), "train", root)


def test_the_memory_budget_decides_what_stays_mapped(features):
    root, _, _ = features
    assert isinstance(load_or_map(list(DIMS), "train", 1.0, root), SplitFeatures)
    assert isinstance(load_or_map(list(DIMS), "train", 1e-9, root), MappedFeatures)


def test_streamed_training_gives_the_in_memory_head_byte_for_byte(features, tmp_path):
    """A budget far below the split: every batch read from the memory-mapped shards, in the
    same shuffled order, gives the same head bytes, history and metrics."""
    root, data, raw = features
    val = SplitFeatures(data.keys[:4], data.class_ids[:4], reference(raw)[:4])
    params = TrainParams(epochs=3, batch_size=6, embedding_dim=4, dropout=0.3)
    results, digests = [], []
    for name, budget in (("ram", 1.0), ("streamed", 1e-9)):
        train = load_or_map(list(DIMS), "train", budget, root)
        result = train_head(train, val, params)
        save_head(result.head, tmp_path / name, list(DIMS), params)
        digests.append(hashlib.sha256((tmp_path / name / "head.safetensors").read_bytes())
                       .hexdigest())
        results.append(result)
    assert isinstance(train, MappedFeatures)
    assert digests[0] == digests[1]
    assert results[0].history == results[1].history
    assert results[0].metrics == results[1].metrics
    assert results[0].metrics["train_images"] == len(data.keys)


def test_device_choice():
    assert resolve_device("cpu") == torch.device("cpu")
    if torch.cuda.is_available():
        assert resolve_device("auto").type == "cuda"
    else:
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("amp", ["off", "bf16"])
def test_gpu_training_saves_a_cpu_head_that_learns(features, tmp_path, amp):
    """On the GPU (streamed, the 2xclip path), the head comes back on the CPU, saves in the
    same format, and separates the classes about as well as the CPU's."""
    root, data, raw = features
    train = load_or_map(list(DIMS), "train", 1e-9, root)
    val = SplitFeatures([], np.zeros(0, np.int64), np.zeros((0, sum(DIMS.values())), np.float32))
    scores = {}
    for device in ("cpu", "cuda"):
        params = TrainParams(epochs=30, batch_size=8, embedding_dim=4, device=device, amp=amp)
        result = train_head(train, val, params)
        save_head(result.head, tmp_path / device, list(DIMS), params)
        weights = load_file(str(tmp_path / device / "head.safetensors"))
        assert all(w.device.type == "cpu" for w in weights.values())
        scores[device] = result.metrics["train_acc"]
    assert scores["cuda"] >= scores["cpu"] - 0.15


def test_bad_device_and_budget_params_are_refused():
    with pytest.raises(ValueError, match="device"):
        TrainParams(epochs=1, device="tpu")
    with pytest.raises(ValueError, match="max_memory_gb"):
        TrainParams(epochs=1, max_memory_gb=0)


def test_train_flow_streams_over_its_budget_and_writes_the_same_head(in_tmp):
    """The `train` stage end to end (manifest, features, Prefect flow, outputs): with a budget
    below the train split it streams it and writes the files it writes in RAM."""
    from flows.train import train
    from tasks.schemas.io import write_table
    from tasks.schemas.manifest import MANIFEST_SCHEMA
    from tasks.schemas.paths import FEATURES_DIR, HEAD_DIR, MANIFEST

    groups = {c: "train" if c < 4 else "validation" for c in range(6)}
    splits = {"train": clusters(range(4), 5, sum(DIMS.values()), seed=1),
              "val": clusters(range(4), 1, sum(DIMS.values()), seed=2),
              "query": clusters(range(4, 6), 2, sum(DIMS.values()), seed=3),
              "index": clusters(range(4, 6), 2, sum(DIMS.values()), seed=4)}
    rows = []
    for split, data in splits.items():
        data.keys[:] = [f"{split}-{k}" for k in data.keys]
        rows += [{"key": k, "source": "s", "label": str(c), "class_id": int(c), "path": k,
                  "split": split, "group": groups[int(c)], "class_images": 10 + int(c)}
                 for k, c in zip(data.keys, data.class_ids)]
        for variant, (lo, hi) in {"a": (0, DIMS["a"]), "b": (DIMS["a"], None)}.items():
            write_features(FEATURES_DIR / variant / split / f"{split}-000000.arrow", data.keys,
                           data.class_ids, data.embeddings[:, lo:hi], meta(DIMS[variant]))
    write_table(MANIFEST, pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), MANIFEST_SCHEMA)
    outputs = []
    for budget in (1.0, 1e-9):
        params = TrainParams(epochs=2, batch_size=4, embedding_dim=4, max_memory_gb=budget)
        train(list(DIMS), params)
        outputs.append({name: (HEAD_DIR / name).read_bytes()
                        for name in ("head.safetensors", "head.json", "metrics.json",
                                     "history.csv")})
    assert outputs[0] == outputs[1]


def assert_same_head(a: torch.nn.Module, b: torch.nn.Module) -> None:
    """Two trained heads hold the same tensors, bit for bit."""
    for name, tensor in a.state_dict().items():
        assert torch.equal(tensor, b.state_dict()[name]), name


def test_the_monitor_scores_a_fixed_sample_of_the_val_split():
    """monitor_queries bounds the per-epoch monitor's search; early stopping (validation
    classes) and the trained head are unaffected, and the sample is the same every epoch."""
    from tasks.features import select

    train = clusters(range(8), 10, dim=16, seed=0, noise=2.0)
    val = clusters(range(8), 5, dim=16, seed=1, noise=2.0)
    base = TrainParams(epochs=3, embedding_dim=8, batch_size=16, early_stopping_patience=0)
    whole = train_head(train, val, base)
    sampled = train_head(train, val, base.model_copy(update={"monitor_queries": 7}))
    assert_same_head(whole.head, sampled.head)
    assert [h["train_loss"] for h in whole.history] == [h["train_loss"]
                                                         for h in sampled.history]
    # the sampled monitor equals the whole monitor run on those 7 queries alone
    keep = np.isin(np.arange(40), np.random.default_rng(0).choice(40, 7, replace=False))
    alone = train_head(train, select(val, keep), base)
    assert [h["val_mP@5"] for h in sampled.history] == [h["val_mP@5"] for h in alone.history]
    assert [h["val_mP@5"] for h in sampled.history] != [h["val_mP@5"] for h in whole.history]


def test_the_monitor_runs_every_nth_epoch_and_the_last_and_changes_no_byte():
    """monitor_every 3 over 7 epochs scores epochs 3, 6 and 7 (the same values as every
    epoch's monitor there), leaves the others null, and trains the same head bytes."""
    train = clusters(range(6), 10, dim=16, seed=0, noise=2.0)
    val = clusters(range(6), 4, dim=16, seed=1, noise=2.0)
    base = TrainParams(epochs=7, embedding_dim=8, batch_size=16, early_stopping_patience=0)
    every = train_head(train, val, base)
    sparse = train_head(train, val, base.model_copy(update={"monitor_every": 3}))
    assert_same_head(every.head, sparse.head)
    for e, s in zip(every.history, sparse.history):
        monitored = s["epoch"] in (3, 6, 7)
        for name in ("val_acc", "val_loss", "val_mP@5"):
            assert s[name] == (e[name] if monitored else None), (s["epoch"], name)
        assert s["train_loss"] == e["train_loss"]


def test_early_stopping_keeps_an_epoch_whose_monitor_was_measured():
    """monitor_every 10 over 30 epochs with patience 2: the run stops early, and the kept
    epoch (an improving one) and the stopping one have monitor scores, so metrics report
    measured values, not nulls."""
    train = clusters(range(6), 10, dim=16, seed=0, noise=2.0)
    val = clusters(range(6), 4, dim=16, seed=1, noise=2.0)
    validation = GroupData(clusters(range(6, 9), 3, 16, seed=2, noise=2.0),
                           clusters(range(6, 9), 4, 16, seed=3, noise=2.0), ["x"] * 9)
    params = TrainParams(epochs=30, embedding_dim=8, batch_size=16, early_stopping_patience=2,
                         monitor_every=10, lr=0.05)
    result = train_head(train, val, params, validation)
    assert result.metrics["epochs_run"] < 10  # stopped before the first 10th epoch
    assert result.metrics["val_mP@5"] is not None and result.metrics["val_loss"] is not None
    assert result.history[-1]["val_mP@5"] is not None  # the epoch it stopped at
    measured = [h["epoch"] for h in result.history if h["val_mP@5"] is not None]
    assert len(measured) < len(result.history)  # epochs between still skip the monitor


def test_bf16_autocast_trains_with_arcface_in_fp32(monkeypatch):
    """With amp: bf16 the head runs under autocast and ArcFace gets fp32 embeddings (its
    margin is scattered into the cosines, whose dtype must match). CPU autocast stands in
    for CUDA's here."""
    import tasks.train as train_module

    monkeypatch.setattr(train_module, "amp_context",
                        lambda device, amp: torch.autocast("cpu", torch.bfloat16))
    train = clusters(range(4), 8, dim=16, seed=0)
    val = clusters(range(4), 2, dim=16, seed=1)
    for loss in ("arcface", "subcenter_arcface"):
        params = TrainParams(epochs=2, embedding_dim=8, batch_size=8, amp="bf16", loss=loss)
        result = train_module.train_head(train, val, params)
        assert all(np.isfinite(h["train_loss"]) for h in result.history)


def test_amp_off_survives_yaml_1_1():
    """PyYAML reads an unquoted `amp: off` (as DVC's round trip writes it back) as false."""
    import yaml

    params = yaml.safe_load("epochs: 1\namp: off\n")
    assert params["amp"] is False
    assert TrainParams(**params).amp == "off"
    assert TrainParams(epochs=1, amp="bf16").amp == "bf16"
