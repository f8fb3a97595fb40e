"""A real HTTP/1.1 server on 127.0.0.1 that serves bytes and misbehaves on request.

Used by the download tests and by benchmarks/download.py. Each path can be
given faults: drop the connection halfway through the body, answer an error
status N times, answer 429 with a Retry-After, wait before answering,
trickle the body a byte at a time, redirect elsewhere, or ignore If-Range.
Range requests are honoured (206)
as real file servers do: every file has a strong ETag (from its bytes) and a
Last-Modified date (a new one each time the file is replaced), and a Range
with an If-Range that no longer matches gets the whole file (200), per RFC
9110 13.1.5. Every request is logged (path, Range and If-Range headers,
time) so tests can check what was asked. With `tls`, it speaks HTTPS.
"""

from __future__ import annotations

import email.utils
import hashlib
import ssl
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

EPOCH = 1_000_000_000  # Last-Modified of a file's first version (2001); replacing it adds a minute


@dataclass
class Fault:
    drop_after: int | None = None  # bytes of the body sent before the connection is cut (once)
    errors: list[int] = field(default_factory=list)  # statuses answered first, one per request
    retry_after: str | None = None  # sent with the error statuses
    delay_s: float = 0.0
    redirect: str | None = None  # answer 302 with this Location instead of the file
    etag: bool = True  # send the file's ETag
    last_modified: bool = True  # send its Last-Modified
    ignore_if_range: bool = False  # a broken server: a Range is served even when the file changed
    no_length: bool = False  # no Content-Length: the body ends when the connection closes
    trickle_s: float = 0.0  # send the body a byte at a time, this long apart (a slow loris)


@dataclass
class Request:
    path: str
    range: str | None
    at: float
    if_range: str | None = None


class _Files(dict):
    """path -> bytes, counting replacements so each version has its own Last-Modified."""

    def __init__(self) -> None:
        super().__init__()
        self.versions: dict[str, int] = {}

    def __setitem__(self, path: str, data: bytes) -> None:
        self.versions[path] = self.versions.get(path, -1) + 1
        super().__setitem__(path, data)


class _Server(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        """A client that hangs up mid-body (a refused download does) is not an error here."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class Loopback:
    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.files = _Files()
        self.faults: dict[str, Fault] = {}
        self.requests: list[Request] = []
        self.active = 0
        self.max_active = 0  # most requests in flight at once
        self._lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body go out in separate writes; with Nagle on, the body
            # waits ~40 ms for the client's delayed ACK (no real server does that).
            disable_nagle_algorithm = True

            def log_message(self, *args) -> None:  # quiet
                pass

            def do_GET(self) -> None:  # noqa: N802
                owner._serve(self)

        self.server = _Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.scheme = "https" if tls else "http"
        if tls:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> "Loopback":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def requests_for(self, path: str) -> list[Request]:
        return [r for r in self.requests if r.path == path]

    def _serve(self, h: BaseHTTPRequestHandler) -> None:
        with self._lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            self._answer(h)
        finally:
            with self._lock:
                self.active -= 1

    def _answer(self, h: BaseHTTPRequestHandler) -> None:
        path = h.path.split("?", 1)[0]
        with self._lock:
            self.requests.append(Request(path, h.headers.get("Range"), time.monotonic(),
                                         h.headers.get("If-Range")))
            fault = self.faults.get(path)
            status = fault.errors.pop(0) if fault and fault.errors else None
            drop = fault.drop_after if fault else None
            if fault and drop is not None:
                fault.drop_after = None  # once
        if fault and fault.delay_s:
            time.sleep(fault.delay_s)
        if status is not None:
            body = f"error {status}".encode()
            h.send_response(status)
            if fault.retry_after is not None:
                h.send_header("Retry-After", fault.retry_after)
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body)
            return
        if fault and fault.redirect is not None:
            h.send_response(302)
            h.send_header("Location", fault.redirect)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        with self._lock:
            data = self.files.get(path)
            version = self.files.versions.get(path, 0)
        if data is None:
            h.send_response(404)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        etag = f'"{hashlib.sha256(data).hexdigest()[:16]}"'
        modified = email.utils.formatdate(EPOCH + 60 * version, usegmt=True)
        start = 0
        rng = h.headers.get("Range")
        if_range = h.headers.get("If-Range")
        current = if_range is None or if_range in (etag, modified)  # a weak W/ tag never matches
        if rng and rng.startswith("bytes=") and rng.endswith("-") and (
                current or (fault is not None and fault.ignore_if_range)):
            start = int(rng[6:-1])
            if start >= len(data):
                h.send_response(416)
                h.send_header("Content-Length", "0")
                h.end_headers()
                return
            h.send_response(206)
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            h.send_response(200)
        body = data[start:]
        if fault is not None and fault.no_length:
            h.send_header("Connection", "close")
            h.close_connection = True
        else:
            h.send_header("Content-Length", str(len(body)))
        h.send_header("Accept-Ranges", "bytes")
        if fault is None or fault.etag:
            h.send_header("ETag", etag)
        if fault is None or fault.last_modified:
            h.send_header("Last-Modified", modified)
        h.end_headers()
        if drop is not None:
            h.wfile.write(body[:drop])
            h.wfile.flush()
            h.close_connection = True
            h.connection.shutdown(2)  # cut mid-body, as a dropped link does
            return
        if fault is not None and fault.trickle_s:
            for i in range(len(body)):
                h.wfile.write(body[i:i + 1])
                h.wfile.flush()
                time.sleep(fault.trickle_s)
            return
        h.wfile.write(body)
