"""Kaggle downloads never reuse a partial zip and are checked before they are kept.

Kaggle's servers are out of reach offline, so `FakeKaggle` stands in for `KaggleApi` with the
behaviour of kaggle>=1.6 that matters here (src/kaggle/api/kaggle_api_extended.py): files land
in `path` as `<competition>.zip` / `<dataset>.zip`; without `force` an existing file is resumed
by appending (no If-Range) or skipped; listings come in pages of objects with `name`,
`total_bytes` and `next_page_token`.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import REPO
from tasks.fetch import FetchError, check_kaggle_zip, kaggle_download
from tasks.http_guard import ByteLimit, TooLarge

FILES = {"train.csv": b"id,landmark_id\n" + b"0123456789abcdef,1\n" * 50,
         "train/0/1/2/0123456789abcdef.jpg": b"\xff\xd8" + bytes(3000)}


def zip_bytes(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


class FakeKaggle:
    def __init__(self, payload: bytes, listing: dict[str, int] | None = None, page_size: int = 1):
        self.payload, self.listing, self.page_size = payload, listing, page_size
        self.calls: list[dict] = []

    def _write(self, outfile: Path, force: bool) -> None:
        if outfile.is_file() and not force:  # the real client resumes what it finds
            with open(outfile, "ab") as fh:
                fh.write(self.payload[outfile.stat().st_size:])
            return
        outfile.write_bytes(self.payload)

    def competition_download_files(self, competition, path=None, force=False, quiet=True):
        self.calls.append({"ref": competition, "path": path, "force": force})
        self._write(Path(path) / f"{competition}.zip", force)

    def dataset_download_files(self, dataset, path=None, force=False, quiet=True, unzip=False):
        self.calls.append({"ref": dataset, "path": path, "force": force})
        self._write(Path(path) / f"{dataset.split('/')[1]}.zip", force)

    def competition_list_files(self, competition, page_token=None, page_size=20):
        if self.listing is None:
            raise RuntimeError("listing unavailable")
        names = sorted(self.listing)
        start = int(page_token or 0)
        end = start + self.page_size
        files = [SimpleNamespace(name=n, total_bytes=self.listing[n]) for n in names[start:end]]
        return SimpleNamespace(files=files, next_page_token=str(end) if end < len(names) else "")

    dataset_list_files = competition_list_files


URI = "kaggle://competitions/landmark-recognition-2021"
LISTED = {n: len(d) for n, d in FILES.items()}


def test_a_partial_zip_in_the_reused_folder_is_never_resumed(tmp_path):
    out = tmp_path / "kaggle" / "competitions" / "landmark-recognition-2021"
    out.mkdir(parents=True)
    stale = zip_bytes({"train.csv": b"an older version of the file"})
    (out / "landmark-recognition-2021.zip").write_bytes(stale[:len(stale) // 2])  # killed mid-way
    api = FakeKaggle(zip_bytes(FILES), LISTED)
    path = kaggle_download(URI, tmp_path, api=api)
    assert path == out / "landmark-recognition-2021.zip" and path.read_bytes() == api.payload
    [call] = api.calls
    assert (call["ref"], call["force"]) == ("landmark-recognition-2021", True)  # never a resume
    assert Path(call["path"]) != out and not Path(call["path"]).exists()  # a fresh temp folder
    assert kaggle_download(URI, tmp_path, api=api) == path and len(api.calls) == 1  # reused


def test_a_truncated_zip_is_refused_and_nothing_is_kept(tmp_path):
    whole = zip_bytes(FILES)
    api = FakeKaggle(whole[: len(whole) - 100])
    with pytest.raises(FetchError, match="landmark-recognition-2021.zip is not a whole zip"):
        kaggle_download(URI, tmp_path, api=api)
    out = tmp_path / "kaggle" / "competitions"
    assert [p.name for p in out.rglob("*") if p.is_file()] == []


def test_member_sizes_are_checked_against_kaggles_listing(tmp_path):
    api = FakeKaggle(zip_bytes(FILES), {**LISTED, "train.csv": LISTED["train.csv"] + 1})
    with pytest.raises(FetchError, match=r"sizes differ for \['train.csv'\]"):
        kaggle_download(URI, tmp_path, api=api)
    api = FakeKaggle(zip_bytes(FILES), {**LISTED, "test.csv": 10})
    with pytest.raises(FetchError, match=r"missing \['test.csv'\]"):
        kaggle_download("kaggle://datasets/owner/glr", tmp_path, api=api)
    assert not list((tmp_path / "kaggle").rglob("*.zip"))


def test_without_a_usable_listing_the_zip_itself_is_still_checked(tmp_path):
    api = FakeKaggle(zip_bytes(FILES), listing=None)
    assert kaggle_download(URI, tmp_path, api=api).is_file()
    renamed = {f"landmark-recognition-2021/{n}": s for n, s in LISTED.items()}
    check_kaggle_zip(URI, kaggle_download(URI, tmp_path, api=api), None, renamed)  # not compared


def test_a_zip_over_the_limit_is_refused(tmp_path):
    api = FakeKaggle(zip_bytes(FILES), LISTED)
    with pytest.raises(TooLarge, match="over sources.glr.max_download_bytes = 100"):
        kaggle_download(URI, tmp_path, ByteLimit(100, "sources.glr.max_download_bytes"), api=api)
    assert not list((tmp_path / "kaggle").rglob("*.zip"))


def test_a_listing_over_the_limit_is_refused_before_anything_is_downloaded(tmp_path):
    api = FakeKaggle(zip_bytes(FILES), LISTED)
    total = sum(LISTED.values())
    limit = ByteLimit(total - 1, "sources.glr.max_download_bytes")
    with pytest.raises(TooLarge) as info:
        kaggle_download(URI, tmp_path, limit, api=api)
    assert str(info.value).startswith(
        f"{URI} (Kaggle lists 2 files): the download is {total} bytes, over "
        f"sources.glr.max_download_bytes = {total - 1}")
    assert api.calls == [] and not list(tmp_path.rglob("*.zip"))


def test_a_listing_too_long_to_read_whole_is_enough_once_it_passes_the_limit(tmp_path):
    """ImageNet lists over a million files: past 20 pages the listing is not read to its end,
    but pages that already total more than the limit are evidence enough."""
    listing = {f"train/{i:04d}.jpg": 1000 for i in range(100)}  # 100 pages of one file
    api = FakeKaggle(zip_bytes(FILES), listing)
    with pytest.raises(TooLarge, match="the download is 5000 bytes, over k = 4999"):
        kaggle_download(URI, tmp_path, ByteLimit(4999, "k"), api=api)
    assert api.calls == []
    roomy = ByteLimit(10**9, "k")  # 20 pages read, the sum still under: the zip decides
    assert kaggle_download(URI, tmp_path, roomy, api=api).read_bytes() == api.payload


class KilledMidDownload(FakeKaggle):
    """Writes half the zip, then the process is killed outright: no `finally` runs."""

    def _write(self, outfile: Path, force: bool) -> None:
        outfile.write_bytes(self.payload[: len(self.payload) // 2])
        os.kill(os.getpid(), signal.SIGKILL)


def run_until_killed(code: str, cwd: Path) -> None:
    """Run `code` in a fresh Python (the repository and tests importable) until it SIGKILLs."""
    path = os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, check=False,
                          env={**os.environ, "PYTHONPATH": path}, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode(errors="replace")[-2000:]


def test_a_killed_downloads_folder_never_looks_done_and_the_next_run_removes_it(tmp_path):
    run_until_killed(
        "from pathlib import Path\n"
        "from test_kaggle_download import FILES, URI, KilledMidDownload, zip_bytes\n"
        "from tasks.fetch import kaggle_download\n"
        "kaggle_download(URI, Path('cache'), api=KilledMidDownload(zip_bytes(FILES)))\n",
        tmp_path)
    parent = tmp_path / "cache" / "kaggle" / "competitions"
    [stale] = [p for p in parent.iterdir() if p.name.startswith(".")]
    assert stale.name.startswith(".landmark-recognition-2021.downloading-")
    assert [p.name for p in stale.iterdir()] == ["landmark-recognition-2021.zip"]  # half of it
    assert not list((parent / "landmark-recognition-2021").iterdir())  # nothing looks done

    api = FakeKaggle(zip_bytes(FILES), LISTED)
    path = kaggle_download(URI, tmp_path / "cache", api=api)
    assert path.read_bytes() == api.payload and len(api.calls) == 1
    assert sorted(p.name for p in parent.iterdir()) == ["landmark-recognition-2021"]


def test_a_scratch_folder_in_use_is_left_alone(tmp_path):
    from tasks.schemas.io import remove_stale_scratch, scratch_dir

    with scratch_dir(tmp_path, ".x.downloading-") as live:
        (live / "part.zip").write_bytes(b"half")
        (tmp_path / ".x.downloading-abandoned").mkdir()  # nobody holds it
        with scratch_dir(tmp_path, ".x.downloading-") as other:  # a second run of the same
            assert other != live and (live / "part.zip").is_file()
        assert remove_stale_scratch(tmp_path, ".x.downloading-") == []
        assert sorted(p.name for p in tmp_path.iterdir()) == [live.name]
    assert list(tmp_path.iterdir()) == []


def test_scratch_folders_made_at_once_by_threads_never_collide(tmp_path):
    """Threads of one prefix each get a folder, though each one's cleanup races the others.

    A folder made by one thread is visible to another's stale-scratch cleanup before it is
    locked; the maker has to notice it was deleted and make another, not fail (a CI run of
    the GLDv2 test failed here once, with two tars unpacking at once).
    """
    from concurrent.futures import ThreadPoolExecutor

    from tasks.schemas.io import scratch_dir

    def use(i: int) -> bool:
        with scratch_dir(tmp_path, ".x.extracting-") as path:
            (path / "f").write_text(str(i))
            return (path / "f").read_text() == str(i)

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(use, range(500)))
    assert list(tmp_path.iterdir()) == []
