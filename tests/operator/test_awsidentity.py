"""The local STS and EKS Pod Identity Agent take only service-account tokens the cluster's apiserver signed, for the
roles and associations configured, and the local S3 only the credentials they hand out: refusals in AWS's words.

The cluster tests get their tokens from the apiserver's TokenRequest API and run boto3's own credential providers
(web identity, container) in a subprocess, as a pod would; the unit tests sign tokens with a key of their own, for what
TokenRequest cannot give (an expired token, another issuer)."""

from __future__ import annotations

import http.client
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode, urlparse
from xml.etree import ElementTree

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from kubernetes import client
from s3 import SigningKey, claims_of, kid_of

from localcluster import awsidentity, s3server
from localcluster.awsidentity import NO_KEY, NOT_VALIDATED, POD_IDENTITY_AUDIENCE, STS_AUDIENCE
from localcluster.cluster import free_port
from localcluster.s3server import REGION, upload_tree
from localcluster.simcluster import SimulatedCluster

BUCKET, KEY, BODY = "irsa-models", "resnet/saved_model.pb", "saved model"
ROLE = "arn:aws:iam::111122223333:role/neuron-model-reader"
ISSUER_KEY, OTHER_KEY = SigningKey(), SigningKey()
NOT_AUTHORIZED = ("AccessDenied", "Not authorized to perform sts:AssumeRoleWithWebIdentity")

# What a pod does with the credentials the environment leads boto3 to: who it is, then the bucket's listing and object.
POD = """
import json, sys
import boto3
from botocore.exceptions import BotoCoreError, ClientError
session = boto3.session.Session()
try:
    arn = session.client("sts").get_caller_identity()["Arn"]
    s3 = session.client("s3")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=sys.argv[1])["Contents"]]
    body = s3.get_object(Bucket=sys.argv[1], Key=sys.argv[2])["Body"].read().decode()
    print(json.dumps({"arn": arn, "keys": keys, "body": body}))
except ClientError as exc:
    print(json.dumps({"operation": exc.operation_name, "code": exc.response["Error"]["Code"],
                      "message": exc.response["Error"]["Message"]}))
except BotoCoreError as exc:
    print(json.dumps({"failure": type(exc).__name__, "message": str(exc)}))
"""


def as_pod(endpoint: str, tmp: Path, **aws: str) -> dict[str, Any]:
    """POD's outcome in a fresh process whose only AWS settings are ``aws`` and the local endpoints."""
    empty = tmp / "aws-config"
    empty.touch()
    env = {name: value for name, value in os.environ.items() if not name.startswith("AWS_")}
    env |= {"AWS_CONFIG_FILE": str(empty), "AWS_SHARED_CREDENTIALS_FILE": str(empty)}
    env |= {"AWS_EC2_METADATA_DISABLED": "true", "AWS_DEFAULT_REGION": REGION}
    env |= {"AWS_ENDPOINT_URL_S3": endpoint, "AWS_ENDPOINT_URL_STS": endpoint, **aws}
    done = subprocess.run([sys.executable, "-c", POD, BUCKET, KEY], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def web_identity(endpoint: str, tmp: Path, token: str, role: str = ROLE) -> dict[str, Any]:
    """POD with IRSA's environment: the role and the token file, as the pod identity webhook injects them."""
    path = tmp / f"token-{time.monotonic_ns()}"
    path.write_text(token)
    return as_pod(endpoint, tmp, AWS_ROLE_ARN=role, AWS_WEB_IDENTITY_TOKEN_FILE=str(path))


def pod_identity(endpoint: str, agent_uri: str, tmp: Path, token: str) -> dict[str, Any]:
    """POD with EKS Pod Identity's environment: the agent's URI and the token file."""
    path = tmp / f"token-{time.monotonic_ns()}"
    path.write_text(token)
    return as_pod(endpoint, tmp, AWS_CONTAINER_CREDENTIALS_FULL_URI=agent_uri,
                  AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE=str(path))  # fmt: skip


def start(log: Path, options: awsidentity.Options) -> Iterator[tuple[str, str]]:
    """(endpoint, agent URI) of a server holding BUCKET/KEY, uploaded with the static key."""
    with s3server.running(log, identity=options) as endpoint:
        upload_tree(endpoint, BUCKET, "", _tree(log.parent))
        assert options.agent_uri is not None
        yield endpoint, options.agent_uri


def _tree(tmp: Path) -> Path:
    (tmp / "tree" / KEY).parent.mkdir(parents=True, exist_ok=True)
    (tmp / "tree" / KEY).write_text(BODY)
    return tmp / "tree"


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(endpoint, agent URI) of a server trusting ISSUER_KEY's tokens, the agent on loopback (botocore takes it)."""
    options = awsidentity.Options(jwks=ISSUER_KEY.jwks, agent=("127.0.0.1", free_port()))
    yield from start(tmp_path_factory.mktemp("local") / "s3.log", options)


def sts_call(endpoint: str, parameters: dict[str, str], method: str = "POST") -> tuple[int, bytes]:
    """One unsigned STS Query request, as a form POST (botocore's way) or a query string; STS's first answer."""
    query = urlencode({"Version": "2011-06-15", **parameters})
    if method == "POST":
        request = urllib.request.Request(endpoint + "/", data=query.encode(), method="POST",
                                         headers={"Content-Type": "application/x-www-form-urlencoded"})  # fmt: skip
    else:
        request = urllib.request.Request(f"{endpoint}/?{query}", method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def assume(endpoint: str, token: str, role: str = ROLE, method: str = "POST") -> tuple[int, bytes]:
    parameters = {"Action": "AssumeRoleWithWebIdentity", "RoleArn": role, "RoleSessionName": "unit-test",
                  "WebIdentityToken": token}  # fmt: skip
    return sts_call(endpoint, parameters, method)


def sts_error(status: int, body: bytes) -> tuple[int, str | None, str | None]:
    """(status, Code, Message) of an STS error document, checking its shape."""
    root = ElementTree.fromstring(body)

    def text(path: str) -> str | None:
        return root.findtext(path.replace("/", "/sts:").join(["sts:", ""]), None, {"sts": awsidentity.STS_XMLNS})

    assert root.tag == f"{{{awsidentity.STS_XMLNS}}}ErrorResponse" and text("RequestId")
    assert text("Error/Type") == "Sender"
    return status, text("Error/Code"), text("Error/Message")


def test_a_token_of_the_trusted_service_account_gets_credentials_s3_takes(
    local: tuple[str, str], tmp_path: Path
) -> None:
    endpoint, _ = local
    awsidentity.trust(endpoint, ROLE, "system:serviceaccount:models:reader")
    outcome = web_identity(endpoint, tmp_path, ISSUER_KEY.token())
    assert outcome["arn"].startswith("arn:aws:sts::111122223333:assumed-role/neuron-model-reader/botocore-session-")
    assert (outcome["keys"], outcome["body"]) == ([KEY], BODY)


def test_the_response_is_sts_s_with_the_token_s_subject_and_the_provider(local: tuple[str, str]) -> None:
    endpoint, _ = local
    awsidentity.trust(endpoint, ROLE, "system:serviceaccount:*:reader")
    status, body = assume(endpoint, ISSUER_KEY.token(namespace="ml"))
    namespace = {"sts": awsidentity.STS_XMLNS}
    result = ElementTree.fromstring(body).find("sts:AssumeRoleWithWebIdentityResult", namespace)
    assert status == 200 and result is not None
    fields = {e.tag.split("}")[1]: e.text for e in result.iter() if not list(e)}
    assert fields["SubjectFromWebIdentityToken"] == "system:serviceaccount:ml:reader"
    assert fields["Audience"] == STS_AUDIENCE
    assert fields["Provider"] == "arn:aws:iam::111122223333:oidc-provider/kubernetes.default.svc.cluster.local"
    assert fields["Arn"] == "arn:aws:sts::111122223333:assumed-role/neuron-model-reader/unit-test"
    assert re.fullmatch(r"AROA[A-Z2-7]{17}:unit-test", fields["AssumedRoleId"] or "")
    assert re.fullmatch(r"ASIA[A-Z2-7]{16}", fields["AccessKeyId"] or "")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", fields["Expiration"] or "")
    assert fields["SecretAccessKey"] and fields["SessionToken"]


def test_the_query_string_form_is_answered_and_its_token_kept_out_of_the_log(tmp_path: Path) -> None:
    log = tmp_path / "s3.log"
    with s3server.running(log, identity=awsidentity.Options(jwks=ISSUER_KEY.jwks)) as endpoint:
        awsidentity.trust(endpoint, ROLE, "system:serviceaccount:models:reader")
        token = ISSUER_KEY.token()
        assert assume(endpoint, token, method="GET")[0] == 200
    text = log.read_text()
    assert "WebIdentityToken=REDACTED" in text and token not in text and token.split(".")[2] not in text


@pytest.mark.parametrize(
    ("token", "role", "refusal"),
    [
        (ISSUER_KEY.token(service_account="intruder"), ROLE, (403, *NOT_AUTHORIZED)),
        (ISSUER_KEY.token(), "arn:aws:iam::111122223333:role/no-such-role", (403, *NOT_AUTHORIZED)),
        (ISSUER_KEY.token(audience=POD_IDENTITY_AUDIENCE), ROLE,
         (400, "InvalidIdentityToken", "Incorrect token audience")),
        (ISSUER_KEY.token(aud=[]), ROLE, (400, "InvalidIdentityToken", "Missing a required claim: aud")),
        (ISSUER_KEY.token(iss="https://oidc.example.com/id/1"), ROLE,
         (400, "InvalidIdentityToken", "No OpenIDConnect provider found in your account for https://oidc.example.com/id/1")),
        (OTHER_KEY.token(), ROLE, (400, "InvalidIdentityToken", NO_KEY)),  # another key: a kid the JWK Set lacks
        (OTHER_KEY.sign(claims_of(ISSUER_KEY.token()), kid=ISSUER_KEY.kid), ROLE,
         (400, "InvalidIdentityToken", NOT_VALIDATED)),  # the issuer's kid, another key's signature
        (ISSUER_KEY.token(nbf=int(time.time()) + 3600), ROLE, (400, "InvalidIdentityToken", NOT_VALIDATED)),
        ("simulated-token-for-reader", ROLE, (400, "InvalidIdentityToken", NOT_VALIDATED)),  # strict unless asked
    ],
    ids=["another-service-account", "unknown-role", "wrong-audience", "no-audience", "another-issuer",
         "unknown-key", "bad-signature", "not-yet-valid", "not-a-jwt"],
)  # fmt: skip
def test_sts_refuses_in_its_words(local: tuple[str, str], token: str, role: str, refusal: tuple[int, str, str]) -> None:
    endpoint, _ = local
    awsidentity.trust(endpoint, ROLE, "system:serviceaccount:models:reader")
    assert sts_error(*assume(endpoint, token, role)) == refusal


def test_an_expired_token_is_refused_with_both_dates(local: tuple[str, str]) -> None:
    endpoint, _ = local
    awsidentity.trust(endpoint, ROLE, "system:serviceaccount:models:reader")
    expired = int(time.time()) - 5
    status, code, message = sts_error(*assume(endpoint, ISSUER_KEY.token(exp=expired)))
    assert (status, code) == (400, "ExpiredTokenException")
    match = re.fullmatch(rf"Token expired: current date/time (\d+) must be before the expiration date/time {expired}",
                         message or "")  # fmt: skip
    assert match and 0 <= int(match[1]) - expired < 60


def test_the_verifier_checks_signature_issuer_times_and_audience_and_reads_rotated_keys() -> None:
    fetched: list[dict[str, Any]] = [ISSUER_KEY.jwks]
    verifier = awsidentity.Verifier(awsidentity.ISSUER, lambda: fetched[-1])
    token, now = ISSUER_KEY.token(lifetime=600), time.time()
    assert verifier.verify(token, STS_AUDIENCE, now)["sub"] == "system:serviceaccount:models:reader"
    reasons = {
        "expired": (token, now + 600),
        "audience": (ISSUER_KEY.token(audience="vault"), now),
        "not-yet-valid": (token, now - 60),
        "malformed": ("a.b", now),
        "key": (OTHER_KEY.token(), now),
    }
    for reason, (candidate, at) in reasons.items():
        with pytest.raises(awsidentity.Rejected) as rejected:
            verifier.verify(candidate, STS_AUDIENCE, at)
        assert rejected.value.reason == reason
    # The apiserver signs with a new key: its kid is unknown, the keys are read again, as IAM reads them again.
    fetched.append({"keys": ISSUER_KEY.jwks["keys"] + OTHER_KEY.jwks["keys"]})
    assert verifier.verify(OTHER_KEY.token(), STS_AUDIENCE)["iss"] == awsidentity.ISSUER


def test_a_server_without_a_provider_refuses_every_token(tmp_path: Path) -> None:
    with s3server.running(tmp_path / "s3.log") as endpoint:
        awsidentity.trust(endpoint, ROLE, "system:serviceaccount:models:reader")
        status, code, message = sts_error(*assume(endpoint, ISSUER_KEY.token()))
    assert (status, code, message) == (
        400, "InvalidIdentityToken", f"No OpenIDConnect provider found in your account for {awsidentity.ISSUER}",
    )  # fmt: skip


def s3_request(endpoint: str, method: str, path: str, credentials: Credentials) -> tuple[int, bytes]:
    """One S3 request signed with ``credentials`` as boto3 signs it, without its retries."""
    netloc = urlparse(endpoint).netloc
    request = AWSRequest(method=method, url=f"http://{netloc}{path}")
    SigV4Auth(credentials, "s3", REGION).add_auth(request)
    connection = http.client.HTTPConnection(netloc, timeout=10)
    try:
        connection.request(method, path, headers=dict(request.headers))
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def s3_error(body: bytes) -> dict[str, str | None]:
    return {e.tag: e.text for e in ElementTree.fromstring(body) if e.tag not in {"RequestId", "HostId"}}


def issued(endpoint: str) -> dict[str, str]:
    """Credentials STS issued for ROLE."""
    awsidentity.trust(endpoint, ROLE, "system:serviceaccount:models:reader")
    status, body = assume(endpoint, ISSUER_KEY.token())
    assert status == 200
    namespace = {"sts": awsidentity.STS_XMLNS}
    found = ElementTree.fromstring(body).find("sts:AssumeRoleWithWebIdentityResult/sts:Credentials", namespace)
    assert found is not None
    return {e.tag.split("}")[1]: e.text or "" for e in found}


def test_s3_takes_only_credentials_that_exist(local: tuple[str, str]) -> None:
    endpoint, _ = local
    path = f"/{BUCKET}/{KEY}"
    good = issued(endpoint)
    key, secret, token = good["AccessKeyId"], good["SecretAccessKey"], good["SessionToken"]
    assert s3_request(endpoint, "GET", path, Credentials(key, secret, token)) == (200, BODY.encode())
    assert s3_request(endpoint, "GET", path, Credentials("test", "test"))[0] == 200  # the uploads' static key

    status, body = s3_request(endpoint, "GET", path, Credentials("ASIAQWERTYUIOPASDFGH", "x", "y"))
    assert (status, s3_error(body)) == (403, {"Code": "InvalidAccessKeyId", "Message": "The AWS Access Key Id you "
                                              "provided does not exist in our records.", "AWSAccessKeyId":
                                              "ASIAQWERTYUIOPASDFGH"})  # fmt: skip
    # A temporary key without its session token is not one S3 knows either.
    status, body = s3_request(endpoint, "GET", path, Credentials(key, secret))
    assert (status, s3_error(body)["Code"]) == (403, "InvalidAccessKeyId")
    status, body = s3_request(endpoint, "GET", path, Credentials(key, secret, token[:-8] + "AAAAAAA="))
    assert (status, s3_error(body)) == (400, {"Code": "InvalidToken", "Message": "The provided token is malformed or "
                                              "otherwise invalid.", "Token-0": token[:-8] + "AAAAAAA="})  # fmt: skip
    # A HEAD is refused with the status alone, as S3 answers HEADs.
    assert s3_request(endpoint, "HEAD", path, Credentials("ASIAQWERTYUIOPASDFGH", "x", "y")) == (403, b"")

    awsidentity.expire(endpoint, key)
    status, body = s3_request(endpoint, "GET", path, Credentials(key, secret, token))
    assert (status, s3_error(body)) == (400, {"Code": "ExpiredToken", "Message": "The provided token has expired.",
                                              "Token-0": token})  # fmt: skip


@pytest.mark.parametrize("signature_version", ["s3", "s3v4"])  # botocore presigns with SigV2 unless told
def test_a_presigned_url_carries_the_session_token_which_stays_out_of_the_log(
    tmp_path: Path, signature_version: str
) -> None:
    import boto3
    from botocore.config import Config

    log = tmp_path / "s3.log"
    with s3server.running(log, identity=awsidentity.Options(jwks=ISSUER_KEY.jwks)) as endpoint:
        upload_tree(endpoint, BUCKET, "", _tree(tmp_path))
        good = issued(endpoint)
        credentials = {"aws_access_key_id": good["AccessKeyId"], "aws_secret_access_key": good["SecretAccessKey"]}
        credentials["aws_session_token"] = good["SessionToken"]
        config = Config(signature_version=signature_version)
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name=REGION, config=config, **credentials)
        url = s3.generate_presigned_url("get_object", Params={"Bucket": BUCKET, "Key": KEY})
        assert urllib.request.urlopen(url, timeout=10).read() == BODY.encode()
        awsidentity.expire(endpoint, good["AccessKeyId"])
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(url, timeout=10)
        assert refused.value.code == 400 and s3_error(refused.value.read())["Code"] == "ExpiredToken"
    text = log.read_text()
    assert good["SessionToken"] not in text and quote(good["SessionToken"], safe="") not in text
    assert "x-amz-security-token=redacted" in text.lower()
    assert f"{s3server.CREDENTIALS_REFUSED} GET /{BUCKET}/{KEY}: ExpiredToken access_key={good['AccessKeyId']}" in text


def test_sts_refuses_calls_signed_with_credentials_it_did_not_issue(local: tuple[str, str], tmp_path: Path) -> None:
    endpoint, _ = local
    unknown = as_pod(endpoint, tmp_path, AWS_ACCESS_KEY_ID="ASIAQWERTYUIOPASDFGH", AWS_SECRET_ACCESS_KEY="x",
                     AWS_SESSION_TOKEN="y")  # fmt: skip
    assert unknown == {"operation": "GetCallerIdentity", "code": "InvalidClientTokenId",
                       "message": "The security token included in the request is invalid."}  # fmt: skip
    good = issued(endpoint)
    awsidentity.expire(endpoint, good["AccessKeyId"])
    expired = as_pod(endpoint, tmp_path, AWS_ACCESS_KEY_ID=good["AccessKeyId"],
                     AWS_SECRET_ACCESS_KEY=good["SecretAccessKey"], AWS_SESSION_TOKEN=good["SessionToken"])  # fmt: skip
    assert expired == {"operation": "GetCallerIdentity", "code": "ExpiredToken",
                       "message": "The security token included in the request is expired"}  # fmt: skip


def agent_call(agent_uri: str, token: str | None, host: str | None = None) -> tuple[int, str, str]:
    """(status, content type, body) of one GET of the agent, as botocore's container provider sends it."""
    headers = {"Accept": "application/json", **({"Authorization": token} if token is not None else {})}
    if host is not None:
        headers["Host"] = host
    request = urllib.request.Request(agent_uri, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read().decode()


def test_the_agent_answers_an_associated_service_account_as_eks_pod_identity_does(
    local: tuple[str, str], tmp_path: Path
) -> None:
    endpoint, agent_uri = local
    awsidentity.associate(endpoint, "models", "server", ROLE)
    status, content_type, body = agent_call(agent_uri, ISSUER_KEY.token(service_account="server",
                                                                        audience=POD_IDENTITY_AUDIENCE))  # fmt: skip
    assert (status, content_type) == (200, "application/json")
    answer = json.loads(body)
    assert sorted(answer) == ["AccessKeyId", "AccountId", "Expiration", "SecretAccessKey", "Token"]
    assert answer["AccountId"] == "111122223333" and answer["AccessKeyId"].startswith("ASIA")
    outcome = pod_identity(endpoint, agent_uri, tmp_path,
                           ISSUER_KEY.token(service_account="server", audience=POD_IDENTITY_AUDIENCE))  # fmt: skip
    assert outcome["arn"].startswith("arn:aws:sts::111122223333:assumed-role/neuron-model-reader/eks-localcluster-")
    assert (outcome["keys"], outcome["body"]) == ([KEY], BODY)


@pytest.mark.parametrize(
    ("token", "host", "status", "words"),
    [
        (None, None, 400, "Service account token cannot be empty\n"),
        ("Bearer x.y.z", None, 400, "Service account token cannot be parsed: token is malformed: could not base64 "
         "decode header: illegal base64 data at input byte 6\n"),  # n8n-io/n8n#23584 quotes the agent's log of this
        ("opaque", None, 400, "Service account token cannot be parsed: token is malformed: token contains an invalid "
         "number of segments\n"),
        (ISSUER_KEY.token(audience=POD_IDENTITY_AUDIENCE, exp=int(time.time()) - 1), None, 400,
         "Service account token failed basic claim validations: token is expired\n"),
        (ISSUER_KEY.token(audience=POD_IDENTITY_AUDIENCE), "localhost", 403, "Access Denied. Called agent through "
         "invalid address, please use either [127.0.0.1] address not localhost\n"),
        (ISSUER_KEY.token(audience=POD_IDENTITY_AUDIENCE, service_account="nobody"), None, 404,
         "(ResourceNotFoundException): The specified resource could not be found., fault: client\n"),
        (ISSUER_KEY.token(service_account="server"), None, 400,  # IRSA's audience
         "(InvalidTokenException): The specified Kubernetes service account token is invalid., fault: client\n"),
        (OTHER_KEY.token(audience=POD_IDENTITY_AUDIENCE, service_account="server"), None, 400,
         "(InvalidTokenException): The specified Kubernetes service account token is invalid., fault: client\n"),
    ],
    ids=["no-token", "bearer", "not-a-jwt", "expired", "wrong-address", "no-association", "wrong-audience",
         "another-key"],
)  # fmt: skip
def test_the_agent_refuses_as_the_eks_pod_identity_agent_does(
    local: tuple[str, str], token: str | None, host: str | None, status: int, words: str
) -> None:
    endpoint, agent_uri = local
    awsidentity.associate(endpoint, "models", "server", ROLE)
    got_status, content_type, body = agent_call(agent_uri, token, host)
    assert (got_status, content_type) == (status, "text/plain; charset=utf-8")
    if words.startswith("("):  # EKS Auth's refusal, after the request ID the agent puts first
        assert re.fullmatch(r"\[[0-9a-f-]{36}\]: " + re.escape(words), body), body
    else:
        assert body == words


def test_botocore_meets_the_agent_s_refusal(local: tuple[str, str], tmp_path: Path) -> None:
    endpoint, agent_uri = local
    outcome = pod_identity(endpoint, agent_uri, tmp_path,
                           ISSUER_KEY.token(service_account="nobody", audience=POD_IDENTITY_AUDIENCE))  # fmt: skip
    assert outcome["failure"] == "CredentialRetrievalError"
    assert "Received non 200 response 404 from container metadata: [" in outcome["message"]
    assert "(ResourceNotFoundException)" in outcome["message"]


def test_the_server_binds_the_address_it_is_given(tmp_path: Path) -> None:
    with s3server.running(tmp_path / "s3.log", host="127.0.0.2") as endpoint:
        assert urlparse(endpoint).hostname == "127.0.0.2"
        urllib.request.urlopen(endpoint + "/moto-api/", timeout=5).close()
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{urlparse(endpoint).port}/moto-api/", timeout=5)


# Against the cluster's apiserver: its TokenRequest API issues the tokens, its OIDC discovery gives the keys.


@pytest.fixture(scope="module")
def cluster_aws(cluster: SimulatedCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(endpoint, agent URI) of a server verifying tokens against the cluster's apiserver."""
    options = awsidentity.Options(kubeconfig=cluster.kubeconfig, agent=("127.0.0.1", free_port()))
    yield from start(tmp_path_factory.mktemp("cluster-aws") / "s3.log", options)


def apiserver_token(cluster: SimulatedCluster, namespace: str, service_account: str, audience: str) -> str:
    """A token of ``service_account`` (created if need be) for ``audience``, from the apiserver's TokenRequest API."""
    core = client.CoreV1Api(cluster.api)
    if service_account not in {a.metadata.name for a in core.list_namespaced_service_account(namespace).items}:
        core.create_namespaced_service_account(namespace, {"metadata": {"name": service_account}})
    request = {"spec": {"audiences": [audience], "expirationSeconds": 600}}
    return core.create_namespaced_service_account_token(service_account, namespace, request).status.token


@pytest.mark.cluster
def test_irsa_with_the_apiserver_s_tokens(
    cluster: SimulatedCluster, cluster_aws: tuple[str, str], namespace: str, tmp_path: Path
) -> None:
    endpoint, _ = cluster_aws
    awsidentity.trust(endpoint, ROLE, f"system:serviceaccount:{namespace}:reader")
    reader = apiserver_token(cluster, namespace, "reader", STS_AUDIENCE)
    outcome = web_identity(endpoint, tmp_path, reader)
    assert outcome["arn"].startswith("arn:aws:sts::111122223333:assumed-role/neuron-model-reader/botocore-session-")
    assert (outcome["keys"], outcome["body"]) == ([KEY], BODY)

    refused = {
        "another service account": web_identity(
            endpoint, tmp_path, apiserver_token(cluster, namespace, "intruder", STS_AUDIENCE)
        ),
        "another role": web_identity(endpoint, tmp_path, reader, role="arn:aws:iam::111122223333:role/admin"),
        "the wrong audience": web_identity(
            endpoint, tmp_path, apiserver_token(cluster, namespace, "reader", POD_IDENTITY_AUDIENCE)
        ),
        "another key": web_identity(endpoint, tmp_path, OTHER_KEY.sign(claims_of(reader))),
        "another key, the apiserver's kid": web_identity(
            endpoint, tmp_path, OTHER_KEY.sign(claims_of(reader), kid=kid_of(reader))
        ),
    }
    words = {name: (o.get("operation"), o.get("code"), o.get("message")) for name, o in refused.items()}
    assert words == {
        "another service account": ("AssumeRoleWithWebIdentity", *NOT_AUTHORIZED),
        "another role": ("AssumeRoleWithWebIdentity", *NOT_AUTHORIZED),
        "the wrong audience": ("AssumeRoleWithWebIdentity", "InvalidIdentityToken", "Incorrect token audience"),
        "another key": ("AssumeRoleWithWebIdentity", "InvalidIdentityToken", NO_KEY),
        "another key, the apiserver's kid": ("AssumeRoleWithWebIdentity", "InvalidIdentityToken", NOT_VALIDATED),
    }


@pytest.mark.cluster
def test_pod_identity_with_the_apiserver_s_tokens(
    cluster: SimulatedCluster, cluster_aws: tuple[str, str], namespace: str, tmp_path: Path
) -> None:
    endpoint, agent_uri = cluster_aws
    awsidentity.associate(endpoint, namespace, "server", ROLE)
    server = apiserver_token(cluster, namespace, "server", POD_IDENTITY_AUDIENCE)
    outcome = pod_identity(endpoint, agent_uri, tmp_path, server)
    assert outcome["arn"].startswith("arn:aws:sts::111122223333:assumed-role/neuron-model-reader/eks-localcluster-")
    assert (outcome["keys"], outcome["body"]) == ([KEY], BODY)

    status, _, body = agent_call(agent_uri, apiserver_token(cluster, namespace, "intruder", POD_IDENTITY_AUDIENCE))
    assert status == 404 and body.endswith("(ResourceNotFoundException): The specified resource could not be found., "
                                           "fault: client\n")  # fmt: skip
    status, _, body = agent_call(agent_uri, apiserver_token(cluster, namespace, "server", STS_AUDIENCE))
    assert status == 400 and "(InvalidTokenException)" in body
