"""Getting a source's files onto this machine: HTTP and Kaggle (archives: tasks/archives.py).

- `download` (tasks/http_download.py) fetches one URL into the download
  cache: resumed with If-Range, retried, verified, within a byte limit, on
  redirects and addresses that tasks/http_guard.py allows.
- `fetch` turns one `uri` (path, file://, http(s)://, kaggle://) into a
  local file or folder; names taken from a URL are checked after decoding
  (tasks/names.py), so a download never lands outside the cache.
- `kaggle_download` runs Kaggle's client in a scratch folder (one a killed
  run left is deleted), refuses what Kaggle lists as over the byte limit
  before it starts, checks the zip, and keeps the token out of the client's
  logs, prints and errors.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import os
import sys
import threading
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import unquote, urlparse, urlsplit

# download and its errors are used through this module too (one place to import fetching from)
from tasks.http_download import (USER_AGENT, ChecksumMismatch, FetchError,  # noqa: F401
                                 download, retry_after_seconds)
from tasks.http_guard import ByteLimit, Refused, TimeLimit, TooLarge, TooSlow  # noqa: F401
from tasks.names import (MAX_COMPONENT_BYTES, UnsafeName, check_component, check_relative_path,
                         url_file_name)
from tasks.schemas.io import scratch_dir, sha256_file


# ------------------------------------------------------------------------ kaggle

KAGGLE_HELP = (
    "Kaggle needs an API token: on https://www.kaggle.com/settings choose "
    "'Create New Token', save the downloaded kaggle.json as ~/.kaggle/kaggle.json "
    "(chmod 600), or set KAGGLE_USERNAME and KAGGLE_KEY; "
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
    raise ValueError(f"{uri!r}: expected kaggle://competitions/<name> "
                     "or kaggle://datasets/<owner>/<name>")


def kaggle_download(uri: str, cache: Path, limit: ByteLimit | None = None,
                    api: Any = None) -> Path:
    """Download a Kaggle competition's or dataset's files (one zip) into `cache`; returns the zip.

    Kaggle's client resumes a partial zip without If-Range and skips one it finds in its folder,
    so it downloads into a fresh scratch folder (`force`: never a resume; one a killed run left
    is deleted first); the zip is checked (`check_kaggle_zip`) and only then moved into place
    beside a record of its size. Only a zip with that record is reused. When Kaggle's listing
    of the files already totals more than `limit`, nothing is downloaded. Everything the client
    says is kept clear of the token (`_kaggle_guarded`). `api` is an authenticated KaggleApi
    (made here when None).
    """
    kind, ref = parse_kaggle(uri)
    out = cache / "kaggle" / kind / ref.replace("/", "__")
    if done := [z for z in sorted(out.glob("*.zip")) if _verified(z)]:
        return done[0]
    with _kaggle_guarded(uri):
        api = api if api is not None else _kaggle_api(uri)
        listed = kaggle_listed_sizes(api, kind, ref, enough=limit.max_bytes if limit else None)
        if limit and listed:
            limit.check(f"{uri} (Kaggle lists {len(listed)} files)", sum(listed.values()),
                        announced=True)
        out.mkdir(parents=True, exist_ok=True)
        with scratch_dir(out.parent, f".{out.name}.downloading-") as tmp:
            if kind == "competitions":
                api.competition_download_files(ref, path=str(tmp), force=True, quiet=False)
            else:
                api.dataset_download_files(ref, path=str(tmp), force=True, quiet=False,
                                           unzip=False)
            zips = sorted(tmp.glob("*.zip"))
            if len(zips) != 1:
                raise FetchError(f"{uri}: expected one zip from Kaggle, got "
                                 f"{[z.name for z in zips]}")
            check_kaggle_zip(uri, zips[0], limit, listed)
            final = out / check_component(zips[0].name, source=uri, entry=zips[0].name)
            os.replace(zips[0], final)
    record = final.with_name(final.name + VERIFIED)
    record.write_text(str(final.stat().st_size), encoding="utf-8")
    return final


def _kaggle_api(uri: str) -> Any:
    """An authenticated KaggleApi, imported with its request printing off."""
    if not kaggle_credentials():
        raise FetchError(f"{uri}: no Kaggle credentials found. {KAGGLE_HELP}")
    # With VERBOSE or VERBOSE_OUTPUT set when it is imported, the client prints every
    # request with its headers (the token), and its import already sends one.
    verbose = {k: os.environ.pop(k) for k in ("VERBOSE", "VERBOSE_OUTPUT") if k in os.environ}
    try:
        from kaggle.api.kaggle_api_extended import KaggleApi
    except ImportError:
        raise FetchError(f"{uri}: the kaggle package is not installed: "
                         "pip install 'guie-pipeline[kaggle]'") from None
    finally:
        os.environ.update(verbose)
    api = KaggleApi()
    api.authenticate()
    return api


def kaggle_secrets() -> list[str]:
    """The Kaggle tokens this process could send, longest first, each also as HTTP Basic
    auth carries it (base64 of user:key): from the environment, kaggle.json, access_token."""
    config = Path(os.environ.get("KAGGLE_CONFIG_DIR", Path.home() / ".kaggle"))
    user = os.environ.get("KAGGLE_USERNAME", "")
    keys = [os.environ.get("KAGGLE_KEY"), os.environ.get("KAGGLE_API_TOKEN")]
    try:
        saved = json.loads((config / "kaggle.json").read_text(encoding="utf-8"))
        user, keys = user or str(saved.get("username", "")), keys + [saved.get("key")]
    except (OSError, ValueError, AttributeError):
        pass
    try:
        keys.append((config / "access_token").read_text(encoding="utf-8").strip())
    except OSError:
        pass
    found = {k for k in keys if isinstance(k, str) and len(k) >= 8}  # shorter: not a token
    found |= {base64.b64encode(f"{user}:{k}".encode()).decode() for k in found}
    return sorted(found, key=len, reverse=True)


def redact(text: str, secrets: list[str]) -> str:
    """`text` with every secret replaced by `***`."""
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


class _RedactedStream(io.TextIOBase):
    """stdout or stderr, with secrets replaced in what is written."""

    def __init__(self, stream: Any, secrets: list[str]):
        self.stream, self.secrets = stream, secrets

    def write(self, text: str) -> int:
        self.stream.write(redact(text, self.secrets))
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


_KAGGLE_GUARD = threading.Lock()


@contextmanager
def _kaggle_guarded(uri: str) -> Iterator[None]:
    """Keep the Kaggle token out of all that Kaggle's client says while it runs.

    Its logs and prints are redacted (`_redacted_output`). Its errors become a FetchError that
    holds only their message, also redacted: requests' errors keep the request, Authorization
    header included, and Prefect pickles a failed task's exception into its result storage (a
    new exception's cause is not pickled).
    """
    with _KAGGLE_GUARD:  # one at a time: the hooks are the whole process's
        secrets = kaggle_secrets()
        with _redacted_output(secrets):
            try:
                yield
            except (FetchError, Refused, UnsafeName):
                raise  # ours: they name the uri and the file, never the token
            except Exception as exc:
                why = f"{uri}: Kaggle: {type(exc).__name__}: {exc}"
                raise FetchError(redact(why, secrets)) from None


@contextmanager
def _redacted_output(secrets: list[str]) -> Iterator[None]:
    """Log records created meanwhile (Prefect makes a task's prints records too) and writes to
    stdout and stderr, with every secret replaced, whichever logger or handler they go to."""
    make_record = logging.getLogRecordFactory()

    def redacted_record(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        if record.exc_info:  # the traceback's text, redacted, stands in for the exception
            record.exc_text = logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
        record.msg, record.args = redact(record.getMessage(), secrets), None
        record.exc_text = record.exc_text and redact(record.exc_text, secrets)
        return record

    streams = sys.stdout, sys.stderr
    logging.setLogRecordFactory(redacted_record)
    sys.stdout, sys.stderr = (_RedactedStream(s, secrets) for s in streams)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = streams
        logging.setLogRecordFactory(make_record)


VERIFIED = ".verified"  # beside a Kaggle zip: its size once checked; nothing else is reused


def _verified(zip_path: Path) -> bool:
    record = zip_path.with_name(zip_path.name + VERIFIED)
    try:
        return int(record.read_text(encoding="utf-8")) == zip_path.stat().st_size
    except (OSError, ValueError):
        return False


def kaggle_listed_sizes(api: Any, kind: str, ref: str, max_pages: int = 20,
                        enough: int | None = None) -> dict[str, int] | None:
    """{file name: bytes} as Kaggle's API lists the files, or None when it gives no usable list.

    Datasets with a few thousand files list in a few calls; ImageNet or GLDv2 (over a million
    files) would take thousands, so past `max_pages` the listing is not used (the zip's own
    CRC-32s are still checked when it is extracted), unless the files listed so far already
    total more than `enough` bytes: then they are returned, as evidence enough of the size.
    """
    lister = api.competition_list_files if kind == "competitions" else api.dataset_list_files
    sizes: dict[str, int] = {}
    token = None
    for _ in range(max_pages):
        try:
            page = lister(ref, page_token=token, page_size=200)
        except Exception:  # noqa: BLE001 - a client that cannot list: no check, not a failure
            return None
        for f in getattr(page, "files", None) or []:
            size = getattr(f, "total_bytes", None)
            size = getattr(f, "totalBytes", None) if size is None else size
            if getattr(f, "name", None) and isinstance(size, int):
                sizes[f.name] = size
        token = getattr(page, "next_page_token", None) or getattr(page, "nextPageToken", None)
        if not token or (enough is not None and sum(sizes.values()) > enough):
            return sizes or None
    return None


def check_kaggle_zip(uri: str, path: Path, limit: ByteLimit | None,
                     listed: dict[str, int] | None) -> None:
    """Refuse a Kaggle zip over `limit`, one that is not a whole zip (a truncated download has no
    central directory), or one whose members differ from the sizes Kaggle lists."""
    if limit:
        limit.check(uri, path.stat().st_size)
    try:
        with zipfile.ZipFile(path) as zf:
            members = {i.filename: i.file_size for i in zf.infolist() if not i.is_dir()}
    except (zipfile.BadZipFile, OSError) as exc:
        raise FetchError(f"{uri}: Kaggle's download {path.name} is not a whole zip ({exc}); "
                         "it was deleted") from None
    if not listed or not set(listed) & set(members):
        return  # no listing, or it names files differently from the zip: nothing to compare
    missing = sorted(set(listed) - set(members))
    wrong = sorted(n for n in set(listed) & set(members) if listed[n] != members[n])
    if missing or wrong:
        raise FetchError(f"{uri}: Kaggle's zip differs from its file list: missing {missing[:5]}, "
                         f"sizes differ for {wrong[:5]}; it was deleted")


# ------------------------------------------------------------------------- fetch


PART_SUFFIXES = ".part.meta.json"  # the longest name download() puts beside a cache file


def cache_name(url: str, source: str = "download") -> str:
    """Where a URL's download lives in the cache: a hash of the URL, then its file name.

    The file name is percent-decoded first and then checked (tasks/names.py), so `%2F..%2F`, a
    NUL or a fullwidth `．．／` cannot make it a path; it leaves room for `.part.meta.json`.
    """
    name = url_file_name(url, source=source, default="download")
    full = f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{name}"
    if len((full + PART_SUFFIXES).encode("utf-8")) > MAX_COMPONENT_BYTES:
        raise UnsafeName(f"{source}: {url}: refused name {name[:60]!r}...: with the cache's hash "
                         f"and suffixes it is over the file system's {MAX_COMPONENT_BYTES} bytes")
    return full


def cache_path(cache: Path, url: str, source: str = "download") -> Path:
    """`cache / cache_name(url)`, verified to be a file directly inside `cache`."""
    cache = Path(os.path.abspath(cache))
    path = Path(os.path.normpath(cache / cache_name(url, source)))
    if path.parent != cache:
        raise UnsafeName(f"{source}: {url}: refused: its cache file {path} is outside {cache}")
    return path


def local_path(url: str, source: str = "download") -> Path | None:
    """The file or folder a path or file:// uri names; None for http(s):// and kaggle://.

    A file:// path is percent-decoded and then checked: it names a file on this machine (no other
    host), with no `..`, NUL or encoded separator inside a name.
    """
    parsed = urlsplit(url)
    if parsed.scheme in ("http", "https", "kaggle"):
        return None
    if parsed.scheme not in ("", "file"):
        raise ValueError(f"{url!r}: allowed are a path, file://, http(s):// and kaggle://")
    if parsed.scheme == "":
        return Path(url)
    if parsed.netloc not in ("", "localhost"):
        raise UnsafeName(f"{source}: {url}: refused: file:// names host {parsed.netloc!r}; "
                         "give a local path as file:///<path>")
    decoded = unquote(parsed.path)
    return Path("/") / check_relative_path(decoded.lstrip("/"), source=source, entry=url)


def fetch(url: str, sha256: str | None, cache: Path, progress: Callable[[int], None] | None = None,
          fresh: bool = False, on_size: Callable[[int], None] | None = None, *,
          source: str = "download", limit: ByteLimit | None = None,
          time_limit: TimeLimit | None = None) -> Path:
    """A local path for one uri: local paths as they are, http(s) downloaded (within `limit` and
    `time_limit`) into `cache`, kaggle through its API (within `limit`: Kaggle's client keeps
    its own time). `source` names where the uri came from in errors."""
    path = local_path(url, source)
    if path is None:
        if urlsplit(url).scheme == "kaggle":
            return kaggle_download(url, cache, limit)
        return download(url, cache_path(cache, url, source), sha256, progress=progress,
                        fresh=fresh and not sha256, on_size=on_size, limit=limit,
                        time_limit=time_limit)
    if not path.exists():
        raise FileNotFoundError(f"{url}: no such file or folder")
    if sha256 and path.is_file() and (got := sha256_file(path)) != sha256.lower():
        raise ChecksumMismatch(f"{url}: sha256 is {got}, params expect {sha256.lower()}")
    return path
