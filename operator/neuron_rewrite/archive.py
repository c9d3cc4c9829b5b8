"""An http(s) archive of the model (``.tar.gz``, ``.tgz``, ``.tar``, ``.zip``) unpacked as it downloads, on the
output's own filesystem, so the rewrite then moves its files into the output instead of copying them.

A tar archive is one stream: its members are written as their bytes arrive, with no copy of the archive anywhere.
A zip's directory sits at its end, so a zip is read in place through ranged GETs (the directory, then each member
in the order they lie) where the server answers ranges; where it does not, the archive is first saved beside the
output and read from there. Either way memory holds a few buffers of ``CHUNK`` bytes, whatever the model's size.

A transfer that breaks off is asked again from where it broke (``Range`` with ``If-Range``, so a file replaced on
the server meanwhile is not spliced onto the old one), up to ``ATTEMPTS`` times. Members are refused, naming them,
when they would land outside the model (absolute, ``..``), are links or devices, or appear twice.
"""

from __future__ import annotations

import bz2
import contextlib
import http.client
import io
import lzma
import os
import queue
import shutil
import stat
import tarfile
import threading
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import IO

from .errors import InvalidModelError, RewriteError
from .files import describe_os_error

CHUNK = 1 << 20
READ_AHEAD = 4  # chunks downloaded ahead of the one being unpacked
ATTEMPTS = 5
TIMEOUT = 60  # seconds without a byte before a connection counts as broken
USER_AGENT = "tf-neuron-auto-multicore"
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a member, or an empty archive's end record


def is_http(location: object) -> bool:
    return isinstance(location, str) and location.startswith(("http://", "https://"))


class HttpFile(io.RawIOBase):
    """The bytes at ``url`` as a readable file, one GET open at a time; seekable where the server answers ranges."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.position = 0
        self.ranges = False
        self.validator: str | None = None
        self._response: http.client.HTTPResponse | None = self._get(None)
        self.size = self._response.length  # None when the server streams without a Content-Length
        self.validator = self._response.headers.get("ETag") or self._response.headers.get("Last-Modified")
        self.ranges = self._response.headers.get("Accept-Ranges", "").strip() == "bytes" and self.size is not None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return self.ranges

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.size or 0}[whence]
        if base + offset != self.position:
            if not self.ranges:
                raise io.UnsupportedOperation(f"{self.url}: the server does not answer byte ranges")
            self._drop()
            self.position = base + offset
        return self.position

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        if self.size is not None and self.position >= self.size:
            return 0
        for _ in range(ATTEMPTS):
            try:
                if self._response is None:
                    self._response = self._get(self.position)
                count = self._response.readinto(buffer)
            except (OSError, http.client.HTTPException):
                count = None  # a reset connection, a timeout, a broken chunk: ask again from here
            if count:
                self.position += count
                return count
            if count == 0 and (self.size is None or self.position >= self.size):
                return 0
            self._drop()  # the body ended before its Content-Length: the connection broke
        raise RewriteError(f"{self.url}: the transfer broke off at byte {self.position}, {ATTEMPTS} times")

    def close(self) -> None:
        self._drop()
        super().close()

    def _drop(self) -> None:
        if self._response is not None:
            self._response.close()
            self._response = None

    def _get(self, offset: int | None) -> http.client.HTTPResponse:
        """The body from ``offset`` on; None: the first request, which learns the size and whether ranges work."""
        headers = {"User-Agent": USER_AGENT}
        if offset is not None:
            if not self.ranges:
                raise RewriteError(
                    f"{self.url}: the transfer broke off at byte {offset} and the server does not answer byte ranges "
                    "to resume it"
                )
            headers["Range"] = f"bytes={offset}-"
            if self.validator:
                headers["If-Range"] = self.validator
        for attempt in range(ATTEMPTS):
            try:
                response = urllib.request.urlopen(urllib.request.Request(self.url, headers=headers), timeout=TIMEOUT)
            except urllib.error.HTTPError as exc:
                if exc.code < 500:  # a refusal (404, 403) is final
                    raise InvalidModelError(f"{self.url}: HTTP {exc.code} {exc.reason}") from None
                if attempt == ATTEMPTS - 1:  # a 503 may pass: exit 1, which the Job may run again
                    raise RewriteError(f"{self.url}: HTTP {exc.code} {exc.reason}") from None
            except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
                if attempt == ATTEMPTS - 1:
                    reason = getattr(exc, "reason", exc)
                    raise RewriteError(f"{self.url}: {reason}") from None
            else:
                if offset is not None and response.status != 206:
                    response.close()  # the whole body again: If-Range found another file under the URL
                    raise RewriteError(f"{self.url}: the file changed on the server while it was read")
                return response
            time.sleep(min(2**attempt, 10) / 10)
        raise AssertionError("unreachable")


class _ReadAhead(io.RawIOBase):
    """Sequential reads of ``source``, downloaded ``READ_AHEAD`` chunks ahead by a thread: the transfer goes on while
    the caller decompresses and writes (zlib and the writes release the GIL). Its errors reach the caller."""

    def __init__(self, source: IO[bytes]) -> None:
        self._queue: queue.Queue[bytes | BaseException] = queue.Queue(READ_AHEAD)
        self._chunk = memoryview(b"")
        self._ended = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, args=(source,), name="read-ahead", daemon=True)
        self._thread.start()

    def readable(self) -> bool:
        return True

    def _fill(self, source: IO[bytes]) -> None:
        try:
            while not self._stop.is_set():
                data = source.read(CHUNK)
                self._put(data)
                if not data:
                    return
        except BaseException as exc:  # handed to the reader, which raises it as its own
            self._put(exc)

    def _put(self, item: bytes | BaseException) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        while not self._chunk:
            if self._ended:
                return 0
            item = self._queue.get()
            if isinstance(item, BaseException):
                self._ended = True
                raise item
            if not item:
                self._ended = True
                return 0
            self._chunk = memoryview(item)
        count = min(len(buffer), len(self._chunk))
        buffer[:count] = self._chunk[:count]
        self._chunk = self._chunk[count:]
        return count

    def close(self) -> None:
        self._stop.set()  # a filler waiting on a full queue gives up within its timeout, one reading within TIMEOUT
        self._thread.join(TIMEOUT)
        super().close()


class _Gunzip(io.RawIOBase):
    """The gzip members of ``source`` (a .tar.gz may hold several, as ``pigz`` writes them) decompressed by zlib,
    which checks each member's CRC and length, never more than is asked for: tarfile's own stream mode decompresses
    a whole read at once, so a run of zeros (or a crafted archive) would expand to gigabytes in memory."""

    def __init__(self, source: IO[bytes]) -> None:
        self.source = source
        self._inflate = zlib.decompressobj(_GZIP_WBITS)
        self._input = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        while True:
            if self._inflate.eof:  # the next member, or the end (gzip allows zeros after the last member)
                rest = self._inflate.unused_data.lstrip(b"\0")
                while not rest:
                    more = self.source.read(CHUNK)
                    if not more:
                        return 0
                    rest = more.lstrip(b"\0")
                self._inflate, self._input = zlib.decompressobj(_GZIP_WBITS), rest
            if not self._input:
                self._input = self.source.read(CHUNK)
                if not self._input:
                    raise EOFError("the gzip stream ends before its end marker")
            out = self._inflate.decompress(self._input, len(buffer))
            self._input = self._inflate.unconsumed_tail
            if out:
                buffer[: len(out)] = out
                return len(out)


_GZIP_WBITS = 16 + zlib.MAX_WBITS  # a gzip header and trailer around the deflate stream
# The bzip2 and xz readers of the standard library also decompress only what is asked of them.
_COMPRESSED = {b"\x1f\x8b": _Gunzip, b"BZh": bz2.BZ2File, b"\xfd7zXZ\x00": lzma.LZMAFile}


def _member_path(url: str, name: str) -> PurePosixPath | None:
    """Where a member lands relative to the model, None for the archive's root itself; refused if outside it."""
    path = PurePosixPath(name.replace("\\", "/"))
    parts = [part for part in path.parts if part not in ("", ".")]
    if path.is_absolute() or ".." in parts:
        raise InvalidModelError(f"{url}: member {name!r} would land outside the model (absolute or with '..')")
    return PurePosixPath(*parts) if parts else None


def _link_refused(url: str, name: str) -> InvalidModelError:
    return InvalidModelError(f"{url}: member {name!r} is a link (links are refused: one could reach outside the model)")


def _write_member(url: str, name: str, data: IO[bytes], out: Path, fsync: bool) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        raise InvalidModelError(f"{url}: member {name!r} appears twice in the archive") from None
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    try:
        while count := data.readinto(view):  # type: ignore[attr-defined]
            os.write(fd, view[:count])
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def _decompressed(stream: io.BufferedReader) -> IO[bytes]:
    head = stream.peek(6)
    for magic, reader in _COMPRESSED.items():
        if head.startswith(magic):
            return io.BufferedReader(reader(stream), CHUNK)  # type: ignore[arg-type]
    return stream


def _unpack_tar(url: str, stream: io.BufferedReader, dest: Path, fsync: bool) -> None:
    started = False  # a member header was read: it is an archive, whatever goes wrong after
    try:
        with tarfile.open(fileobj=_decompressed(stream), mode="r|", bufsize=CHUNK) as archive:
            for member in archive:
                started = True
                relative = _member_path(url, member.name)
                if member.issym() or member.islnk():
                    raise _link_refused(url, member.name)
                if relative is None or member.isdir():
                    (dest / (relative or ".")).mkdir(parents=True, exist_ok=True)
                elif member.isfile():
                    data = archive.extractfile(member)
                    assert data is not None  # a regular file always has a reader
                    _write_member(url, member.name, data, dest / relative, fsync)  # type: ignore[arg-type]
                else:
                    raise InvalidModelError(f"{url}: member {member.name!r} is not a regular file or directory")
    except (tarfile.ReadError, EOFError, OSError, zlib.error, lzma.LZMAError) as exc:
        if isinstance(exc, OSError) and exc.errno is not None:
            raise  # the store's side (no space, no permission), not the archive's: gzip and bz2 raise errno-less ones
        if not started:  # an error page, a wrong URL: nothing in it was ever an archive
            raise InvalidModelError(f"{url}: not a .tar.gz, .tgz, .tar or .zip archive ({exc})") from None
        raise InvalidModelError(f"{url}: the archive ends early or is corrupt ({exc})") from None


def _unpack_zip(url: str, source: IO[bytes], dest: Path, fsync: bool) -> None:
    try:
        with zipfile.ZipFile(source) as archive:
            for info in sorted(archive.infolist(), key=lambda i: i.header_offset):  # in the order they lie
                relative = _member_path(url, info.filename)
                if stat.S_ISLNK(info.external_attr >> 16):
                    raise _link_refused(url, info.filename)
                if relative is None or info.is_dir():
                    (dest / (relative or ".")).mkdir(parents=True, exist_ok=True)
                    continue
                with archive.open(info) as data:
                    _write_member(url, info.filename, data, dest / relative, fsync)
    except zipfile.BadZipFile as exc:
        raise InvalidModelError(f"{url}: not a valid .zip archive ({exc})") from None
    except (NotImplementedError, RuntimeError) as exc:  # an unsupported compression method, an encrypted member
        raise InvalidModelError(f"{url}: {exc}") from None


def unpack(url: str, dest: Path, fsync: bool) -> Path:
    """Unpack the archive at ``url`` into the new directory ``dest``; the model's directory in it (an archive of one
    top folder holds the model in that folder, as ``tar czf model.tgz resnet50/`` makes)."""
    dest.mkdir()
    with HttpFile(url) as raw, io.BufferedReader(raw, CHUNK) as stream:
        zipped = stream.peek(4)[:4] in _ZIP_MAGIC
        if zipped and raw.seekable():
            _unpack_zip(url, stream, dest, fsync)
        else:
            with io.BufferedReader(_ReadAhead(stream), CHUNK) as ahead:
                if not zipped:
                    _unpack_tar(url, ahead, dest, fsync)
                else:  # its directory cannot be reached without the rest: the archive is kept beside the output
                    saved = dest.with_name(dest.name + ".zip")
                    with saved.open("wb") as out:
                        shutil.copyfileobj(ahead, out, CHUNK)
                    try:
                        with saved.open("rb") as local:
                            _unpack_zip(url, local, dest, fsync)
                    finally:
                        saved.unlink()
    entries = list(dest.iterdir())
    if len(entries) == 1 and entries[0].is_dir() and not entries[0].name.isdigit():  # a number: a version folder
        return entries[0]
    return dest


@contextlib.contextmanager
def unpacked(url: str, beside: Path, fsync: bool) -> Iterator[Path]:
    """The model in the archive at ``url``, unpacked into a hidden directory beside ``beside`` (named as the
    rewrite's staging directories are, so the store's clean-up removes it if the rewrite is killed) and removed
    after the block. Errors in the block name the URL, not that directory."""
    work = beside.parent / f".{beside.name}.tmp-{os.urandom(4).hex()}"
    try:
        beside.parent.mkdir(parents=True, exist_ok=True)
        work.mkdir()
    except OSError as exc:
        raise RewriteError(f"{beside}: cannot create the directory to unpack into ({exc.strerror})") from None
    try:
        try:
            root = unpack(url, work / "model", fsync)
        except OSError as exc:  # the store's side: no space, no permission
            raise describe_os_error(exc) from None
        try:
            yield root
        except RewriteError as exc:
            raise type(exc)(str(exc).replace(str(root), url)) from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
