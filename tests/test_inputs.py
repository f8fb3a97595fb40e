"""Fingerprints of what stages read from outside the project (tasks/inputs.py)."""

from __future__ import annotations

import hashlib
import os

import pytest

from conftest import make_imagefolder
from tasks import inputs
from tasks.inputs import HashState, model_fingerprint, path_fingerprint, source_fingerprint
from tasks.params.project import parse_params

SHA = "ab" * 32


def spec_of(section: str, name: str, raw: dict):
    """One source or model as params.yaml would give it, validated by the real params classes."""
    from conftest import REPO
    import yaml

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params[section] = {name: raw}
    if section == "sources":
        params["sample"]["num_classes"] = {name: "all"}
    if section == "models":  # the only backbone, so the one embedded
        params["variants"] = {name: "models"}
    return getattr(parse_params(params), section)[name]


def test_a_folder_changes_its_fingerprint_when_an_image_is_added_changed_or_removed(tmp_path):
    folder = make_imagefolder(tmp_path / "mine", classes=2, per_class=2)
    state = HashState(tmp_path / "state.sqlite")
    first = path_fingerprint(folder, state)
    assert path_fingerprint(folder, state) == first  # nothing changed
    assert (first["files"], first["kind"]) == (4, "folder")

    extra = folder / "class_01" / "new.jpg"
    extra.write_bytes((folder / "class_00" / "img_000.jpg").read_bytes())
    added = path_fingerprint(folder, state)
    assert added["sha256"] != first["sha256"] and added["files"] == 5
    extra.unlink()
    assert path_fingerprint(folder, state) == first

    target = folder / "class_00" / "img_001.jpg"
    data = bytearray(target.read_bytes())
    data[-3] ^= 0xFF  # same size, other bytes
    target.write_bytes(bytes(data))
    assert path_fingerprint(folder, state)["sha256"] != first["sha256"]


def test_the_digest_is_independent_of_where_the_folder_is_and_fold_is_of_every_file(tmp_path):
    """Checked against a fold computed here from hashlib, not from the module's own helpers."""
    a = make_imagefolder(tmp_path / "a", classes=2, per_class=3)
    b = tmp_path / "elsewhere" / "b"
    b.parent.mkdir()
    os.rename(a, b)
    state = HashState(tmp_path / "state.sqlite")
    got = path_fingerprint(b, state)
    fold = hashlib.sha256()
    for f in sorted(p for p in b.rglob("*") if p.is_file()):
        data = f.read_bytes()
        rel = f.relative_to(b).as_posix()
        fold.update(f"{rel}\0{len(data)}\0{hashlib.sha256(data).hexdigest()}\n".encode())
    assert got["sha256"] == fold.hexdigest() and got["bytes"] == sum(
        p.stat().st_size for p in b.rglob("*") if p.is_file())


def test_unchanged_files_are_not_read_again(tmp_path, monkeypatch):
    folder = make_imagefolder(tmp_path / "mine", classes=3, per_class=2)
    state = HashState(tmp_path / "state.sqlite")
    path_fingerprint(folder, state)
    state.close()
    reads = []
    real = inputs.sha256_file
    monkeypatch.setattr(inputs, "sha256_file", lambda p: reads.append(p) or real(p))
    state = HashState(tmp_path / "state.sqlite")  # a later run, the state from disk
    path_fingerprint(folder, state)
    assert reads == []
    touched = folder / "class_02" / "img_001.jpg"
    touched.write_bytes(touched.read_bytes() + b"\0")
    path_fingerprint(folder, state)
    assert [p.name for p in reads] == ["img_001.jpg"]


def test_an_imagefolder_source_is_fingerprinted_by_content_and_its_path_as_given(tmp_path):
    make_imagefolder(tmp_path / "mine", classes=2, per_class=1)
    spec = spec_of("sources", "mine", {"kind": "imagefolder", "path": str(tmp_path / "mine")})
    got = source_fingerprint("mine", spec, HashState(tmp_path / "state.sqlite"))
    assert got["path"] == str(tmp_path / "mine") and got["files"] == 2


def test_a_missing_folder_is_recorded_as_missing(tmp_path):
    spec = spec_of("sources", "mine", {"kind": "imagefolder", "path": str(tmp_path / "nope")})
    got = source_fingerprint("mine", spec, HashState(tmp_path / "state.sqlite"))
    assert got == {"kind": "missing", "path": str(tmp_path / "nope")}


def test_dataset_locations_local_archives_by_content_remote_by_sha256_or_untracked(tmp_path):
    archive = tmp_path / "mini.tar.gz"
    archive.write_bytes(b"not really an archive, but bytes to hash")
    spec = spec_of("sources", "glr", {"kind": "landmarks", "uri": [
        f"file://{archive}", {"url": "https://example.org/images_000.tar", "sha256": SHA},
        "https://example.org/train.csv", "kaggle://competitions/landmark-recognition-2021"]})
    items = source_fingerprint("glr", spec, HashState(tmp_path / "state.sqlite"))["items"]
    assert items[0] == {"kind": "file", "path": f"file://{archive}",
                        "bytes": archive.stat().st_size,
                        "sha256": hashlib.sha256(archive.read_bytes()).hexdigest()}
    assert items[1] == {"kind": "remote", "url": "https://example.org/images_000.tar",
                        "sha256": SHA}
    for item in items[2:]:
        assert item["tracked"] is False and "dvc repro -f download@glr" in item["note"]


def test_package_photos_are_fingerprinted_by_the_versions_of_what_ships_them(tmp_path, monkeypatch):
    spec = spec_of("sources", "package_photos", {"kind": "package_photos"})
    got = source_fingerprint("package_photos", spec, HashState(tmp_path / "state.sqlite"))
    import skimage

    assert got["versions"]["scikit-image"] == skimage.__version__
    assert set(got["versions"]) >= {"deb:opencv-doc", "deb:gcompris-qt-data"}
    # installing (or upgrading) a Debian package changes the fingerprint
    monkeypatch.setattr(inputs, "debian_version",
                        lambda name: "9.9-1" if name == "opencv-doc" else None)
    after = source_fingerprint("package_photos", spec, HashState(tmp_path / "state.sqlite"))
    assert after["versions"]["deb:opencv-doc"] == "9.9-1" and after != got


@pytest.mark.skipif(not os.path.exists("/usr/bin/dpkg-query"), reason="no dpkg on this machine")
def test_debian_versions_come_from_dpkg():
    assert inputs.debian_version("dpkg")  # always installed where dpkg is
    assert inputs.debian_version("no-such-package-here") is None


def test_models_a_checkpoint_by_content_a_wheel_by_its_file_a_tag_by_name(tmp_path):
    ckpt = tmp_path / "vit.bin"
    ckpt.write_bytes(b"weights")
    state = HashState(tmp_path / "state.sqlite")
    spec = spec_of("models", "mine", {"kind": "checkpoint", "arch": "ViT-B-32", "path": str(ckpt)})
    got = model_fingerprint("mine", spec, state)
    assert got["sha256"] == hashlib.sha256(b"weights").hexdigest()

    from tasks.models import lite_weights_file

    lite = model_fingerprint("lite0", spec_of("models", "lite0", {
        "kind": "efficientnet_lite", "arch": "lite0"}), state)
    weights = lite_weights_file("lite0")
    assert lite["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert str(weights.parent) not in lite["path"]  # no clone-specific path in a DVC dep

    tag = model_fingerprint("b32", spec_of("models", "b32", {
        "kind": "open_clip", "arch": "ViT-B-32", "pretrained": "openai"}), state)
    assert tag["pretrained"] == "openai" and "sha256" not in tag
