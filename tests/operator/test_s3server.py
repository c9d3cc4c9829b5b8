"""The local S3 refuses what AWS refuses for its signing region; boto3 meets it as it meets AWS."""

from __future__ import annotations

import http.client
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from xml.etree import ElementTree

import boto3
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from botocore.exceptions import ClientError
from s3 import SigningKey, clean_aws_env

from localcluster import awsidentity, s3server
from localcluster.s3server import client

BUCKET, BUCKET_REGION = "eu-models", "eu-west-1"
KEY, BODY = "bert/saved_model.pb", b"\x08\x01"
ISSUER_KEY = SigningKey()  # the service-account key of the cluster whose tokens the server's STS takes


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """(endpoint, log) of a server holding one object in a bucket of BUCKET_REGION."""
    log = tmp_path_factory.mktemp("s3") / "s3.log"
    with s3server.running(log, identity=awsidentity.Options(jwks=ISSUER_KEY.jwks)) as endpoint:
        s3 = client(endpoint, BUCKET_REGION)
        s3.create_bucket(Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": BUCKET_REGION})
        s3.put_object(Bucket=BUCKET, Key=KEY, Body=BODY)
        yield endpoint, log


def send(endpoint: str, method: str, path: str, region: str, host: str = "") -> tuple[int, Any, bytes]:
    """One request signed for ``region`` as boto3 signs it, without boto3's retries: S3's first answer."""
    netloc = urlparse(endpoint).netloc
    request = AWSRequest(method=method, url=f"http://{host or netloc}{path}")
    SigV4Auth(Credentials("test", "test"), "s3", region).add_auth(request)
    connection = http.client.HTTPConnection(netloc, timeout=10)
    try:
        connection.request(method, path, headers={**request.headers, "Host": host or netloc})
        response = connection.getresponse()
        return response.status, response.headers, response.read()
    finally:
        connection.close()


def error(body: bytes) -> tuple[str | None, str | None, str | None]:
    root = ElementTree.fromstring(body)
    return root.findtext("Code"), root.findtext("Message"), root.findtext("Region")


def test_a_request_signed_for_another_region_is_refused_as_s3_refuses_it(server: tuple[str, Path]) -> None:
    endpoint, log = server
    status, headers, body = send(endpoint, "GET", f"/{BUCKET}/{KEY}", "us-west-2")
    assert status == 400 and headers["x-amz-bucket-region"] == BUCKET_REGION
    assert error(body) == (
        "AuthorizationHeaderMalformed",
        "The authorization header is malformed; the region 'us-west-2' is wrong; expecting 'eu-west-1'",
        BUCKET_REGION,
    )
    assert s3server.refusals(log)[-1].endswith(f"GET /{BUCKET}/{KEY}: signed for us-west-2, bucket in {BUCKET_REGION}")
    assert send(endpoint, "GET", f"/{BUCKET}/{KEY}", BUCKET_REGION)[::2] == (200, BODY)


def test_every_way_of_addressing_the_bucket_is_checked(server: tuple[str, Path]) -> None:
    endpoint, _ = server
    host = f"{BUCKET}.localhost:{urlparse(endpoint).port}"  # virtual-host style, as moto reads it
    assert send(endpoint, "GET", f"/{KEY}", BUCKET_REGION, host=host)[::2] == (200, BODY)
    status, _, body = send(endpoint, "GET", f"/{KEY}", "us-west-2", host=host)
    assert status == 400 and error(body)[0] == "AuthorizationHeaderMalformed"
    status, _, body = send(endpoint, "GET", f"/{BUCKET}?list-type=2", "us-west-2")
    assert status == 400 and error(body)[0] == "AuthorizationHeaderMalformed"
    # A HEAD answer has no body: SDKs find the region in the header.
    status, headers, body = send(endpoint, "HEAD", f"/{BUCKET}/{KEY}", "us-west-2")
    assert (status, headers["x-amz-bucket-region"], body) == (400, BUCKET_REGION, b"")

    presigned = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-west-2",
        aws_access_key_id="test",
        aws_secret_access_key="test",
        config=Config(signature_version="s3v4"),
    ).generate_presigned_url("get_object", Params={"Bucket": BUCKET, "Key": KEY})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(presigned, timeout=10)
    assert refused.value.code == 400 and refused.value.headers["x-amz-bucket-region"] == BUCKET_REGION
    assert error(refused.value.read()) == (
        "AuthorizationQueryParametersError",
        "Error parsing the X-Amz-Credential parameter; the region 'us-west-2' is wrong; expecting 'eu-west-1'",
        BUCKET_REGION,
    )


def test_requests_on_no_existing_bucket_pass_whatever_their_region(server: tuple[str, Path]) -> None:
    endpoint, _ = server
    elsewhere = client(endpoint, "ap-south-1")
    assert BUCKET in {b["Name"] for b in elsewhere.list_buckets()["Buckets"]}
    with pytest.raises(ClientError) as missing:
        elsewhere.list_objects_v2(Bucket="no-such-bucket")
    assert missing.value.response["Error"]["Code"] == "NoSuchBucket"


def test_create_bucket_takes_only_the_location_of_the_region_it_is_signed_for(server: tuple[str, Path]) -> None:
    """moto's own check, kept: S3's regional endpoints create buckets in their region only, us-east-1's anywhere."""
    endpoint, _ = server
    with pytest.raises(ClientError) as refused:
        client(endpoint, BUCKET_REGION).create_bucket(
            Bucket="west-models", CreateBucketConfiguration={"LocationConstraint": "us-west-2"}
        )
    assert refused.value.response["Error"] == {
        "Code": "IllegalLocationConstraintException",
        "Message": "The us-west-2 location constraint is incompatible for the region specific endpoint this request "
        "was sent to.",
    }
    client(endpoint, "us-east-1").create_bucket(
        Bucket="west-models", CreateBucketConfiguration={"LocationConstraint": "us-west-2"}
    )
    assert client(endpoint).get_bucket_location(Bucket="west-models")["LocationConstraint"] == "us-west-2"


@pytest.mark.parametrize(
    ("setting", "client_region", "refused"),
    [
        ("region_name", BUCKET_REGION, 0),
        ("AWS_DEFAULT_REGION", BUCKET_REGION, 0),
        # botocore does not read AWS_REGION: the client signs for us-east-1, the default, and S3 refuses that.
        ("AWS_REGION", "us-east-1", 1),
    ],
)
def test_botocore_takes_the_region_from_region_name_or_aws_default_region_only(
    server: tuple[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    setting: str,
    client_region: str,
    refused: int,
) -> None:
    endpoint, log = server
    clean_aws_env(monkeypatch, tmp_path)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    if setting == "region_name":
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name=BUCKET_REGION)
    else:
        monkeypatch.setenv(setting, BUCKET_REGION)
        s3 = boto3.client("s3", endpoint_url=endpoint)
    assert s3.meta.region_name == client_region
    before = len(s3server.refusals(log))
    # S3's answer names the bucket's region; botocore's S3RegionRedirectorv2 sends the request again, signed for it,
    # to the same endpoint_url, and signs for that region from then on: the client gets its objects anyway.
    for _ in range(2):
        assert [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET)["Contents"]] == [KEY]
    refusals = s3server.refusals(log)[before:]
    assert len(refusals) == refused
    assert all(line.endswith(f"signed for us-east-1, bucket in {BUCKET_REGION}") for line in refusals)


def test_irsa_web_identity_goes_through_the_local_sts(
    server: tuple[str, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    endpoint, log = server
    clean_aws_env(monkeypatch, tmp_path)
    awsidentity.trust(endpoint, "arn:aws:iam::111122223333:role/neuron-model-reader", "system:serviceaccount:*:reader")
    token = tmp_path / "token"
    token.write_text(ISSUER_KEY.token(namespace="models", service_account="reader"))
    for name, value in {
        "AWS_ROLE_ARN": "arn:aws:iam::111122223333:role/neuron-model-reader",
        "AWS_WEB_IDENTITY_TOKEN_FILE": str(token),
        "AWS_ENDPOINT_URL_STS": endpoint,
        "AWS_ENDPOINT_URL_S3": endpoint,
        "AWS_DEFAULT_REGION": BUCKET_REGION,
    }.items():
        monkeypatch.setenv(name, value)
    session = boto3.session.Session()
    identity = session.client("sts").get_caller_identity()
    assert identity["Account"] == "111122223333" and ":assumed-role/neuron-model-reader/" in identity["Arn"]
    before = len(s3server.refusals(log))
    assert session.client("s3").get_object(Bucket=BUCKET, Key=KEY)["Body"].read() == BODY
    assert len(s3server.refusals(log)) == before


def test_a_server_that_cannot_start_fails_with_its_log(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        monkeypatch.setattr(s3server, "free_port", lambda: taken.getsockname()[1])
        with pytest.raises(RuntimeError, match="did not start") as failed, s3server.running(tmp_path / "s3.log"):
            pass
    assert "in use" in str(failed.value)


def test_a_ranged_get_is_answered_from_the_stored_object_as_s3_answers_it(server: tuple[str, Path]) -> None:
    endpoint, _ = server
    s3 = client(endpoint, BUCKET_REGION)
    body = bytes(range(256)) * 4096  # 1 MiB
    s3.put_object(Bucket=BUCKET, Key="big/variables.data", Body=body, ContentType="application/x-data",
                  Metadata={"team": "search"})  # fmt: skip
    whole = s3.get_object(Bucket=BUCKET, Key="big/variables.data")  # moto's own answer
    for asked, first, last in (("bytes=10-99", 10, 99), ("bytes=1048000-", 1048000, 1048575), ("bytes=-16", 1048560,
                               1048575), ("bytes=1048500-2000000", 1048500, 1048575)):  # fmt: skip
        part = s3.get_object(Bucket=BUCKET, Key="big/variables.data", Range=asked)
        assert part["ResponseMetadata"]["HTTPStatusCode"] == 206
        assert part["Body"].read() == body[first : last + 1]
        assert part["ContentRange"] == f"bytes {first}-{last}/{len(body)}"
        assert (part["ETag"], part["ContentType"], part["Metadata"]) == (
            whole["ETag"],
            "application/x-data",
            {"team": "search"},
        )
    # A holding If-Match (boto3 sends one with each part of a download) is served; another ETag is refused, as S3.
    matched = s3.get_object(Bucket=BUCKET, Key="big/variables.data", Range="bytes=0-9", IfMatch=whole["ETag"])
    assert matched["Body"].read() == body[:10]
    with pytest.raises(ClientError) as changed:
        s3.get_object(Bucket=BUCKET, Key="big/variables.data", Range="bytes=0-9", IfMatch='"0123456789abcdef"')
    assert changed.value.response["Error"]["Code"] == "PreconditionFailed"
    # What the stored object cannot satisfy is moto's to answer, as S3: 416 InvalidRange.
    with pytest.raises(ClientError) as refused:
        s3.get_object(Bucket=BUCKET, Key="big/variables.data", Range="bytes=2000000-")
    assert refused.value.response["Error"]["Code"] == "InvalidRange"
    # A ranged download in parts (boto3's transfer manager) gets the object whole.
    target = Path(str(server[1]) + ".download")
    parts = boto3.s3.transfer.TransferConfig(multipart_threshold=1 << 18, multipart_chunksize=1 << 18)
    s3.download_file(BUCKET, "big/variables.data", str(target), Config=parts)
    assert target.read_bytes() == body
