"""One URL over HTTP(S) into a file: resumed, retried, verified, within the rules of http_guard.

`download` fetches one URL into a cache folder: it resumes a dropped
connection with a Range request guarded by If-Range, retries timeouts, 429
(after its Retry-After) and 5xx with exponential backoff, checks the
sha256, and renames the file into place only when it is complete and
verified (until then it is `<name>.part`, which nothing reads as a finished
download). Redirects, addresses, byte and time limits are checked on the way
(tasks/http_guard.py says what is refused and why).
"""

from __future__ import annotations

import email.utils
import os
import time
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Callable, Iterator

import httpx

from tasks.http_guard import (MAX_REDIRECTS, ByteLimit, Refused, TimeLimit, check_public_address,
                              check_redirect, discard, resumable, same_version, save_validator,
                              validator_of)
from tasks.schemas.io import sha256_file

RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}
USER_AGENT = "guie-pipeline (+https://github.com/guie-pipeline)"
# A read cut short by the time limit ends this far past it, so the limit's check sees it passed.
PAST_LIMIT_S = 0.1


class FetchError(RuntimeError):
    """A download failed for good (after its retries, or with a status retrying cannot fix)."""


class ChecksumMismatch(FetchError):
    """The bytes arrived but are not the ones the params promise; nothing was kept."""


class _Retry(Exception):
    def __init__(self, reason: str, wait: float | None = None):
        super().__init__(reason)
        self.wait = wait


def retry_after_seconds(value: str | None) -> float | None:
    """Retry-After as seconds: either a number or an HTTP date (RFC 9110)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def backoff_wait(attempt: int, backoff_s: float, hint: float | None, cap: float = 120.0) -> float:
    """The server's Retry-After when it gives one, else backoff_s * 2^(attempt-1), capped."""
    return min(cap, hint) if hint is not None else min(cap, backoff_s * 2 ** (attempt - 1))


class _Clock:
    """The seconds one download has spent on its requests, against its TimeLimit.

    Only time connected counts (a hostile server controls it), not waits for a gate (other
    downloads' turns) or between retries (bounded by the retries and their cap).
    """

    def __init__(self, url: str, limit: TimeLimit | None):
        self.url, self.limit, self.spent, self.since = url, limit, 0.0, None

    @contextmanager
    def running(self) -> Iterator[None]:
        self.since = time.monotonic()
        try:
            yield
        finally:
            self.spent, self.since = self.elapsed(), None

    def elapsed(self) -> float:
        return self.spent + (time.monotonic() - self.since if self.since is not None else 0.0)

    def check(self) -> None:
        """Raise TooSlow once the limit is passed."""
        if self.limit:
            self.limit.check(self.url, self.elapsed())

    def timeout(self, timeout_s: float) -> float:
        """The read timeout for a request sent now: no read may wait past the limit."""
        if not self.limit:
            return timeout_s
        left = self.limit.max_seconds - self.elapsed()
        return min(timeout_s, max(0.0, left) + PAST_LIMIT_S)


def download(url: str, dest: Path, sha256: str | None = None, *, retries: int = 5,
             backoff_s: float = 1.0, timeout_s: float = 60.0, client: httpx.Client | None = None,
             progress: Callable[[int], None] | None = None,
             sleep: Callable[[float], None] = time.sleep,
             gate: AbstractContextManager | None = None, fresh: bool = False,
             on_size: Callable[[int], None] | None = None, limit: ByteLimit | None = None,
             public_only: bool = False, time_limit: TimeLimit | None = None) -> Path:
    """GET `url` into `dest` (resuming, retrying, verified, within `limit` and `time_limit`).

    Waits between attempts are not spent holding `gate`. `progress` gets
    each chunk's size, `on_size` once the bytes still to come (for an ETA).
    Redirects stay on http(s) and never downgrade https; `public_only` (URL
    lists) also refuses hosts that resolve to non-public addresses, on
    every hop. `time_limit` bounds the seconds spent on requests, all
    attempts together, checked at every read (a slow-loris server trickling
    bytes is cut off). A refusal (`http_guard.Refused`, TooLarge and TooSlow
    included) is not retried and leaves no `.part` behind. Returns `dest`.

    An existing `dest` is trusted when no sha256 is given or it matches: a
    rerun fetches nothing it already has (unless `fresh`: small files that
    change upstream, such as a URL list).
    """
    dest = Path(dest)
    if not fresh and dest.is_file() and (sha256 is None or sha256_file(dest) == sha256.lower()):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    own = client is None
    # identity: a compressed body would be inflated in memory past the limits, and a Range
    # offset counts the encoded bytes, not the decoded ones we store
    client = client or httpx.Client(headers={"User-Agent": USER_AGENT,
                                             "Accept-Encoding": "identity"})
    attempt = 0
    sized = [on_size is None]
    clock = _Clock(url, time_limit)

    def size_once(n: int) -> None:
        if not sized[0]:
            sized[0] = True
            on_size(n)

    try:
        while True:
            try:
                # the gate (a per-host limit) is held, and the clock runs, only while connected
                with gate or nullcontext(), clock.running():
                    _get_once(client, url, part, timeout_s, progress, size_once, limit,
                              public_only, clock)
                break
            except (httpx.TransportError, _Retry) as exc:
                clock.check()  # a read cut off at the time limit is that limit's error
                attempt += 1
                if attempt > retries:
                    why = exc or type(exc).__name__
                    raise FetchError(f"{url}: gave up after {retries} retries ({why})") from None
                sleep(backoff_wait(attempt, backoff_s, getattr(exc, "wait", None)))
    except Refused:
        discard(part)
        raise
    finally:
        if own:
            client.close()
    if sha256 and (got := sha256_file(part)) != sha256.lower():
        discard(part)
        raise ChecksumMismatch(f"{url}: sha256 is {got}, params expect {sha256.lower()}; the "
                               "download was deleted (a changed file upstream, or a wrong sha256 "
                               "in params.yaml)")
    os.replace(part, dest)
    save_validator(part, None)
    return dest


@contextmanager
def _open(client: httpx.Client, url: str, headers: dict[str, str], timeout_s: float,
          public_only: bool, clock: _Clock) -> Iterator[httpx.Response]:
    """The response at the end of `url`'s redirects, each hop checked before it is requested."""
    request = client.build_request("GET", url, headers=headers, timeout=clock.timeout(timeout_s))
    for _ in range(MAX_REDIRECTS + 1):
        clock.check()
        if public_only:
            check_public_address(str(request.url))
        response = client.send(request, stream=True, follow_redirects=False)
        if response.next_request is None:
            break
        response.close()
        check_redirect(str(request.url), str(response.next_request.url))
        request = response.next_request
        request.extensions["timeout"] = httpx.Timeout(clock.timeout(timeout_s)).as_dict()
    else:
        raise Refused(f"{url}: more than {MAX_REDIRECTS} redirects")
    try:
        yield response
    finally:
        response.close()


def _get_once(client: httpx.Client, url: str, part: Path, timeout_s: float,
              progress: Callable[[int], None] | None, on_size: Callable[[int], None],
              limit: ByteLimit | None, public_only: bool, clock: _Clock) -> None:
    """One request: resume `part` (If-Range) or start it over, writing at most `limit` bytes
    and stopping when `clock` passes its limit."""
    have, validator = resumable(part, url)
    headers = {"Range": f"bytes={have}-", "If-Range": validator.if_range()} if have else {}
    with _open(client, url, headers, timeout_s, public_only, clock) as r:
        if r.status_code == 416 and have:  # our .part is already whole (or stale): start over
            discard(part)
            raise _Retry("range not satisfiable", wait=0.0)
        if r.status_code in RETRY_STATUS or r.status_code >= 500:
            wait = retry_after_seconds(r.headers.get("Retry-After"))
            raise _Retry(f"HTTP {r.status_code}", wait=wait)
        if r.status_code not in (200, 206) or (r.status_code == 206 and not have):
            raise FetchError(f"{url}: HTTP {r.status_code} {r.reason_phrase}")
        resumed = r.status_code == 206
        if resumed and not (_range_start(r) == have and same_version(r, validator)):
            discard(part)  # a 206 of another offset or version: joining it would corrupt the file
            raise _Retry("the server resumed another version of the file", wait=0.0)
        if not resumed:  # the whole file (a 200 to If-Range means it changed): start over
            have = 0
            save_validator(part, validator_of(r, url))
        length = r.headers.get("Content-Length")
        expected = have + int(length) if length and length.isdigit() else None
        total = _range_total(r) if resumed else None
        if total is not None:
            expected = total  # a 206 of part of the rest: the next attempt asks for what is left
        if limit and expected is not None:
            limit.check(url, expected, announced=True)
        if length and length.isdigit():
            on_size(int(length))
        written = have
        with open(part, "ab" if resumed else "wb") as fh:
            for chunk in r.iter_bytes():  # as each read returns: a trickle is seen, not buffered
                written += len(chunk)
                if limit:
                    limit.check(url, written)
                clock.check()
                fh.write(chunk)
                if progress:
                    progress(len(chunk))
    size = part.stat().st_size
    if expected is not None and size < expected:
        raise _Retry(f"connection dropped at {size} of {expected} bytes", wait=0.0)


def _range_total(response: httpx.Response) -> int | None:
    """The whole file's size a 206's Content-Range gives (`bytes <start>-<end>/<total>`)."""
    total = response.headers.get("Content-Range", "").rpartition("/")[2]
    return int(total) if total.isdigit() else None


def _range_start(response: httpx.Response) -> int | None:
    """The first byte a 206's Content-Range covers (`bytes <start>-<end>/<total>`)."""
    unit, _, spec = response.headers.get("Content-Range", "").partition(" ")
    start = spec.partition("-")[0]
    return int(start) if unit == "bytes" and start.isdigit() else None
