"""Archives that cannot hurt: member names, links and special members, bombs, limits, atomicity.

Every archive is built small in tmp_path; the bombs are made with low limits passed in.
The seeded fuzz test lives in test_archives_fuzz.py.
"""

from __future__ import annotations

import io
import os
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from tasks.archives import (ArchiveLimitError, ArchiveLimits, UnsafeArchive, is_archive,
                            safe_extract)
from tasks.names import UnsafeName

ROOMY = ArchiveLimits(max_entries=1000, max_bytes=64 << 20, max_ratio=200.0)
ZEROS = bytes(8 << 20)  # deflates to ~8 KB: 1000:1


def tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]], mode: str = "w",
        fmt: int = tarfile.PAX_FORMAT) -> Path:
    """Write `members` (TarInfo, data) as they are: tarfile itself refuses no name or type."""
    with tarfile.open(path, mode, format=fmt) as tf:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info


def zip_(path: Path, entries: list[tuple[str | zipfile.ZipInfo, bytes]],
         method: int = zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", method) as zf:
        for name, data in entries:
            zf.writestr(name, data)
    return path


def zip_info(name: str, mode: int = 0o100644) -> zipfile.ZipInfo:
    """A ZipInfo whose name is kept exactly (ZipInfo() itself cuts a NUL) and unix mode set."""
    info = zipfile.ZipInfo("placeholder")
    info.filename = info.orig_filename = name
    info.external_attr = mode << 16
    return info


def left_behind(parent: Path) -> list[str]:
    """What an extraction left in `parent` besides the archives (nothing, after a refusal)."""
    return sorted(p.name for p in parent.iterdir() if not is_archive(p) and p.suffix != ".gz")


# ------------------------------------------------------------------------ clean archives


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".zip"])
def test_a_clean_archive_extracts_whole_into_a_new_folder(tmp_path, suffix):
    files = {"d/训练.txt": b"1", "d/e/f.jpg": b"22", "top.csv": b"a,b\n"}
    if suffix == ".zip":
        archive = zip_(tmp_path / f"a{suffix}", [("d/", b""), *files.items()])
    else:
        mode = {".tar": "w", ".tgz": "w:gz"}.get(suffix, f"w:{suffix.rsplit('.', 1)[-1]}")
        members = [(member("./", tarfile.DIRTYPE), None), (member("./d", tarfile.DIRTYPE), None)]
        members += [(member(f"./{n}"), b) for n, b in files.items()]
        archive = tar(tmp_path / f"a{suffix}", members, mode)
    dest = tmp_path / "out" / "dest"
    assert safe_extract(archive, dest, ROOMY, source="src") == 3
    got = {p.relative_to(dest).as_posix(): p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    assert got == files
    assert os.listdir(tmp_path / "out") == ["dest"]  # the temporary folder is gone


def test_several_archives_fill_one_folder_and_a_refused_one_leaves_it_as_it_was(tmp_path):
    dest = tmp_path / "train"
    for k in range(2):  # GLDv2: every tar holds a/b/c/<id>.jpg under the same a/b/c folders
        tar(tmp_path / f"images_{k}.tar",
            [(member(f"0/0/0/{k}.jpg"), b"x"), (member(f"1/{k}"), b"y")])
        safe_extract(tmp_path / f"images_{k}.tar", dest, ROOMY, source="gldv2")
    before = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*"))
    assert before == ["0", "0/0", "0/0/0", "0/0/0/0.jpg", "0/0/0/1.jpg", "1", "1/0", "1/1"]
    bad = tar(tmp_path / "images_2.tar", [(member("0/0/0/2.jpg"), b"z"), (member("../x"), b"!")])
    with pytest.raises(UnsafeName):
        safe_extract(bad, dest, ROOMY, source="gldv2")
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*")) == before
    assert left_behind(tmp_path) == ["train"]


def test_only_zip_and_tar_names_are_archives():
    assert all(is_archive(Path(n)) for n in ("a.zip", "b.TAR", "c.tar.gz", "d.tgz", "e.tar.xz"))
    assert not any(is_archive(Path(n)) for n in ("a.csv.gz", "b.jpg", "c.tar.gz.part"))


# --------------------------------------------------------------------------- member names

REFUSED = [
    ("../evil.txt", "parent folder"),
    ("ok/../../evil.txt", "parent folder"),
    ("/tmp/evil.txt", "absolute path"),
    ("C:/evil.txt", "absolute path"),
    ("c:evil.txt", "absolute path"),
    ("ok\\..\\evil.txt", "separator"),
    ("ok/a\x1bb.txt", "control character"),
    ("x" * 256, "more than 255 bytes"),
    ("d/" * 2100 + "f", "more than 4096 bytes"),
    ("d/" * 65 + "f", "folders deep"),
    ("\uff0e\uff0e/evil.txt", "parent folder"),    # fullwidth full stops: NFKC ".."
    ("ok/a\uff0fb.txt", "separator"),                # fullwidth solidus: NFKC "/"
    ("\u2024\u2024/evil.txt", "parent folder"),     # one-dot leaders: NFKC ".."
]


@pytest.mark.parametrize("fmt", ["tar", "zip"])
@pytest.mark.parametrize("name, why", REFUSED, ids=[r[1] + str(i) for i, r in enumerate(REFUSED)])
def test_each_unsafe_member_name_is_refused_naming_source_archive_and_entry(tmp_path, fmt, name,
                                                                            why):
    if fmt == "zip":
        archive = zip_(tmp_path / "a.zip", [("good.txt", b"1"), (zip_info(name), b"2")])
    else:
        archive = tar(tmp_path / "a.tar.gz", [(member("good.txt"), b"1"), (member(name), b"2")],
                      "w:gz")
    with pytest.raises(UnsafeName, match=why) as err:
        safe_extract(archive, tmp_path / "box" / "out", ROOMY, source="mysource")
    assert str(err.value).startswith(f"mysource: archive {archive.name}: refused name")
    assert left_behind(tmp_path) == ["box"] and os.listdir(tmp_path / "box") == []


def test_a_nul_in_a_zip_name_is_refused_as_stored_not_as_zipfile_cuts_it(tmp_path):
    archive = zip_(tmp_path / "a.zip", [(zip_info("evil.sh\x00.jpg"), b"#!")])
    with pytest.raises(UnsafeName, match="control character"):
        safe_extract(archive, tmp_path / "out", ROOMY, source="s")
    assert left_behind(tmp_path) == []


def test_a_tar_name_that_is_not_utf8_is_refused(tmp_path):
    archive = tar(tmp_path / "a.tar", [(member("caf\udce9.jpg"), b"1")], fmt=tarfile.GNU_FORMAT)
    with pytest.raises(UnsafeName, match="not valid UTF-8"):
        safe_extract(archive, tmp_path / "out", ROOMY, source="s")


def test_percent_escapes_in_a_member_name_are_a_plain_file_name_inside(tmp_path):
    archive = zip_(tmp_path / "a.zip", [("%2F..%2Fevil.sh", b"1")])
    safe_extract(archive, tmp_path / "out", ROOMY, source="s")
    assert os.listdir(tmp_path / "out") == ["%2F..%2Fevil.sh"]  # no decoding: it stays inside


# ----------------------------------------------------------------- links and special members


@pytest.mark.parametrize("evil, what", [
    (member("ok/link", tarfile.SYMTYPE, "target.txt"), "symbolic link"),  # even inside
    (member("ok/link", tarfile.SYMTYPE, "../../evil.txt"), "symbolic link"),
    (member("ok/link", tarfile.SYMTYPE, "/etc/passwd"), "symbolic link"),
    (member("ok/hard", tarfile.LNKTYPE, "target.txt"), "hard link"),
    (member("ok/hard", tarfile.LNKTYPE, "/etc/passwd"), "hard link"),
    (member("ok/tty", tarfile.CHRTYPE), "character device"),
    (member("ok/sda", tarfile.BLKTYPE), "block device"),
    (member("ok/pipe", tarfile.FIFOTYPE), "FIFO"),
    (member("ok/odd", b"Z"), "unknown type"),
])
def test_every_link_and_special_tar_member_is_refused_and_never_created(tmp_path, evil, what):
    archive = tar(tmp_path / "a.tar", [(member("target.txt"), b"1"), (evil, None)])
    with pytest.raises(UnsafeArchive, match=what):
        safe_extract(archive, tmp_path / "out", ROOMY, source="s")
    assert left_behind(tmp_path) == []


@pytest.mark.parametrize("mode, what", [(stat.S_IFLNK | 0o777, "symbolic link"),
                                        (stat.S_IFIFO | 0o644, "FIFO"),
                                        (stat.S_IFCHR | 0o644, "character device"),
                                        (stat.S_IFSOCK | 0o644, "socket")])
def test_links_and_special_zip_members_are_refused(tmp_path, mode, what):
    archive = zip_(tmp_path / "a.zip", [("t.txt", b"1"), (zip_info("link", mode), b"t.txt")])
    with pytest.raises(UnsafeArchive, match=what):
        safe_extract(archive, tmp_path / "out", ROOMY, source="s")
    assert left_behind(tmp_path) == []


@pytest.mark.parametrize("members", [
    [("a", b"1"), ("a", b"2")],         # the same name twice
    [("a", b"1"), ("a/b", b"2")],       # a file where a folder is needed
    [("a/b", b"1"), ("a", b"2")],       # a folder where a file is
])
def test_duplicate_names_and_file_folder_collisions_are_refused(tmp_path, members):
    archive = tar(tmp_path / "a.tar", [(member(n), d) for n, d in members])
    with pytest.raises(UnsafeArchive, match="cannot be written|needs a folder"):
        safe_extract(archive, tmp_path / "out", ROOMY, source="s")
    assert left_behind(tmp_path) == []


def test_an_encrypted_or_corrupt_archive_is_a_clear_error(tmp_path):
    raw = bytearray(zip_(tmp_path / "e.zip", [("secret.txt", b"x")]).read_bytes())
    for sig, at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):  # the flags: bit 0, encrypted
        raw[raw.index(sig) + at] |= 0x1
    (tmp_path / "e.zip").write_bytes(bytes(raw))
    with pytest.raises(UnsafeArchive, match="encrypted"):
        safe_extract(tmp_path / "e.zip", tmp_path / "out", ROOMY, source="s")
    full = tar(tmp_path / "t.tar", [(member("a.jpg"), os.urandom(5000))]).read_bytes()
    (tmp_path / "cut.tar").write_bytes(full[:3000])
    (tmp_path / "junk.zip").write_bytes(b"not a zip at all")
    for name in ("cut.tar", "junk.zip"):
        with pytest.raises(UnsafeArchive, match="corrupt, truncated or unsupported"):
            safe_extract(tmp_path / name, tmp_path / "out", ROOMY, source="s")
    assert left_behind(tmp_path) == []


# ------------------------------------------------------------------------ bombs and limits


def limits(**kw) -> ArchiveLimits:
    return ArchiveLimits(**{"max_entries": 100, "max_bytes": 64 << 20, "max_ratio": 100.0,
                            "grace_bytes": 0, **kw})


def test_zip_bomb_is_refused_from_its_directory_before_anything_is_written(tmp_path):
    archive = zip_(tmp_path / "bomb.zip", [("zeros.bin", ZEROS)])
    with pytest.raises(ArchiveLimitError, match="over the limit archive_max_ratio = 100.0") as err:
        safe_extract(archive, tmp_path / "out", limits(), source="mysource")
    assert str(err.value).startswith("mysource: bomb.zip: its directory:")
    assert left_behind(tmp_path) == []


def test_a_zip_whose_headers_lie_about_sizes_gains_nothing(tmp_path):
    raw = bytearray(zip_(tmp_path / "x.zip", [("zeros.bin", ZEROS)]).read_bytes())
    for sig, at in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):  # local header, central directory
        pos = raw.index(sig) + at
        raw[pos:pos + 4] = (1000).to_bytes(4, "little")  # claims 1000 bytes: under every limit
    (tmp_path / "liar.zip").write_bytes(bytes(raw))
    with pytest.raises(UnsafeArchive, match="corrupt"):  # zipfile stops at 1000 bytes: bad CRC
        safe_extract(tmp_path / "liar.zip", tmp_path / "out", limits(), source="s")
    assert left_behind(tmp_path) == []


@pytest.mark.parametrize("mode, suffix", [("w:gz", ".tar.gz"), ("w:gz", ".tgz"),
                                          ("w:bz2", ".tar.bz2"), ("w:xz", ".tar.xz")])
def test_compressed_tar_bombs_are_stopped_while_streaming(tmp_path, mode, suffix):
    archive = tar(tmp_path / f"bomb{suffix}", [(member("a.txt"), b"ok"), (member("z.bin"), ZEROS)],
                  mode)
    with pytest.raises(ArchiveLimitError, match="entry 'z.bin': over the limit archive_max_ratio"):
        safe_extract(archive, tmp_path / "out", limits(), source="s")
    assert left_behind(tmp_path) == []


def test_plain_tar_over_the_byte_limit_is_stopped_while_streaming(tmp_path):
    data = os.urandom(300_000)
    archive = tar(tmp_path / "big.tar", [(member(f"{i}.jpg"), data) for i in range(4)])
    with pytest.raises(ArchiveLimitError, match="entry '3.jpg': over the limit archive_max_bytes"):
        safe_extract(archive, tmp_path / "out", limits(max_bytes=1_000_000), source="s")
    assert left_behind(tmp_path) == []
    zipped = zip_(tmp_path / "big.zip", [(f"{i}.jpg", data) for i in range(4)])
    with pytest.raises(ArchiveLimitError, match="its directory: over the limit archive_max_bytes"):
        safe_extract(zipped, tmp_path / "out", limits(max_bytes=1_000_000), source="s")


@pytest.mark.parametrize("fmt", ["tar", "zip"])
def test_too_many_entries(tmp_path, fmt):
    names = [f"d{i % 3}/{i}.jpg" for i in range(30)]
    if fmt == "zip":
        archive, at = zip_(tmp_path / "many.zip", [(n, b"") for n in names]), "its directory"
    else:
        archive, at = tar(tmp_path / "many.tar", [(member(n), b"") for n in names]), "entry"
    with pytest.raises(ArchiveLimitError, match=f"{at}.*archive_max_entries = 20"):
        safe_extract(archive, tmp_path / "out", limits(max_entries=20), source="s")
    assert left_behind(tmp_path) == []


def test_a_nested_archive_is_a_file_never_opened_and_counts_as_its_bytes(tmp_path):
    inner = zip_(tmp_path / "inner.zip", [("zeros.bin", ZEROS), ("../evil.txt", b"!")])
    outer = tar(tmp_path / "outer.tar.gz", [(member("data/inner.zip"), inner.read_bytes())],
                "w:gz")
    safe_extract(outer, tmp_path / "out", limits(), source="s")
    assert (tmp_path / "out" / "data" / "inner.zip").read_bytes() == inner.read_bytes()
    assert sorted(os.listdir(tmp_path / "out" / "data")) == ["inner.zip"]
    small = limits(max_bytes=inner.stat().st_size - 1)
    with pytest.raises(ArchiveLimitError, match="entry 'data/inner.zip'.*archive_max_bytes"):
        safe_extract(outer, tmp_path / "again", small, source="s")


def test_the_download_step_passes_the_sources_limits(tmp_path):
    from tasks.download import place_fetched
    from tasks.params.sources import Fetch, LandmarksSource

    spec = LandmarksSource(kind="landmarks", uri="x")
    assert (spec.archive_max_entries, spec.archive_max_bytes, spec.archive_max_ratio) == (
        5_000_000, 256 << 30, 200.0)
    archive = tar(tmp_path / "images_000.tar", [(member(f"{i}.jpg"), b"j") for i in range(5)])
    tight = LandmarksSource(kind="landmarks", uri="x", archive_max_entries=4)
    with pytest.raises(ArchiveLimitError, match="sources.landmarks: images_000.tar: .*entries = 4"):
        place_fetched(archive, Fetch(url=str(archive), into="train"), tmp_path / "stage", tight,
                      "landmarks")
    place_fetched(archive, Fetch(url=str(archive), into="train"), tmp_path / "stage", spec,
                  "landmarks")
    assert len(os.listdir(tmp_path / "stage" / "train")) == 5


KILL_AFTER_FIRST_MEMBER = """
import os, signal
from pathlib import Path
from tasks import archives, download as dl
from tasks.params.sources import CsvSource, Fetch
from tasks.schemas.paths import RAW_DIR

write = archives._Budget.write

def write_then_die(self, *args):  # the process is killed outright: no `finally` runs
    write(self, *args)
    os.kill(os.getpid(), signal.SIGKILL)

archives._Budget.write = write_then_die
tar = Path({archive!r})
with dl.staged_dir(RAW_DIR / "x") as stage:
    dl.place_fetched(tar, Fetch(url=str(tar)), stage, CsvSource(kind="csv", uri=str(tar)), "x")
"""


def test_an_extraction_killed_midway_never_looks_done_and_the_next_run_removes_it(in_tmp):
    from conftest import jpeg_bytes
    from flows.download import download
    from tasks.params.sources import CsvSource
    from tasks.schemas.paths import RAW_DIR
    from test_kaggle_download import run_until_killed

    images = {f"img/{c}/{i}.jpg": jpeg_bytes(10 * c + i) for c in range(2) for i in range(2)}
    table = "path,label\n" + "".join(f"{p},{p.split('/')[1]}\n" for p in images)
    archive = tar(in_tmp / "data.tar", [(member("labels.csv"), table.encode())]
                  + [(member(p), data) for p, data in images.items()])
    run_until_killed(KILL_AFTER_FIRST_MEMBER.format(archive=str(archive)), in_tmp)
    staging, scratch = sorted(os.listdir(RAW_DIR), key=len)  # and no `x`: nothing looks done
    assert staging == ".x.staging" and scratch.startswith("..x.staging.extracting-")
    assert os.listdir(RAW_DIR / scratch) == ["labels.csv"]  # killed after its first member

    assert download("x", CsvSource(kind="csv", uri=str(archive))) == 4
    assert os.listdir(RAW_DIR) == ["x"]
    assert sorted(os.listdir(RAW_DIR / "x" / "img")) == ["0", "1"]
