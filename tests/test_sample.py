"""Sampling invariants: counts, determinism, prefix stability, disjoint eval classes."""

from __future__ import annotations

import polars as pl
import pytest
from pydantic import ValidationError

from tasks.params.base import ParamsError
from tasks.params.sample import SampleParams
from tasks.sample import build_manifest, image_key, is_minority


def catalog(classes: int, per_class: int, prefix: str = "c") -> pl.DataFrame:
    rows = [{"path": f"images/{prefix}{c}/{i}.jpg", "label": f"{prefix}{c}", "source": "s"}
            for c in range(classes) for i in range(per_class)]
    return pl.DataFrame(rows)


def params(**kw) -> SampleParams:
    base = {"seed": 0, "samples": 6, "num_classes": {"a": 8, "b": 5}, "eval_fraction": 0.4,
            "val_fraction": 0.2, "query_fraction": 0.5}
    return SampleParams(**{**base, **kw})


CATALOGS = {"a": catalog(12, 10), "b": catalog(6, 9, prefix="k")}


def frame(p: SampleParams) -> pl.DataFrame:
    table, _ = build_manifest(CATALOGS, p)
    return pl.from_arrow(table)


def test_counts_and_schema():
    m = frame(params())
    per_class = m.group_by("source", "label").len()
    assert per_class.height == 8 + 5
    assert per_class["len"].to_list() == [6] * 13
    assert m["key"].n_unique() == m.height
    assert all("." not in k for k in m["key"])
    assert m["class_id"].n_unique() == 13


def test_deterministic_and_seed_sensitive():
    assert frame(params()).equals(frame(params()))
    assert not frame(params()).equals(frame(params(seed=1)))


def test_eval_classes_disjoint_from_training_classes():
    m = frame(params())
    seen = set(m.filter(pl.col("split").is_in(["train", "val"]))["class_id"])
    unseen = set(m.filter(pl.col("split").is_in(["query", "index"]))["class_id"])
    assert seen and unseen and not seen & unseen
    # every held-out class has both queries and index images
    for cid in unseen:
        splits = set(m.filter(pl.col("class_id") == cid)["split"])
        assert splits == {"query", "index"}


def test_prefix_stable_when_samples_grow():
    small, big = frame(params(samples=4)), frame(params(samples=7))
    joined = small.join(big, on="key", how="left", suffix="_big")
    assert joined["split_big"].null_count() == 0, (
        "an image chosen at samples=4 was dropped at samples=7")
    assert (joined["split"] == joined["split_big"]).all(), (
        "an image changed split when samples grew")
    assert big.height > small.height


def test_prefix_stable_when_classes_grow():
    small = frame(params(num_classes={"a": 5, "b": 3}))
    big = frame(params(num_classes={"a": 10, "b": 5}))
    assert set(small["label"]) <= set(big["label"])
    roles = lambda m: {l: "eval" if s in ("query", "index") else "train"  # noqa: E731
                       for l, s in zip(m["label"], m["split"])}
    rs, rb = roles(small), roles(big)
    assert all(rb[label] == role for label, role in rs.items())


def test_split_fractions():
    assert [is_minority(j, 0.5) for j in range(4)] == [False, True, False, True]
    assert sum(is_minority(j, 0.1) for j in range(100)) == 10


def test_too_many_classes_is_a_params_error():
    with pytest.raises(ParamsError,
                       match=r"sample.num_classes.b = 7: .* has 6 classes .* allowed is 2..6"):
        build_manifest(CATALOGS, params(num_classes={"a": 2, "b": 7}))


def test_class_with_too_few_images_is_skipped_and_recorded():
    lonely = pl.DataFrame([{"path": "images/lonely/0.jpg", "label": "lonely", "source": "s"}])
    cats = {"a": pl.concat([catalog(4, 5), lonely])}
    table, skipped = build_manifest(cats, params(num_classes={"a": 4}))
    assert [s.label for s in skipped] == ["lonely"] and "fewer than 2" in skipped[0].reason
    assert "lonely" not in table.column("label").to_pylist()


def test_same_label_in_two_sources_stays_two_classes():
    cats = {"a": catalog(3, 4), "b": catalog(3, 4)}
    m = pl.from_arrow(build_manifest(cats, params(num_classes={"a": 3, "b": 3}))[0])
    assert m.select("source", "label").unique().height == m["class_id"].n_unique() == 6
    assert image_key("a", "x/y.jpg") != image_key("b", "x/y.jpg")


def test_all_classes():
    m = pl.from_arrow(build_manifest(CATALOGS, params(num_classes={"a": "all", "b": 3}))[0])
    assert m.filter(pl.col("source") == "a")["label"].n_unique() == 12
    with pytest.raises(ValidationError, match="num_classes.a = 1"):
        SampleParams(samples=2, num_classes={"a": 1})


def test_three_disjoint_class_groups():
    """Training, validation and test classes never share a class, and each group's images
    are in its own splits: train/val for training classes, query/index for the others."""
    m = frame(params(num_classes={"a": 12, "b": 6}, eval_fraction=0.6, test_fraction=0.5))
    per_class = m.group_by("class_id").agg(pl.col("group").n_unique().alias("n"))
    assert per_class["n"].max() == 1, "a class is in two groups"
    split_of = {"train": {"train", "val"}, "validation": {"query", "index"},
                "test": {"query", "index"}}
    for group, splits in split_of.items():
        rows = m.filter(pl.col("group") == group)
        assert rows.height and set(rows["split"]) == splits, group
    counts = m.group_by("group").agg(pl.col("class_id").n_unique().alias("n"))
    # a: 12 classes, floor(12 * 0.6) = 7 held out, floor(7 * 0.5) = 3 of them test;
    # b: 6 classes, 3 held out, 1 test.
    assert dict(counts.iter_rows()) == {"train": 5 + 3, "validation": 4 + 2, "test": 3 + 1}


def test_groups_prefix_stable_when_classes_grow():
    small = frame(params(num_classes={"a": 5, "b": 3}))
    big = frame(params(num_classes={"a": 12, "b": 6}))
    group = lambda m: dict(zip(m["label"], m["group"]))  # noqa: E731
    gs, gb = group(small), group(big)
    assert all(gb[label] == g for label, g in gs.items())


def test_class_images_counts_the_catalog_before_capping():
    cats = {"a": pl.concat([catalog(3, 10), catalog(2, 40, prefix="big")])}
    m = frame_of(cats, params(num_classes={"a": 5}, samples=6))
    sizes = dict(m.select("label", "class_images").unique().iter_rows())
    assert sizes == {"c0": 10, "c1": 10, "c2": 10, "big0": 40, "big1": 40}
    assert m.group_by("label").len()["len"].max() == 6


def test_shared_class_takes_one_group_and_sums_its_images():
    cats = {"a": catalog(6, 5), "b": catalog(6, 7)}
    base = frame_of(cats, params(num_classes={"a": 6, "b": 6}))
    train_a = base.filter((pl.col("source") == "a") & (pl.col("group") == "train"))["label"][0]
    held_b = base.filter((pl.col("source") == "b") & (pl.col("group") != "train"))["label"][0]
    mapped = frame_of(cats, params(num_classes={"a": 6, "b": 6},
                                   label_map={f"a/{train_a}": "x", f"b/{held_b}": "x"}))
    shared = mapped.filter(((pl.col("source") == "a") & (pl.col("label") == train_a))
                           | ((pl.col("source") == "b") & (pl.col("label") == held_b)))
    assert shared["class_id"].n_unique() == 1
    assert set(shared["group"]) == {"train"}
    assert set(shared["split"]) <= {"train", "val"}
    assert set(shared["class_images"]) == {5 + 7}


def frame_of(cats, p: SampleParams) -> pl.DataFrame:
    return pl.from_arrow(build_manifest(cats, p)[0])
