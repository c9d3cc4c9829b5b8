"""A local HTTP file server for model archives, answering as the servers users fetch them from do (an S3 presigned
URL, CloudFront, a model registry behind nginx): ``Content-Length``, an ``ETag``, and one byte range per request
(``206 Partial Content`` with ``Content-Range``, ``416`` past the end, the whole body again when an ``If-Range``
validator no longer matches), as RFC 9110 has them.

Two switches make it behave as the less helpful servers do: ``ranges=False`` ignores ``Range`` and always sends the
whole body (many static servers, Python's own ``http.server``), and ``fault(path, after, times)`` drops the
connection after ``after`` bytes of a body, ``times`` times, for the tests of interrupted transfers. A third,
``hold(path)`` until ``release(path)``, keeps the bodies of ``path`` from leaving after their headers: a download
in progress for as long as a test needs one (to disrupt its pod). Every request is logged (``log``) so tests can
read what was asked, and how.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

_RANGE = re.compile(r"bytes=(\d*)-(\d*)$")
_CHUNK = 1 << 20


@dataclass
class ArchiveServer:
    """What the handler serves and how: shared by its threads."""

    root: Path
    ranges: bool = True
    faults: dict[str, list[int]] = field(default_factory=dict)  # path -> [after, times left]
    holds: dict[str, threading.Event] = field(default_factory=dict)  # path -> set when released
    log: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""

    def fault(self, path: str, after: int, times: int) -> None:
        with self.lock:
            self.faults[path] = [after, times]

    def hold(self, path: str) -> None:
        with self.lock:
            self.holds[path] = threading.Event()

    def release(self, path: str) -> None:
        """Let the held bodies of ``path`` go, and every later one."""
        with self.lock:
            held = self.holds.pop(path, None)
        if held is not None:
            held.set()

    def wait_if_held(self, path: str) -> None:
        with self.lock:
            held = self.holds.get(path)
        if held is not None:
            self.record(f"held GET {path}")
            held.wait()

    def take_fault(self, path: str, sent: int) -> int | None:
        """Where to break the body of ``path`` that is about to pass ``sent`` bytes, if a fault is due there: only a
        body that gets that far counts towards the fault's ``times`` (a client may close one early)."""
        with self.lock:
            fault = self.faults.get(path)
            if not fault or fault[1] <= 0 or sent <= fault[0]:
                return None
            fault[1] -= 1
            return fault[0]

    def record(self, line: str) -> None:
        with self.lock:
            self.log.append(line)


def _etag(path: Path) -> str:
    info = path.stat()
    return '"' + hashlib.sha1(f"{info.st_size}-{info.st_mtime_ns}".encode()).hexdigest()[:16] + '"'


class _Handler(http.server.BaseHTTPRequestHandler):
    server_version = "localcluster-archives"
    protocol_version = "HTTP/1.1"
    state: ArchiveServer

    def log_message(self, format: str, *args: object) -> None:
        pass  # requests go to state.log, not stderr

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_GET(self) -> None:
        self._answer(body=True)

    def _answer(self, body: bool) -> None:
        state = self.state
        path = (state.root / self.path.split("?", 1)[0].lstrip("/")).resolve()
        asked = self.headers.get("Range")
        if state.root.resolve() not in path.parents or not path.is_file():
            state.record(f"{self.command} {self.path} range={asked} -> 404")
            self._empty(404)
            return
        size, etag = path.stat().st_size, _etag(path)
        first, last, status = 0, size - 1, 200
        if asked and state.ranges and self.headers.get("If-Range", etag) == etag:
            match = _RANGE.match(asked.strip())
            if match and (match[1] or match[2]):
                if match[1]:
                    first, last = int(match[1]), min(int(match[2]) if match[2] else size - 1, size - 1)
                else:  # a suffix: the last N bytes
                    first = max(size - int(match[2]), 0)
                if first >= size or first > last:
                    state.record(f"{self.command} {self.path} range={asked} -> 416")
                    self._empty(416, {"Content-Range": f"bytes */{size}"})
                    return
                status = 206
        state.record(f"{self.command} {self.path} range={asked} -> {status}")
        self.send_response(status)
        self.send_header("Content-Length", str(last - first + 1))
        self.send_header("ETag", etag)
        self.send_header("Content-Type", "application/octet-stream")
        if state.ranges:
            self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
        self.end_headers()
        if body:
            try:
                self._send(path, first, last - first + 1)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True  # the client had what it wanted (a reader closes a GET it stops reading)

    def _send(self, path: Path, first: int, length: int) -> None:
        self.state.wait_if_held(self.path)
        sent = 0
        with path.open("rb") as source:
            source.seek(first)
            while sent < length:
                chunk = source.read(min(_CHUNK, length - sent))
                drop_after = self.state.take_fault(self.path, sent + len(chunk))
                if drop_after is not None:
                    self.wfile.write(chunk[: drop_after - sent])
                    self.state.record(f"fault: dropped GET {self.path} after {drop_after} bytes")
                    self.close_connection = True
                    self.wfile.flush()
                    self.connection.shutdown(2)  # a reset mid-body, as a broken network gives
                    return
                self.wfile.write(chunk)
                sent += len(chunk)

    def _empty(self, status: int, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", "0")
        self.end_headers()


@contextlib.contextmanager
def serving(root: Path, *, ranges: bool = True, host: str = "127.0.0.1") -> Iterator[ArchiveServer]:
    """Serve the files under ``root`` on a free port of ``host`` for the duration of the block."""
    state = ArchiveServer(root, ranges)
    handler = type("Handler", (_Handler,), {"state": state})
    server = http.server.ThreadingHTTPServer((host, 0), handler)
    server.daemon_threads = True
    state.url = f"http://{host}:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, name="archive-server", daemon=True)
    thread.start()
    try:
        yield state
    finally:
        for path in list(state.holds):  # no handler thread left waiting
            state.release(path)
        server.shutdown()
        server.server_close()
