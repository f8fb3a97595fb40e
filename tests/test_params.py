"""Invalid params stop before any work, with one message naming key, value and what is allowed."""

from __future__ import annotations

import copy

import pytest
import yaml

from conftest import REPO
from tasks.params.base import ParamsError
from tasks.params.project import load_params, parse_params


@pytest.fixture
def raw() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def error_of(raw: dict) -> str:
    with pytest.raises(ParamsError) as exc:
        parse_params(raw)
    return str(exc.value)


def test_repo_params_are_valid():
    params = load_params(REPO / "params.yaml")
    assert params.sample.samples >= 1 and set(params.sample.num_classes) == set(params.sources)


def test_samples_zero_names_key_value_and_rule(raw):
    raw["sample"]["samples"] = 0
    msg = error_of(raw)
    assert "sample.samples = 0" in msg and ">= 1" in msg


def test_unknown_source_kind(raw):
    raw["sources"]["fashion_mnist"]["kind"] = "flickr"
    msg = error_of(raw)
    assert "sources.fashion_mnist" in msg and "'flickr'" in msg
    assert "package_photos" in msg and "imagefolder" in msg  # lists what is allowed


def test_unknown_key_is_refused(raw):
    raw["train"]["epochz"] = 3
    assert "train.epochz" in error_of(raw)


def test_num_classes_must_cover_every_source(raw):
    del raw["sample"]["num_classes"]["fashion_mnist"]
    assert "fashion_mnist" in error_of(raw)


def test_embedding_dim_capped_at_64(raw):
    raw["train"]["embedding_dim"] = 128
    assert "train.embedding_dim = 128" in error_of(raw)


def test_bad_model_kind(raw):
    bad = copy.deepcopy(raw)
    bad["models"]["lite0"] = {"kind": "efficientnet_lite", "arch": "lite7"}
    assert "models.lite0" in error_of(bad) and "lite7" in error_of(bad)


def test_sweep_recipe_is_checked_like_the_train_section(raw):
    raw["sweep"] = {"recipes": {"typo": {"haed": "bn_linear"}}}
    message = error_of(raw)
    assert "sweep.recipes.typo" in message and "haed" in message
    raw["sweep"] = {"recipes": {"big": {"embedding_dim": 128}}}
    assert "sweep.recipes.big" in error_of(raw) and "<= 64" in error_of(raw)
    raw["sweep"] = {"recipes": {"ok": {"head": "bn_linear"}}}
    assert parse_params(raw).sweep.recipe("ok", parse_params(raw).train).head == "bn_linear"


def test_each_variant_is_made_by_the_stage_group_it_names(raw):
    raw["finetune"]["runs"] = {"lite0_ft": {}, "lite0_ft_s1": {"seed": 1}}
    raw["soup"] = {"lite0_soup": {"kind": "uniform", "runs": ["lite0_ft", "lite0_ft_s1"]}}
    raw["variants"] = {"lite0": "models", "lite0_ft": "finetuned", "lite0_soup": "soups"}
    raw["train"]["backbones"] = ["lite0_soup", "lite0"]
    assert list(parse_params(raw).variants) == ["lite0", "lite0_ft", "lite0_soup"]
    bad = [({"lite0_ft": "models"}, "variants.lite0_ft = models: models has no 'lite0_ft'"),
           ({"lite2": "soups"}, "variants.lite2 = soups: soup has no 'lite2'"),
           ({"x": "elsewhere"}, "variants.x = 'elsewhere'"),
           ({}, "variants: needs at least one backbone")]
    for variants, message in bad:
        with pytest.raises(ParamsError, match=message):
            parse_params({**raw, "variants": variants})
    with pytest.raises(ParamsError, match=r"train.backbones \['lite2'\] are not in variants"):
        parse_params({**raw, "train": {**raw["train"], "backbones": ["lite2"]}})
    soup = {"lite0_soup": {"kind": "uniform", "runs": ["lite0_ft", "nope"]}}
    with pytest.raises(ParamsError, match=r"soup.lite0_soup.runs: \['nope'\] are not"):
        parse_params({**raw, "soup": soup})
    runs = {"lite2": {}}  # a run named like a built model: which folder would `lite2` be?
    with pytest.raises(ParamsError, match="finetune.runs.lite2: the name of a models variant"):
        parse_params({**raw, "finetune": {**raw["finetune"], "runs": runs}})
    with pytest.raises(ParamsError, match="runs.lite0_ft.base = 'lite2': unknown key"):
        parse_params({**raw, "finetune": {**raw["finetune"], "runs": {"lite0_ft": {
            "base": "lite2"}}}})


def test_params_survive_dvc_exp_run_set_param(tmp_path):
    """`dvc exp run -S train.epochs=41` rewrites params.yaml with DVC's own YAML writer,
    which leaves `pic?.png` and `off` unquoted in it; the project reads the result as DVC
    does (YAML 1.2): the same params, but the one set."""
    import shutil

    from dvc.utils.serialize import modify_yaml

    from conftest import REPO
    from tasks.params.base import read_raw
    from tasks.params.project import parse_params

    path = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", path)
    before = read_raw(path)
    with modify_yaml(str(path)) as data:
        data["train"]["epochs"] = 41
    text = path.read_text()
    assert "pic?.png" in text and '"pic?.png"' not in text  # as DVC writes it
    after = read_raw(path)
    assert after["train"]["epochs"] == 41
    after["train"]["epochs"] = before["train"]["epochs"]
    assert after == before
    assert parse_params(read_raw(path)).train.amp == "off"
