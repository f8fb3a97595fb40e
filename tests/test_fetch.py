"""Downloads against a real loopback HTTP server: resume, retries, 429, checksums
(archives: test_archives.py)."""

from __future__ import annotations

import hashlib
import os
import time

import pytest

from loopback import Fault, Loopback
from tasks.fetch import (ChecksumMismatch, FetchError, download, kaggle_credentials, parse_kaggle,
                         retry_after_seconds)

BLOB = os.urandom(3 * 1024 * 1024 + 17)
SHA = hashlib.sha256(BLOB).hexdigest()


@pytest.fixture
def server():
    with Loopback() as srv:
        srv.files["/data.tar"] = BLOB
        yield srv


def test_dropped_connection_resumes_with_a_range_request(server, tmp_path):
    server.faults["/data.tar"] = Fault(drop_after=1024 * 1024)
    sizes, got = [], []
    out = download(f"{server.url}/data.tar", tmp_path / "data.tar", SHA, backoff_s=0.01,
                   on_size=sizes.append, progress=got.append)
    assert out.read_bytes() == BLOB
    assert sizes == [len(BLOB)] and sum(got) == len(BLOB)  # the ETA's total, counted once
    reqs = server.requests_for("/data.tar")
    assert [r.range for r in reqs] == [None, f"bytes={1024 * 1024}-"]
    assert not (tmp_path / "data.tar.part").exists()


def test_server_errors_twice_then_ok(server, tmp_path):
    server.faults["/data.tar"] = Fault(errors=[500, 503])
    waits = []
    download(f"{server.url}/data.tar", tmp_path / "d", SHA, backoff_s=0.5, sleep=waits.append)
    assert len(server.requests_for("/data.tar")) == 3
    assert waits == [0.5, 1.0]  # exponential backoff


def test_429_waits_for_retry_after(server, tmp_path):
    server.faults["/data.tar"] = Fault(errors=[429], retry_after="1")
    start = time.monotonic()
    download(f"{server.url}/data.tar", tmp_path / "d", SHA, backoff_s=0.01)
    reqs = server.requests_for("/data.tar")
    assert len(reqs) == 2 and reqs[1].at - reqs[0].at >= 0.95
    assert time.monotonic() - start >= 0.95


def test_retry_after_as_http_date():
    from email.utils import formatdate

    assert 1.0 <= retry_after_seconds(formatdate(time.time() + 3, usegmt=True)) <= 3.0
    assert retry_after_seconds("7") == 7.0 and retry_after_seconds("soon") is None


def test_wrong_checksum_is_a_clear_error_and_nothing_is_kept(server, tmp_path):
    with pytest.raises(ChecksumMismatch, match=f"sha256 is {SHA}, params expect {'0' * 64}"):
        download(f"{server.url}/data.tar", tmp_path / "d", "0" * 64)
    assert list(tmp_path.iterdir()) == []


def test_not_found_fails_at_once_and_too_many_errors_give_up(server, tmp_path):
    with pytest.raises(FetchError, match="HTTP 404"):
        download(f"{server.url}/missing", tmp_path / "m", retries=3, sleep=lambda s: None)
    assert len(server.requests_for("/missing")) == 1
    server.faults["/data.tar"] = Fault(errors=[500] * 10)
    with pytest.raises(FetchError, match="gave up after 2 retries"):
        download(f"{server.url}/data.tar", tmp_path / "d", retries=2, sleep=lambda s: None)
    assert not (tmp_path / "d").exists()


def test_a_completed_download_is_not_fetched_again(server, tmp_path):
    download(f"{server.url}/data.tar", tmp_path / "d", SHA)
    download(f"{server.url}/data.tar", tmp_path / "d", SHA)
    assert len(server.requests_for("/data.tar")) == 1


def test_kaggle_uris_and_missing_credentials(tmp_path, monkeypatch):
    from tasks.download import check_source
    from tasks.params.base import ParamsError
    from tasks.params.sources import LandmarksSource

    assert parse_kaggle("kaggle://competitions/landmark-recognition-2021") == (
        "competitions", "landmark-recognition-2021")
    assert parse_kaggle("kaggle://datasets/owner/products-10k") == (
        "datasets", "owner/products-10k")
    with pytest.raises(ValueError, match="expected kaggle://competitions/<name>"):
        parse_kaggle("kaggle://models/x")
    for var in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "no-kaggle"))
    assert not kaggle_credentials()
    spec = LandmarksSource(kind="landmarks", uri="kaggle://competitions/landmark-recognition-2021")
    with pytest.raises(ParamsError, match=r"no Kaggle credentials found.*~/.kaggle/kaggle.json"
                                          r".*KAGGLE_USERNAME"):
        check_source("glr", spec)
    (tmp_path / "no-kaggle").mkdir()
    (tmp_path / "no-kaggle" / "kaggle.json").write_text('{"username": "u", "key": "k"}')
    assert kaggle_credentials()
