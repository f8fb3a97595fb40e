"""Several devices: one process per device gives one device's bytes; the cache takes
concurrent writers; device specs are validated; Dask tasks go to workers with a GPU."""

from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from conftest import REPO
from tasks.embedding_cache import EmbeddingCache, image_digest
from tasks.extract import resolve_devices
from tasks.params.extract import ExtractParams
from tasks.schemas.features import embeddings_of
from tasks.schemas.shards import read_shard
from test_extract_scale import features, make_project, run_extract


def feature_bytes(root: Path) -> dict[str, bytes]:
    return {str(f.relative_to(root)): f.read_bytes()
            for f in sorted((root / "data" / "04_features").rglob("*.arrow"))}


def test_two_cpu_processes_write_the_bytes_of_one_device(tmp_path, tiny_backbone, monkeypatch):
    """device: [cpu, cpu] runs two processes that share the shards and one cache; every
    feature file is byte for byte the single-device one, and the cache holds every image."""
    one = make_project(tmp_path / "one", tiny_backbone, images=24, per_shard=3)
    ref = run_extract(one, monkeypatch, cache_dir=str(tmp_path / "cache-one"))
    two = make_project(tmp_path / "two", tiny_backbone, images=24, per_shard=3)
    got = run_extract(two, monkeypatch, device=["cpu", "cpu"], cache_dir=str(tmp_path / "cache"))
    assert (got["images"], got["embedded"]) == (ref["images"], ref["embedded"]) == (24, 24)
    assert list(ref["shards_per_process"]) == [os.getpid()]  # one device: today's path, in here
    per_process = got["shards_per_process"]
    assert len(per_process) == 2 and os.getpid() not in per_process
    assert sum(per_process.values()) == 8 and min(per_process.values()) >= 1
    want = feature_bytes(one)
    assert len(want) == 8 and feature_bytes(two) == want

    # the two processes' chunks in the one cache hold every image, as one device computed it
    chunks = [pa.ipc.open_file(pa.memory_map(str(f))).read_all()
              for f in (tmp_path / "cache").glob("*/*.arrow")]
    cached = {d: e for t in chunks
              for d, e in zip(t.column("digest").to_pylist(), embeddings_of(t))}
    assert len(cached) == 24
    for shard in sorted((two / "data" / "03_shards").rglob("*.tar")):
        table = pa.ipc.open_file(pa.memory_map(str(
            two / "data" / "04_features" / "tiny" / "train" / f"{shard.stem}.arrow"))).read_all()
        want_rows = embeddings_of(table)
        for sample, row in zip(read_shard(shard), want_rows):
            assert cached[image_digest(sample.jpeg)].tobytes() == row.tobytes()


WRITER = """
import sys
import numpy as np
from tasks.embedding_cache import EmbeddingCache
root, writer, chunks = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
cache = EmbeddingCache(root, {"format": 1, "test": "concurrent"}, 4)
for c in range(chunks):  # one-row chunks of this writer's own digests, row value = digest id
    i = writer * 1000 + c
    cache.put([i.to_bytes(32, "big")], np.full((1, 4), i, np.float32))
"""


def test_cache_takes_concurrent_writers_and_readers(tmp_path, caplog):
    """Processes adding chunks to one namespace at once lose no row, and a cache opened
    while they write neither fails nor reads a half-written chunk (none skipped as unreadable).
    Before the fix, opening it while a writer renamed its temp chunk raised FileNotFoundError."""
    key = {"format": 1, "test": "concurrent"}
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), str(w), "60"],
                              cwd=REPO) for w in range(2)]
    opened = 0
    while any(p.poll() is None for p in procs) or not opened:
        EmbeddingCache(tmp_path, key, 4)  # a reader in the middle of the writes
        opened += 1
    assert [p.wait() for p in procs] == [0, 0]
    assert "unreadable" not in caplog.text
    cache = EmbeddingCache(tmp_path, key, 4)
    ids = [w * 1000 + c for w in range(2) for c in range(60)]
    hit, emb = cache.get([i.to_bytes(32, "big") for i in ids])
    assert len(cache) == 120 and hit.all()
    assert np.array_equal(emb, np.repeat(np.array(ids, np.float32)[:, None], 4, axis=1))


@pytest.mark.parametrize("spec, message", [
    ("gpu", "'gpu' is not a device"),
    ("cuda:0,cuda:0", "a GPU listed twice"),
    (["cpu", "cuda:0"], "devices of one kind only"),
    (["cuda", "cuda:1"], "name each GPU of a list by index"),
    (["auto", "cpu"], "'auto' stands alone"),
    ([], "non-empty list"),
])
def test_bad_device_specs_are_clear_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        ExtractParams(device=spec)


def test_device_specs_resolve_to_one_process_per_entry():
    assert ExtractParams(device="cuda:0, cuda:2").device == ["cuda:0", "cuda:2"]
    assert resolve_devices(["cpu", "cpu", "cpu"]) == ["cpu", "cpu", "cpu"]
    with pytest.MonkeyPatch.context() as mp_:  # what auto sees on machines without one
        mp_.setattr(torch.cuda, "is_available", lambda: True)
        for count, want in ((4, ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]), (1, ["cuda"])):
            mp_.setattr(torch.cuda, "device_count", lambda count=count: count)
            assert resolve_devices("auto") == want
        mp_.setattr(torch.cuda, "is_available", lambda: False)
        assert resolve_devices("auto") == ["cpu"]
    with pytest.raises(ValueError, match="takes one device name"):
        ExtractParams(device=["cpu", "cpu"], runner="dask", dask_address="tcp://s:8786")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA device is visible"):
            resolve_devices(["cuda:0", "cuda:1"])


def test_dask_tasks_asking_for_a_gpu_run_only_on_workers_that_have_one(tmp_path, tiny_backbone,
                                                                       monkeypatch):
    """Two workers declare GPU=1 (as `dask worker --resources GPU=1` would), a third none:
    the shard tasks, annotated with the resource, spread over the two and skip the third."""
    from distributed import Client, Nanny, Scheduler, SpecCluster
    from prefect.settings import PREFECT_API_URL

    ref = make_project(tmp_path / "threads", tiny_backbone, images=24, per_shard=3)
    run_extract(ref, monkeypatch)
    root = make_project(tmp_path / "dask", tiny_backbone, images=24, per_shard=3)
    monkeypatch.setenv("PREFECT_API_URL", PREFECT_API_URL.value())
    gpu = {"cls": Nanny, "options": {"nthreads": 2, "resources": {"GPU": 1}}}
    workers = {"gpu0": gpu, "gpu1": gpu, "plain": {"cls": Nanny, "options": {"nthreads": 2}}}
    scheduler = {"cls": Scheduler, "options": {"dashboard_address": None}}
    with SpecCluster(scheduler=scheduler, workers=workers) as cluster, Client(cluster) as client:
        client.wait_for_workers(3)
        stats = run_extract(root, monkeypatch, runner="dask",
                            dask_address=cluster.scheduler_address, dask_resources={"GPU": 1},
                            cache_dir=str(tmp_path / "dask-cache"))
        pids = client.run(os.getpid)
        names = {a: w["name"] for a, w in client.scheduler_info()["workers"].items()}
    by_name = {names[a]: pid for a, pid in pids.items()}
    per_process = stats["shards_per_process"]
    assert set(per_process) == {by_name["gpu0"], by_name["gpu1"]}  # both GPU workers, not "plain"
    assert sum(per_process.values()) == 8
    want, got = features(ref), features(root)
    assert want.keys() == got.keys() and len(got) == 8
    for name in want:
        assert want[name][0] == got[name][0]
        assert np.array_equal(want[name][1], got[name][1]), name


def test_cuda_device_asks_dask_for_a_gpu_by_default():
    from flows.extract import dask_resources

    assert dask_resources(ExtractParams(device="cuda")) == {"GPU": 1}
    assert dask_resources(ExtractParams(device="auto")) == {}
    assert dask_resources(ExtractParams(device="cuda", dask_resources={})) == {}


def test_auto_on_a_dask_cluster_warns_that_nothing_pins_a_gpu():
    from flows.extract import unpinned_gpu_warning

    dask = {"runner": "dask", "dask_address": "tcp://scheduler:8786"}
    assert "set extract.device: cuda" in unpinned_gpu_warning(ExtractParams(**dask))
    assert unpinned_gpu_warning(ExtractParams(device="cuda", **dask)) is None
    assert unpinned_gpu_warning(ExtractParams(dask_resources={"GPU": 1}, **dask)) is None
    assert unpinned_gpu_warning(ExtractParams()) is None  # threads: every GPU is pinned


def test_a_failing_device_process_fails_the_run_with_its_error(tmp_path, tiny_backbone):
    """A shard one process cannot read stops the run with that process's traceback, and
    no device process is left behind."""
    from tasks.extract_devices import embed_on_devices

    # pools other tests started in this process (decoding, sharding) live on: not ours
    before = set(mp.active_children())
    root = make_project(tmp_path, tiny_backbone, images=6, per_shard=3)
    shard = next((root / "data" / "03_shards").rglob("*.tar"))
    jobs = [(str(shard), str(tmp_path / "a.arrow")),
            (str(tmp_path / "missing.tar"), str(tmp_path / "b.arrow"))]
    params = ExtractParams(batch_size=4, num_workers=0, cache_dir="")
    model_dir = str(root / "data" / "00_models" / "tiny")
    with pytest.raises(RuntimeError, match=r"(?s)extract on cpu failed:.*missing\.tar"):
        list(embed_on_devices(jobs, model_dir, params, ["cpu", "cpu"]))
    assert not set(mp.active_children()) - before
    assert not (tmp_path / "b.arrow").exists()


def test_a_device_process_killed_mid_run_fails_the_run_at_once(tmp_path, tiny_backbone):
    """SIGKILL one of two processes after its first shard: the run stops with its name and
    exit code (not after the other finishes), and no device process is left behind."""
    import signal

    from tasks.extract_devices import embed_on_devices

    before = set(mp.active_children())
    root = make_project(tmp_path, tiny_backbone, images=40, per_shard=2)
    jobs = [(str(s), str(tmp_path / "out" / f"{s.stem}.arrow"))
            for s in sorted((root / "data" / "03_shards").rglob("*.tar"))]
    params = ExtractParams(batch_size=2, num_workers=0, cache_dir="")
    model_dir = str(root / "data" / "00_models" / "tiny")
    seen = []
    with pytest.raises(RuntimeError, match=r"extract-cpu died with exit code -9 before it"):
        for stats in embed_on_devices(jobs, model_dir, params, ["cpu", "cpu"]):
            if not seen:
                os.kill(stats["pid"], signal.SIGKILL)
            seen.append(stats)
    assert len(seen) < len(jobs) // 2  # not after the other process embedded the rest
    assert not set(mp.active_children()) - before


def test_a_process_that_said_it_was_done_may_exit_badly():
    """A device process whose driver crashes at teardown, after it sent "done", lost no
    shard: its exit code fails nothing. One that exits before "done" fails the run, with
    the error it queued if it queued one."""
    import time
    from types import SimpleNamespace

    from tasks.extract_devices import _check_alive

    procs = [SimpleNamespace(exitcode=None, name="extract-cuda:0"),
             SimpleNamespace(exitcode=139, name="extract-cuda:1")]
    results = mp.get_context("spawn").Queue()
    results.put(("shard", {"images": 3}))
    results.put(("done", 1))
    time.sleep(0.2)  # the queue's feeder thread writes to the pipe
    finished, shards = set(), []
    _check_alive(procs, finished, results, shards)
    assert finished == {1} and shards == [{"images": 3}]
    procs[0].exitcode = 0  # gone without a word: its error message is read and raised
    results.put(("error", "extract on cuda:0 failed:\nTraceback"))
    time.sleep(0.2)
    with pytest.raises(RuntimeError, match="extract on cuda:0 failed"):
        _check_alive(procs, finished, results, shards)
    procs[0].exitcode = -9
    with pytest.raises(RuntimeError, match="extract-cuda:0 died with exit code -9"):
        _check_alive(procs, finished, results, shards)
