"""`dvc plots show` draws every model line of the evaluation, whatever the variants are called
(any preset)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

from conftest import REPO
from tasks.report import write_curves

DVC = Path(sys.executable).parent / "dvc"


def git_dvc_repo(root: Path) -> Path:
    """A git + DVC repo holding only the project's top-level plots and its plot templates."""
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run([str(DVC), "init", "-q"], cwd=root, check=True)
    plots = yaml.safe_load((REPO / "dvc.yaml").read_text())["plots"]
    (root / "dvc.yaml").write_text(yaml.safe_dump({"plots": plots}, sort_keys=False))
    shutil.copytree(REPO / ".dvc" / "plots", root / ".dvc" / "plots", dirs_exist_ok=True)
    (root / "data/05_head").mkdir(parents=True)
    (root / "data/05_head/history.csv").write_text(
        "epoch,train_loss,val_loss,train_acc,val_acc\n1,2.0,2.1,0.1,0.2\n")
    return root


def curves(variants: list[str], depth: int = 10) -> dict[str, dict]:
    """score_line-shaped results of every model line the evaluate flow writes, with distinct
    values."""
    lines = [f"zero_shot_pca64_{v}" for v in variants] + ["zero_shot_pca64_concat", "head"]
    rng = np.random.default_rng(len(variants))
    return {line: {"precision": rng.random(depth), "recall": rng.random(depth)} for line in lines}


def test_eval_plots_draw_every_model_line_for_any_variant_names(tmp_path):
    root = git_dvc_repo(tmp_path)
    for variants in (["lite0", "lite2"], ["clip_l14_336", "openclip_l14", "siglip_so400m"]):
        results = curves(variants)
        write_curves(results, root / "data/06_eval")
        shown = subprocess.run([str(DVC), "plots", "show", "--json"], cwd=root,
                               capture_output=True, text=True, check=True)
        out = json.loads(shown.stdout)
        assert not out.get("errors"), out["errors"]
        for plot, metric in (("precision_at_k", "precision"), ("recall_at_k", "recall")):
            [rendered] = out["data"][plot]
            spec = rendered["content"]
            # one line per model: the template colours by the `model` field, y is the metric, x is k
            assert spec["encoding"]["color"]["field"] == "model"
            assert (spec["encoding"]["x"]["field"], spec["encoding"]["y"]["field"]) == ("k", metric)
            drawn = {(p["model"], int(p["k"]), float(p[metric])) for p in spec["data"]["values"]}
            expected = {(line, k, round(float(r[metric][k - 1]), 4))
                        for line, r in results.items() for k in range(1, 11)}
            assert drawn == expected, f"{plot} with variants {variants}"
        assert {"loss", "accuracy"} <= set(out["data"])
