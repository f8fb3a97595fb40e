"""Model soups: the averages against torch's own mean, the soup through open_clip's loader, the
greedy rule against a second implementation of it, every refusal of a bad run, and the
validation score against a brute-force mP@5 over the features `extract` writes."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from itertools import combinations
from pathlib import Path

import numpy as np
import open_clip
import pyarrow as pa
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import REPO, TINY_CONFIG
from flows.soup import soup
from tasks.backbone import CONFIG_NAME, WEIGHTS_NAME, load_backbone
from tasks.extract import Embedder, embed_shard, feature_metadata
from tasks.params.base import ParamsError, load_sections
from tasks.params.evaluate import EvaluateParams
from tasks.params.extract import ExtractParams
from tasks.params.shard import ShardParams
from tasks.params.soup import SoupParams, SoupSpec
from tasks.schemas.features import embeddings_of, read_features
from tasks.schemas.io import sha256_file, write_json, write_table
from tasks.schemas.manifest import MANIFEST_SCHEMA
from tasks.schemas.paths import FINETUNED_DIR, MANIFEST, SHARDS_DIR, SOUPS_DIR
from tasks.schemas.shards import read_split
from tasks.shard import plan_shards, write_shards
from tasks.soup import SoupError, greedy_soup, uniform_soup
from tasks.soup_score import (SCORE_FIELDS, embed_samples, score_settings, validation_score,
                              validation_scorer)

CONFIG = {"model_cfg": {"embed_dim": 3}, "preprocess_cfg": {"size": 8}}


def save_run(d: Path, state: dict[str, torch.Tensor], config: dict = CONFIG, **info) -> Path:
    """A run folder in the models stage's layout, its model.json true to its weights."""
    d.mkdir(parents=True)
    (d / CONFIG_NAME).write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in state.items()}, str(d / WEIGHTS_NAME))
    (d / "model.json").write_text(json.dumps({
        "model_name": "tiny", "pretrained": f"finetune:{d.name}", "image_size": 8, "dim": 3,
        "checkpoint_sha256": sha256_file(d / WEIGHTS_NAME), **info}))
    return d


def synthetic_state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(5, 3, generator=g), "h": torch.randn(7, generator=g).half(),
            "bn.running_mean": torch.randn(3, generator=g),
            "bn.num_batches_tracked": torch.tensor(100 + seed),
            "position_ids": torch.arange(4)}


def test_uniform_soup_is_the_mean_of_the_runs_in_any_order(tmp_path):
    states = [synthetic_state(s) for s in range(3)]
    runs = [save_run(tmp_path / f"run{s}", st) for s, st in enumerate(states)]
    info = uniform_soup(runs, tmp_path / "soup")
    soup = load_file(str(tmp_path / "soup" / WEIGHTS_NAME))
    for key in ("w", "h", "bn.running_mean"):
        dtype = states[0][key].dtype
        expected = torch.stack([st[key].double() for st in states]).mean(0).to(dtype)
        assert soup[key].dtype == dtype
        torch.testing.assert_close(soup[key], expected, rtol=0, atol=0)
    assert int(soup["bn.num_batches_tracked"]) == 102  # the counters' max
    assert torch.equal(soup["position_ids"], torch.arange(4))
    assert info["checkpoint_sha256"] == sha256_file(tmp_path / "soup" / WEIGHTS_NAME)
    assert [r["checkpoint_sha256"] for r in info["soup"]["runs"]] == [
        sha256_file(r / WEIGHTS_NAME) for r in runs]
    assert info["soup"]["kind"] == "uniform" and info["soup"]["counters_that_differed"] == 1
    assert json.loads((tmp_path / "soup" / "model.json").read_text()) == info
    assert json.loads((tmp_path / "soup" / CONFIG_NAME).read_text()) == CONFIG
    again = uniform_soup(runs[::-1], tmp_path / "reversed")
    assert again["checkpoint_sha256"] == info["checkpoint_sha256"]  # the same bytes


@pytest.fixture
def tiny_runs(tmp_path, tiny_backbone) -> list[Path]:
    """Three 'fine-tuned' tiny ViTs: the tiny backbone's weights plus seeded noise."""
    base = load_file(str(tiny_backbone / WEIGHTS_NAME))
    runs = []
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        state = {k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
                 for k, v in base.items()}
        runs.append(save_run(tmp_path / f"vit{seed}", state, TINY_CONFIG, model_name="tiny-vit",
                             image_size=32, dim=16))
    return runs


def test_soup_loads_through_open_clips_local_dir_and_runs_as_the_mean(tmp_path, tiny_runs):
    uniform_soup(tiny_runs, tmp_path / "soup")
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'soup'}")
    states = [load_file(str(r / WEIGHTS_NAME)) for r in tiny_runs]
    by_hand = {k: torch.stack([s[k] for s in states]).mean(0) for k in states[0]}
    reference = open_clip.create_model(f"local-dir:{tiny_runs[0]}")
    reference.load_state_dict(by_hand)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model.eval().encode_image(x),
                                   reference.eval().encode_image(x), rtol=1e-5, atol=1e-6)
    loaded, _, info = load_backbone(tmp_path / "soup")  # as extract loads it
    assert info["dim"] == 16 and info["soup"]["kind"] == "uniform"


# ---------------------------------------------------------------- greedy soup

TARGET = torch.tensor([1.0, 2.0, -1.0, 0.5])


def distance_score(folder: Path) -> float:
    """Synthetic score: minus the distance of the folder's `w` to TARGET."""
    return -float(torch.linalg.norm(load_file(str(folder / WEIGHTS_NAME))["w"].double() - TARGET))


def greedy_by_hand(states: list[dict]) -> tuple[list[int], list[float]]:
    """The greedy rule again, on the tensors in memory: (runs kept, every score tried)."""
    def score(members: list[int]) -> float:
        w = torch.stack([states[i]["w"].double() for i in members]).mean(0).float()
        return -float(torch.linalg.norm(w.double() - TARGET))
    own = [score([i]) for i in range(len(states))]
    order = sorted(range(len(states)), key=lambda i: (-own[i], i))
    kept, tried = [order[0]], [own[order[0]]]
    for i in order[1:]:
        tried.append(score(kept + [i]))
        if tried[-1] > score(kept):
            kept.append(i)
    return kept, own + tried[1:]


def run_states(ws: list[list[float]]) -> list[dict]:
    return [{"w": torch.tensor(w), "b": torch.tensor([float(i)])} for i, w in enumerate(ws)]


def check_greedy(tmp_path: Path, states: list[dict]) -> dict:
    runs = [save_run(tmp_path / f"g{i}", s) for i, s in enumerate(states)]
    info = greedy_soup(runs, distance_score, tmp_path / "greedy")
    kept, scores = greedy_by_hand(states)
    record = info["soup"]["greedy"]
    assert record["chosen"] == [str(runs[i]) for i in kept]
    assert list(record["individual"].values()) + [t["score"] for t in record["tries"][1:]] \
        == pytest.approx(scores, abs=1e-6)
    soup = load_file(str(tmp_path / "greedy" / WEIGHTS_NAME))
    torch.testing.assert_close(soup["w"], torch.stack([states[i]["w"] for i in kept]).mean(0))
    assert record["score"] == pytest.approx(distance_score(tmp_path / "greedy"), abs=1e-6)
    # greedy is no exhaustive search, but never worse than its best single run
    subsets = [c for n in range(1, len(states) + 1) for c in combinations(range(len(states)), n)]
    best = max(-float(torch.linalg.norm(torch.stack([states[i]["w"] for i in c]).mean(0).double()
                                        - TARGET)) for c in subsets)
    assert max(record["individual"].values()) <= record["score"] <= best + 1e-6
    return record


def test_greedy_soup_rejects_a_run_that_does_not_help(tmp_path):
    states = run_states([[1.5, 2.0, -1.0, 0.0], [0.5, 2.0, -1.0, 1.0], [9.0, 9.0, 9.0, 9.0],
                         [1.0, 2.5, -1.5, 0.5]])
    record = check_greedy(tmp_path, states)
    assert [t["added"] for t in record["tries"]].count(False) >= 1
    assert str(tmp_path / "g2") not in record["chosen"]  # the far-off run stays out
    assert not list(tmp_path.glob(".greedy.try-*"))  # candidates' folders are gone


def test_greedy_soup_does_not_add_a_run_that_ties(tmp_path):
    # g1 has g0's w (only b differs): equal own scores (the listed order ranks them), and the
    # soup of both scores exactly what g0 alone does, so g1 is not added.
    states = run_states([[1.5, 2.0, -1.0, 0.0], [1.5, 2.0, -1.0, 0.0], [0.5, 2.0, -1.0, 1.0]])
    record = check_greedy(tmp_path, states)
    assert record["tries"][1]["runs"] == [str(tmp_path / "g0"), str(tmp_path / "g1")]
    assert record["tries"][1]["score"] == record["tries"][0]["score"]
    assert record["tries"][1]["added"] is False
    assert record["chosen"] == [str(tmp_path / "g0"), str(tmp_path / "g2")]


# ---------------------------------------------------------------- hostile runs

def _bad(tmp_path: Path, change) -> list[Path]:
    good = save_run(tmp_path / "good", synthetic_state(0))
    state, config = synthetic_state(1), dict(CONFIG)
    change(state, config)
    return [good, save_run(tmp_path / "bad", state, config)]


@pytest.mark.parametrize("change, message", [
    (lambda s, c: s.pop("w"), r"run .*bad: key 'w' missing"),
    (lambda s, c: s.update(extra=torch.zeros(1)), r"run .*bad: extra key 'extra'"),
    (lambda s, c: s.update(w=torch.zeros(3, 5)), r"run .*bad: key 'w' has shape \[3, 5\]"),
    (lambda s, c: s.update(w=s["w"].double()),
     r"run .*bad: key 'w' has shape \[5, 3\] and dtype F64"),
    (lambda s, c: c.update(model_cfg={"embed_dim": 4}), r"run .*bad: its open_clip_config"),
    (lambda s, c: s["w"].__setitem__((0, 0), float("nan")), r"run .*bad: key 'w' has non-fin"),
    (lambda s, c: s["h"].__setitem__(2, float("inf")), r"run .*bad: key 'h' has non-finite"),
    (lambda s, c: s.update(position_ids=torch.arange(1, 5)),
     r"run .*bad: non-float tensor 'position_ids' differs"),
])
def test_a_bad_run_is_refused_naming_run_and_key(tmp_path, change, message):
    runs = _bad(tmp_path, change)
    with pytest.raises(SoupError, match=message):
        uniform_soup(runs, tmp_path / "soup")
    with pytest.raises(SoupError, match=message):  # before anything is scored
        greedy_soup(runs, lambda _: pytest.fail("scored a bad run"), tmp_path / "greedy")
    assert not (tmp_path / "soup").exists()


def test_runs_fine_tuned_from_different_weights_are_not_averaged(tmp_path):
    """Same architecture and config, but one run started from other pretrained weights:
    refused, naming both bases; runs of one base pass."""
    a, b, c = (save_run(tmp_path / n, synthetic_state(i), base_checkpoint_sha256=base)
               for i, (n, base) in enumerate([("a", "1" * 64), ("b", "1" * 64), ("c", "2" * 64)]))
    uniform_soup([a, b], tmp_path / "ok")
    with pytest.raises(SoupError, match=r"run .*c was fine-tuned from other weights .*2222"):
        uniform_soup([a, b, c], tmp_path / "soup")


def test_a_changed_folder_a_repeated_run_or_a_lone_run_is_refused(tmp_path):
    a, b = (save_run(tmp_path / n, synthetic_state(i)) for i, n in enumerate("ab"))
    with pytest.raises(SoupError, match="needs at least two runs"):
        uniform_soup([a], tmp_path / "soup")
    with pytest.raises(SoupError, match="given twice"):
        uniform_soup([a, b, a], tmp_path / "soup")
    with pytest.raises(SoupError, match="is one of its runs"):
        uniform_soup([a, b], a)
    save_file(synthetic_state(5), str(b / WEIGHTS_NAME))  # weights swapped after the fact
    with pytest.raises(SoupError, match=r"run .*b: model.json says checkpoint_sha256"):
        uniform_soup([a, b], tmp_path / "soup")
    (b / WEIGHTS_NAME).write_bytes(b"\x10" + b"\0" * 20)
    info = json.loads((b / "model.json").read_text())
    write_json(b / "model.json", {**info, "checkpoint_sha256": sha256_file(b / WEIGHTS_NAME)})
    with pytest.raises(SoupError, match="not a valid safetensors file"):
        uniform_soup([a, b], tmp_path / "soup")
    write_json(b / "model.json", {"checkpoint_sha256": sha256_file(b / WEIGHTS_NAME)})
    with pytest.raises(SoupError, match=r"run .*b: model.json lacks \['model_name', 'image_s"):
        uniform_soup([a, b], tmp_path / "soup")
    (b / CONFIG_NAME).write_text("[1, 2]")
    with pytest.raises(SoupError, match=r"run .*b: open_clip_config.json is not a JSON object"):
        uniform_soup([a, b], tmp_path / "soup")


# ---------------------------------------------------------------- validation score

def class_jpeg(class_id: int, i: int) -> bytes:
    """A small JPEG whose colour is its class's, plus noise: the tiny ViT tells some apart."""
    colour = np.random.default_rng(class_id).integers(30, 220, size=3)
    noise = np.random.default_rng(1000 * class_id + i).normal(0, 35, size=(36, 36, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(colour + noise, 0, 255).astype(np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def build_shards(root: Path, validation: range, shards: Path = Path("shards"),
                 manifest: Path = Path("manifest.parquet")) -> tuple[Path, Path]:
    """Raw images, manifest and shards under `root`: classes 0-3 train (24 images), the
    classes in `validation` and the rest of 4-9 test, with 2 queries and 3 index images each."""
    rows = []
    for c in range(10):
        group = "train" if c < 4 else "validation" if c in validation else "test"
        splits = ["train"] * 6 if c < 4 else ["query"] * 2 + ["index"] * 3
        for i, split in enumerate(splits):
            source = "a" if c % 2 else "b"
            path = f"c{c}/{i}.jpg"
            (root / "raw" / source / f"c{c}").mkdir(parents=True, exist_ok=True)
            (root / "raw" / source / path).write_bytes(class_jpeg(c, i))
            rows.append({"key": f"{source}-{c:02d}{i:02d}", "source": source, "label": f"c{c}",
                         "class_id": c, "path": path, "split": split, "group": group,
                         "class_images": len(splits)})
    table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
    write_table(root / manifest, table, MANIFEST_SCHEMA)
    index, _ = write_shards(plan_shards(table, 7), root / "raw", root / shards,
                            ShardParams(processes=1))
    write_json(root / shards / "index.json", index)
    return root / shards, root / manifest


EXTRACT = ExtractParams(device="cpu", batch_size=8, cpu_threads=1, num_workers=0, cache_dir="")
# pca_dim = the tiny ViT's 16: the PCA is then a rotation, which changes no distance.
EVALUATE = EvaluateParams(pca_dim=16, bootstrap_resamples=100)


def brute_force_mp5(query: np.ndarray, q_ids: np.ndarray, index: np.ndarray,
                    i_ids: np.ndarray) -> float:
    scores = []
    for q, c in zip(query, q_ids):
        order = np.argsort(((index - q) ** 2).sum(axis=1), kind="stable")
        depth = min(int((i_ids == c).sum()), 5)
        scores.append((i_ids[order[:depth]] == c).mean())
    return float(np.mean(scores))


def test_validation_score_is_mp5_of_the_extracted_validation_features(tmp_path, tiny_backbone):
    shards, manifest = build_shards(tmp_path, validation=range(4, 8))
    model, preprocess, info = load_backbone(tiny_backbone)
    embedder = Embedder(model, torch.device("cpu"), "fp32", batch_size=8, cpu_threads=1)
    feats: dict[str, list] = {"train": [], "query": [], "index": []}
    for entry in json.loads((shards / "index.json").read_text())["shardlist"]:
        out = tmp_path / "features" / f"{entry['name']}.arrow"
        embed_shard(shards / entry["url"], out, embedder, preprocess, EXTRACT,
                    feature_metadata("tiny", info))
        table, _ = read_features(out)
        feats[entry["split"]].append((table.column("class_id").to_numpy(), embeddings_of(table)))
    ids, emb = {}, {}
    for split, parts in feats.items():
        ids[split] = np.concatenate([p[0] for p in parts])
        emb[split] = np.concatenate([p[1] for p in parts]).astype(np.float64)
    # the scorer embeds an image into the very bytes extract writes for it
    train, = embed_samples(tiny_backbone, [list(read_split(shards, "train"))], EXTRACT)
    assert np.array_equal(train, emb["train"])

    def normed(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    centre = normed(emb["train"]).mean(axis=0)  # PCA to 16 of 16 dims: centring, rotation
    held = {s: np.isin(ids[s], range(4, 8)) for s in ("query", "index")}
    query, index = (normed(normed(emb[s][held[s]]) - centre) for s in ("query", "index"))
    expected = brute_force_mp5(query, ids["query"][held["query"]], index,
                               ids["index"][held["index"]])
    got = validation_score(tiny_backbone, shards, manifest, EVALUATE, EXTRACT)
    assert got == pytest.approx(expected, abs=1e-9)
    assert 0 < expected < 1  # a score that can tell runs apart


def test_validation_score_never_reads_test_classes(tmp_path, tiny_backbone):
    shards, manifest = build_shards(tmp_path, validation=range(0))  # 4-9 are all test classes
    with pytest.raises(ValueError, match="no validation classes"):
        validation_score(tiny_backbone, shards, manifest, EVALUATE, EXTRACT)


def test_validation_score_fits_its_pca_on_at_most_fit_images(tmp_path, tiny_backbone):
    shards, manifest = build_shards(tmp_path, validation=range(4, 8))
    with pytest.raises(ValueError, match="PCA to 16 needs >= 16 train images, got 15"):
        validation_score(tiny_backbone, shards, manifest, EVALUATE, EXTRACT, fit_images=15)
    assert 0 < validation_score(tiny_backbone, shards, manifest, EVALUATE, EXTRACT,
                                fit_images=20) <= 1
    # without fit_images, as evaluate fits it: at most pca_train_max rows, the same sample
    capped = EVALUATE.model_copy(update={"pca_train_max": 15})
    with pytest.raises(ValueError, match="PCA to 16 needs >= 16 train images, got 15"):
        validation_score(tiny_backbone, shards, manifest, capped, EXTRACT)
    assert validation_score(tiny_backbone, shards, manifest,
                            EVALUATE.model_copy(update={"pca_train_max": 20}), EXTRACT) == \
        validation_score(tiny_backbone, shards, manifest, EVALUATE, EXTRACT, fit_images=20)


def test_the_scorer_reads_the_images_from_the_shards_as_it_embeds_them(tmp_path, tiny_backbone):
    """No split's bytes are held between scores: with the shards gone, scoring fails. The
    decode pool (reading each chunk's bytes as it is sent) gives the same score as decoding
    in this process."""
    shards, manifest = build_shards(tmp_path, validation=range(4, 8))
    in_process = validation_scorer(shards, manifest, EVALUATE, EXTRACT)
    pooled = validation_scorer(shards, manifest, EVALUATE,
                               EXTRACT.model_copy(update={"num_workers": 2}))
    assert pooled(tiny_backbone) == in_process(tiny_backbone)
    shutil.rmtree(shards)
    with pytest.raises(FileNotFoundError):
        in_process(tiny_backbone)


def test_a_greedy_soup_is_scored_with_only_the_settings_its_stage_lists():
    """score_settings keeps SCORE_FIELDS and defaults the rest, so a setting the score
    does not read reruns no soup, and dvc.yaml's soup@ params are exactly those fields."""
    evaluate = EvaluateParams(k=3, pca_dim=16, seed=7, bootstrap_resamples=100,
                              query_block=5, recall_queries=9)
    extract = ExtractParams(batch_size=4, cpu_threads=1, num_workers=3, device="cuda:1",
                            cache_dir="elsewhere", precision="bf16")
    scoring, embedding = score_settings(evaluate, extract)
    assert (scoring.k, scoring.pca_dim, scoring.seed) == (3, 16, 7)
    assert scoring.bootstrap_resamples == EvaluateParams().bootstrap_resamples
    assert (scoring.query_block, scoring.recall_queries) == (16384, 1000)
    assert (embedding.batch_size, embedding.cpu_threads) == (4, 1)
    assert (embedding.device, embedding.precision) == ("cpu", "fp32")
    assert embedding.cache_dir == ".cache/embeddings"
    assert embedding.num_workers == 3  # speed only: the same bytes for any (tested above)
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["soup"]["do"]
    assert stage["params"] == ["soup.${key}"] + [f"{section}.{name}" for section, names
                                                 in SCORE_FIELDS.items() for name in names]


# ---------------------------------------------------------------- the flow

def test_soup_params_refuse_bad_values_naming_the_key(in_tmp):
    (in_tmp / "params.yaml").write_text(
        "soup:\n"
        "  ok_soup: {kind: greedy, runs: [a, b, c], pca_fit_images: 1000}\n"
        "  one: {kind: uniform, runs: [a]}\n"
        "  twice: {kind: greedy, runs: [a, a]}\n"
        "  typo: {kind: mean, runs: [a, b]}\n"
        "  extra: {kind: uniform, runs: [a, b], weights: [1, 2]}\n"
        "  bad/name: {kind: uniform, runs: [a, b]}\n")
    with pytest.raises(ParamsError) as err:
        load_sections({"soup": SoupParams})
    lines = str(err.value).splitlines()[1:]
    assert lines == [
        "  soup.one = {'kind': 'uniform', 'runs': ['a']}: a uniform soup needs at least two runs",
        "  soup.twice = {'kind': 'greedy', 'runs': ['a', 'a']}: runs ['a', 'a']: a run listed "
        "twice would count twice",
        "  soup.typo.kind = 'mean': allowed are 'uniform' or 'greedy'",
        "  soup.extra.weights = [1, 2]: unknown key (a typo?)",
        "  soup.bad/name.[key] = 'bad/name': String should match pattern '^[A-Za-z0-9_]+$'"]
    (in_tmp / "params.yaml").write_text("soup:\n  ok: {kind: greedy, runs: [a, b, c]}\n")
    assert load_sections({"soup": SoupParams}).soup["ok"].runs == ["a", "b", "c"]


def test_soup_flow_writes_uniform_and_greedy_soups(in_tmp, tiny_runs):
    build_shards(in_tmp, validation=range(4, 8), shards=SHARDS_DIR, manifest=MANIFEST)
    names = [f"run{i}" for i in range(len(tiny_runs))]  # runs as finetune@<run> leaves them
    for name, run in zip(names, tiny_runs):
        shutil.copytree(run, FINETUNED_DIR / name)
    tiny_runs = [FINETUNED_DIR / name for name in names]
    uniform = soup("vit_uniform", SoupSpec(kind="uniform", runs=names[:2]), EVALUATE,
                   EXTRACT)
    assert uniform["soup"]["kind"] == "uniform" and len(uniform["soup"]["runs"]) == 2
    assert sha256_file(SOUPS_DIR / "vit_uniform" / WEIGHTS_NAME) == uniform["checkpoint_sha256"]

    greedy = soup("vit_greedy", SoupSpec(kind="greedy", runs=names), EVALUATE, EXTRACT)
    record = greedy["soup"]["greedy"]
    assert len(record["tries"]) == len(tiny_runs)
    for run in tiny_runs:  # each run's own score is its validation score
        assert record["individual"][str(run)] == validation_score(run, SHARDS_DIR, MANIFEST,
                                                                  EVALUATE, EXTRACT)
    # the soup written scores what its last kept try scored
    assert validation_score(SOUPS_DIR / "vit_greedy", SHARDS_DIR, MANIFEST, EVALUATE,
                            EXTRACT) == record["score"]
    assert [r["path"] for r in greedy["soup"]["runs"]] == record["chosen"]


def test_soup_cli_refuses_an_unknown_soup_before_any_work(in_tmp):
    (in_tmp / "params.yaml").write_text("soup:\n  lite0_soup: {kind: uniform, runs: [a, b]}\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "flows.soup", "nope"], cwd=in_tmp, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "stage key 'nope': allowed are ['lite0_soup']" in done.stderr
    assert not (in_tmp / "data").exists()
