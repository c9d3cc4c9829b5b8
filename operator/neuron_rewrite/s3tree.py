"""An ``s3://bucket/prefix`` source read in place: the rewrite takes its input from S3 without a scratch copy.

``S3Path`` is a read-only view of the objects under a prefix with the few ``pathlib.Path`` methods the rewrite's
model discovery uses (a directory is a common prefix of keys), so a base path's versions are chosen exactly as on
disk. ``S3Reader`` gives the scanner positional reads of ``saved_model.pb`` through ranged GETs of a small window:
the scan touches field headers only, never the NEFF payloads. The output is then written into the store in one pass:
every object as parallel ranged GETs whose chunks are written at their place as they arrive (``saved_model.pb`` as
its unchanged byte ranges around the edited headers). Memory stays bounded by the window and the chunks in
flight, whatever the model's size.

Credentials and region come from the environment as boto3 reads them (IRSA's web identity on EKS,
``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL_S3``). boto3 is imported only for an ``s3://`` source.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import urlparse

from .errors import InvalidModelError, RewriteError
from .wire import FileReader

PART = 8 << 20  # bytes per ranged GET when copying: as boto3's transfer manager
PARTS_IN_FLIGHT = 8
CHUNK = 256 * 1024  # what a part holds in memory at a time (boto3's io_chunksize)
WINDOW = 64 * 1024  # as the local reader's window
ATTEMPTS = 5  # a ranged GET whose body breaks off is asked again from where it broke


def is_s3(location: object) -> bool:
    return isinstance(location, str) and location.startswith("s3://")


@dataclass
class _Listing:
    """Every object under one prefix: key (relative to the prefix) -> size."""

    bucket: str
    prefix: str
    sizes: dict[str, int]
    client: Any = field(repr=False)

    @cached_property
    def directories(self) -> set[str]:
        dirs = {""}
        for key in self.sizes:
            parts = key.split("/")[:-1]
            dirs.update("/".join(parts[: i + 1]) for i in range(len(parts)))
        return dirs


def open_s3(uri: str) -> S3Path:
    """The source at ``uri``: its objects listed once, up front (a source is not expected to change meanwhile)."""
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    parsed = urlparse(uri)
    bucket, prefix = parsed.netloc, parsed.path.lstrip("/")
    if not bucket:
        raise InvalidModelError(f"{uri}: no bucket (expected s3://bucket/prefix)")
    prefix = prefix if not prefix or prefix.endswith("/") else prefix + "/"
    config = Config(retries={"max_attempts": ATTEMPTS, "mode": "standard"}, max_pool_connections=PARTS_IN_FLIGHT + 2)
    client = boto3.client("s3", config=config)
    region = boto3.session.Session().region_name
    if region:
        client.meta.events.register_first("needs-retry.s3", _refuse_other_regions(uri, region))
    sizes: dict[str, int] = {}
    try:
        pages = list(client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix))
    except ClientError as exc:  # no such bucket, access denied: the service's own words
        error = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        # A refusal is final; a server error (500, 503 SlowDown) that outlasted botocore's retries may pass: exit 1,
        # which the Job may run again.
        failure = RewriteError if status >= 500 else InvalidModelError
        words = f"{error.get('Code')}: {error.get('Message')}"
        if exc.operation_name == "AssumeRoleWithWebIdentity":  # IRSA: STS refused the pod's token for the role
            role = os.environ.get("AWS_ROLE_ARN", "")
            raise failure(f"{uri}: STS refused the web identity for {role}: {words}") from None
        raise failure(f"{uri}: {words}") from None
    except BotoCoreError as exc:  # no credentials yet, an endpoint not reachable: may pass, exit 1
        raise RewriteError(f"{uri}: {exc}") from None
    for page in pages:
        for item in page.get("Contents", []):
            rel = item["Key"][len(prefix) :]
            if rel and not rel.endswith("/"):  # "folder" placeholder objects hold nothing
                if any(part in ("", ".", "..") for part in rel.split("/")):
                    raise InvalidModelError(f"s3://{bucket}/{item['Key']}: key escapes the model or has empty parts")
                sizes[rel] = item["Size"]
    if not sizes:
        raise InvalidModelError(f"{uri}: no object under this prefix")
    return S3Path(_Listing(bucket, prefix, sizes, client), "")


def _refuse_other_regions(uri: str, region: str) -> Any:
    """A botocore hook that fails the call when S3 answers that the bucket is in another region than ``region``.

    Without it botocore would send the request again, signed for the bucket's region, and read the model across
    regions (slower, billed as transfer, and out of reach from a VPC whose S3 endpoint is regional) while the
    configured region says otherwise: a region given is a region kept, and S3's refusal is the message.
    """

    def refuse(response: Any = None, **_: Any) -> None:
        if response is None:
            return
        http, parsed = response
        error = parsed.get("Error") or {}
        found = http.headers.get("x-amz-bucket-region") or error.get("Region")
        if http.status_code >= 300 and found and found != region:
            words = f"{error.get('Code') or http.status_code}: {error.get('Message') or 'moved'}"
            raise InvalidModelError(f"{uri}: {words} (the bucket is in {found}, not in the configured region {region})")

    return refuse


class S3Path:
    """A file or directory under the listed prefix, with the pathlib methods the rewrite's discovery calls."""

    def __init__(self, listing: _Listing, rel: str) -> None:
        self.listing, self.rel = listing, rel

    def __truediv__(self, name: str | os.PathLike[str]) -> S3Path:
        joined = str(PurePosixPath(self.rel, str(name))) if self.rel else str(PurePosixPath(str(name)))
        return S3Path(self.listing, "" if joined == "." else joined)

    def __str__(self) -> str:
        return f"s3://{self.listing.bucket}/{self.listing.prefix}{self.rel}".rstrip("/")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, S3Path) and (other.listing, other.rel) == (self.listing, self.rel)

    def __hash__(self) -> int:
        return hash((id(self.listing), self.rel))

    @property
    def name(self) -> str:
        return PurePosixPath(self.rel).name

    @property
    def key(self) -> str:
        return self.listing.prefix + self.rel

    def exists(self) -> bool:
        return self.is_file() or self.is_dir()

    def is_file(self) -> bool:
        return self.rel in self.listing.sizes

    def is_dir(self) -> bool:
        return self.rel in self.listing.directories

    def is_symlink(self) -> bool:
        return False  # S3 has no links: nothing can point out of the model

    def resolve(self) -> S3Path:
        return self

    @property
    def parents(self) -> list[S3Path]:
        return [S3Path(self.listing, str(p) if str(p) != "." else "") for p in PurePosixPath(self.rel).parents]

    def iterdir(self) -> Iterator[S3Path]:
        base = f"{self.rel}/" if self.rel else ""
        names = {k[len(base) :].split("/", 1)[0] for k in self.listing.sizes if k.startswith(base)}
        for name in sorted(names):
            yield self / name

    def files(self) -> Iterator[tuple[PurePosixPath, S3Path]]:
        """Every object below this directory, as (path relative to it, object), in key order."""
        base = f"{self.rel}/" if self.rel else ""
        for key in sorted(k for k in self.listing.sizes if k.startswith(base)):
            yield PurePosixPath(key[len(base) :]), S3Path(self.listing, key)

    @property
    def size(self) -> int:
        return self.listing.sizes[self.rel]

    def stream(self, first: int, last: int) -> Iterator[tuple[int, bytes]]:
        """Bytes [first, last] (inclusive, as HTTP ranges are) as (offset, chunk) pairs, as they arrive. A body
        that breaks off (a reset connection, a timeout) is asked again from where it broke, up to ATTEMPTS times;
        a refusal (no such key, access denied) is not retried."""
        from botocore.exceptions import BotoCoreError

        at = first
        for _ in range(ATTEMPTS):
            try:
                response = self.listing.client.get_object(
                    Bucket=self.listing.bucket, Key=self.key, Range=f"bytes={at}-{last}"
                )
                for chunk in response["Body"].iter_chunks(CHUNK):
                    yield at, chunk
                    at += len(chunk)
            except (OSError, BotoCoreError):
                pass
            if at > last:
                return
        raise OSError(errno.EIO, f"{self}: bytes {at}-{last} still missing after {ATTEMPTS} attempts")


class S3Reader(FileReader):
    """``wire.FileReader``'s positional reads, through ranged GETs of a window: the scanner walks field headers."""

    def __init__(self, path: S3Path) -> None:
        super().__init__(-1, path.size)  # no descriptor: every read is a ranged GET
        self.path = path

    def read(self, offset: int, length: int) -> bytes:
        rel = offset - self._window_start
        if rel >= 0 and rel + length <= len(self._window):
            return self._window[rel : rel + length]
        last = min(offset + max(length, WINDOW), self.size) - 1
        self._window = b"".join(chunk for _, chunk in self.path.stream(offset, last)) if offset <= last else b""
        self._window_start = offset
        return self._window[:length]


def write_pieces_from_s3(path: S3Path, dst: str | os.PathLike[str], pieces: Iterable[tuple[int, int] | bytes],
                         fsync: bool) -> None:  # fmt: skip
    """``files.write_pieces`` with the source byte ranges fetched from S3 in parallel parts, each written at its
    place in the output: the output's layout is known before any byte is fetched."""
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        jobs: list[tuple[int, int, int]] = []  # (output offset, first, last)
        position = 0
        for piece in pieces:
            if isinstance(piece, bytes):
                os.pwrite(fd, piece, position)
                position += len(piece)
                continue
            start, end = piece
            for first in range(start, end, PART):
                last = min(first + PART, end) - 1
                jobs.append((position + first - start, first, last))
            position += end - start
        os.ftruncate(fd, position)

        def fetch(job: tuple[int, int, int]) -> None:
            at, first, last = job
            for offset, chunk in path.stream(first, last):  # written as it arrives: no part is held whole
                os.pwrite(fd, chunk, at + offset - first)

        with ThreadPoolExecutor(PARTS_IN_FLIGHT) as pool:
            for _ in pool.map(fetch, jobs):
                pass
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
