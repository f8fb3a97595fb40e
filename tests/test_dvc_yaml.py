"""dvc.yaml stays honest: each stage depends on every project module its flow imports, and on
its own params."""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

from conftest import REPO


def project_imports(path: Path, seen: set[Path] | None = None) -> set[Path]:
    """Project modules imported by `path`, transitively (flows/*, tasks/*)."""
    seen = set() if seen is None else seen
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if (isinstance(node, ast.ImportFrom) and node.module
                and node.module.split(".")[0] in ("flows", "tasks")):
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.split(".")[0] in ("flows", "tasks")]
        for name in names:
            module = REPO / (name.replace(".", "/") + ".py")
            if module.is_file() and module not in seen:
                seen.add(module)
                project_imports(module, seen)
            # tasks.params.train runs tasks/params/__init__.py first (top-level ones are empty)
            package = REPO / name.rpartition(".")[0].replace(".", "/") / "__init__.py"
            if name.count(".") >= 2 and package.is_file() and package not in seen:
                seen.add(package)
                project_imports(package, seen)
    return seen


def test_every_stage_depends_on_exactly_the_code_its_flow_imports():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        body = stage.get("do", stage)
        flow = REPO / "flows" / f"{name}.py"
        assert body["cmd"].startswith(f"python -m flows.{name}"), (
            f"stage {name} must run flows.{name}")
        needed = {p.relative_to(REPO).as_posix() for p in project_imports(flow) | {flow}}
        deps = {d if isinstance(d, str) else next(iter(d)) for d in body["deps"]}
        assert needed <= deps, f"stage {name} lacks deps {sorted(needed - deps)}"
        # and no module it never imports: an edit there would rerun the stage for nothing
        code = {d for d in deps if d.endswith(".py")}
        assert code <= needed, (
            f"stage {name} depends on modules it never imports: {sorted(code - needed)}")


# Sections a stage reads besides its own: the variants (which backbones, from which stage
# group) and train.backbones (which features the head concatenates, in which order) for
# the stages that embed or combine backbones; train and evaluate for the sweep, whose
# recipes are changes to train scored the way evaluate scores.
ALSO_READS = {"inputs": {"models"}, "finetune": {"models"}, "soup": {"evaluate", "extract"},
              "extract": {"variants"}, "train": {"variants"},
              "evaluate": {"variants", "train"}, "export": {"variants", "train"},
              "sweep": {"variants", "train", "evaluate"}}


def test_every_stage_declares_exactly_the_params_sections_it_reads():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    own = {"models": "models", "download": "sources", "extract": "extract", "inputs": "sources"}
    for name, stage in stages.items():
        body = stage.get("do", stage)
        sections = {p.split(".")[0] for p in body["params"]}
        expected = {name if name in params else own[name]} | ALSO_READS.get(name, set())
        assert sections == expected, name


def test_a_stage_lists_every_setting_of_its_section_but_those_that_change_no_byte():
    """shard, extract, train and evaluate rerun when a setting that changes their bytes
    changes, and only then: each lists its section's settings one by one, all but the
    class's SPEED_ONLY (processes, decoding workers, caches, memory budgets, query blocks;
    each has a test that its outputs stay byte-equal)."""
    from tasks.params.evaluate import EvaluateParams
    from tasks.params.extract import ExtractParams
    from tasks.params.shard import ShardParams
    from tasks.params.train import TrainParams

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for stage, section, cls in (("shard", "shard", ShardParams),
                                ("extract", "extract", ExtractParams),
                                ("train", "train", TrainParams),
                                ("evaluate", "evaluate", EvaluateParams),
                                ("sweep", "train", TrainParams),
                                ("sweep", "evaluate", EvaluateParams)):
        body = stages[stage].get("do", stages[stage])
        listed = {p.split(".", 1)[1] for p in body["params"] if p.startswith(f"{section}.")}
        assert listed == set(cls.model_fields) - cls.SPEED_ONLY, (stage, section)
        assert cls.SPEED_ONLY <= set(cls.model_fields), section


# The stages that may depend on each section's params class and each artifact's schema
# (`inputs`, which validates the whole file on every run, aside): editing one makes stale
# only the stages that read that section or that artifact.
READERS = {
    "tasks/params/models.py": {"models"},
    "tasks/params/sources.py": {"download"},
    "tasks/params/sample.py": {"sample"},
    "tasks/params/shard.py": {"shard"},
    "tasks/params/extract.py": {"extract", "soup"},
    "tasks/params/train.py": {"train", "sweep"},
    "tasks/params/evaluate.py": {"evaluate", "sweep", "soup"},
    "tasks/params/sweep.py": {"sweep"},
    "tasks/params/export.py": {"export"},
    "tasks/params/variants.py": {"extract", "train", "evaluate", "sweep", "export"},
    "tasks/params/soup.py": {"soup"},
    "tasks/params/finetune.py": {"finetune"},
    "tasks/params/project.py": set(),
    "tasks/schemas/raw.py": {"download", "sample"},
    "tasks/schemas/manifest.py": {"sample", "shard", "train", "evaluate", "sweep", "export",
                                  "finetune", "soup"},
    "tasks/schemas/shards.py": {"shard", "extract", "evaluate", "export", "finetune", "soup"},
    "tasks/schemas/features.py": {"extract", "train", "evaluate", "sweep", "export", "soup"},
}


def test_a_sections_params_or_an_artifacts_schema_is_a_dep_of_its_readers_only():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    depends = {path: set() for path in READERS}
    for name, stage in stages.items():
        for dep in stage.get("do", stage)["deps"]:
            dep = dep if isinstance(dep, str) else next(iter(dep))
            if dep in depends and name != "inputs":
                depends[dep].add(name)
    assert depends == READERS
    modules = {p.relative_to(REPO).as_posix() for d in ("params", "schemas")
               for p in (REPO / "tasks" / d).glob("*.py")}
    shared = {"tasks/params/__init__.py", "tasks/params/base.py", "tasks/schemas/__init__.py",
              "tasks/schemas/io.py", "tasks/schemas/paths.py"}
    assert modules - shared == set(READERS), "a new params or schema module needs its readers"


def test_the_inputs_stage_runs_every_time_and_guards_every_download_and_model():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert stages["inputs"]["always_changed"] is True
    assert stages["inputs"]["outs"] == ["data/00_inputs"]
    assert "data/00_inputs/sources/${key}.json" in stages["download"]["do"]["deps"]
    assert "data/00_inputs/models/${key}.json" in stages["models"]["do"]["deps"]
