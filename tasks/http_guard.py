"""What a download may do: where its redirects go, which addresses it reaches, how many
bytes it writes, and when a partial file may be resumed.

Sources are untrusted (issue 11), so `tasks.http_download.download` asks this module first:

- a redirect must stay on http(s) and never go from https down to http;
- a URL list's hosts must resolve to public addresses (not loopback, private, link-local,
  unspecified, multicast or reserved) unless the source allows private ones; checked after DNS
  resolution, on every hop, and for an IPv6 address that embeds an IPv4 one (IPv4-mapped,
  NAT64, 6to4, Teredo) on that IPv4 address too;
- a download stops, and its `.part` is deleted, when it passes its byte limit (announced by
  Content-Length or counted as it streams) or its time limit (seconds spent on its requests,
  so a server that trickles a byte at a time, each within the read timeout, cannot hold it);
- a `.part` is resumed only with `If-Range` and the validator (strong ETag, or a strong
  Last-Modified date) of the response that began it, kept beside it in `<part>.meta.json`, so a
  file that changed upstream is fetched whole instead of spliced.
"""

from __future__ import annotations

import email.utils
import ipaddress
import json
import os
import socket
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Union
from urllib.parse import urlsplit

import httpx

MAX_REDIRECTS = 10
ALLOWED_SCHEMES = ("http", "https")
IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


class Refused(ValueError):
    """A download the rules forbid (redirect, address, size); retrying cannot change that."""


class TooLarge(Refused):
    """A download passed its byte limit; the message names the file, the limit and its key."""


class TooSlow(Refused):
    """A download passed its time limit; the message names the URL, the limit and its key."""


# -------------------------------------------------------------------- redirects


def check_redirect(src: str, dst: str) -> None:
    """Refuse a redirect to a scheme other than http(s), or from https down to plain http."""
    to = urlsplit(dst).scheme.lower()
    if to not in ALLOWED_SCHEMES:
        raise Refused(f"{src}: refused redirect to {dst!r}: only http(s) redirects are followed")
    if urlsplit(src).scheme.lower() == "https" and to == "http":
        raise Refused(f"{src}: refused redirect from https down to http ({dst})")


# -------------------------------------------------------------------- addresses


# NAT64's well-known prefix (RFC 6052): 64:ff9b::a.b.c.d is a.b.c.d, reached through a gateway.
NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def translated_ipv4(ip: ipaddress.IPv6Address) -> tuple[str, ipaddress.IPv4Address] | None:
    """(how, the IPv4 address) an IPv6 address stands for (IPv4-mapped, NAT64), or None.

    Such an address is the IPv4 one under another name: it is judged as that address alone,
    so `::ffff:127.0.0.1` is loopback and NAT64's `64:ff9b::808:808` is as public as 8.8.8.8.
    """
    if ip.ipv4_mapped is not None:
        return "an IPv4-mapped", ip.ipv4_mapped
    if ip in NAT64:
        return "a NAT64", ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def tunnelled_ipv4(ip: ipaddress.IPv6Address) -> list[tuple[str, ipaddress.IPv4Address]]:
    """(how, address) for each IPv4 address a tunnelled IPv6 address leads to: 6to4's router,
    Teredo's server and client. Packets to it go to those IPv4 hosts, so each must be public."""
    found = [("a 6to4", ip.sixtofour)] if ip.sixtofour is not None else []
    if ip.teredo is not None:
        server, client = ip.teredo
        found += [("a Teredo server", server), ("a Teredo client", client)]
    return found


def address_problem(ip: IPAddress) -> str | None:
    """Why a URL list may not reach `ip` (None for a public unicast address).

    An IPv6 address that embeds an IPv4 one (IPv4-mapped, NAT64, 6to4, Teredo) is judged by
    that IPv4 address too, and the reason names it: `2002:7f00:1::` leads to 127.0.0.1.
    """
    if isinstance(ip, ipaddress.IPv6Address):
        if (translated := translated_ipv4(ip)) is not None:
            how, v4 = translated
            why = address_problem(v4)
            return None if why is None else f"{how} address of {v4}, {why}"
        for how, v4 in tunnelled_ipv4(ip):
            if (why := address_problem(v4)) is not None:
                return f"{how} address of {v4}, {why}"
    for kind in ("loopback", "link_local", "unspecified", "multicast", "reserved", "private"):
        if getattr(ip, f"is_{kind}"):
            return f"{'an' if kind[0] == 'u' else 'a'} {kind.replace('_', '-')} address"
    return None if ip.is_global else "not a globally routable address"


def resolve_host(host: str, port: int) -> set[IPAddress]:
    """Every address `host` resolves to (what a connection to it may use)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return {ipaddress.ip_address(info[4][0].split("%", 1)[0]) for info in infos}


def check_public_address(url: str) -> None:
    """Refuse `url` when its host is, or resolves to, any address that is not public.

    Every address the name resolves to is checked, since the connection may use any of them.
    """
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        addresses, literal = {ipaddress.ip_address(host)}, True
    except ValueError:
        try:
            addresses = resolve_host(host, parts.port or (443 if parts.scheme == "https" else 80))
        except (OSError, UnicodeError) as exc:
            raise Refused(f"{url}: cannot resolve host {host!r} ({exc})") from None
        literal = False
    for ip in sorted(addresses, key=str):
        if (why := address_problem(ip)) is not None:
            shown = host if literal else f"{host} resolves to {ip}"
            raise Refused(f"{url}: refused address: {shown}, {why} "
                          "(set allow_private_addresses: true on the source to allow it)")


# ------------------------------------------------------------------------ sizes


def human_bytes(n: int) -> str:
    """1536 -> '1.5 KiB': limits in errors, readable."""
    size, unit = float(n), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            break
        size /= 1024
    return f"{size:.0f} B" if unit == "B" else f"{size:.1f} {unit}"


@dataclass(frozen=True)
class ByteLimit:
    """At most `max_bytes` per file; `key` is the params key that sets it (the error names it)."""

    max_bytes: int
    key: str

    def check(self, url: str, size: int, *, announced: bool = False) -> None:
        """Raise TooLarge when `size` bytes (announced, or counted so far) pass the limit."""
        if size > self.max_bytes:
            what = f"is {size} bytes" if announced else f"passed {self.max_bytes} bytes"
            raise TooLarge(f"{url}: the download {what}, over {self.key} = {self.max_bytes} "
                           f"({human_bytes(self.max_bytes)}); nothing was kept (raise the limit "
                           "in params.yaml if the file really is this large)")


def human_seconds(s: float) -> str:
    """21600 -> '6.0 h': limits in errors, readable."""
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    return f"{s / 60:.1f} min" if s >= 60 else f"{s:g} s"


@dataclass(frozen=True)
class TimeLimit:
    """At most `max_seconds` spent on one file's requests (all its attempts together); `key` is
    the params key that sets it."""

    max_seconds: float
    key: str

    def check(self, url: str, spent: float) -> None:
        """Raise TooSlow when `spent` seconds pass the limit."""
        if spent > self.max_seconds:
            raise TooSlow(f"{url}: the download took more than {self.key} = {self.max_seconds:g} "
                          f"s ({human_seconds(self.max_seconds)}); nothing was kept (raise the "
                          "limit in params.yaml if the server really is this slow)")


# ----------------------------------------------------------------------- resume


@dataclass(frozen=True)
class Validator:
    """What identifies the version of a file a `.part` holds: a strong ETag or Last-Modified."""

    url: str
    etag: str | None = None
    last_modified: str | None = None

    def if_range(self) -> str:
        """The If-Range value (RFC 9110 13.1.5): the ETag when there is one, else the date."""
        return self.etag or self.last_modified or ""


def _strong_date(last_modified: str | None, date: str | None) -> bool:
    """Last-Modified is strong when the Date is a second or more later (RFC 9110 8.8.2.2)."""
    try:
        lm = email.utils.parsedate_to_datetime(last_modified)
        now = email.utils.parsedate_to_datetime(date)
    except (TypeError, ValueError, IndexError):
        return False
    return (now - lm).total_seconds() >= 1


def validator_of(response: httpx.Response, url: str) -> Validator | None:
    """The validator a resume may use, or None (weak ETags and fresh dates cannot guard it)."""
    etag = response.headers.get("ETag")
    etag = etag if etag and not etag.startswith("W/") else None
    lm = response.headers.get("Last-Modified")
    lm = lm if _strong_date(lm, response.headers.get("Date")) else None
    return Validator(url, etag, lm) if etag or lm else None


def same_version(response: httpx.Response, validator: Validator) -> bool:
    """False when a 206 names another version than the `.part` (a server ignoring If-Range)."""
    etag, lm = response.headers.get("ETag"), response.headers.get("Last-Modified")
    if validator.etag:
        return etag is None or etag == validator.etag
    return lm is None or lm == validator.last_modified


def meta_path(part: Path) -> Path:
    return part.with_name(part.name + ".meta.json")


def save_validator(part: Path, validator: Validator | None) -> None:
    """Record (atomically) which version `part` holds; None forgets it (no resume then)."""
    meta = meta_path(part)
    if validator is None:
        meta.unlink(missing_ok=True)
        return
    tmp = meta.with_name(meta.name + ".tmp")
    tmp.write_text(json.dumps(asdict(validator)), encoding="utf-8")
    os.replace(tmp, meta)


def resumable(part: Path, url: str) -> tuple[int, Validator | None]:
    """(bytes to resume from, validator) for `part`; (0, None) when it must start over.

    A `.part` without a recorded validator for this very URL is deleted: resuming it could join
    two versions of a file.
    """
    if not part.is_file():
        return 0, None
    try:
        found = Validator(**json.loads(meta_path(part).read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        found = None
    if found is None or found.url != url or not found.if_range():
        discard(part)
        return 0, None
    return part.stat().st_size, found


def discard(part: Path) -> None:
    """Delete a `.part` and its validator: nothing half-downloaded is left to look complete."""
    part.unlink(missing_ok=True)
    meta_path(part).unlink(missing_ok=True)
