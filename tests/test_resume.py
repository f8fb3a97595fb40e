"""A resume cannot splice two versions of a file (issue 11): `Range` goes with `If-Range` and
the validator of the first response, and a changed file is fetched whole. Real loopback server."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from loopback import Fault, Loopback
from tasks.fetch import FetchError, download

BLOB = os.urandom(3 * 1024 * 1024 + 17)
NEW = bytes(reversed(BLOB))  # same length, other bytes: a splice would be invisible by size


@pytest.fixture
def server():
    with Loopback() as srv:
        srv.files["/data.tar"] = BLOB
        yield srv


def interrupted(server, dest: Path, drop: int = 1024 * 1024) -> None:
    """Leave a `.part` of BLOB's first `drop` bytes, as a killed run does."""
    server.faults.setdefault("/data.tar", Fault()).drop_after = drop  # once, keeping other faults
    with pytest.raises(FetchError, match="gave up"):
        download(f"{server.url}/data.tar", dest, retries=0)
    assert dest.with_name(dest.name + ".part").stat().st_size == drop


def test_resume_sends_if_range_with_the_etag_of_the_first_response(server, tmp_path):
    interrupted(server, tmp_path / "d")
    assert download(f"{server.url}/data.tar", tmp_path / "d", backoff_s=0.01).read_bytes() == BLOB
    first, second = server.requests_for("/data.tar")
    etag = f'"{hashlib.sha256(BLOB).hexdigest()[:16]}"'
    assert (first.range, first.if_range) == (None, None)
    assert (second.range, second.if_range) == (f"bytes={1024 * 1024}-", etag)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # .part and its meta are gone


@pytest.mark.parametrize("fault", [Fault(), Fault(etag=False)], ids=["etag", "last-modified"])
def test_a_file_changed_between_attempts_is_fetched_whole_never_spliced(server, tmp_path, fault):
    server.faults["/data.tar"] = fault
    interrupted(server, tmp_path / "d")
    server.files["/data.tar"] = NEW  # a new version upstream, same size
    assert download(f"{server.url}/data.tar", tmp_path / "d").read_bytes() == NEW
    second = server.requests_for("/data.tar")[1]
    assert second.range == f"bytes={1024 * 1024}-"
    assert second.if_range.startswith('"') if fault.etag else second.if_range.endswith("GMT")


def test_a_server_that_ignores_if_range_is_caught_by_the_etag_of_its_206(server, tmp_path):
    interrupted(server, tmp_path / "d")
    server.files["/data.tar"] = NEW
    server.faults["/data.tar"] = Fault(ignore_if_range=True)
    assert download(f"{server.url}/data.tar", tmp_path / "d", backoff_s=0.01).read_bytes() == NEW
    ranges = [r.range for r in server.requests_for("/data.tar")]
    assert ranges == [None, f"bytes={1024 * 1024}-", None]  # the 206 of the new version: dropped


def test_a_part_without_a_validator_is_started_over(server, tmp_path):
    server.faults["/data.tar"] = Fault(etag=False, last_modified=False)
    interrupted(server, tmp_path / "d")
    server.files["/data.tar"] = NEW
    assert download(f"{server.url}/data.tar", tmp_path / "d").read_bytes() == NEW
    assert server.requests_for("/data.tar")[1].range is None  # nothing to guard a Range with
