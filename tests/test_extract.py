"""Extraction with a tiny random-init open_clip tower: the Arrow schema, metadata and values."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
import torch

from conftest import REPO, jpeg_bytes
from tasks.preprocess import decode_rgb
from tasks.extract import Embedder, embed_shard, feature_metadata, resolve_device
from tasks.schemas.shards import read_shard
from tasks.backbone import load_backbone
from tasks.params.extract import ExtractParams
from tasks.params.shard import ShardParams
from tasks.schemas.features import embeddings_of, read_features, write_features
from tasks.schemas.manifest import MANIFEST_SCHEMA
from tasks.shard import plan_shards, write_shard


@pytest.fixture
def shard_file(tmp_path):
    raw = tmp_path / "raw" / "src" / "images"
    raw.mkdir(parents=True)
    rows = []
    for i in range(11):
        (raw / f"{i}.jpg").write_bytes(jpeg_bytes(i, (48, 40)))
        rows.append({"key": f"src-{i:03d}", "source": "src", "label": f"l{i % 3}",
                     "class_id": i % 3, "path": f"images/{i}.jpg", "split": "train"})
    plan = plan_shards(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), 100)[0]
    write_shard(plan, tmp_path / "raw", tmp_path / "shards", ShardParams())
    return tmp_path / "shards" / plan.relpath


def test_features_read_in_polars_pyarrow_and_duckdb_without_project_code(tmp_path, shard_file,
                                                                         tiny_backbone):
    import duckdb

    model, preprocess, info = load_backbone(tiny_backbone)
    out = tmp_path / "f.arrow"
    embedder = Embedder(model, resolve_device("cpu"), "fp32", batch_size=4, cpu_threads=2)
    embed_shard(shard_file, out, embedder, preprocess, ExtractParams(batch_size=4, num_workers=0),
                feature_metadata("tiny", info))
    table = pa.ipc.open_file(pa.memory_map(str(out))).read_all()  # pyarrow
    meta = {k.decode(): v.decode() for k, v in table.schema.metadata.items()}
    assert {k: meta[k] for k in ("model_name", "pretrained", "image_size", "dim")} == {
        "model_name": "tiny-vit", "pretrained": "random-init", "image_size": "32", "dim": "16"}
    assert meta["checkpoint_sha256"] == info["checkpoint_sha256"]
    df = pl.read_ipc(out)  # polars
    assert df.height == 11 and df["embedding"].dtype == pl.Array(pl.Float32, 16)
    assert pl.read_ipc_schema(out)["embedding"] == pl.Array(pl.Float32, 16)
    feats = table  # noqa: F841 (duckdb finds the Arrow table by its variable name)
    rows = duckdb.sql("select class_id, count(*) as n, avg(embedding[1]) as e1 from feats "
                      "group by class_id order by class_id").fetchall()
    assert [(c, n) for c, n, _ in rows] == [(0, 4), (1, 4), (2, 3)]
    first = embeddings_of(table)[:, 0]
    ids = table.column("class_id").to_numpy()
    assert np.allclose([e for _, _, e in rows], [first[ids == c].mean() for c in range(3)],
                       atol=1e-6)


@pytest.mark.parametrize("workers", [0, 2])
def test_features_file_schema_and_values(tmp_path, shard_file, tiny_backbone, workers):
    model, preprocess, info = load_backbone(tiny_backbone)
    embedder = Embedder(model, resolve_device("cpu"), "fp16", batch_size=4, cpu_threads=2)
    out = tmp_path / "feat" / "train-000000.arrow"
    seen = []
    stats = embed_shard(shard_file, out, embedder, preprocess,
                        ExtractParams(batch_size=4, num_workers=workers),
                        feature_metadata("tiny", info), seen.append)
    assert stats["images"] == 11 and sum(seen) == 11

    table, meta = read_features(out)
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 16)
    assert table.schema.field("class_id").type == pa.int32()
    assert (meta["model_name"] == "tiny-vit" and meta["dim"] == "16"
            and meta["checkpoint_sha256"] == info["checkpoint_sha256"])
    # values equal a direct forward pass on the decoded JPEGs, in shard order
    samples = read_shard(shard_file)
    assert table.column("key").to_pylist() == [s.key for s in samples]
    batch = torch.cat([preprocess(decode_rgb(s.jpeg)[None]) for s in samples])
    with torch.no_grad():
        ref = model.encode_image(batch).numpy()
    assert np.allclose(embeddings_of(table), ref, atol=2e-2 * np.abs(ref).max())



class _PointwiseConvs(torch.nn.Module):
    """1x1 and depthwise convolutions, as in EfficientNet: torch runs them on the CPU
    with other kernels (other last bits) at one thread under 16 images, or for one image."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.convs = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 1),
                                         torch.nn.Conv2d(64, 64, 3, padding=1, groups=64),
                                         torch.nn.Conv2d(64, 32, 1))

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return self.convs(x).mean((2, 3))


def test_an_embedding_does_not_depend_on_its_batch_or_the_callers_threads():
    """A shard's last batch, cache hits or a worker thread started with other torch
    threads (OMP_NUM_THREADS=1, or after the decoding threads set theirs to 1) change no
    byte: the fresh-clone check compares the features' hashes with the committed lock."""
    images = torch.randn(6, 3, 16, 16)
    embedder = Embedder(_PointwiseConvs(), resolve_device("cpu"), "fp32", batch_size=8,
                        cpu_threads=2)
    want = embedder(images)
    for threads in (1, 2):
        torch.set_num_threads(threads)
        got = np.concatenate([embedder(images[:5]), embedder(images[5:])])
        assert got.tobytes() == want.tobytes(), f"{threads} torch threads in the caller"
        assert torch.get_num_threads() == threads  # the caller's own count is left as it was
    with pytest.raises(ValueError, match="1 to 8"):
        embedder(torch.randn(9, 3, 16, 16))


def test_empty_shard_gives_an_empty_valid_file(tmp_path):
    meta = {"model_name": "m", "pretrained": "p", "checkpoint_sha256": "0" * 64,
            "image_size": "32", "dim": "8"}
    write_features(tmp_path / "e.arrow", [], np.zeros(0, np.int32), np.zeros((0, 8), np.float32),
                   meta)
    table, _ = read_features(tmp_path / "e.arrow")
    assert table.num_rows == 0 and table.schema.field("embedding").type.list_size == 8


def test_cuda_request_without_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(RuntimeError, match="extract.device = 'cuda'"):
        resolve_device("cuda")


def test_decoding_processes_outlive_a_shard_and_keep_order(shard_file, tiny_backbone):
    from tasks.decode import decode_pool

    _, preprocess, _ = load_backbone(tiny_backbone)
    samples = read_shard(shard_file)
    pool = decode_pool(preprocess, 2)
    assert decode_pool(preprocess, 2) is pool  # the next shard reuses the running processes
    got = list(pool.batches([s.jpeg for s in samples], batch_size=4, pin=False))
    assert [len(b) for b in got] == [4, 4, 3]
    expected = torch.cat([preprocess(decode_rgb(s.jpeg)[None]) for s in samples])
    assert torch.equal(torch.cat(got), expected)


def _alive(pid: int) -> bool:
    """A process that exists and is not a zombie (an exited child nobody has reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc")
def test_decoding_processes_exit_when_their_process_is_killed(tmp_path, tiny_backbone):
    """A device process that extract terminates (or the kernel kills) cannot shut its pool
    down: the decoding processes must notice and exit rather than wait for work forever."""
    script = tmp_path / "hold.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        from conftest import jpeg_bytes
        from tasks.backbone import load_backbone
        from tasks.decode import decode_pool
        _, preprocess, _ = load_backbone({str(tiny_backbone)!r})
        pool = decode_pool(preprocess, 2)
        list(pool.batches([jpeg_bytes(seed=i) for i in range(4)], batch_size=2, pin=False))
        print(" ".join(str(p) for p in pool._executor._processes), flush=True)
        time.sleep(600)
    """))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    holder = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, env=env,
                              text=True)
    try:
        workers = [int(p) for p in holder.stdout.readline().split()]
        assert len(workers) == 2 and all(_alive(p) for p in workers)
    finally:
        holder.kill()
        holder.wait()
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(p) for p in workers), "decoding processes outlived their parent"
