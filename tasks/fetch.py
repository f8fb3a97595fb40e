"""Getting a source's files onto this machine: HTTP with resume, Kaggle, safe extraction.

- `download` fetches one URL into a cache folder: it resumes a dropped
  connection with a Range request, retries timeouts, 429 (after its
  Retry-After) and 5xx with exponential backoff, checks the sha256, and
  renames the file into place only when it is complete and verified (until
  then it is `<name>.part`, which nothing reads as a finished download).
- `safe_extract` unpacks tar / tar.gz / zip after checking every entry:
  absolute paths, `..` components, links leading outside and device files
  are refused with the entry's name, before anything is written.
- `fetch` turns one `uri` (path, file://, http(s)://, kaggle://) into a
  local file or folder.
"""

from __future__ import annotations

import email.utils
import hashlib
import os
import re
import stat
import tarfile
import time
import zipfile
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path, PurePosixPath
from typing import Callable
from urllib.parse import unquote, urlparse

import httpx

from tasks.schemas import sha256_file

RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}
USER_AGENT = "guie-pipeline (+https://github.com/guie-pipeline)"


class FetchError(RuntimeError):
    """A download failed for good (after its retries, or with a status retrying cannot fix)."""


class ChecksumMismatch(FetchError):
    """The bytes arrived but are not the ones the params promise; nothing was kept."""


class UnsafeArchive(ValueError):
    """An archive entry would land outside the target folder (or is a device file)."""


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


def download(url: str, dest: Path, sha256: str | None = None, *, retries: int = 5, backoff_s: float = 1.0,
             timeout_s: float = 60.0, client: httpx.Client | None = None,
             progress: Callable[[int], None] | None = None,
             sleep: Callable[[float], None] = time.sleep,
             gate: AbstractContextManager | None = None, fresh: bool = False,
             on_size: Callable[[int], None] | None = None) -> Path:
    """GET `url` into `dest` (resuming, retrying, verified); returns `dest`.

    Waits between attempts are not spent holding `gate`. `progress` gets
    each chunk's size, `on_size` once the bytes still to come (for an ETA).

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
    client = client or httpx.Client(follow_redirects=True, headers={"User-Agent": USER_AGENT})
    attempt = 0
    sized = [on_size is None]

    def size_once(n: int) -> None:
        if not sized[0]:
            sized[0] = True
            on_size(n)

    try:
        while True:
            try:
                with gate or nullcontext():  # e.g. a per-host connection limit, held only while connected
                    _get_once(client, url, part, timeout_s, progress, size_once)
                break
            except (httpx.TransportError, _Retry) as exc:
                attempt += 1
                if attempt > retries:
                    raise FetchError(f"{url}: gave up after {retries} retries ({exc or type(exc).__name__})") from None
                sleep(backoff_wait(attempt, backoff_s, getattr(exc, "wait", None)))
    finally:
        if own:
            client.close()
    if sha256:
        got = sha256_file(part)
        if got != sha256.lower():
            part.unlink()
            raise ChecksumMismatch(f"{url}: sha256 is {got}, params expect {sha256.lower()}; "
                                   "the download was deleted (a changed file upstream, or a wrong sha256 in params.yaml)")
    os.replace(part, dest)
    return dest


def _get_once(client: httpx.Client, url: str, part: Path, timeout_s: float,
              progress: Callable[[int], None] | None, on_size: Callable[[int], None]) -> None:
    have = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    with client.stream("GET", url, headers=headers, timeout=timeout_s) as r:
        if r.status_code == 416 and have:  # our .part is already whole (or stale): start over
            part.unlink()
            raise _Retry("range not satisfiable", wait=0.0)
        if r.status_code in RETRY_STATUS or r.status_code >= 500:
            raise _Retry(f"HTTP {r.status_code}", wait=retry_after_seconds(r.headers.get("Retry-After")))
        if r.status_code not in (200, 206):
            raise FetchError(f"{url}: HTTP {r.status_code} {r.reason_phrase}")
        resumed = r.status_code == 206
        length = r.headers.get("Content-Length")
        expected = (have if resumed else 0) + int(length) if length and length.isdigit() else None
        if length and length.isdigit():
            on_size(int(length))
        with open(part, "ab" if resumed else "wb") as fh:
            for chunk in r.iter_bytes(1 << 20):
                fh.write(chunk)
                if progress:
                    progress(len(chunk))
    size = part.stat().st_size
    if expected is not None and size < expected:
        raise _Retry(f"connection dropped at {size} of {expected} bytes", wait=0.0)


# --------------------------------------------------------------------- archives


def is_archive(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith((".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".zip"))


def _check_name(name: str, archive: Path) -> PurePosixPath:
    posix = name.replace("\\", "/")
    if posix.startswith("/") or re.match(r"^[A-Za-z]:", posix):
        raise UnsafeArchive(f"{archive.name}: entry {name!r} has an absolute path; refusing to extract the archive")
    rel = PurePosixPath(posix)
    if ".." in rel.parts:
        raise UnsafeArchive(f"{archive.name}: entry {name!r} climbs out with '..'; refusing to extract the archive")
    return rel


def _inside(root: Path, rel: PurePosixPath) -> bool:
    target = os.path.normpath(os.path.join(root, *rel.parts))
    return target == str(root) or target.startswith(str(root) + os.sep)


def safe_extract(archive: Path, dest: Path) -> int:
    """Extract a tar/zip into `dest` after vetting every entry; returns the number of files."""
    dest = Path(dest).resolve()
    dest.mkdir(parents=True, exist_ok=True)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
            for info in infos:
                _check_name(info.filename, archive)
                if stat.S_ISLNK(info.external_attr >> 16):
                    raise UnsafeArchive(f"{archive.name}: entry {info.filename!r} is a symbolic link; refusing to extract")
            zf.extractall(dest)
            return sum(not i.is_dir() for i in infos)
    if tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            members = tf.getmembers()
            for m in members:
                rel = _check_name(m.name, archive)
                if m.isdev() or m.isfifo():
                    raise UnsafeArchive(f"{archive.name}: entry {m.name!r} is a device or pipe; refusing to extract")
                if m.issym() or m.islnk():
                    base = rel.parent if m.issym() else PurePosixPath()
                    link = m.linkname.replace("\\", "/")
                    if link.startswith("/") or not _inside(dest, base / PurePosixPath(link)):
                        raise UnsafeArchive(f"{archive.name}: link {m.name!r} -> {m.linkname!r} points outside the "
                                            "target folder; refusing to extract")
            tf.extractall(dest, filter="data")  # the stdlib's own guard, on top of ours
            return sum(m.isfile() for m in members)
    raise UnsafeArchive(f"{archive.name}: neither a tar nor a zip archive")


# ------------------------------------------------------------------------ kaggle

KAGGLE_HELP = (
    "Kaggle needs an API token: on https://www.kaggle.com/settings choose 'Create New Token', save the "
    "downloaded kaggle.json as ~/.kaggle/kaggle.json (chmod 600), or set KAGGLE_USERNAME and KAGGLE_KEY; "
    "then accept the competition's rules on its Kaggle page once."
)


def kaggle_credentials() -> bool:
    if os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY"):
        return True
    if os.environ.get("KAGGLE_API_TOKEN"):
        return True
    config = Path(os.environ.get("KAGGLE_CONFIG_DIR", Path.home() / ".kaggle"))
    return (config / "kaggle.json").is_file() or (config / "access_token").is_file()


def parse_kaggle(uri: str) -> tuple[str, str]:
    """kaggle://competitions/<name> or kaggle://datasets/<owner>/<name> -> (kind, ref)."""
    parsed = urlparse(uri)
    ref = (parsed.netloc + parsed.path).strip("/")
    kind, _, rest = ref.partition("/")
    if kind == "competitions" and rest and "/" not in rest:
        return kind, rest
    if kind == "datasets" and rest.count("/") == 1:
        return kind, rest
    raise ValueError(f"{uri!r}: expected kaggle://competitions/<name> or kaggle://datasets/<owner>/<name>")


def kaggle_download(uri: str, cache: Path) -> Path:
    """Download a Kaggle competition's or dataset's files (a zip) into `cache`; returns the zip."""
    kind, ref = parse_kaggle(uri)
    if not kaggle_credentials():
        raise FetchError(f"{uri}: no Kaggle credentials found. {KAGGLE_HELP}")
    try:
        from kaggle.api.kaggle_api_extended import KaggleApi
    except ImportError:
        raise FetchError(f"{uri}: the kaggle package is not installed: pip install 'guie-pipeline[kaggle]'") from None
    api = KaggleApi()
    api.authenticate()
    out = cache / "kaggle" / kind / ref.replace("/", "__")
    out.mkdir(parents=True, exist_ok=True)
    if kind == "competitions":
        api.competition_download_files(ref, path=str(out), quiet=False)
    else:
        api.dataset_download_files(ref, path=str(out), quiet=False, unzip=False)
    zips = sorted(out.glob("*.zip"))
    if not zips:
        raise FetchError(f"{uri}: Kaggle returned no archive in {out}")
    return zips[0]


# ------------------------------------------------------------------------- fetch


def cache_name(url: str) -> str:
    """Where a URL's download lives in the cache: a hash of the URL, then its file name."""
    name = unquote(Path(urlparse(url).path).name) or "download"
    return f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{name}"


def local_path(url: str) -> Path | None:
    """The file or folder a path or file:// uri names; None for http(s):// and kaggle://."""
    parsed = urlparse(url)
    if parsed.scheme in ("http", "https", "kaggle"):
        return None
    if parsed.scheme not in ("", "file"):
        raise ValueError(f"{url!r}: allowed are a path, file://, http(s):// and kaggle://")
    return Path(unquote(parsed.path) if parsed.scheme == "file" else url)


def fetch(url: str, sha256: str | None, cache: Path, progress: Callable[[int], None] | None = None,
          fresh: bool = False, on_size: Callable[[int], None] | None = None) -> Path:
    """A local path for one uri: local paths as they are, http(s) downloaded, kaggle through its API."""
    path = local_path(url)
    if path is None:
        if urlparse(url).scheme == "kaggle":
            return kaggle_download(url, cache)
        return download(url, cache / cache_name(url), sha256, progress=progress, fresh=fresh and not sha256,
                        on_size=on_size)
    if not path.exists():
        raise FileNotFoundError(f"{url}: no such file or folder")
    if sha256 and path.is_file() and (got := sha256_file(path)) != sha256.lower():
        raise ChecksumMismatch(f"{url}: sha256 is {got}, params expect {sha256.lower()}")
    return path
