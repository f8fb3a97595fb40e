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
