"""Review findings on hostile inputs: costs no limit counted, headers read whole, bad rows."""

from __future__ import annotations

import io
import tarfile

import pytest

from tasks.archives import ArchiveLimitError, ArchiveLimits, UnsafeArchive, safe_extract
from tasks.urls import UrlRow, fetch_urls

LIMITS = ArchiveLimits(max_entries=1_000_000, max_bytes=64 << 20, max_ratio=200.0)


def _tar_gz(path, members):
    with tarfile.open(path, "w:gz") as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def test_empty_folders_cost_disk_and_count_against_the_ratio(tmp_path):
    dirs = []
    for i in range(3000):
        info = tarfile.TarInfo(f"d{i:05d}")
        info.type = tarfile.DIRTYPE
        dirs.append((info, None))
    archive = _tar_gz(tmp_path / "folders.tar.gz", dirs)
    assert archive.stat().st_size < 60_000  # 3000 folders: 12 MB of blocks from ~30 KB
    with pytest.raises(ArchiveLimitError, match="archive_max_ratio"):
        safe_extract(archive, tmp_path / "out", LIMITS, source="s")
    assert not (tmp_path / "out").exists()


def test_a_tar_long_name_header_is_refused_before_it_is_read_whole(tmp_path):
    info = tarfile.TarInfo("x" * (2 << 20))  # GNU long name: a 2 MiB header
    archive = tmp_path / "longname.tar.gz"
    with tarfile.open(archive, "w:gz", format=tarfile.GNU_FORMAT) as tf:
        tf.addfile(info, io.BytesIO(b""))
    with pytest.raises(UnsafeArchive, match="extended header of"):
        safe_extract(archive, tmp_path / "out", LIMITS, source="s")


def test_a_url_that_httpx_cannot_parse_is_a_recorded_failure_not_a_crash(tmp_path):
    rows = [UrlRow("http://a\x00b/x.jpg", "a")]
    [result] = fetch_urls(rows, tmp_path / "cache", concurrency=1, per_host=1, retries=0,
                          timeout_s=1.0, backoff_s=0.0)
    assert result.path is None and result.error


def test_a_catalog_row_cannot_make_the_shard_stage_read_outside_its_source(
        tmp_path, monkeypatch):
    """catalog.parquet may come from a shared DVC remote: its paths are checked again."""
    from tasks.images import BadImage
    from tasks.names import UnsafeName
    from tasks.shard import read_raw

    raw = tmp_path / "01_raw"
    (raw / "src").mkdir(parents=True)
    (tmp_path / "secret.jpg").write_bytes(b"not yours")
    (raw / "src" / "zero.jpg").symlink_to("/dev/zero")
    (raw / "src" / "ok.jpg").write_bytes(b"\xff\xd8\xff")
    assert read_raw(raw, {"source": "src", "path": "ok.jpg", "key": "k"}) == b"\xff\xd8\xff"
    for path in ["../secret.jpg", "/etc/passwd", "ｓｒｃ/．．/．．/secret.jpg", "a\\..\\x.jpg"]:
        with pytest.raises(UnsafeName):
            read_raw(raw, {"source": "src", "path": path, "key": "k"})
    with pytest.raises(UnsafeName):
        read_raw(raw, {"source": "..", "path": "secret.jpg", "key": "k"})
    with pytest.raises(FileNotFoundError):  # a device is not a regular file: never read
        read_raw(raw, {"source": "src", "path": "zero.jpg", "key": "k"})
    import tasks.shard

    monkeypatch.setattr(tasks.shard, "MAX_RAW_BYTES", 2)  # the real cap is 1 GiB
    with pytest.raises(BadImage, match="over 2 bytes"):
        read_raw(raw, {"source": "src", "path": "ok.jpg", "key": "k"})


def test_an_unreadable_file_is_rejected_with_the_same_reason_every_time():
    """The reason lands in rejects.parquet, a DVC output: Pillow's own message for a file it
    cannot identify names a memory address, which would change the output on every run."""
    from tasks.images import BadImage, normalize_image

    reasons = set()
    for _ in range(2):
        with pytest.raises(BadImage) as err:
            normalize_image(bytes(range(256)) * 4, 512, 92)
        reasons.add(str(err.value))
    assert len(reasons) == 1 and "0x" not in reasons.pop()


@pytest.mark.parametrize("name", ["a\\..\\x.jpg", "C:/x.jpg", "c:x.jpg", "ｘ/．．/．．/y.jpg",
                                  "a\x00b.jpg", "/etc/passwd", "../y.jpg", "x" * 300 + ".jpg"])
def test_every_refused_kind_of_table_path_is_a_recorded_skip(tmp_path, name):
    import polars as pl

    from tasks.layout_rows import LEAVES_FOLDER
    from tasks.layouts import read_table_source

    (tmp_path / "ok.jpg").write_bytes(b"x")
    pl.DataFrame({"path": ["ok.jpg", name], "label": ["a", "b"]}).write_csv(tmp_path / "t.csv")
    rows, skips = read_table_source(tmp_path, "t.csv", "path", "label")
    assert rows == [{"path": "ok.jpg", "label": "a"}]
    assert [(s.path, s.reason) for s in skips] == [(name, LEAVES_FOLDER)]


# ------------------------------------------------------------ labels that become folders

# labels that cannot be one folder name: refused, with the source and entry named
BAD_LABELS = {
    "parent": "..", "parent then name": "../x", "separator": "a/b", "backslash": "a\\b",
    "NUL": "a\x00b", "newline": "a\nb", "C1 control": "a\x85b", "right-to-left override":
    "evil\u202egpj.exe", "fullwidth dot-dot": "\uff0e\uff0e", "fullwidth solidus": "a\uff0fb",
    "drive": "C:x", "empty": "", "over NAME_MAX": "x" * 256,
}


def files_outside(tmp_path, root) -> list[str]:
    """Everything under tmp_path that is not the photo itself or inside `root`."""
    return sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")
                  if p.name != "photo.jpg" and not p.is_relative_to(root) and p != root.parent)


@pytest.fixture
def photo_file(tmp_path):
    from conftest import jpeg_bytes

    path = tmp_path / "photo.jpg"
    path.write_bytes(jpeg_bytes(3, (160, 120)))
    return path


@pytest.mark.parametrize("label", list(BAD_LABELS.values()), ids=list(BAD_LABELS))
def test_a_photo_label_that_is_no_folder_name_is_refused_and_nothing_is_written(
        tmp_path, photo_file, label):
    from tasks.download import render_photo_views
    from tasks.names import UnsafeName
    from tasks.photos import Photo

    root = tmp_path / "raw" / "src"
    with pytest.raises(UnsafeName) as info:
        render_photo_views(Photo(label, photo_file), root, 2, 32, 0)
    assert str(info.value).startswith(f"package_photos: {photo_file}: refused name")
    assert not root.exists() and files_outside(tmp_path, root) == []


@pytest.mark.parametrize("label", ["%2e%2e", "%2F", "con", "a..b", "训练"])
def test_a_label_that_only_looks_odd_is_a_plain_folder_inside(tmp_path, photo_file, label):
    """Labels are not URLs: `%2e%2e` is not decoded, it is a folder of that name."""
    from tasks.download import render_photo_views
    from tasks.photos import Photo

    root = tmp_path / "raw" / "src"
    rows, _ = render_photo_views(Photo(label, photo_file), root, 2, 32, 0)
    assert [r["path"] for r in rows] == [f"images/{label}/0000.jpg", f"images/{label}/0001.jpg"]
    assert sorted(p.name for p in (root / "images").iterdir()) == [label]
    assert files_outside(tmp_path, root) == []


# folder names a file system can hold that still must not be labels
BAD_CLASS_FOLDERS = {k: BAD_LABELS[k] for k in ["backslash", "newline", "C1 control",
                                                "right-to-left override", "fullwidth dot-dot",
                                                "fullwidth solidus", "drive"]}


@pytest.mark.parametrize("name", list(BAD_CLASS_FOLDERS.values()), ids=list(BAD_CLASS_FOLDERS))
def test_an_imagefolder_class_that_is_no_safe_name_stops_the_source(in_tmp, name):
    from conftest import jpeg_bytes
    from flows.download import download
    from tasks.names import UnsafeName
    from tasks.params.sources import ImageFolderSource
    from tasks.schemas.paths import RAW_DIR

    src = in_tmp / "mine"
    for label in ["ok", name]:
        (src / label).mkdir(parents=True)
        (src / label / "1.jpg").write_bytes(jpeg_bytes(1))
    with pytest.raises(UnsafeName) as info:
        download("mine", ImageFolderSource(kind="imagefolder", path=src))
    assert str(info.value).startswith(f"imagefolder {src}: {name}/1.jpg: refused name")
    written = {p.relative_to(in_tmp).as_posix() for p in in_tmp.rglob("*")
               if not p.is_relative_to(src)}
    assert written <= {"data", RAW_DIR.as_posix()}  # no source folder, no staging, nothing else
