"""The AWS identity side of the local S3 (``localcluster.s3server``), as strict as AWS: an STS whose
AssumeRoleWithWebIdentity (IRSA's exchange) takes only service-account tokens the cluster's kube-apiserver signed, an
EKS Pod Identity Agent (``GET /v1/credentials``) that answers only such tokens for an associated service account, and
the record of the credentials both hand out: the only temporary keys the local S3 accepts.

Tokens are verified as IAM verifies them for an OIDC provider: the issuer's discovery document
(``/.well-known/openid-configuration``) names its ``jwks_uri``; the token's RS256 signature must verify with the key its
``kid`` names, and ``iss``, ``exp``, ``nbf`` and ``aud`` must hold. The keys are read from the apiserver with the admin
kubeconfig, or given directly (unit tests). Refusals are in the services' own words (and status codes), each cited
where it is defined.

What IAM and EKS would hold is set at run time on the server's endpoint, under ``/localcluster-api/``: a role and the
``sub`` values its trust policy allows (``trust``, IAM's StringLike patterns) and a pod identity association from a
namespace's service account to a role (``associate``). ``expire`` ends issued credentials early, for tests of what
expired credentials get.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import io
import json
import re
import secrets
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlparse
from xml.sax.saxutils import escape

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

ISSUER = "https://kubernetes.default.svc.cluster.local"  # cluster.py's --service-account-issuer
STS_AUDIENCE = "sts.amazonaws.com"  # of IRSA's projected token
POD_IDENTITY_AUDIENCE = "pods.eks.amazonaws.com"  # of EKS Pod Identity's projected token
# The access key IDs the tests' and benchmarks' uploads sign with: long-term keys, accepted without a session token.
STATIC_KEYS = ("test", "bench")
SESSION_SECONDS = 3600  # STS's default DurationSeconds

API = "/localcluster-api"  # test equipment: what IAM and EKS would hold, set by the tests
ROLES_PATH = f"{API}/iam/roles"
ASSOCIATIONS_PATH = f"{API}/eks/pod-identity-associations"
EXPIRE_PATH = f"{API}/credentials/expire"
AGENT_PATH = "/v1/credentials"  # the EKS Pod Identity Agent's (pkg/handlers/eks_credential_handler.go)

# The credential scope of SigV4: ACCESS_KEY/DATE/REGION/SERVICE/aws4_request.
SCOPE = re.compile(r"^(?P<key>[^/]+)/\d{8}/(?P<region>[^/]+)/(?P<service>[^/]+)/aws4_request$")


@dataclass(frozen=True)
class Signed:
    """Who signed a request, and for which region and service (SigV4; S3's SigV2, which botocore still presigns URLs
    with by default, names neither: its region is None)."""

    access_key_id: str
    region: str | None
    service: str
    presigned: bool
    session_token: str | None


def signed(environ: WSGIEnvironment) -> Signed | None:
    """The credential a request is signed with (Authorization header or presigned query), None when unsigned."""
    authorization = environ.get("HTTP_AUTHORIZATION", "")
    query = {name.lower(): values[0] for name, values in parse_qs(environ.get("QUERY_STRING", "")).items()}
    header_token = environ.get("HTTP_X_AMZ_SECURITY_TOKEN")
    if authorization.startswith("AWS "):  # SigV2: AWS ACCESS_KEY:SIGNATURE
        return Signed(authorization[4:].rpartition(":")[0], None, "s3", False, header_token)
    if "awsaccesskeyid" in query and "signature" in query:
        return Signed(query["awsaccesskeyid"], None, "s3", True, query.get("x-amz-security-token"))
    if authorization.startswith("AWS4-HMAC-SHA256 "):
        fields = dict(
            field.strip().partition("=")[::2] for field in authorization.removeprefix("AWS4-HMAC-SHA256 ").split(",")
        )
        scope, presigned, token = fields.get("Credential", ""), False, header_token
    else:
        scope, presigned, token = query.get("x-amz-credential", ""), True, query.get("x-amz-security-token")
    match = SCOPE.match(scope)
    if match is None:
        return None
    return Signed(match["key"], match["region"], match["service"], presigned, token)


def log(event: str, **fields: object) -> None:
    """One line per event in the server's log, as ``event key=value ...``: never a token or a secret key."""
    print(" ".join([event, *(f"{key}={value}" for key, value in fields.items())]), file=sys.stderr, flush=True)


def _b64url(segment: str) -> bytes:
    """A base64url segment without padding, as JWTs and JWKs carry them (RFC 7515 section 2)."""
    if not re.fullmatch(r"[A-Za-z0-9_-]*", segment):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def public_keys(jwks: dict[str, Any]) -> dict[str, rsa.RSAPublicKey]:
    """The RSA signing keys of a JWK Set, by key ID ("" for a key without one)."""
    keys = {}
    for jwk in jwks.get("keys", []):
        if jwk.get("kty") == "RSA" and jwk.get("use", "sig") == "sig":
            numbers = rsa.RSAPublicNumbers(
                int.from_bytes(_b64url(jwk["e"]), "big"), int.from_bytes(_b64url(jwk["n"]), "big")
            )
            keys[jwk.get("kid", "")] = numbers.public_key()
    return keys


def apiserver_jwks(kubeconfig: Path, issuer: str) -> dict[str, Any]:
    """The service-account keys, read as IAM reads an OIDC provider's: the discovery document names the JWK Set.

    Both come from the apiserver of ``kubeconfig``: the host of the document's ``jwks_uri`` is the apiserver's external
    address, not always reachable from here; its path is what counts.
    """
    from kubernetes import config

    api = config.new_client_from_config(str(kubeconfig))
    try:

        def get(path: str) -> dict[str, Any]:
            method, url, headers, _, _ = api.param_serialize("GET", path, auth_settings=["BearerToken"])
            return json.loads(api.call_api(method, url, headers, _request_timeout=10).read())

        discovery = get("/.well-known/openid-configuration")
        if discovery.get("issuer") != issuer:
            raise ValueError(f"the discovery document names issuer {discovery.get('issuer')!r}, not {issuer!r}")
        return get(urlparse(discovery["jwks_uri"]).path)
    finally:
        api.close()


class Rejected(Exception):
    """A token that is not one the configured issuer signed for the audience asked, with the reason why."""

    MALFORMED, ISSUER, KEY, SIGNATURE, EXPIRED, NOT_YET_VALID, NO_AUDIENCE, AUDIENCE = (
        "malformed", "issuer", "key", "signature", "expired", "not-yet-valid", "no-audience", "audience",
    )  # fmt: skip

    def __init__(self, reason: str, claims: dict[str, Any] | None = None) -> None:
        super().__init__(reason)
        self.reason, self.claims = reason, claims or {}


class Verifier:
    """Verifies RS256 JWTs of one issuer against the keys ``fetch_keys`` returns, fetched when first needed and again
    when a token names a key they lack (as IAM does when a provider rotates its keys). No issuer: no OIDC provider is
    registered, and every token is refused."""

    def __init__(self, issuer: str | None, fetch_keys: Callable[[], dict[str, Any]]) -> None:
        self.issuer = issuer
        self._fetch_keys = fetch_keys
        self._keys: dict[str, rsa.RSAPublicKey] = {}
        self._lock = threading.Lock()

    def _key(self, kid: str) -> rsa.RSAPublicKey | None:
        with self._lock:
            if kid not in self._keys:
                try:
                    self._keys = public_keys(self._fetch_keys())
                except Exception as exc:  # an unreachable provider is STS's "couldn't retrieve" refusal
                    detail = " ".join(str(exc).split())[:200]  # one line
                    log("oidc keys unavailable", issuer=self.issuer, error=type(exc).__name__, detail=detail)
            return self._keys.get(kid)

    def verify(self, token: str, audience: str, now: float | None = None) -> dict[str, Any]:
        """The token's claims if the issuer signed it for ``audience`` and it is valid at ``now``; else Rejected."""
        try:
            header_part, claims_part, signature_part = token.split(".")
            header, claims = json.loads(_b64url(header_part)), json.loads(_b64url(claims_part))
            signature = _b64url(signature_part)
        except ValueError:  # also binascii.Error and json.JSONDecodeError
            raise Rejected(Rejected.MALFORMED) from None
        if not isinstance(header, dict) or not isinstance(claims, dict):
            raise Rejected(Rejected.MALFORMED)
        if self.issuer is None or claims.get("iss") != self.issuer:
            raise Rejected(Rejected.ISSUER, claims)
        key = self._key(str(header.get("kid", "")))
        if key is None:
            raise Rejected(Rejected.KEY, claims)
        if header.get("alg") != "RS256":
            raise Rejected(Rejected.SIGNATURE, claims)
        try:
            key.verify(signature, f"{header_part}.{claims_part}".encode(), padding.PKCS1v15(), hashes.SHA256())
        except InvalidSignature:
            raise Rejected(Rejected.SIGNATURE, claims) from None
        if not isinstance(claims.get("exp"), int | float):
            raise Rejected(Rejected.MALFORMED, claims)
        now = time.time() if now is None else now
        if now >= claims["exp"]:
            raise Rejected(Rejected.EXPIRED, claims)
        if isinstance(claims.get("nbf"), int | float) and now < claims["nbf"]:
            raise Rejected(Rejected.NOT_YET_VALID, claims)
        audiences = claims.get("aud")
        audiences = [audiences] if isinstance(audiences, str) else audiences or []
        if not audiences:
            raise Rejected(Rejected.NO_AUDIENCE, claims)
        if audience not in audiences:
            raise Rejected(Rejected.AUDIENCE, claims)
        return claims


@dataclass(frozen=True)
class Issued:
    """Temporary credentials of an assumed role, as STS and the Pod Identity Agent hand them out."""

    access_key_id: str
    secret_access_key: str
    session_token: str
    expiration: float  # seconds since the epoch
    role_arn: str
    session_name: str

    @property
    def account(self) -> str:
        return self.role_arn.split(":")[4]

    @property
    def assumed_role_arn(self) -> str:
        return f"arn:aws:sts::{self.account}:assumed-role/{self.role_arn.rpartition('/')[2]}/{self.session_name}"

    @property
    def assumed_role_id(self) -> str:
        return f"{role_id(self.role_arn)}:{self.session_name}"

    @property
    def expiration_iso(self) -> str:
        return datetime.fromtimestamp(self.expiration, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def role_id(role_arn: str) -> str:
    """The role's unique ID (AROA...), the same for the same ARN."""
    return "AROA" + base64.b32encode(hashlib.sha256(role_arn.encode()).digest()).decode()[:17]


def _like(pattern: str, value: str) -> bool:
    """IAM's StringLike: ``*`` matches any run of characters, ``?`` any one character."""
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, value) is not None


# What a signed request's credentials are, for the service to refuse in its own words.
VALID, STATIC, UNKNOWN, WRONG_TOKEN, EXPIRED = "valid", "static", "unknown", "wrong-token", "expired"


class Identities:
    """What IAM and EKS know here: roles and the subjects their trust policies allow, pod identity associations, the
    static keys, and the credentials STS and the agent handed out. Shared by the server's threads."""

    def __init__(self, static_keys: Iterable[str]) -> None:
        self.static_keys = frozenset(static_keys)
        self._roles: dict[str, list[str]] = {}
        self._associations: dict[tuple[str, str], str] = {}
        self._issued: dict[str, Issued] = {}
        self._lock = threading.Lock()

    def trust(self, role_arn: str, subjects: list[str]) -> None:
        """Create or replace the role, its trust policy allowing web identities whose ``sub`` is like one of these."""
        with self._lock:
            self._roles[role_arn] = list(subjects)

    def trusts(self, role_arn: str, subject: str) -> bool:
        with self._lock:
            return any(_like(pattern, subject) for pattern in self._roles.get(role_arn, []))

    def associate(self, namespace: str, service_account: str, role_arn: str) -> None:
        """Create or replace the pod identity association of a service account (EKS allows one per account)."""
        with self._lock:
            self._associations[(namespace, service_account)] = role_arn

    def association(self, namespace: str, service_account: str) -> str | None:
        with self._lock:
            return self._associations.get((namespace, service_account))

    def issue(self, role_arn: str, session_name: str, seconds: int = SESSION_SECONDS) -> Issued:
        alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
        issued = Issued(
            access_key_id="ASIA" + "".join(secrets.choice(alphabet) for _ in range(16)),
            secret_access_key=base64.b64encode(secrets.token_bytes(30)).decode(),
            session_token=base64.b64encode(secrets.token_bytes(240)).decode(),
            expiration=float(int(time.time()) + seconds),  # whole seconds, as the answers state it
            role_arn=role_arn,
            session_name=session_name,
        )
        with self._lock:
            self._issued[issued.access_key_id] = issued
        return issued

    def issued(self, access_key_id: str) -> Issued | None:
        with self._lock:
            return self._issued.get(access_key_id)

    def expire(self, access_key_id: str) -> bool:
        with self._lock:
            issued = self._issued.get(access_key_id)
            if issued is not None:
                self._issued[access_key_id] = replace(issued, expiration=time.time())
            return issued is not None

    def check(self, credential: Signed) -> str:
        """VALID, STATIC, or why the service refuses the credential: UNKNOWN (never issued, or temporary without its
        session token, which AWS does not recognise either), WRONG_TOKEN, EXPIRED."""
        if credential.access_key_id in self.static_keys:
            return STATIC
        issued = self.issued(credential.access_key_id)
        if issued is None or credential.session_token is None:
            return UNKNOWN
        if not secrets.compare_digest(credential.session_token.encode(), issued.session_token.encode()):
            return WRONG_TOKEN
        return EXPIRED if time.time() >= issued.expiration else VALID


def _request_id() -> str:
    return str(uuid.uuid4())


STS_XMLNS = "https://sts.amazonaws.com/doc/2011-06-15/"
# STS's Query-protocol error document, as mozilla-iam/mozilla-aws-cli#146 quotes one verbatim (an
# ExpiredTokenException of AssumeRoleWithWebIdentity): ErrorResponse/Error/{Type,Code,Message}, then RequestId.
STS_ERROR = (
    '<ErrorResponse xmlns="{xmlns}">\n  <Error>\n    <Type>Sender</Type>\n    <Code>{code}</Code>\n'
    "    <Message>{message}</Message>\n  </Error>\n  <RequestId>{request_id}</RequestId>\n</ErrorResponse>\n"
)
# botocore's STS model (data/sts/2011-06-15/service-2.json) describes InvalidIdentityTokenException so; used as the
# message where no verbatim STS text is published (a bad signature, an unparseable token, a token not yet valid).
NOT_VALIDATED = (
    "The web identity token that was passed could not be validated by Amazon Web Services. Get a new identity token "
    "from the identity provider and then retry the request."
)
# Quoted by aws/amazon-eks-pod-identity-webhook#12 for a token whose kid the provider's JWK Set lacks, and by
# aws/aws-cli#7194 (note the two spaces after the comma, as STS sends them).
NO_KEY = (
    "Couldn't retrieve verification key from your identity provider,  please reference AssumeRoleWithWebIdentity "
    "documentation for requirements"
)


def sts_refusal(rejected: Rejected, now: float) -> tuple[int, str, str]:
    """STS's status, code and message for a web identity token it does not accept."""
    reason, claims = rejected.reason, rejected.claims
    if reason == Rejected.ISSUER:
        # aws-actions/configure-aws-credentials#721, treeverse/dvc.org#5273: the issuer is not a registered provider.
        return 400, "InvalidIdentityToken", f"No OpenIDConnect provider found in your account for {claims.get('iss')}"
    if reason == Rejected.KEY:
        return 400, "InvalidIdentityToken", NO_KEY
    if reason == Rejected.EXPIRED:
        # aws/aws-sdk-java-v2#5709 (2024): "Token expired: current date/time 1731098245 must be before the expiration
        # date/time 1731095240", status 400. (Reports from 2021, awslabs/aws-orbit-workbench#771, lack the last space.)
        message = (
            f"Token expired: current date/time {int(now)} must be before the expiration date/time {claims.get('exp')}"
        )
        return 400, "ExpiredTokenException", message
    if reason == Rejected.NO_AUDIENCE:
        return 400, "InvalidIdentityToken", "Missing a required claim: aud"  # aws/aws-sdk-ruby#2698
    if reason == Rejected.AUDIENCE:
        # awslabs/amazon-eks-irsa-cfn#18, guardian/cdk#1944: a token for another audience than sts.amazonaws.com.
        return 400, "InvalidIdentityToken", "Incorrect token audience"
    return 400, "InvalidIdentityToken", NOT_VALIDATED  # MALFORMED, SIGNATURE, NOT_YET_VALID


# crossplane/crossplane#5578: "StatusCode: 403, ... api error AccessDenied: Not authorized to perform
# sts:AssumeRoleWithWebIdentity" for a role that does not trust the token's subject (or does not exist).
NOT_AUTHORIZED = (403, "AccessDenied", "Not authorized to perform sts:AssumeRoleWithWebIdentity")
# What STS answers requests signed with credentials it does not accept: okta/okta-aws-cli-assume-role#21 and
# aws/aws-toolkit-azure-devops#428 quote "InvalidClientTokenId: The security token included in the request is invalid"
# (403); miquella/vaulted#107 and prowler-cloud/prowler#789 quote "(ExpiredToken) when calling the GetCallerIdentity
# operation: The security token included in the request is expired" (403, as the AWS APIs' common errors list it).
STS_CREDENTIAL_REFUSALS = {
    UNKNOWN: (403, "InvalidClientTokenId", "The security token included in the request is invalid."),
    WRONG_TOKEN: (403, "InvalidClientTokenId", "The security token included in the request is invalid."),
    EXPIRED: (403, "ExpiredToken", "The security token included in the request is expired"),
}

HTTP_REASONS = {200: "OK", 204: "No Content", 400: "Bad Request", 403: "Forbidden", 404: "Not Found"}


def _respond(
    start_response: StartResponse, status: int, body: bytes, content_type: str, **headers: str
) -> Iterable[bytes]:
    start_response(
        f"{status} {HTTP_REASONS[status]}",
        [("Content-Type", content_type), ("Content-Length", str(len(body))), *headers.items()],
    )
    return [body]


def _sts_respond(start_response: StartResponse, status: int, xml: str, request_id: str) -> Iterable[bytes]:
    return _respond(start_response, status, xml.encode(), "text/xml", **{"x-amzn-RequestId": request_id})


def _sts_error(start_response: StartResponse, refusal: tuple[int, str, str]) -> Iterable[bytes]:
    status, code, message = refusal
    request_id = _request_id()
    xml = STS_ERROR.format(xmlns=STS_XMLNS, code=code, message=escape(message), request_id=request_id)
    return _sts_respond(start_response, status, xml, request_id)


def _read_body(environ: WSGIEnvironment) -> bytes:
    """The request body, left in place for the application behind (a body without a length is left unread)."""
    if not environ.get("CONTENT_LENGTH"):
        return b""
    body = environ["wsgi.input"].read(int(environ["CONTENT_LENGTH"]))
    environ["wsgi.input"] = io.BytesIO(body)
    return body


def _query_parameters(environ: WSGIEnvironment) -> dict[str, str]:
    """A Query-protocol request's parameters: its query string and, for a form POST, its body."""
    parameters = {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
    if environ["REQUEST_METHOD"] == "POST" and environ.get("CONTENT_TYPE", "").startswith(
        "application/x-www-form-urlencoded"
    ):
        parameters |= {k: v[0] for k, v in parse_qs(_read_body(environ).decode()).items()}
    return parameters


class IdentityEndpoints:
    """WSGI middleware in front of the local S3 (and moto's STS): the test equipment under ``/localcluster-api/``, STS's
    AssumeRoleWithWebIdentity (form POST or query string, as botocore may send it) and GetCallerIdentity of the
    credentials it issued; STS requests signed with credentials it never issued are refused. The rest passes on."""

    def __init__(self, app: WSGIApplication, identities: Identities, verifier: Verifier) -> None:
        self.app, self.identities, self.verifier = app, identities, verifier

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path.startswith(API + "/") and environ["REQUEST_METHOD"] == "POST":
            return self._admin(path, json.loads(_read_body(environ) or b"{}"), start_response)
        credential = signed(environ)
        if credential is not None and credential.service != "sts":
            return self.app(environ, start_response)
        if credential is None and path != "/" and not environ.get("QUERY_STRING"):
            return self.app(environ, start_response)
        parameters = _query_parameters(environ)
        action = parameters.get("Action")
        if credential is None:
            if action == "AssumeRoleWithWebIdentity":
                return self._assume_role_with_web_identity(parameters, start_response)
            return self.app(environ, start_response)
        verdict = self.identities.check(credential)
        if verdict in STS_CREDENTIAL_REFUSALS:
            log("sts refused", action=action, reason=verdict, access_key=credential.access_key_id)
            return _sts_error(start_response, STS_CREDENTIAL_REFUSALS[verdict])
        if verdict == VALID and action == "GetCallerIdentity":
            issued = self.identities.issued(credential.access_key_id)
            assert issued is not None
            return self._caller_identity(issued, start_response)
        return self.app(environ, start_response)

    def _admin(self, path: str, body: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if path == ROLES_PATH:
            self.identities.trust(body["roleArn"], body["trustedSubjects"])
            log("iam role set", role=body["roleArn"], trusted_subjects=",".join(body["trustedSubjects"]))
        elif path == ASSOCIATIONS_PATH:
            self.identities.associate(body["namespace"], body["serviceAccount"], body["roleArn"])
            log("pod identity association set", namespace=body["namespace"], service_account=body["serviceAccount"],
                role=body["roleArn"])  # fmt: skip
        elif path == EXPIRE_PATH:
            if not self.identities.expire(body["accessKeyId"]):
                return _respond(start_response, 404, b"no such credentials\n", "text/plain")
            log("credentials expired", access_key=body["accessKeyId"])
        else:
            return _respond(start_response, 404, b"no such endpoint\n", "text/plain")
        return _respond(start_response, 204, b"", "text/plain")

    def _assume_role_with_web_identity(
        self, parameters: dict[str, str], start_response: StartResponse
    ) -> Iterable[bytes]:
        role_arn, token = parameters.get("RoleArn", ""), parameters.get("WebIdentityToken", "")
        session_name = parameters.get("RoleSessionName", "")
        now = time.time()
        try:
            claims = self.verifier.verify(token, STS_AUDIENCE, now)
        except Rejected as rejected:
            log("sts refused", action="AssumeRoleWithWebIdentity", reason=rejected.reason, role=role_arn,
                subject=rejected.claims.get("sub"))  # fmt: skip
            return _sts_error(start_response, sts_refusal(rejected, now))
        if not self.identities.trusts(role_arn, str(claims.get("sub"))):
            log("sts refused", action="AssumeRoleWithWebIdentity", reason="not-trusted", role=role_arn,
                subject=claims.get("sub"))  # fmt: skip
            return _sts_error(start_response, NOT_AUTHORIZED)
        seconds = int(parameters.get("DurationSeconds", SESSION_SECONDS))
        issued = self.identities.issue(role_arn, session_name, seconds)
        log("sts issued", action="AssumeRoleWithWebIdentity", role=role_arn, subject=claims.get("sub"),
            access_key=issued.access_key_id, expires=issued.expiration_iso)  # fmt: skip
        provider = f"arn:aws:iam::{issued.account}:oidc-provider/{str(claims.get('iss')).removeprefix('https://')}"
        request_id = _request_id()
        # The response of the STS API reference's example (AssumeRoleWithWebIdentity), Provider and Audience as an
        # OIDC provider's (spiffe/spiffe.io#110 shows a real one: the provider's ARN, the token's aud).
        xml = (
            f'<AssumeRoleWithWebIdentityResponse xmlns="{STS_XMLNS}">\n  <AssumeRoleWithWebIdentityResult>\n'
            f"    <SubjectFromWebIdentityToken>{escape(str(claims.get('sub')))}</SubjectFromWebIdentityToken>\n"
            f"    <Audience>{STS_AUDIENCE}</Audience>\n"
            f"    <AssumedRoleUser>\n      <Arn>{escape(issued.assumed_role_arn)}</Arn>\n"
            f"      <AssumedRoleId>{escape(issued.assumed_role_id)}</AssumedRoleId>\n    </AssumedRoleUser>\n"
            f"    <Credentials>\n      <SessionToken>{issued.session_token}</SessionToken>\n"
            f"      <SecretAccessKey>{issued.secret_access_key}</SecretAccessKey>\n"
            f"      <Expiration>{issued.expiration_iso}</Expiration>\n"
            f"      <AccessKeyId>{issued.access_key_id}</AccessKeyId>\n    </Credentials>\n"
            f"    <Provider>{escape(provider)}</Provider>\n  </AssumeRoleWithWebIdentityResult>\n"
            f"  <ResponseMetadata>\n    <RequestId>{request_id}</RequestId>\n  </ResponseMetadata>\n"
            "</AssumeRoleWithWebIdentityResponse>\n"
        )
        return _sts_respond(start_response, 200, xml, request_id)

    @staticmethod
    def _caller_identity(issued: Issued, start_response: StartResponse) -> Iterable[bytes]:
        request_id = _request_id()
        xml = (
            f'<GetCallerIdentityResponse xmlns="{STS_XMLNS}">\n  <GetCallerIdentityResult>\n'
            f"    <Arn>{escape(issued.assumed_role_arn)}</Arn>\n    <UserId>{escape(issued.assumed_role_id)}</UserId>\n"
            f"    <Account>{issued.account}</Account>\n  </GetCallerIdentityResult>\n"
            f"  <ResponseMetadata>\n    <RequestId>{request_id}</RequestId>\n  </ResponseMetadata>\n"
            "</GetCallerIdentityResponse>\n"
        )
        return _sts_respond(start_response, 200, xml, request_id)


class AgentRefusal(Exception):
    """The agent's answer to a request it does not serve: its status and text, and a reason for the log."""

    def __init__(self, status: int, message: str, reason: str) -> None:
        super().__init__(message)
        self.status, self.message, self.reason = status, message, reason


def _go_base64_error(segment: str) -> str:
    """Go's base64.RawURLEncoding error for a segment it cannot decode: the offset of the first byte it refuses."""
    bad = next((i for i, c in enumerate(segment) if not re.match(r"[A-Za-z0-9_-]", c)), len(segment) - 1)
    return f"illegal base64 data at input byte {bad}"


def _unverified_claims(token: str) -> dict[str, Any]:
    """The claims of a token parsed as the agent parses it before anything else (golang-jwt v5.2.2's
    ParseUnverified), refusing in its words what does not parse."""
    parts = token.split(".")
    if len(parts) != 3:
        raise ValueError("token is malformed: token contains an invalid number of segments")
    decoded: list[Any] = []
    for part, name in zip(parts[:2], ("header", "claim"), strict=True):
        try:
            raw = _b64url(part)
        except (ValueError, binascii.Error):
            raise ValueError(f"token is malformed: could not base64 decode {name}: {_go_base64_error(part)}") from None
        try:
            decoded.append(json.loads(raw))
        except ValueError as exc:
            raise ValueError(f"token is malformed: could not JSON decode {name}: {exc}") from None
    header, claims = decoded
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise ValueError("token is malformed: could not JSON decode claim")
    if not isinstance(header.get("alg"), str):
        raise ValueError("token is unverifiable: signing method (alg) is unspecified")
    if header["alg"] not in {"RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384", "PS512",
                             "HS256", "HS384", "HS512", "EdDSA", "none"}:  # fmt: skip
        raise ValueError("token is unverifiable: signing method (alg) is unavailable")
    return claims


class PodIdentityAgent:
    """WSGI app: the EKS Pod Identity Agent's ``GET /v1/credentials``, with EKS Auth's AssumeRoleForPodIdentity
    played in-process. Each step refuses as the agent (github.com/aws/eks-pod-identity-agent) does:

    - internal/validation/request.go: a request to another address than the agent's (TargetHosts: the address it
      listens on here; by default 169.254.170.23 and fd00:ec2::23), 403; an empty Authorization header, 400; a token
      golang-jwt cannot parse, 400; a token whose unverified ``exp``/``nbf`` fail (jwt.Validator), 400 — each with
      pkg/errors/errors.go's wording ("Access Denied. " before an AccessDeniedError), written by Go's http.Error
      (text/plain, a final newline);
    - EKS Auth's refusals pass through HandleCredentialFetchingError: "[request id]: (Code): message, fault: client"
      with EKS Auth's status. Codes and statuses are botocore's eks-auth model's (data/eks-auth/2023-11-26): a token
      EKS Auth cannot verify, InvalidTokenException (400); a service account without an association,
      ResourceNotFoundException (404). EKS Auth's own texts are not published: the messages are the model's
      descriptions of these errors.
    """

    def __init__(self, identities: Identities, verifier: Verifier, target_hosts: list[str], cluster: str) -> None:
        self.identities, self.verifier, self.target_hosts, self.cluster = identities, verifier, target_hosts, cluster

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != AGENT_PATH:
            return self._text(start_response, 404, "404 page not found")  # Go's http.ServeMux
        try:
            issued = self._credentials(environ)
        except AgentRefusal as refusal:
            log("pod identity agent refused", status=refusal.status, reason=refusal.reason)
            return self._text(start_response, refusal.status, refusal.message)
        body = json.dumps(
            {
                "AccessKeyId": issued.access_key_id,
                "SecretAccessKey": issued.secret_access_key,
                "Token": issued.session_token,
                "AccountId": issued.account,
                "Expiration": issued.expiration_iso,  # Go's time.RFC3339Nano of a whole second in UTC
            }
        ).encode()
        return _respond(start_response, 200, body, "application/json")

    def _credentials(self, environ: WSGIEnvironment) -> Issued:
        host = environ.get("HTTP_HOST", "")  # without its port and an IPv6 address's brackets, as the agent reads it
        if host.startswith("["):
            host = host[1:].partition("]")[0]
        elif host.count(":") == 1:
            host = host.rpartition(":")[0]
        if host not in self.target_hosts:
            raise AgentRefusal(
                403,
                "Access Denied. Called agent through invalid address, please use either "
                f"[{' '.join(self.target_hosts)}] address not {host}",
                "address",
            )
        token = environ.get("HTTP_AUTHORIZATION", "")
        if not token:
            raise AgentRefusal(400, "Service account token cannot be empty", "no-token")
        try:
            claims = _unverified_claims(token)
        except ValueError as exc:
            raise AgentRefusal(400, f"Service account token cannot be parsed: {exc}", "unparseable") from None
        now = time.time()
        failures = []
        if isinstance(claims.get("exp"), int | float) and not now < claims["exp"]:
            failures.append("token is expired")
        if isinstance(claims.get("nbf"), int | float) and now < claims["nbf"]:
            failures.append("token is not valid yet")
        if failures:
            message = f"Service account token failed basic claim validations: {', '.join(failures)}"
            raise AgentRefusal(400, message, "claims")
        try:
            claims = self.verifier.verify(token, POD_IDENTITY_AUDIENCE, now)
        except Rejected as rejected:  # (an expired token was refused above)
            raise self._eks_auth(400, "InvalidTokenException", "The specified Kubernetes service account token is "
                                 "invalid.", rejected.reason) from None  # fmt: skip
        kubernetes = claims.get("kubernetes.io") or {}
        namespace = str(kubernetes.get("namespace"))
        service_account = str((kubernetes.get("serviceaccount") or {}).get("name"))
        role_arn = self.identities.association(namespace, service_account)
        if role_arn is None:
            raise self._eks_auth(404, "ResourceNotFoundException", "The specified resource could not be found.",
                                 f"no-association namespace={namespace} service_account={service_account}")  # fmt: skip
        pod = str((kubernetes.get("pod") or {}).get("name", "pod"))
        issued = self.identities.issue(role_arn, f"eks-{self.cluster}-{pod}-{uuid.uuid4()}"[:64])
        log("pod identity agent issued", namespace=namespace, service_account=service_account, role=role_arn,
            access_key=issued.access_key_id, expires=issued.expiration_iso)  # fmt: skip
        return issued

    @staticmethod
    def _eks_auth(status: int, code: str, message: str, reason: str) -> AgentRefusal:
        return AgentRefusal(status, f"[{_request_id()}]: ({code}): {message}, fault: client", reason)

    @staticmethod
    def _text(start_response: StartResponse, status: int, message: str) -> Iterable[bytes]:
        return _respond(start_response, status, f"{message}\n".encode(), "text/plain; charset=utf-8",
                        **{"X-Content-Type-Options": "nosniff"})  # fmt: skip


@dataclass(frozen=True)
class Options:
    """How the local STS and Pod Identity Agent verify tokens, and where the agent listens (``s3server.running``)."""

    kubeconfig: Path | None = None  # an apiserver whose service-account keys sign the tokens (its OIDC discovery)
    jwks: dict[str, Any] | None = None  # or the keys themselves; neither: no OIDC provider, every token is refused
    issuer: str = ISSUER
    # (host, port) of the Pod Identity Agent; none without. It answers requests to that host only, as the agent
    # answers those to its own addresses (169.254.170.23, fd00:ec2::23): bind one address, not 0.0.0.0. botocore takes
    # plain-http container credential URIs on loopback addresses, localhost, 169.254.170.2, 169.254.170.23 and
    # fd00:ec2::23 only (utils.ContainerMetadataFetcher._ALLOWED_HOSTS).
    agent: tuple[str, int] | None = None
    cluster_name: str = "localcluster"  # in the agent's session names, as EKS names the cluster there
    static_keys: tuple[str, ...] = STATIC_KEYS

    @property
    def agent_uri(self) -> str | None:
        """AWS_CONTAINER_CREDENTIALS_FULL_URI for pods (or boto3) to reach the agent."""
        if self.agent is None:
            return None
        host, port = self.agent
        return f"http://{f'[{host}]' if ':' in host else host}:{port}{AGENT_PATH}"

    def argv(self, jwks_file: Path) -> list[str]:
        """The server's command-line options; ``jwks`` is written to ``jwks_file``."""
        argv = ["--issuer", self.issuer, "--cluster-name", self.cluster_name]
        argv += [arg for key in self.static_keys for arg in ("--static-key", key)]
        if self.kubeconfig is not None:
            argv += ["--kubeconfig", str(self.kubeconfig)]
        if self.jwks is not None:
            jwks_file.write_text(json.dumps(self.jwks))
            argv += ["--jwks", str(jwks_file)]
        if self.agent is not None:
            argv += ["--agent-host", self.agent[0], "--agent-port", str(self.agent[1])]
        return argv


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The server's options for the identity side (``Options.argv`` writes them)."""
    parser.add_argument("--issuer", default=ISSUER)
    parser.add_argument("--kubeconfig", type=Path, help="read the issuer's keys from this apiserver (OIDC discovery)")
    parser.add_argument("--jwks", type=Path, help="or from this JWK Set file")
    parser.add_argument("--agent-host", help="serve the EKS Pod Identity Agent on this address")
    parser.add_argument("--agent-port", type=int, default=80)
    parser.add_argument("--cluster-name", default="localcluster")
    parser.add_argument("--static-key", action="append", dest="static_keys", help="a long-term access key ID")


@dataclass(frozen=True)
class IdentityService:
    """The identity side of one server process: the record, the verifier and the options it runs with."""

    identities: Identities
    verifier: Verifier
    agent: tuple[str, int] | None
    cluster_name: str

    @classmethod
    def from_arguments(cls, args: argparse.Namespace) -> IdentityService:
        if args.kubeconfig is not None:
            kubeconfig, issuer = args.kubeconfig, args.issuer
            verifier = Verifier(issuer, lambda: apiserver_jwks(kubeconfig, issuer))
        elif args.jwks is not None:
            jwks = json.loads(args.jwks.read_text())
            verifier = Verifier(args.issuer, lambda: jwks)
        else:
            verifier = Verifier(None, dict)
        agent = (args.agent_host, args.agent_port) if args.agent_host else None
        static_keys = args.static_keys if args.static_keys is not None else STATIC_KEYS
        return cls(Identities(static_keys), verifier, agent, args.cluster_name)

    def endpoints(self, app: WSGIApplication) -> WSGIApplication:
        return IdentityEndpoints(app, self.identities, self.verifier)

    def agent_app(self) -> WSGIApplication:
        assert self.agent is not None
        return PodIdentityAgent(self.identities, self.verifier, [self.agent[0]], self.cluster_name)


def _post(endpoint: str, path: str, body: dict[str, Any]) -> None:
    request = urllib.request.Request(
        endpoint + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    urllib.request.urlopen(request, timeout=10).close()


def trust(endpoint: str, role_arn: str, *subjects: str) -> None:
    """Create or replace ``role_arn`` on the server at ``endpoint``, its trust policy allowing web identity tokens
    whose ``sub`` is like one of ``subjects`` (``system:serviceaccount:<namespace>:<name>``; ``*`` and ``?`` as in
    IAM's StringLike)."""
    _post(endpoint, ROLES_PATH, {"roleArn": role_arn, "trustedSubjects": list(subjects)})


def associate(endpoint: str, namespace: str, service_account: str, role_arn: str) -> None:
    """Create or replace the EKS Pod Identity association of ``namespace``'s ``service_account`` with ``role_arn``."""
    _post(endpoint, ASSOCIATIONS_PATH, {"namespace": namespace, "serviceAccount": service_account, "roleArn": role_arn})


def expire(endpoint: str, access_key_id: str) -> None:
    """End the issued credentials of ``access_key_id`` now: S3 and STS refuse them as expired from then on."""
    _post(endpoint, EXPIRE_PATH, {"accessKeyId": access_key_id})


def redacted(target: str) -> str:
    """A request target with the values of its secret query parameters (a session token, a web identity token)
    replaced, for the request log."""
    return re.sub(r"(?i)([?&](?:X-Amz-Security-Token|WebIdentityToken)=)[^&]*", r"\1REDACTED", target)
