"""Downloads that cannot hurt, against a real loopback HTTP(S) server: names checked after
decoding, byte limits, redirects and private addresses (issue 11; resumes: test_resume.py)."""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import ssl
import time
from pathlib import Path

import httpx
import pytest

from loopback import Fault, Loopback
from tasks import http_guard
from tasks.fetch import FetchError, cache_name, download, fetch, local_path
from tasks.http_guard import (ByteLimit, Refused, TimeLimit, TooLarge, TooSlow,
                              check_public_address, check_redirect)
from tasks.names import UnsafeName

BLOB = os.urandom(3 * 1024 * 1024 + 17)


@pytest.fixture
def server():
    with Loopback() as srv:
        srv.files["/data.tar"] = BLOB
        yield srv


def files_under(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


# ------------------------------------------------------------------------------ names

# the last segment of each URL decodes to something that is not one file name
EVIL_NAMES = {
    "encoded slash": "x%2F..%2F..%2Fevil.sh",
    "encoded backslash": "x%5C..%5C..%5Cevil.bat",
    "encoded NUL": "evil.sh%00.jpg",
    "dot-dot": "%2E%2E",
    "absolute path": "%2Fetc%2Fcron.d%2Fevil",
    "Windows drive": "C:%5CWindows%5Cevil.exe",
    "drive-relative": "c:evil.exe",
    "over NAME_MAX": "x" * 256,
    "cache name over NAME_MAX": "y" * 230,  # fine alone, not with the hash and `.part.meta.json`
    "fullwidth dot-dot-slash": "%EF%BC%8E%EF%BC%8E%EF%BC%8Fevil.sh",  # ．．／evil.sh, NFKC ../
    "fullwidth backslash": "a%EF%BC%BCb",
}


@pytest.mark.parametrize("segment", list(EVIL_NAMES.values()), ids=list(EVIL_NAMES))
def test_a_dataset_url_whose_name_decodes_to_a_path_is_refused_before_any_request(
        server, tmp_path, segment):
    project = tmp_path / "project"
    cache = project / ".cache" / "downloads"
    cache.mkdir(parents=True)
    url = f"{server.url}/files/{segment}"
    server.files[f"/files/{segment}"] = b"#!/bin/sh\necho owned\n"
    with pytest.raises(UnsafeName) as info:
        fetch(url, None, cache, source="sources.evil")
    assert str(info.value).startswith(f"sources.evil: {url}: refused")
    assert server.requests == []  # refused from the name alone
    assert files_under(tmp_path) == {"project", "project/.cache", "project/.cache/downloads"}


def test_the_reported_traversal_lands_inside_the_cache_no_more(server, tmp_path):
    """Issue 11's report: `%2F..%2F..%2F..%2Fevil.sh` used to be written to <project>/evil.sh."""
    cache = tmp_path / "project" / ".cache" / "downloads"
    with pytest.raises(UnsafeName, match="a path separator"):
        cache_name(f"{server.url}/x%2F..%2F..%2F..%2Fevil.sh", source="sources.glr")
    assert not (tmp_path / "project" / "evil.sh").exists() and not cache.exists()


def test_ordinary_names_are_decoded_once_and_kept(server, tmp_path):
    server.files["/a/b%20c%252F.tar"] = BLOB
    path = fetch(f"{server.url}/a/b%20c%252F.tar", None, tmp_path, source="sources.ok")
    assert path.parent == tmp_path and path.name.endswith("-b c%2F.tar")
    assert path.read_bytes() == BLOB


@pytest.mark.parametrize("uri, why", [
    ("file://evil.example/etc/passwd", "names host"),
    ("file:///data/%2E%2E/etc/passwd", "current or parent folder"),
    ("file:///data/a%00b", "a control character"),
    ("file:///data/%EF%BC%8E%EF%BC%8E/x", "current or parent folder"),
])
def test_file_uris_are_checked_after_decoding(uri, why):
    with pytest.raises(UnsafeName, match=why):
        local_path(uri, source="sources.local")


def test_a_plain_file_uri_still_names_its_file(tmp_path):
    (tmp_path / "a b").mkdir()
    assert local_path(f"file://{tmp_path}/a%20b") == tmp_path / "a b"


# ------------------------------------------------------------------------------ sizes

LIMIT = ByteLimit(1024 * 1024, "sources.glr.max_download_bytes")


def test_a_download_announced_over_its_limit_stops_before_the_body(server, tmp_path):
    with pytest.raises(TooLarge) as info:
        download(f"{server.url}/data.tar", tmp_path / "d.tar", limit=LIMIT)
    message = str(info.value)
    assert f"{server.url}/data.tar" in message
    assert "sources.glr.max_download_bytes = 1048576" in message
    assert "1.0 MiB" in message and f"is {len(BLOB)} bytes" in message
    assert list(tmp_path.iterdir()) == []  # no .part, no .part.meta.json
    assert len(server.requests) == 1  # not retried


def test_a_download_without_length_is_counted_and_cut_at_its_limit(server, tmp_path):
    server.faults["/data.tar"] = Fault(no_length=True)
    with pytest.raises(TooLarge, match="passed 1048576 bytes, over sources.glr.max_download"):
        download(f"{server.url}/data.tar", tmp_path / "d.tar", limit=LIMIT)
    assert list(tmp_path.iterdir()) == []


def test_a_resumed_download_counts_the_bytes_it_already_has(server, tmp_path):
    server.faults["/data.tar"] = Fault(drop_after=1024 * 1024)
    with pytest.raises(FetchError, match="gave up"):
        download(f"{server.url}/data.tar", tmp_path / "d.tar", retries=0)
    assert (tmp_path / "d.tar.part").stat().st_size == 1024 * 1024
    limit = ByteLimit(len(BLOB) - 1, "sources.x.max_download_bytes")
    with pytest.raises(TooLarge, match=f"is {len(BLOB)} bytes"):
        download(f"{server.url}/data.tar", tmp_path / "d.tar", limit=limit)
    assert list(tmp_path.iterdir()) == []


def test_a_download_within_its_limit_arrives(server, tmp_path):
    limit = ByteLimit(len(BLOB), "k")
    assert download(f"{server.url}/data.tar", tmp_path / "d", limit=limit).read_bytes() == BLOB


# ------------------------------------------------------------------------------- time

SLOW = TimeLimit(1.0, "sources.glr.max_download_seconds")


def test_a_server_that_trickles_its_body_is_cut_off_at_the_time_limit(server, tmp_path):
    """A byte every 50 ms is well within any read timeout, and would take 10 s for 200 bytes."""
    server.files["/slow.tar"] = bytes(200)
    server.faults["/slow.tar"] = Fault(trickle_s=0.05)
    url = f"{server.url}/slow.tar"
    start = time.monotonic()
    with pytest.raises(TooSlow) as info:
        download(url, tmp_path / "d.tar", timeout_s=5.0, time_limit=SLOW)
    assert 1.0 < time.monotonic() - start < 3.0
    assert str(info.value).startswith(
        f"{url}: the download took more than sources.glr.max_download_seconds = 1 s (1 s); "
        "nothing was kept (raise the limit in params.yaml")
    assert list(tmp_path.iterdir()) == [] and len(server.requests) == 1  # no .part, no retry


def test_a_server_that_stalls_is_cut_off_at_the_time_limit_not_the_read_timeout(
        server, tmp_path):
    server.faults["/data.tar"] = Fault(delay_s=4.0)
    start = time.monotonic()
    with pytest.raises(TooSlow, match="max_download_seconds = 1 s"):
        download(f"{server.url}/data.tar", tmp_path / "d.tar", timeout_s=60.0, time_limit=SLOW)
    assert time.monotonic() - start < 2.0


def test_the_time_limit_counts_every_attempt(server, tmp_path):
    """Slow errors, retried: the time on each request adds up (the waits between do not)."""
    server.faults["/data.tar"] = Fault(errors=[503] * 50, delay_s=0.3)
    with pytest.raises(TooSlow, match="max_download_seconds = 1 s"):
        download(f"{server.url}/data.tar", tmp_path / "d.tar", retries=50, backoff_s=0.5,
                 sleep=lambda s: None, time_limit=SLOW)
    assert 3 <= len(server.requests) <= 5


def test_a_download_within_its_time_limit_arrives(server, tmp_path):
    server.files["/slow.tar"] = bytes(10)
    server.faults["/slow.tar"] = Fault(trickle_s=0.05)
    got = download(f"{server.url}/slow.tar", tmp_path / "d", time_limit=SLOW)
    assert got.read_bytes() == bytes(10)


# -------------------------------------------------------------------------- redirects


@pytest.mark.parametrize("location", ["ftp://127.0.0.1/data.tar", "file:///etc/passwd",
                                      "gopher://127.0.0.1:70/x"])
def test_redirects_off_http_are_refused(server, tmp_path, location):
    server.faults["/moved"] = Fault(redirect=location)
    with pytest.raises(Refused, match="only http\\(s\\) redirects are followed"):
        download(f"{server.url}/moved", tmp_path / "d")
    assert list(tmp_path.iterdir()) == [] and len(server.requests) == 1


def test_http_redirects_are_followed_and_loops_are_cut(server, tmp_path):
    server.faults["/old"] = Fault(redirect="/data.tar")  # relative Location, as RFC 9110 allows
    assert download(f"{server.url}/old", tmp_path / "d").read_bytes() == BLOB
    server.faults["/loop"] = Fault(redirect="/loop")
    with pytest.raises(Refused, match="more than 10 redirects"):
        download(f"{server.url}/loop", tmp_path / "e")


@pytest.fixture
def tls_server(tmp_path):
    """The loopback server over HTTPS with a throwaway self-signed certificate for 127.0.0.1."""
    from cryptography import x509  # prefect's own dependency
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    here = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(here, critical=False).sign(key, hashes.SHA256()))
    pem = tmp_path / "cert.pem"
    pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(pem)
    with Loopback(tls=server_ctx) as srv:
        yield srv, ssl.create_default_context(cafile=str(pem))


def test_https_to_http_downgrade_is_refused(tls_server, server, tmp_path):
    https, client_ctx = tls_server
    https.files["/data.tar"] = BLOB
    https.faults["/moved"] = Fault(redirect=f"{server.url}/data.tar")
    with httpx.Client(verify=client_ctx) as client:
        ok = download(f"{https.url}/data.tar", tmp_path / "ok", client=client)
        assert ok.read_bytes() == BLOB
        with pytest.raises(Refused, match="from https down to http"):
            download(f"{https.url}/moved", tmp_path / "d", client=client)
    assert server.requests == [] and not (tmp_path / "d").exists()


def test_check_redirect_rules():
    check_redirect("http://a/x", "https://b/y")  # upgrades and other hosts are fine
    check_redirect("https://a/x", "https://b/y")
    with pytest.raises(Refused, match="down to http"):
        check_redirect("https://a/x", "HTTP://a/x")
    with pytest.raises(Refused, match="only http"):
        check_redirect("http://a/x", "javascript:alert(1)")


# -------------------------------------------------------------------------- addresses


@pytest.mark.parametrize("url, why", [
    ("http://127.0.0.1:8080/x", "a loopback address"),
    ("http://localhost/x", "localhost resolves to 127.0.0.1, a loopback address"),  # getaddrinfo
    ("http://10.0.0.7/x", "a private address"),
    ("http://192.168.1.1/x", "a private address"),
    ("http://169.254.169.254/latest/meta-data/", "a link-local address"),  # cloud metadata
    ("http://0.0.0.0/x", "an unspecified address"),
    ("http://[::1]/x", "a loopback address"),
    ("http://[fe80::1]/x", "a link-local address"),
    ("http://[fc00::1]/x", "a private address"),
    ("http://[::ffff:127.0.0.1]/x", "a loopback address"),  # IPv4-mapped
    ("http://224.0.0.1/x", "a multicast address"),
    ("http://240.0.0.1/x", "a reserved address"),
    ("http://100.64.0.1/x", "not a globally routable address"),  # carrier-grade NAT
])
def test_non_public_addresses_are_refused(url, why):
    with pytest.raises(Refused, match=why):
        check_public_address(url)


def test_public_addresses_pass():
    check_public_address("http://8.8.8.8/x")
    check_public_address("https://[2606:4700:4700::1111]/x")
    check_public_address("http://[::ffff:8.8.8.8]/x")  # IPv4-mapped 8.8.8.8
    check_public_address("http://[64:ff9b::808:808]/x")  # 8.8.8.8 through NAT64 (IPv6-only nets)


# IPv6 addresses that lead to an IPv4 address inside your network
EMBEDDED = [
    ("::ffff:10.0.0.1", "an IPv4-mapped address of 10.0.0.1, a private address"),
    ("::ffff:169.254.169.254", "an IPv4-mapped address of 169.254.169.254, a link-local"),
    ("64:ff9b::7f00:1", "a NAT64 address of 127.0.0.1, a loopback address"),
    ("64:ff9b::a9fe:a9fe", "a NAT64 address of 169.254.169.254, a link-local address"),
    ("64:ff9b::c0a8:101", "a NAT64 address of 192.168.1.1, a private address"),
    ("2002:7f00:1::", "a 6to4 address of 127.0.0.1, a loopback address"),
    ("2002:a00:1::1", "a 6to4 address of 10.0.0.1, a private address"),
    ("2002:a9fe:a9fe::1", "a 6to4 address of 169.254.169.254, a link-local address"),
    # Teredo: 2001:0:<server>:<flags>:<port>:<client>, the client's bits inverted
    ("2001:0:4136:e378:8000:63bf:80ff:fffe", "a Teredo client address of 127.0.0.1, a loopback"),
    ("2001:0:4136:e378:8000:63bf:f5ff:fffe", "a Teredo client address of 10.0.0.1, a private"),
    ("2001:0:a00:1:8000:63bf:f7f7:f7f7", "a Teredo server address of 10.0.0.1, a private"),
]


@pytest.mark.parametrize("address, why", EMBEDDED)
def test_an_ipv6_address_is_judged_by_the_ipv4_address_it_embeds(address, why):
    with pytest.raises(Refused, match=re.escape(f"refused address: {address}, {why}")):
        check_public_address(f"http://[{address}]:8080/x.jpg")


def test_a_host_resolving_to_an_embedding_ipv6_address_is_refused(server, tmp_path,
                                                                    monkeypatch):
    """DNS may answer with such an address (a hostile zone's AAAA record): every address a name
    resolves to is judged, and nothing is asked of the host."""
    monkeypatch.setattr(http_guard, "resolve_host", lambda host, port: {
        ipaddress.ip_address("93.184.216.34"), ipaddress.ip_address("2002:7f00:1::")})
    port = server.server.server_address[1]
    url = f"http://images.example:{port}/data.tar"
    with pytest.raises(Refused, match="images.example resolves to 2002:7f00:1::, a 6to4 address "
                                      "of 127.0.0.1, a loopback address"):
        download(url, tmp_path / "d", public_only=True)
    for address, _ in EMBEDDED:
        with pytest.raises(Refused, match="allow_private_addresses: true"):
            download(f"http://[{address}]:{port}/data.tar", tmp_path / "d", public_only=True)
    assert server.requests == [] and list(tmp_path.iterdir()) == []


def test_every_redirect_hop_is_checked_after_resolution(server, tmp_path, monkeypatch):
    """A host that resolves to a public address, redirecting to a private one, is refused at
    the hop (DNS is the one thing offline tests cannot run: `localhost` is declared public)."""
    real = http_guard.resolve_host
    monkeypatch.setattr(http_guard, "resolve_host", lambda host, port: (
        {ipaddress.ip_address("93.184.216.34")} if host == "localhost" else real(host, port)))
    port = server.server.server_address[1]
    server.faults["/hop"] = Fault(redirect=f"http://127.0.0.1:{port}/data.tar")
    ok = download(f"http://localhost:{port}/data.tar", tmp_path / "ok", public_only=True)
    assert ok.read_bytes() == BLOB
    with pytest.raises(Refused, match="127.0.0.1, a loopback address"):
        download(f"http://localhost:{port}/hop", tmp_path / "d", public_only=True)
    assert [r.path for r in server.requests] == ["/data.tar", "/hop"]  # never /data.tar again
    assert not (tmp_path / "d").exists()


def test_private_addresses_are_only_refused_when_asked(server, tmp_path):
    with pytest.raises(Refused, match="allow_private_addresses: true"):
        download(f"{server.url}/data.tar", tmp_path / "d", public_only=True)
    assert server.requests == []
    assert download(f"{server.url}/data.tar", tmp_path / "d").read_bytes() == BLOB


# ----------------------------------------------------------------- through the stage


def test_a_dataset_source_stops_at_an_unsafe_name_naming_source_and_entry(in_tmp, server):
    from flows.download import download
    from tasks.params.sources import CsvSource

    segment = EVIL_NAMES["encoded slash"]
    server.files[f"/{segment}"] = b"#!/bin/sh\n"
    url = f"{server.url}/{segment}"
    with pytest.raises(UnsafeName, match=rf"sources.evil: {re.escape(url)}: refused name"):
        download("evil", CsvSource(kind="csv", uri=[url, f"{server.url}/data.tar"]))
    assert not [p for p in in_tmp.rglob("*evil*")]


def test_a_dataset_download_over_its_time_limit_names_source_file_and_limit(in_tmp, server):
    from flows.download import download
    from tasks.params.sources import CsvSource

    assert CsvSource(kind="csv", uri="x").max_download_seconds == 6 * 3600
    server.files["/slow.tar"] = bytes(200)
    server.faults["/slow.tar"] = Fault(trickle_s=0.05)
    url = f"{server.url}/slow.tar"
    with pytest.raises(TooSlow, match=rf"{re.escape(url)}: .* sources.slow.max_download_seconds"):
        download("slow", CsvSource(kind="csv", uri=url, max_download_seconds=1))
    assert not [p for p in in_tmp.rglob("*.part*")]
    assert len(server.requests) == 1  # a refusal is not retried by Prefect either


def test_a_dataset_download_over_its_limit_names_source_file_and_limit(in_tmp, server):
    from flows.download import download
    from tasks.params.sources import CsvSource

    url = f"{server.url}/data.tar"
    with pytest.raises(TooLarge, match=rf"{re.escape(url)}: .* over sources.big.max_download"):
        download("big", CsvSource(kind="csv", uri=url, max_download_bytes=1000))
    assert not [p for p in in_tmp.rglob("*.part*")]
    assert len(server.requests) == 1  # a refusal is not retried by Prefect either
