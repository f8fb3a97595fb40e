"""Names from outside that become paths: checked after decoding, refused with the source and entry.

Every name that reaches the file system from a source (a download's cache
name, an archive member, a URL list's file name, a label used as a folder, a
path read from a table) passes through here. The checks run on the name as
the file system will see it: after percent-decoding (for URLs) and on its
NFKC form too, so that `%2F`, a fullwidth solidus or `．．` cannot smuggle a
separator or a parent reference past them. Control characters (C0, DEL, C1)
and bidirectional controls are refused too: they cut or disguise a name in
the logs, tables and terminals that show it. Messages show a name escaped.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import PurePosixPath
from urllib.parse import unquote, urlsplit

# Linux's limits (NAME_MAX, PATH_MAX) in bytes of UTF-8; most file systems share the first.
MAX_COMPONENT_BYTES = 255
MAX_PATH_BYTES = 4096
_DRIVE = re.compile(r"^[A-Za-z]:")
_SEPARATORS = ("/", "\\")
# C0 controls, DEL and the C1 controls: NUL ends a C string, a newline splits a log line or a
# CSV row, ESC drives the terminal that shows a message.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# Bidirectional controls (LRM, RLM, ALM, the embeddings and overrides, the isolates): they
# reorder how a name is shown, so `photo\u202egpj.exe` reads as `photoexe.jpg`.
_BIDI = re.compile(r"[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


class UnsafeName(ValueError):
    """A name from a source that must not become a path; the message names the source and entry."""


def _shown(name: str) -> str:
    return repr(name if len(name) <= 80 else name[:60] + "..." + name[-15:])


def _problem(component: str) -> str | None:
    """Why one path component is unsafe, or None."""
    if not component:
        return "an empty name"
    if _CONTROL.search(component):
        return "a control character (NUL included)"
    if _BIDI.search(component):
        return "a bidirectional control character (it reorders how the name is shown)"
    for form in {component, unicodedata.normalize("NFKC", component)}:
        if any(sep in form for sep in _SEPARATORS):
            return "a path separator"
        if form in (".", ".."):
            return "a reference to the current or parent folder"
        if _DRIVE.match(form):
            return "a Windows drive letter"
    if len(component.encode("utf-8")) > MAX_COMPONENT_BYTES:
        return f"more than {MAX_COMPONENT_BYTES} bytes"
    return None


def check_component(name: str, *, source: str, entry: str) -> str:
    """`name` as one file or folder name (a label folder, a cache file); raises UnsafeName."""
    if (why := _problem(name)) is not None:
        raise UnsafeName(f"{source}: {entry}: refused name {_shown(name)}: {why}")
    return name


def check_relative_path(name: str, *, source: str, entry: str) -> PurePosixPath:
    """`name` as a relative path of safe components ('/'-separated, as archives and tables give
    them); raises UnsafeName for an absolute path, a drive, `..`, a backslash and the rest."""
    if name.startswith(_SEPARATORS) or _DRIVE.match(name):
        raise UnsafeName(f"{source}: {entry}: refused name {_shown(name)}: an absolute path")
    if len(name.encode("utf-8")) > MAX_PATH_BYTES:
        raise UnsafeName(
            f"{source}: {entry}: refused name {_shown(name)}: more than {MAX_PATH_BYTES} bytes"
        )
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts:
        raise UnsafeName(f"{source}: {entry}: refused name {_shown(name)}: no file name")
    for part in parts:
        if (why := _problem(part)) is not None:
            raise UnsafeName(f"{source}: {entry}: refused name {_shown(name)}: {why} in {part!r}")
    return PurePosixPath(*parts)


def url_file_name(url: str, *, source: str, default: str | None = None) -> str:
    """The file name a URL's path ends with, percent-decoded once, as one checked component.

    A URL whose path ends in `/` has no file name: `default` when given, else refused.
    """
    segment = urlsplit(url).path.rsplit("/", 1)[-1]
    if not segment and default is not None:
        return default
    return check_component(unquote(segment), source=source, entry=url)
