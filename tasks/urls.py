"""A URL list (`url,label` rows) -> images in the download cache, concurrently and politely.

Every image is fetched with `tasks.fetch.download` (retries with backoff on
timeouts, 429 + Retry-After and 5xx; atomic rename), under two limits shared
by all threads of the process: `concurrency` connections in all and
`per_host` to any one host, so a list dominated by one CDN does not hammer
it. An image already in the cache is not fetched again, so a rerun fetches
only what is missing or failed before. Failures are returned, not raised:
refusals too (a file name that decodes to a path, a host on a private
address, a redirect off http(s), an image over its byte limit), each with
its reason, for failures.parquet.
"""

from __future__ import annotations

import hashlib
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

import httpx
import polars as pl
import pyarrow.parquet as pq

from tasks.fetch import USER_AGENT, FetchError, download
from tasks.http_guard import ByteLimit, TimeLimit
from tasks.images import IMAGE_SUFFIXES
from tasks.names import url_file_name


@dataclass(frozen=True)
class UrlRow:
    url: str
    label: str


@dataclass(frozen=True)
class Fetched:
    url: str
    label: str
    path: Path | None  # None: failed
    error: str = ""


class TooManyRows(ValueError):
    """A URL list with more rows than its limit; none of it was read or fetched."""


@dataclass(frozen=True)
class RowLimit:
    """At most `max_rows` rows in a URL list; `key` is the params key that sets it."""

    max_rows: int
    key: str

    def check(self, shown: str, rows: int, where: str = "") -> None:
        """Raise TooManyRows when `rows` (counted, or declared `where`) pass the limit."""
        if rows > self.max_rows:
            count = f"{rows:,} rows{where}" if where else f"more than {self.max_rows:,} rows"
            raise TooManyRows(f"{shown}: the URL list has {count}, over {self.key} = "
                              f"{self.max_rows:,}; nothing was fetched (raise the limit in "
                              "params.yaml if the list really is this long)")


def _parquet_columns(path: Path, limit: RowLimit | None, shown: str) -> list[str]:
    """A Parquet list's column names, once its metadata says it is within `limit`.

    Dictionary and run-length encodings store millions of equal rows in a few kilobytes, so
    the rows are counted from the footer (the file's count and its row groups') before any
    are decoded.
    """
    meta = pq.ParquetFile(path).metadata
    groups = sum(meta.row_group(i).num_rows for i in range(meta.num_row_groups))
    if limit:
        limit.check(shown, max(meta.num_rows, groups), " in its metadata")
    return meta.schema.to_arrow_schema().names


def read_url_list(path: Path, url_column: str, label_column: str, *,
                  limit: RowLimit | None = None, shown: str | None = None) -> list[UrlRow]:
    """The rows of a CSV, TSV (by its name) or Parquet URL list, within `limit`.

    A missing column is a clear error. Only the two columns are decoded, and never more than
    one row past the limit: a CSV is read until the limit is passed, a Parquet file is
    refused from its metadata. `shown` names the list in errors (its URL; else the file).
    """
    shown = shown or path.name
    n_rows = limit.max_rows + 1 if limit else None
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        columns = _parquet_columns(path, limit, shown)
    else:
        separator = "\t" if suffix == ".tsv" else ","
        columns = pl.read_csv(path, n_rows=0, separator=separator).columns
    missing = [c for c in (url_column, label_column) if c not in columns]
    if missing:
        raise ValueError(f"{shown}: missing columns {missing}; it has {columns}")
    wanted = [url_column, label_column]
    frame = (pl.read_parquet(path, columns=wanted, n_rows=n_rows) if suffix == ".parquet"
             else pl.read_csv(path, columns=wanted, n_rows=n_rows, separator=separator,
                              infer_schema_length=0))
    if limit:
        limit.check(shown, frame.height)
    return [UrlRow(str(url), str(label))
            for url, label in zip(frame[url_column], frame[label_column])]


def cached_path(cache: Path, url: str, source: str = "urls") -> Path:
    """Content of `url` lives at <cache>/<h[:2]>/<h><suffix>, h = sha256(url).

    The suffix comes from the URL's file name, decoded and checked first: a name that decodes
    to a path (`%2F`, `..`, NUL, a fullwidth solidus) is refused (UnsafeName), not guessed around.
    """
    digest = hashlib.sha256(url.encode()).hexdigest()[:32]
    suffix = Path(url_file_name(url, source=source, default="")).suffix.lower()
    return cache / digest[:2] / f"{digest}{suffix if suffix in IMAGE_SUFFIXES else '.jpg'}"


class Limits:
    """Connection limits and one pooled HTTP client, shared by every fetch in this process."""

    _shared: dict[tuple[int, int], "Limits"] = {}
    _lock = threading.Lock()

    def __init__(self, concurrency: int, per_host: int):
        self.total = threading.BoundedSemaphore(concurrency)
        self.per_host = per_host
        self._hosts: dict[str, threading.BoundedSemaphore] = {}
        # identity: a compressed response would be inflated in memory, past the byte limits,
        # and a Range offset counts encoded bytes. Redirects are followed as checked hops.
        headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
        self.client = httpx.Client(headers=headers,
                                   limits=httpx.Limits(max_connections=concurrency,
                                                       max_keepalive_connections=concurrency))

    @classmethod
    def shared(cls, concurrency: int, per_host: int) -> "Limits":
        with cls._lock:
            key = (concurrency, per_host)
            if key not in cls._shared:
                cls._shared[key] = cls(concurrency, per_host)
            return cls._shared[key]

    def gate(self, url: str) -> "_Gate":
        host = urlparse(url).netloc
        with self._lock:
            sem = self._hosts.setdefault(host, threading.BoundedSemaphore(self.per_host))
        return _Gate(self.total, sem)


class _Gate:
    def __init__(self, *sems: threading.BoundedSemaphore):
        self.sems = sems

    def __enter__(self) -> None:
        for s in self.sems:
            s.acquire()

    def __exit__(self, *exc) -> None:
        for s in reversed(self.sems):
            s.release()


def fetch_urls(rows: list[UrlRow], cache: Path, *, concurrency: int, per_host: int, retries: int,
               timeout_s: float, backoff_s: float,
               on_done: Callable[[Fetched], None] | None = None, limit: ByteLimit | None = None,
               allow_private: bool = False, source: str = "urls",
               time_limit: TimeLimit | None = None) -> list[Fetched]:
    """Fetch every row (already-cached ones return at once); results keep the rows' order.

    Each image is at most `limit` bytes and `time_limit` seconds (a trickling server must not
    hold a connection slot for ever); hosts (and redirect hops) must resolve to public
    addresses unless `allow_private`: a third party's list must not reach into your network.
    """
    limits = Limits.shared(concurrency, per_host)

    def one(row: UrlRow) -> Fetched:
        try:
            path = download(row.url, cached_path(cache, row.url, source), retries=retries,
                            backoff_s=backoff_s, timeout_s=timeout_s, client=limits.client,
                            gate=limits.gate(row.url), limit=limit, public_only=not allow_private,
                            time_limit=time_limit)
            result = Fetched(row.url, row.label, path)
        except (FetchError, httpx.HTTPError, httpx.InvalidURL, OSError, ValueError) as exc:
            why = str(exc).removeprefix(f"{source}: ").removeprefix(f"{row.url}: ")
            result = Fetched(row.url, row.label, None, why or type(exc).__name__)
        if on_done:
            on_done(result)
        return result

    # threads wait on the gates, so more threads than connections keeps every connection busy
    workers = min(len(rows), concurrency * 2) or 1
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fetch") as pool:
        return list(pool.map(one, rows))
