"""A local S3 and STS (IRSA's web identity) for tests and benchmarks: moto's server, as strict as AWS about regions,
and as cheap as S3 for ranged GETs (``RangedGets``).

moto answers a request on a bucket whatever region it was signed for; S3 refuses one that is not signed for the
bucket's region, and that difference is how a client configured for the wrong region slips through tests.
``RegionCheck`` refuses such requests with S3's own error, so boto3 reacts to them as it does against AWS: its
S3RegionRedirectorv2 sends the request again signed for the region the error names, and the call succeeds. A wrong
region then costs one refused request per client and bucket; ``refusals`` reads them from the server's log.
Requests that address no bucket (ListBuckets, STS, ``/moto-api``) and unsigned ones pass through unchanged; moto
itself refuses a CreateBucket whose LocationConstraint is not the signing region (but us-east-1's), as S3 does.

``python -m localcluster.s3server --port N`` serves on loopback; ``running(log)`` starts that as a subprocess.
moto is imported in that process only: importing it adds its stub to botocore's handlers in the importing process.
"""

from __future__ import annotations

import argparse
import json
import re
import secrets
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote
from xml.sax.saxutils import escape

from werkzeug.wrappers import Request

from localcluster.cluster import free_port

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

# The credential scope of SigV4: ACCESS_KEY/DATE/REGION/SERVICE/aws4_request.
SCOPE = re.compile(r"^[^/]+/\d{8}/(?P<region>[^/]+)/(?P<service>[^/]+)/aws4_request$")


def signing_region(environ: WSGIEnvironment) -> tuple[str, bool] | None:
    """The region an S3 request was signed for and whether it was presigned, or None when not signed with SigV4."""
    authorization = environ.get("HTTP_AUTHORIZATION", "")
    if authorization.startswith("AWS4-HMAC-SHA256 "):
        fields = dict(
            field.strip().partition("=")[::2] for field in authorization.removeprefix("AWS4-HMAC-SHA256 ").split(",")
        )
        scope, presigned = fields.get("Credential", ""), False
    else:
        scope, presigned = parse_qs(environ.get("QUERY_STRING", "")).get("X-Amz-Credential", [""])[0], True
    match = SCOPE.match(scope)
    if match is None or match["service"] != "s3":
        return None
    return match["region"], presigned


def addressed(environ: WSGIEnvironment) -> tuple[Any, str] | None:
    """The existing bucket a request addresses (path or virtual-host style, as moto reads it) and the key part of
    its path ("" for the bucket itself); None for no existing bucket."""
    from moto.s3.models import s3_backends
    from moto.s3.responses import S3Response
    from moto.s3.utils import bucket_name_from_url

    request = Request(environ)  # reads headers only: the body stays for moto
    if request.path.startswith("/moto-api"):
        return None
    if S3Response.subdomain_based_buckets(request):
        bucket, key = bucket_name_from_url(request.url), request.path.lstrip("/")
    else:
        bucket, _, key = request.path.lstrip("/").partition("/")
    owner = s3_backends.bucket_accounts.get(bucket or "")
    if owner is None:
        return None  # no such bucket: moto says so, as S3 does whatever the region
    partition, account = owner
    return s3_backends[account][partition].buckets[bucket], key


def bucket_region(environ: WSGIEnvironment) -> str | None:
    """The region of the existing bucket a request addresses: its LocationConstraint, us-east-1 when it was created
    without one."""
    found = addressed(environ)
    return None if found is None else found[0].region_name


def region_error(signed: str, expected: str, presigned: bool, head: bool) -> tuple[str, list[tuple[str, str]], bytes]:
    """S3's answer to a request signed for another region than the bucket's, body and headers as AWS sends them.

    The ``Region`` element and the ``x-amz-bucket-region`` header are what SDKs read to retry in the right region.
    """
    if presigned:
        code = "AuthorizationQueryParametersError"
        message = (
            f"Error parsing the X-Amz-Credential parameter; the region '{signed}' is wrong; expecting '{expected}'"
        )
    else:
        code = "AuthorizationHeaderMalformed"
        message = f"The authorization header is malformed; the region '{signed}' is wrong; expecting '{expected}'"
    request_id = secrets.token_hex(8).upper()
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{escape(message)}</Message><Region>{escape(expected)}</Region>"
        f"<RequestId>{request_id}</RequestId><HostId>{secrets.token_urlsafe(48)}</HostId></Error>"
    ).encode()
    headers = [
        ("x-amz-bucket-region", expected),
        ("x-amz-request-id", request_id),
        ("Content-Type", "application/xml"),
        ("Server", "AmazonS3"),
    ]
    if head:  # S3 answers a HEAD with the status and headers only
        body = b""
    headers.append(("Content-Length", str(len(body))))
    return "400 Bad Request", headers, body


REFUSED = "region check refused"


def refusals(log: Path) -> list[str]:
    """The requests the server refused for their signing region, as its log (``running``'s) records them."""
    return [line for line in log.read_text().splitlines() if line.startswith(REFUSED)]


class RegionCheck:
    """WSGI middleware: a request on a bucket must be signed for the bucket's region, as S3 requires."""

    def __init__(self, app: WSGIApplication) -> None:
        self.app = app

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        signed = signing_region(environ)
        expected = bucket_region(environ) if signed else None
        if signed is None or expected is None or signed[0] == expected:
            return self.app(environ, start_response)
        method = environ["REQUEST_METHOD"]
        # One line per refusal in the server's log: a test reads them with ``refusals`` (boto3 retries some unseen).
        print(
            f"{REFUSED} {method} {environ.get('PATH_INFO', '')}: signed for {signed[0]}, bucket in {expected}",
            file=sys.stderr,
            flush=True,
        )
        status, headers, body = region_error(signed[0], expected, signed[1], method == "HEAD")
        start_response(status, headers)
        return [body]


BYTE_RANGE = re.compile(r"^bytes=(?P<first>[0-9]*)-(?P<last>[0-9]*)$")


FAULTS_PATH = "/localcluster/faults"  # test equipment: interrupted transfers on request


class Faults:
    """WSGI middleware: a POST of ``{"key": K, "after": N, "times": T}`` to FAULTS_PATH makes the next T GETs of
    key K send N bytes of their body and then drop the connection, as a reset or a timed-out transfer does. Each
    drop is logged ("fault: ...") for a test to read."""

    def __init__(self, app: WSGIApplication) -> None:
        self.app = app
        self.armed: dict[str, list[int]] = {}  # key -> [bytes sent before the drop, drops left]

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == FAULTS_PATH and environ["REQUEST_METHOD"] == "POST":
            size = int(environ.get("CONTENT_LENGTH") or 0)
            fault = json.loads(environ["wsgi.input"].read(size))
            self.armed[fault["key"]] = [int(fault["after"]), int(fault["times"])]
            start_response("204 No Content", [])
            return [b""]
        found = addressed(environ) if environ["REQUEST_METHOD"] == "GET" else None
        armed = self.armed.get(unquote(found[1])) if found else None
        if not armed or armed[1] <= 0:
            return self.app(environ, start_response)
        armed[1] -= 1
        return self._dropped(self.app(environ, start_response), armed[0], environ.get("PATH_INFO", ""))

    @staticmethod
    def _dropped(body: Iterable[bytes], after: int, path: str) -> Iterator[bytes]:
        sent = 0
        for chunk in body:
            if sent + len(chunk) >= after:
                yield chunk[: after - sent]
                print(f"fault: dropped GET {path} after {after} bytes", file=sys.stderr, flush=True)
                raise ConnectionAbortedError("fault injected by the test")  # the server closes the connection
            sent += len(chunk)
            yield chunk


class RangedGets:
    """WSGI middleware: a GET of one byte range of an object is answered from the stored object, reading only that
    range. moto reads the whole object for every GET, so a ranged download (boto3's, in parts) would cost the
    object's size per part and a benchmark would measure moto. Anything else (no or several ranges, a condition but
    a holding If-Match, versions, an unsatisfiable range) goes to moto, which answers as S3 does."""

    def __init__(self, app: WSGIApplication) -> None:
        self.app = app

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        answered = self._ranged(environ) if environ["REQUEST_METHOD"] == "GET" else None
        if answered is None:
            return self.app(environ, start_response)
        status, headers, body = answered
        start_response(status, headers)
        return [body]

    @staticmethod
    def _ranged(environ: WSGIEnvironment) -> tuple[str, list[tuple[str, str]], bytes] | None:
        match = BYTE_RANGE.match(environ.get("HTTP_RANGE", ""))
        # boto3's downloads in parts send If-Match with the ETag of the first part: kept here when it holds.
        conditions = {k for k in environ if k.startswith("HTTP_IF_")} - {"HTTP_IF_MATCH"}
        if match is None or conditions or environ.get("QUERY_STRING") or not (match["first"] or match["last"]):
            return None
        found = addressed(environ)
        if found is None or not found[1]:
            return None
        key = found[0].keys.get(unquote(found[1]))
        if key is None or not hasattr(key, "_value_buffer"):
            return None  # no such key (moto answers NoSuchKey), or a delete marker
        if environ.get("HTTP_IF_MATCH", key.etag) not in (key.etag, key.etag.strip('"')):
            return None  # moto's 412 PreconditionFailed
        size = key.size
        if match["first"]:
            first = int(match["first"])
            last = min(int(match["last"]), size - 1) if match["last"] else size - 1
        else:  # a suffix: the last N bytes
            first, last = max(size - int(match["last"]), 0), size - 1
        if first >= size or last < first:
            return None  # unsatisfiable: moto's 416 InvalidRange
        with key.lock:
            key._value_buffer.seek(first)
            body = key._value_buffer.read(last - first + 1)
        # The headers moto's own GET sends (S3Response.get_object), less the checksums S3 omits for a range.
        headers = {"x-amz-version-id": key.version_id} if key.version_id != "null" else {}
        headers |= {k: str(v) for k, v in key.response_dict.items() if k.lower() != "content-length"}
        headers |= {k: str(v) for k, v in key.metadata.items()}
        headers |= {
            "Accept-Ranges": "bytes",
            "content-range": f"bytes {first}-{last}/{size}",
            "content-length": str(len(body)),
        }
        return "206 Partial Content", list(headers.items()), body


def make_app() -> WSGIApplication:
    """moto's server app behind the region check, with ranged GETs answered from the stored object and interrupted
    transfers injected on request in between (so the region check covers them too)."""
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app

    return RegionCheck(Faults(RangedGets(DomainDispatcherApplication(create_backend_app))))


def serve(host: str, port: int) -> None:
    from moto.moto_server.werkzeug_app import MotoRequestHandler  # keeps S3 metadata headers with underscores
    from werkzeug.serving import run_simple

    run_simple(host, port, make_app(), threaded=True, request_handler=MotoRequestHandler)


@contextmanager
def running(log: Path, timeout: float = 30) -> Iterator[str]:
    """The server in a subprocess, its output appended to ``log``: yields its endpoint URL.

    Raises with the end of the log if the server exits or does not answer within ``timeout`` seconds.
    """
    port = free_port()
    with log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "localcluster.s3server", "--port", str(port)], stdout=out, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(url + "/moto-api/", timeout=1).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the local S3 did not start; its log:\n{log.read_text()[-4000:]}") from None
                time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(10)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m localcluster.s3server", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    serve(args.host, args.port)


if __name__ == "__main__":
    main()
