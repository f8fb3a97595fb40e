"""A real HTTP/1.1 server on 127.0.0.1 that serves bytes and misbehaves on request.

Used by the download tests and by benchmarks/download.py. Each path can be
given faults: drop the connection halfway through the body, answer an error
status N times, answer 429 with a Retry-After, or wait before answering.
Range requests are honoured (206), as real file servers do. Every request is
logged (path, Range header, time) so tests can check what was asked.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Fault:
    drop_after: int | None = None  # bytes of the body sent before the connection is cut (once)
    errors: list[int] = field(default_factory=list)  # statuses answered first, one per request
    retry_after: str | None = None  # sent with the error statuses
    delay_s: float = 0.0


@dataclass
class Request:
    path: str
    range: str | None
    at: float


class Loopback:
    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
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

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

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
            self.requests.append(Request(path, h.headers.get("Range"), time.monotonic()))
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
        data = self.files.get(path)
        if data is None:
            h.send_response(404)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        start = 0
        rng = h.headers.get("Range")
        if rng and rng.startswith("bytes=") and rng.endswith("-"):
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
        h.send_header("Content-Length", str(len(body)))
        h.send_header("Accept-Ranges", "bytes")
        h.end_headers()
        if drop is not None:
            h.wfile.write(body[:drop])
            h.wfile.flush()
            h.close_connection = True
            h.connection.shutdown(2)  # cut mid-body, as a dropped link does
            return
        h.wfile.write(body)
