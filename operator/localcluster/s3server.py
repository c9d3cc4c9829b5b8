"""A local S3 and STS (IRSA's web identity) for tests and benchmarks: moto's server, as strict as AWS about regions
and credentials, and as cheap as S3 for ranged GETs (``RangedGets``).

moto answers a request on a bucket whatever region it was signed for; S3 refuses one that is not signed for the
bucket's region, and that difference is how a client configured for the wrong region slips through tests.
``RegionCheck`` refuses such requests with S3's own error, so boto3 reacts to them as it does against AWS: its
S3RegionRedirectorv2 sends the request again signed for the region the error names, and the call succeeds. A wrong
region then costs one refused request per client and bucket; ``refusals`` reads them from the server's log.
Requests that address no bucket (ListBuckets, STS, ``/moto-api``) and unsigned ones pass through unchanged; moto
itself refuses a CreateBucket whose LocationConstraint is not the signing region (but us-east-1's), as S3 does.

S3 takes only credentials that exist (``CredentialCheck``): the static keys the tests upload with, and the temporary
credentials the identity side hands out (``localcluster.awsidentity``: an STS whose AssumeRoleWithWebIdentity takes
only tokens the cluster's apiserver signed, and an EKS Pod Identity Agent). Anything else is refused in S3's words.

``python -m localcluster.s3server --port N`` serves on loopback (``--host`` elsewhere); ``running(log)`` starts that
as a subprocess. moto is imported in that process only: importing it adds its stub to botocore's handlers in the
importing process.
"""

from __future__ import annotations

import argparse
import json
import re
import secrets
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote
from xml.sax.saxutils import escape

from werkzeug.wrappers import Request

from localcluster import awsidentity
from localcluster.cluster import free_port

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment


def signing_region(environ: WSGIEnvironment) -> tuple[str, bool] | None:
    """The region an S3 request was signed for and whether it was presigned, or None when not signed with SigV4."""
    credential = awsidentity.signed(environ)
    if credential is None or credential.service != "s3" or credential.region is None:
        return None
    return credential.region, credential.presigned


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


def s3_error(
    status: str, code: str, message: str, details: dict[str, str], head: bool, headers: dict[str, str] | None = None
) -> tuple[str, list[tuple[str, str]], bytes]:
    """S3's error answer: its XML document (Code, Message, the error's own elements, RequestId, HostId) and headers."""
    request_id = secrets.token_hex(8).upper()
    elements = "".join(f"<{name}>{escape(value)}</{name}>" for name, value in details.items())
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{escape(message)}</Message>{elements}"
        f"<RequestId>{request_id}</RequestId><HostId>{secrets.token_urlsafe(48)}</HostId></Error>"
    ).encode()
    all_headers = [
        *(headers or {}).items(),
        ("x-amz-request-id", request_id),
        ("Content-Type", "application/xml"),
        ("Server", "AmazonS3"),
    ]
    if head:  # S3 answers a HEAD with the status and headers only
        body = b""
    all_headers.append(("Content-Length", str(len(body))))
    return status, all_headers, body


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
    return s3_error("400 Bad Request", code, message, {"Region": expected}, head, {"x-amz-bucket-region": expected})


REGION = "us-west-2"  # of the buckets upload_tree creates: requests on them must be signed for it
REFUSED = "region check refused"


def refusals(log: Path) -> list[str]:
    """The requests the server refused for their signing region, as its log (``running``'s) records them."""
    return [line for line in log.read_text().splitlines() if line.startswith(REFUSED)]


# S3's refusals of credentials that are not (or no longer) good, each as S3 sends it:
# - databend/databend#8069 quotes the whole document of InvalidAccessKeyId (403), with AWSAccessKeyId; it is also what
#   a temporary key without its session token gets (prolane/samltoawsstskeys#40, redbubble/yak#51, aws/aws-cli#3793);
# - InvalidToken, 400 (s3tools/s3cmd#297: "400 (InvalidToken): The provided token is malformed or otherwise invalid.");
# - ExpiredToken, 400 (aws/aws-cli#4613: "(ExpiredToken) ... The provided token has expired."; the status in
#   embulk/embulk-input-s3#43 and amazon-mq/rabbitmq-stream-s3#62).
# Both echo the session token sent as Token-0, as captured S3 error documents (client test fixtures) show.
CREDENTIAL_REFUSALS = {
    awsidentity.UNKNOWN: ("403 Forbidden", "InvalidAccessKeyId",
                          "The AWS Access Key Id you provided does not exist in our records."),
    awsidentity.WRONG_TOKEN: ("400 Bad Request", "InvalidToken",
                              "The provided token is malformed or otherwise invalid."),
    awsidentity.EXPIRED: ("400 Bad Request", "ExpiredToken", "The provided token has expired."),
}  # fmt: skip
CREDENTIALS_REFUSED = "credential check refused"


class CredentialCheck:
    """WSGI middleware: an S3 request signed with credentials S3 does not accept is refused in its words. Accepted:
    the static keys, and issued credentials with their session token until they expire. The SigV4 signature itself is
    not verified (moto does not either); unsigned requests pass, as before."""

    def __init__(self, app: WSGIApplication, identities: awsidentity.Identities) -> None:
        self.app, self.identities = app, identities

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        credential = awsidentity.signed(environ)
        verdict = self.identities.check(credential) if credential and credential.service == "s3" else None
        if verdict is None or verdict not in CREDENTIAL_REFUSALS:
            return self.app(environ, start_response)
        assert credential is not None
        status, code, message = CREDENTIAL_REFUSALS[verdict]
        method = environ["REQUEST_METHOD"]
        print(
            f"{CREDENTIALS_REFUSED} {method} {environ.get('PATH_INFO', '')}: {code} "
            f"access_key={credential.access_key_id}",
            file=sys.stderr,
            flush=True,
        )
        if verdict == awsidentity.UNKNOWN:
            details = {"AWSAccessKeyId": credential.access_key_id}
        else:
            details = {"Token-0": credential.session_token or ""}
        status, headers, body = s3_error(status, code, message, details, method == "HEAD")
        start_response(status, headers)
        return [body]


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


def make_app(identity: awsidentity.IdentityService) -> WSGIApplication:
    """moto's server app behind the identity side (STS, the test equipment), the region check and the credential
    check, with ranged GETs answered from the stored object and interrupted transfers injected on request in between
    (so both checks cover them too)."""
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app

    s3 = Faults(RangedGets(DomainDispatcherApplication(create_backend_app)))
    return identity.endpoints(RegionCheck(CredentialCheck(s3, identity.identities)))


def serve(host: str, port: int, identity: awsidentity.IdentityService) -> None:
    """The S3 and STS on ``host:port``, and the Pod Identity Agent where ``identity`` says, in one process: the agent
    hands out credentials the S3 then accepts."""
    from moto.moto_server.werkzeug_app import MotoRequestHandler  # keeps S3 metadata headers with underscores
    from werkzeug.serving import make_server, run_simple

    class RequestHandler(MotoRequestHandler):
        """moto's, logging requests without their secret query parameters (presigned URLs' session tokens)."""

        def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
            path, self.path = self.path, awsidentity.redacted(self.path)
            try:
                super().log_request(code, size)
            finally:
                self.path = path

    if identity.agent is not None:
        agent = make_server(*identity.agent, identity.agent_app(), threaded=True)
        threading.Thread(target=agent.serve_forever, name="pod-identity-agent", daemon=True).start()
        awsidentity.log("pod identity agent listening", host=identity.agent[0], port=identity.agent[1])
    run_simple(host, port, make_app(identity), threaded=True, request_handler=RequestHandler)


@contextmanager
def running(
    log: Path, timeout: float = 30, *, host: str = "127.0.0.1", identity: awsidentity.Options | None = None
) -> Iterator[str]:
    """The server in a subprocess on ``host`` (loopback by default), its output appended to ``log``: yields its
    endpoint URL, the S3's and STS's. ``identity`` says how tokens are verified and where the Pod Identity Agent
    listens (``identity.agent_uri``); roles and associations are set with ``awsidentity.trust``/``associate``.

    Raises with the end of the log if the server exits or does not answer within ``timeout`` seconds.
    """
    identity = identity or awsidentity.Options()
    port = free_port()
    argv = ["--host", host, "--port", str(port), *identity.argv(log.with_name(f"{log.name}.{port}.jwks.json"))]
    with log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "localcluster.s3server", *argv], stdout=out, stderr=subprocess.STDOUT
        )
    url = f"http://{host}:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(url + "/moto-api/", timeout=1).close()
                if identity.agent is not None:
                    socket.create_connection(identity.agent, timeout=1).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the local S3 did not start; its log:\n{log.read_text()[-4000:]}") from None
                time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(10)


def client(endpoint: str, region: str = REGION) -> Any:  # boto3 generates its client types at run time
    """An S3 client of the tests' uploads: the static key, signing for ``region``."""
    import boto3

    return boto3.client(
        "s3", endpoint_url=endpoint, region_name=region, aws_access_key_id="test", aws_secret_access_key="test"
    )


def upload_tree(endpoint: str, bucket: str, prefix: str, root: Path, region: str = REGION) -> int:
    """Every file under ``root`` as an object under ``prefix``, in ``bucket`` (made in ``region`` if missing)."""
    s3 = client(endpoint, region)
    existing = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
    if bucket not in existing:
        # S3 takes no LocationConstraint for us-east-1, where a bucket lives without one.
        where = {} if region == "us-east-1" else {"CreateBucketConfiguration": {"LocationConstraint": region}}
        s3.create_bucket(Bucket=bucket, **where)
    files = [p for p in root.rglob("*") if p.is_file()]
    for path in files:
        s3.upload_file(str(path), bucket, f"{prefix}{path.relative_to(root).as_posix()}")
    return len(files)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m localcluster.s3server", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    awsidentity.add_arguments(parser)
    args = parser.parse_args(argv)
    serve(args.host, args.port, awsidentity.IdentityService.from_arguments(args))


if __name__ == "__main__":
    main()
