"""Extraction at scale: the embedding cache, kill-and-resume, incremental runs, and a Dask
cluster."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from conftest import REPO, jpeg_bytes
from tasks.embedding_cache import EmbeddingCache, cache_key, image_digest
from tasks.params.extract import ExtractParams
from tasks.params.shard import ShardParams
from tasks.schemas.features import embeddings_of, read_features
from tasks.schemas.io import write_json
from tasks.schemas.manifest import MANIFEST_SCHEMA
from tasks.schemas.paths import SHARD_INDEX
from tasks.shard import plan_shards, shard_index, write_shard


def make_project(root: Path, tiny_backbone: Path, images: int, per_shard: int,
                 first_image: int = 0) -> Path:
    """data/00_models/tiny and data/03_shards with `images` distinct JPEGs, as the earlier stages
    leave them."""
    models = root / "data" / "00_models" / "tiny"
    if not models.exists():
        shutil.copytree(tiny_backbone, models)
    raw = root / "data" / "01_raw" / "src"
    (raw / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(first_image, first_image + images):
        (raw / "images" / f"{i}.jpg").write_bytes(jpeg_bytes(i, (48, 40)))
        rows.append({"key": f"src-{i:04d}", "source": "src", "label": f"l{i % 5}",
                     "class_id": i % 5, "path": f"images/{i}.jpg", "split": "train"})
    shards = root / "data" / "03_shards"
    shutil.rmtree(shards, ignore_errors=True)
    plans = plan_shards(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), per_shard)
    entries = [write_shard(plan, raw.parent, shards, ShardParams())[0] for plan in plans]
    assert sum(e["nsamples"] for e in entries) == images
    write_json(shards / SHARD_INDEX, shard_index(entries))
    return root


def features(root: Path) -> dict[str, tuple[list[str], np.ndarray]]:
    out = {}
    for f in sorted((root / "data" / "04_features" / "tiny").rglob("*.arrow")):
        table, _ = read_features(f)
        out[f.name] = (table.column("key").to_pylist(), embeddings_of(table))
    return out


def run_extract(root: Path, monkeypatch, **overrides) -> dict:
    from flows.extract import extract, task_runner

    monkeypatch.chdir(root)
    params = ExtractParams(**{"batch_size": 4, "num_workers": 0, "device": "cpu", **overrides})
    model_dir = Path("data/00_models/tiny")
    return extract.with_options(task_runner=task_runner(params))("tiny", model_dir, params)


def test_cache_returns_what_was_put_and_survives_reopening(tmp_path, tiny_backbone):
    key = cache_key(tiny_backbone, "cpu", "fp16", batch_size=4, cpu_threads=2)
    cache = EmbeddingCache(tmp_path, key, dim=4)
    digests = [image_digest(bytes([i])) for i in range(5)]
    emb = np.arange(20, dtype=np.float32).reshape(5, 4)
    cache.put(digests[:3], emb[:3])
    hit, got = cache.get(digests)
    assert hit.tolist() == [True, True, True, False, False] and np.array_equal(got[:3], emb[:3])
    again = EmbeddingCache(tmp_path, key, dim=4)
    assert len(again) == 3 and np.array_equal(again.get(digests[:3])[1], emb[:3])
    # a foreign or broken chunk is skipped with a warning, not a crash
    (again.dir / "zz-broken.arrow").write_bytes(b"not arrow")
    assert len(EmbeddingCache(tmp_path, key, dim=4)) == 3
    # a killed writer's temp file is removed once it is old; a young one may still be written
    old, young = again.dir / ".x.tmp1.tmp.arrow", again.dir / ".y.tmp2.tmp.arrow"
    old.write_bytes(b"half"), young.write_bytes(b"half")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    EmbeddingCache(tmp_path, key, dim=4)
    assert not old.exists() and young.exists()


def test_rerun_and_raised_samples_embed_only_new_images(tmp_path, tiny_backbone, monkeypatch):
    root = make_project(tmp_path / "p", tiny_backbone, images=30, per_shard=8)
    first = run_extract(root, monkeypatch)
    assert (first["images"], first["embedded"], first["cached"]) == (30, 30, 0)
    full = features(root)

    # DVC deletes the stage's outputs before rerunning it; the cache rebuilds them without the model
    shutil.rmtree(root / "data" / "04_features")
    again = run_extract(root, monkeypatch)
    assert (again["embedded"], again["cached"]) == (0, 30)
    assert all(np.array_equal(full[k][1], v[1]) and full[k][0] == v[0]
               for k, v in features(root).items())

    # 10% more images (new shards layout, old images kept): exactly the new ones are embedded
    make_project(root, tiny_backbone, images=33, per_shard=8)
    grown = run_extract(root, monkeypatch)
    assert (grown["images"], grown["embedded"], grown["cached"]) == (33, 3, 30)
    old = {k: e for keys, emb in full.values() for k, e in zip(keys, emb)}
    new = {k: e for keys, emb in features(root).values() for k, e in zip(keys, emb)}
    assert all(np.allclose(new[k], old[k], atol=1e-5) for k in old)


def test_cache_off_embeds_everything(tmp_path, tiny_backbone, monkeypatch):
    root = make_project(tmp_path / "p", tiny_backbone, images=6, per_shard=8)
    run_extract(root, monkeypatch, cache_dir="")
    assert run_extract(root, monkeypatch, cache_dir="")["embedded"] == 6
    assert not (root / ".cache").exists()


def test_killed_run_resumes_and_equals_an_uninterrupted_run(tmp_path, tiny_backbone, monkeypatch):
    """SIGKILL mid-extraction, rerun: finished work comes from the cache, the result is
    identical."""
    from prefect.settings import PREFECT_API_URL

    reference = make_project(tmp_path / "ref", tiny_backbone, images=160, per_shard=8)
    run_extract(reference, monkeypatch, flush_every=4)
    root = make_project(tmp_path / "p", tiny_backbone, images=160, per_shard=8)
    script = ("from flows.extract import extract; from tasks.params.extract import ExtractParams; "
              "from pathlib import Path; "
              "extract('tiny', Path('data/00_models/tiny'), "
              "ExtractParams(batch_size=4, num_workers=0, device='cpu', flush_every=4))")
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=root, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    chunks = lambda: [p for p in (root / ".cache" / "embeddings").rglob("*.arrow")
                      if not p.name.startswith(".")]
    deadline = time.monotonic() + 120
    while len(chunks()) < 6 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    # whatever the kill left is either complete or a dot-named temp file no reader takes for output
    for f in (root / "data" / "04_features").rglob("*.arrow"):
        assert f.name.startswith(".") or read_features(f)[0].num_rows == 8
    resumed = run_extract(root, monkeypatch, flush_every=4)
    assert resumed["cached"] >= 6 * 4 and resumed["embedded"] > 0
    assert resumed["cached"] + resumed["embedded"] == 160
    ref, got = features(reference), features(root)
    assert ref.keys() == got.keys()
    for name in ref:
        assert ref[name][0] == got[name][0]
        assert np.array_equal(ref[name][1], got[name][1]), name


def test_dask_cluster_of_two_workers_gives_the_threads_result(tmp_path, tiny_backbone, monkeypatch):
    """Shards mapped over a local 2-worker Dask cluster: same embeddings, one model load per
    worker."""
    from distributed import Client, LocalCluster
    from prefect.settings import PREFECT_API_URL

    threads = make_project(tmp_path / "threads", tiny_backbone, images=40, per_shard=5)
    run_extract(threads, monkeypatch)
    root = make_project(tmp_path / "dask", tiny_backbone, images=40, per_shard=5)
    # worker processes report their task runs to the same Prefect API as this process
    monkeypatch.setenv("PREFECT_API_URL", PREFECT_API_URL.value())
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, \
            Client(cluster) as client:
        stats = run_extract(root, monkeypatch, runner="dask",
                            dask_address=cluster.scheduler_address,
                            cache_dir=str(tmp_path / "dask-cache"))
        loads = client.run(lambda: len(__import__("tasks.extract", fromlist=["_workers"])._workers))
    assert (stats["images"], stats["embedded"]) == (40, 40)
    assert sorted(loads.values()) == [1, 1]  # both workers took shards; each loaded the model once
    ref, got = features(threads), features(root)
    assert ref.keys() == got.keys() and len(got) == 8
    for name in ref:
        assert ref[name][0] == got[name][0]
        assert np.array_equal(ref[name][1], got[name][1]), name


def test_dask_runner_needs_an_address():
    with pytest.raises(ValueError, match="dask_address"):
        ExtractParams(runner="dask")


def test_speed_only_settings_write_the_same_bytes(tmp_path, tiny_backbone, monkeypatch):
    """ExtractParams.SPEED_ONLY are no DVC params, so none may change a byte: decoding
    processes, the cache (off, or flushed every few images), and shards embedded 3 at once
    by the threads runner all give one run's feature files, bit for bit."""
    root = make_project(tmp_path / "p", tiny_backbone, images=24, per_shard=5)
    run_extract(root, monkeypatch, cache_dir="")
    reference = {f.name: f.read_bytes()
                 for f in sorted((root / "data" / "04_features" / "tiny").rglob("*.arrow"))}
    assert len(reference) == 5
    for change in ({"num_workers": 2}, {"threads": 3}, {"flush_every": 3},
                   {"cache_dir": str(tmp_path / "cache"), "flush_every": 7}):
        shutil.rmtree(root / "data" / "04_features")
        run_extract(root, monkeypatch, **{"cache_dir": "", **change})
        got = {f.name: f.read_bytes()
               for f in sorted((root / "data" / "04_features" / "tiny").rglob("*.arrow"))}
        assert got == reference, change
