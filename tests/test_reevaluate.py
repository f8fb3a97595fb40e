"""The CI re-evaluation report (.ci/reevaluate.py): each stage's outcome and seconds from
`dvc repro`'s output, and the P@k curves of base and change from `dvc plots diff`, drawn.

The real DVC runs on a tiny git + DVC repo of three stages: `inputs` (always_changed, as
the project's), `train` (a cached output, so the run-cache can restore it) and `evaluate`
(copies a P@k CSV the test writes, declared as the project's `precision_at_k` plot)."""

from __future__ import annotations

import csv
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO

BIN = Path(sys.executable).parent
SCRIPT = REPO / ".ci" / "reevaluate.py"
_spec = importlib.util.spec_from_file_location("reevaluate", SCRIPT)
reevaluate = sys.modules["reevaluate"] = importlib.util.module_from_spec(_spec)  # .ci: no package
_spec.loader.exec_module(reevaluate)

STEP = """import sys, time
from pathlib import Path
import yaml
params = yaml.safe_load(open("params.yaml"))["train"]
time.sleep(params["seconds"])
Path("out").mkdir(exist_ok=True)
Path("out/head.txt").write_text(str(params["seed"]))
"""

DVC_YAML = {
    "stages": {
        "inputs": {"cmd": "python -c \"print('fingerprinted')\"", "always_changed": True},
        "train": {"cmd": "python train.py", "deps": ["train.py"], "params": ["train"],
                  "outs": ["out/head.txt"]},
        "evaluate": {"cmd": "python -c \"import shutil; shutil.copy('curves.csv', "
                            "'out/precision_at_k.csv')\"",
                     "deps": ["curves.csv", "out/head.txt"],
                     "outs": [{"out/precision_at_k.csv": {"cache": False}}]},
    },
}


def git(*args: str) -> None:
    subprocess.run(["git", *args], check=True, capture_output=True)


def dvc(*args: str) -> str:
    return subprocess.run(["dvc", *args], check=True, capture_output=True, text=True).stdout


def write_curves(path: Path, curves: dict[str, list[float]]) -> None:
    """A P@k CSV as the evaluate stage writes it: model,k,precision, k from 1."""
    rows = [(model, k, p) for model, ps in curves.items() for k, p in enumerate(ps, 1)]
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows([("model", "k", "precision"), *rows])


def read_curves(path: Path) -> dict[str, list[tuple[float, float]]]:
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    out: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        out.setdefault(row["model"], []).append((float(row["k"]), float(row["precision"])))
    return out


def set_train(seconds: float, seed: int) -> None:
    Path("params.yaml").write_text(yaml.safe_dump({"train": {"seconds": seconds, "seed": seed}}))


@pytest.fixture(scope="module")
def tool_env() -> dict[str, str]:
    """The venv's dvc first on PATH (as in the workflow's activated venv), git identity."""
    who = {f"GIT_{w}_{k}": v for w in ("AUTHOR", "COMMITTER") for k, v in (("NAME", "t"),
                                                                           ("EMAIL", "t@t"))}
    return {"PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1", **who}


@pytest.fixture(scope="module")
def base_repo(tmp_path_factory, tool_env) -> Path:
    """The tiny repo, reproduced and committed as branch `base`; built once, copied per test."""
    root = tmp_path_factory.mktemp("base") / "repo"
    root.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        for name, value in tool_env.items():
            mp.setenv(name, value)
        git("init", "-q")
        dvc("init", "-q")
        shutil.copytree(REPO / ".dvc" / "plots", ".dvc/plots", dirs_exist_ok=True)
        # the project's own definition of the plot, pointed at this repo's CSV
        [plot] = [p for p in yaml.safe_load((REPO / "dvc.yaml").read_text())["plots"]
                  if reevaluate.PK_PLOT in p]
        plot[reevaluate.PK_PLOT]["y"] = {"out/precision_at_k.csv": "precision"}
        Path("dvc.yaml").write_text(yaml.safe_dump({**DVC_YAML, "plots": [plot]},
                                                   sort_keys=False))
        Path("train.py").write_text(STEP)
        set_train(0.0, 1)
        write_curves(Path("curves.csv"), {"zero_shot": [0.5, 0.4, 0.3],
                                          "head": [0.7, 0.6, 0.5]})
        dvc("repro", "-q")
        git("add", "-A")
        git("commit", "-qm", "base")
        git("branch", "base")
    return root


@pytest.fixture
def tiny_repo(base_repo, tool_env, tmp_path, monkeypatch) -> Path:
    """A copy of the base repo (its DVC cache and run-cache too) as the current directory."""
    root = tmp_path / "repo"
    shutil.copytree(base_repo, root, symlinks=True)
    monkeypatch.chdir(root)
    for name, value in tool_env.items():
        monkeypatch.setenv(name, value)
    return root


def test_time_stages_times_each_recomputed_stage_until_the_next_stage():
    """A fake `dvc repro` output with a clock that reads the time each line arrived."""
    script = [(0.0, "Running stage 'inputs':\n"), (0.1, "> python -m flows.inputs\n"),
              (1.5, "Updating lock file 'dvc.lock'\n"),
              (2.0, "Stage 'models@lite0' didn't change, skipping\n"),
              (2.2, "'glr_mini.tar.gz.dvc' didn't change, skipping\n"),  # a data source
              (2.5, "Stage 'sample' is cached - skipping run, checking out outputs\n"),
              (3.0, "Running stage 'train':\n"), (3.1, "epoch 1\n"), (10.0, "epoch 2\n"),
              (11.0, "Running stage 'evaluate':\n"), (12.0, "Use `dvc push` to send ...\n")]
    now = [0.0]

    def stream():
        for t, line in script:
            now[0] = t
            yield line
        now[0] = 20.0  # the output ends: `dvc repro` exited

    runs = reevaluate.time_stages(stream(), clock=lambda: now[0])
    ran, skipped, cached = (reevaluate.OUTCOMES[k] for k in ("ran", "skipped", "cached"))
    assert [(r.stage, r.outcome, r.seconds) for r in runs] == [
        ("inputs", ran, 2.0), ("models@lite0", skipped, 0.0), ("sample", cached, 0.0),
        ("train", ran, 8.0), ("evaluate", ran, 9.0)]


def test_stage_table_and_summary_keep_always_changed_stages_apart():
    R = reevaluate.StageRun
    ran, skipped, cached = (reevaluate.OUTCOMES[k] for k in ("ran", "skipped", "cached"))
    runs = [R("inputs", ran, 2.04), R("models@lite0", skipped), R("sample", cached),
            R("train", ran, 8.0), R("evaluate", ran, 9.0), R("sweep", ran, 3.0),
            R("export", ran, 1.25)]
    table = reevaluate.stages_markdown(runs, {"inputs"}, total=30.0)
    rows = [[c.strip() for c in line.strip("|").split("|")]
            for line in table.splitlines() if line.startswith("|")]
    assert rows[:2] == [["stage", "what happened", "seconds"], ["---", "---", "---:"]]
    assert rows[2:] == [["inputs", "ran (always_changed: on every repro)", "2.0"],
                        ["models@lite0", skipped, "0.0"], ["sample", cached, "0.0"],
                        ["train", ran, "8.0"], ["evaluate", ran, "9.0"], ["sweep", ran, "3.0"],
                        ["export", ran, "1.2"]]
    assert "took 30.0 s in all" in table
    line = reevaluate.recomputed_line(runs, {"inputs"})
    assert line.startswith("stages recomputed: evaluate, export, sweep, train (and `inputs`")
    assert reevaluate.recomputed_line(runs[:3], {"inputs"}).startswith(
        "stages recomputed: none (and `inputs`")
    assert reevaluate.recomputed_line(runs[1:3], {"inputs"}) == "stages recomputed: none"


def test_repro_times_real_stages_and_tells_run_cache_restores(tiny_repo, capsys):
    assert reevaluate.always_changed() == {"inputs"}
    set_train(0.6, 2)
    runs, total = reevaluate.repro()
    outcomes = {r.stage: (r.outcome, r.seconds) for r in runs}
    ran, cached = reevaluate.OUTCOMES["ran"], reevaluate.OUTCOMES["cached"]
    assert [r.stage for r in runs] == ["inputs", "train", "evaluate"]
    assert {s: o for s, (o, _) in outcomes.items()} == dict.fromkeys(outcomes, ran)
    assert 0.6 <= outcomes["train"][1] <= total
    assert "Running stage 'train'" in capsys.readouterr().out  # streamed through
    # back to the base's params: the run-cache has that train run, so nothing reruns it
    set_train(0.0, 1)
    runs, _ = reevaluate.repro()
    assert [(r.stage, r.outcome) for r in runs] == [("inputs", ran), ("train", cached),
                                                    ("evaluate", ran)]
    assert runs[1].seconds == 0.0


def test_pk_curves_of_both_revisions_are_read_as_written_and_drawn(tiny_repo, tmp_path):
    base = read_curves(Path("curves.csv"))
    write_curves(Path("curves.csv"), {"zero_shot": [0.55, 0.45, 0.35],
                                      "head": [0.9, 0.8, 0.75], "concat": [0.6, 0.5, 0.4]})
    dvc("repro", "-q")
    change = read_curves(Path("curves.csv"))
    series = reevaluate.pk_series("base")
    assert series == {**{("base", m): ps for m, ps in base.items()},
                      **{(reevaluate.WORKSPACE, m): ps for m, ps in change.items()}}
    image = tmp_path / "report-pk.png"
    section = reevaluate.pk_section("base", image)
    assert section == "![P@k, base vs this change](report-pk.png)"
    data = image.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000


def test_pk_section_says_so_when_no_revision_has_curves(tiny_repo, tmp_path):
    Path("out/precision_at_k.csv").unlink()
    git("rm", "-q", "--cached", "out/precision_at_k.csv")
    git("commit", "-qm", "no curves")
    image = tmp_path / "pk.png"
    image.write_bytes(b"from an earlier run")
    section = reevaluate.pk_section("HEAD", image)
    assert section.startswith("No P@k data") and not image.exists()
    # a failed `dvc plots diff` costs the image, not the report
    section = reevaluate.pk_section("no-such-revision", image)
    assert section.startswith("No P@k image: `dvc plots diff no-such-revision")
    assert "unknown Git revision" in section


def test_pk_section_draws_this_change_alone_when_the_base_has_no_curves(tiny_repo, tmp_path):
    git("rm", "-q", "--cached", "out/precision_at_k.csv")
    git("commit", "-qm", "no curves")
    git("branch", "nocurves")
    series = reevaluate.pk_series("nocurves")
    assert {rev for rev, _ in series} == {reevaluate.WORKSPACE}
    section = reevaluate.pk_section("nocurves", tmp_path / "pk.png")
    assert "`nocurves` has no P@k data; not drawn." in section
    assert (tmp_path / "pk.png").read_bytes().startswith(b"\x89PNG")


def test_script_reports_stages_params_and_curves(tiny_repo, tmp_path):
    """The script as the workflow calls it, without a remote."""
    set_train(0.0, 3)
    write_curves(Path("curves.csv"), {"zero_shot": [0.6, 0.5, 0.4], "head": [0.8, 0.7, 0.6]})
    output = tmp_path / "ci" / "reevaluation.md"
    output.parent.mkdir()
    proc = subprocess.run([sys.executable, str(SCRIPT), "--base", "base", "--output", str(output)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = output.read_text()
    assert "No DVC remote configured" in report
    assert "stages recomputed: evaluate, train (and `inputs`" in report
    assert re.search(r"\|\s*train\s*\|\s*recomputed\s*\|\s*\d+\.\d\s*\|", report), report
    assert re.search(r"\|\s*params.yaml\s*\|\s*train.seed\s*\|\s*1\s*\|\s*3\s*\|", report), report
    assert "![P@k, base vs this change](reevaluation-pk.png)" in report
    assert (output.parent / "reevaluation-pk.png").read_bytes().startswith(b"\x89PNG")
