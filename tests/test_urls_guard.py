"""A third party's URL list cannot hurt: every refusal is a row of failures.parquet with its
reason (names, private addresses on any hop, redirects off http, oversized images)."""

from __future__ import annotations

import ipaddress

import polars as pl
import pytest

from conftest import jpeg_bytes
from loopback import Fault, Loopback
from tasks import http_guard
from tasks.params.sources import UrlsSource
from tasks.schemas.paths import RAW_DIR
from test_fetch_guard import EVIL_NAMES as ALL_EVIL

# a URL list's images are cached under a hash of the URL: a long name is refused only past NAME_MAX
EVIL_NAMES = {k: v for k, v in ALL_EVIL.items() if k != "cache name over NAME_MAX"}


@pytest.fixture
def server():
    with Loopback() as srv:
        yield srv


@pytest.fixture
def localhost_is_public(monkeypatch):
    """Declare `localhost` a public host (offline, DNS is the one thing a test cannot run), so the
    loopback server stands for the internet and 127.0.0.1 for an address inside your network."""
    real = http_guard.resolve_host
    monkeypatch.setattr(http_guard, "resolve_host", lambda host, port: (
        {ipaddress.ip_address("93.184.216.34")} if host == "localhost" else real(host, port)))


def failures() -> dict[str, str]:
    table = pl.read_parquet(RAW_DIR / "web" / "failures.parquet")
    return dict(zip(table["url"], table["error"]))


def test_every_refusal_is_recorded_with_its_reason(in_tmp, server, localhost_is_public):
    from flows.download import download

    port = server.server.server_address[1]
    public, private = f"http://localhost:{port}", f"http://127.0.0.1:{port}"
    for i in range(3):
        server.files[f"/img/{i}.jpg"] = jpeg_bytes(i)
    server.files["/inside/1.jpg"] = jpeg_bytes(1)
    server.files["/big.jpg"] = jpeg_bytes(7, (1200, 900))
    server.faults["/to-private.jpg"] = Fault(redirect=f"{private}/img/0.jpg")
    server.faults["/to-ftp.jpg"] = Fault(redirect="ftp://example.org/x.jpg")
    server.faults["/to-metadata.jpg"] = Fault(redirect="http://169.254.169.254/latest/meta-data/")
    refused = {
        f"{private}/inside/1.jpg": "refused address: 127.0.0.1, a loopback address",
        f"http://10.1.2.3:{port}/img/2.jpg": "refused address: 10.1.2.3, a private address",
        f"{public}/to-private.jpg": "refused address: 127.0.0.1, a loopback address",
        f"{public}/to-metadata.jpg": "169.254.169.254, a link-local address",
        f"{public}/to-ftp.jpg": "only http(s) redirects are followed",
        f"{public}/big.jpg": "over sources.web.max_image_bytes = 20000",
    }
    for segment in EVIL_NAMES.values():
        server.files[f"/img/{segment}"] = b"#!/bin/sh\n"
        refused[f"{public}/img/{segment}"] = "refused"
    ok = [f"{public}/img/{i}.jpg" for i in range(3)]
    lines = ["url,label"] + [f"{u},c{i % 2}" for i, u in enumerate(ok + list(refused))]
    server.files["/list.csv"] = ("\n".join(lines) + "\n").encode()
    spec = UrlsSource(kind="urls", uri=f"{private}/list.csv", max_image_bytes=20_000, retries=0)
    assert download("web", spec) == 3  # the list itself is the user's: it may live anywhere
    got = failures()
    assert set(got) == set(refused)
    for url, why in refused.items():
        assert why in got[url], (url, got[url])
    for segment in EVIL_NAMES.values():
        assert "refused name" in got[f"{public}/img/{segment}"]
    asked = {r.path for r in server.requests}
    assert not asked & {f"/img/{s}" for s in EVIL_NAMES.values()}  # refused from the name alone
    assert "/inside/1.jpg" not in asked  # a private host is refused before it is asked
    everything = {p.name for p in in_tmp.rglob("*")}
    assert not any("evil" in name for name in everything)  # nothing written anywhere
    assert not [p for p in in_tmp.rglob("*.part*")]  # no partial download left behind


def test_private_addresses_are_fetched_when_the_source_allows_them(in_tmp, server):
    from flows.download import download

    server.files["/img/0.jpg"] = jpeg_bytes(0)
    server.files["/img/1.jpg"] = jpeg_bytes(1)
    lines = ["url,label", f"{server.url}/img/0.jpg,a", f"{server.url}/img/1.jpg,b"]
    server.files["/list.csv"] = ("\n".join(lines) + "\n").encode()
    spec = UrlsSource(kind="urls", uri=f"{server.url}/list.csv", retries=0)
    with pytest.raises(Exception, match="no usable images"):  # all refused: a loopback host
        download("web", spec)
    assert [r.path for r in server.requests] == ["/list.csv"]
    assert download("web", spec.model_copy(update={"allow_private_addresses": True})) == 2


# ------------------------------------------------------------------------- list rows


def equal_rows_parquet(path, rows: int):
    """A Parquet URL list of `rows` equal rows: dictionary and run-length encoded, a few KB."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    url = pa.array(["http://img.example/a.jpg"]).dictionary_encode()
    label = pa.array(["a"]).dictionary_encode()
    table = pa.table({"url": url.take([0] * rows), "label": label.take([0] * rows)})
    pq.write_table(table, path, compression="zstd")
    return path


def test_a_parquet_list_is_refused_from_its_metadata_before_it_is_decoded(tmp_path):
    from tasks.urls import RowLimit, TooManyRows, read_url_list

    path = equal_rows_parquet(tmp_path / "list.parquet", 2_000_000)
    assert path.stat().st_size < 20_000  # two million rows in a few kilobytes
    limit = RowLimit(1_999_999, "sources.web.max_list_rows")
    with pytest.raises(TooManyRows) as info:
        read_url_list(path, "url", "label", limit=limit, shown="https://lists.example/l.parquet")
    assert str(info.value).startswith(
        "https://lists.example/l.parquet: the URL list has 2,000,000 rows in its metadata, "
        "over sources.web.max_list_rows = 1,999,999; nothing was fetched")
    rows = read_url_list(path, "url", "label", limit=RowLimit(2_000_000, "k"))
    assert len(rows) == 2_000_000 and rows[-1].url == "http://img.example/a.jpg"


@pytest.mark.parametrize("name, separator", [("list.csv", ","), ("list.tsv", "\t")])
def test_a_csv_or_tsv_list_is_read_only_until_its_limit_is_passed(tmp_path, name, separator):
    import gzip

    from tasks.urls import RowLimit, TooManyRows, read_url_list

    body = f"url{separator}label\n" + f"http://img.example/a.jpg{separator}a\n" * 3_000_000
    path = tmp_path / name
    path.write_bytes(gzip.compress(body.encode(), 9))  # polars inflates a gzip list itself
    assert path.stat().st_size < 400_000  # 3M rows, 90 MB once inflated
    with pytest.raises(TooManyRows, match=rf"{name}: the URL list has more than 10 rows, "
                                          r"over sources.web.max_list_rows = 10;"):
        read_url_list(path, "url", "label", limit=RowLimit(10, "sources.web.max_list_rows"))
    path.write_text("".join(f"{u}{separator}{v}\n" for u, v in [
        ("url", "label"), ("http://a/1.jpg", "x"), ("http://a/2.jpg", "y")]))
    rows = read_url_list(path, "url", "label", limit=RowLimit(2, "k"))
    assert [(r.url, r.label) for r in rows] == [("http://a/1.jpg", "x"), ("http://a/2.jpg", "y")]


def test_a_list_over_max_list_rows_stops_the_source_before_any_image(in_tmp, server):
    from flows.download import download
    from tasks.params.project import parse_params
    from tasks.urls import TooManyRows

    assert UrlsSource(kind="urls", uri="x").max_list_rows == 10_000_000
    for i in range(4):
        server.files[f"/img/{i}.jpg"] = jpeg_bytes(i)
    lines = ["url,label"] + [f"{server.url}/img/{i}.jpg,c{i % 2}" for i in range(4)]
    server.files["/list.csv"] = ("\n".join(lines) + "\n").encode()
    spec = UrlsSource(kind="urls", uri=f"{server.url}/list.csv", max_list_rows=3,
                      allow_private_addresses=True, retries=0)
    with pytest.raises(TooManyRows, match=rf"{server.url}/list.csv: the URL list has more than "
                                          r"3 rows, over sources.web.max_list_rows = 3"):
        download("web", spec)
    assert [r.path for r in server.requests] == ["/list.csv"]  # no image was asked for
    assert not (RAW_DIR / "web").exists()
    raised = spec.model_copy(update={"max_list_rows": 4})  # what params.yaml raises it to
    assert download("web", raised) == 4
    with pytest.raises(Exception, match="sources.web.max_list_rows = 0"):
        parse_params({"sources": {"web": {"kind": "urls", "uri": "x", "max_list_rows": 0}}})


def test_an_image_that_trickles_past_max_image_seconds_is_a_recorded_failure(in_tmp, server):
    from flows.download import download

    assert UrlsSource(kind="urls", uri="x").max_image_seconds == 600
    server.files["/img/ok.jpg"] = jpeg_bytes(0)
    server.files["/img/slow.jpg"] = jpeg_bytes(1)
    server.faults["/img/slow.jpg"] = Fault(trickle_s=0.05)  # a byte every 50 ms: a minute
    lines = ["url,label", f"{server.url}/img/ok.jpg,a", f"{server.url}/img/slow.jpg,b"]
    server.files["/list.csv"] = ("\n".join(lines) + "\n").encode()
    spec = UrlsSource(kind="urls", uri=f"{server.url}/list.csv", max_image_seconds=1,
                      allow_private_addresses=True, retries=2)
    assert download("web", spec) == 1
    assert "more than sources.web.max_image_seconds = 1 s" in failures()[
        f"{server.url}/img/slow.jpg"]
    assert len(server.requests_for("/img/slow.jpg")) == 1  # refused, not retried
    assert not [p for p in in_tmp.rglob("*.part*")]
