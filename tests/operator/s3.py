"""The local S3 (and STS, for IRSA's web identity) of the tests: moto, as strict as AWS about regions and credentials,
on loopback (its uploads are localcluster.s3server's ``upload_tree``); and keys that sign service-account tokens as
the kube-apiserver does, for tests of what it verifies."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import boto3
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from localcluster import awsidentity, s3server

if TYPE_CHECKING:
    import pytest


@contextmanager
def moto_server(log: Path) -> Iterator[str]:
    """Yields the endpoint URL; fails loudly, with the server's log, if the server does not come up."""
    with s3server.running(log) as url:
        yield url


def clean_aws_env(monkeypatch: pytest.MonkeyPatch, tmp: Path) -> None:
    """No AWS setting of this machine's reaches boto3: no AWS_* variable, empty config files, a new default session
    (``boto3.client`` keeps the one it made first, with the credentials it found then)."""
    for name in [name for name in os.environ if name.startswith("AWS_")]:
        monkeypatch.delenv(name)
    empty = tmp / "aws-config"
    empty.touch()
    monkeypatch.setenv("AWS_CONFIG_FILE", str(empty))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty))
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims_of(token: str) -> dict[str, Any]:
    """The claims of a JWT, unverified."""
    part = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


def kid_of(token: str) -> str:
    """The ID of the key a JWT says it is signed with."""
    part = token.split(".")[0]
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))["kid"]


class SigningKey:
    """An RSA key that signs JWTs as the kube-apiserver signs service-account tokens (RS256; the key ID is the
    base64url SHA-256 of the public key's DER, as kubernetes/kubernetes#78502 derives it), and its JWK Set."""

    def __init__(self) -> None:
        self.private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        public = self.private.public_key()
        der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        self.kid = _b64url(hashlib.sha256(der).digest())
        numbers = public.public_numbers()
        jwk = {"use": "sig", "kty": "RSA", "kid": self.kid, "alg": "RS256"}
        jwk |= {"n": _b64url(numbers.n.to_bytes(256, "big")), "e": _b64url(numbers.e.to_bytes(3, "big"))}
        self.jwks = {"keys": [jwk]}

    def sign(self, claims: dict[str, Any], kid: str | None = None) -> str:
        """``claims`` signed with this key, the header naming ``kid`` (this key's unless given)."""
        header = _b64url(json.dumps({"alg": "RS256", "kid": self.kid if kid is None else kid}).encode())
        payload = _b64url(json.dumps(claims).encode())
        signature = self.private.sign(f"{header}.{payload}".encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{header}.{payload}.{_b64url(signature)}"

    def token(
        self,
        namespace: str = "models",
        service_account: str = "reader",
        audience: str = awsidentity.STS_AUDIENCE,
        lifetime: int = 600,
        **claims: Any,
    ) -> str:
        """A token with the claims the apiserver's TokenRequest gives a service account, ``claims`` overriding."""
        now = int(time.time())
        standard = {
            "aud": [audience],
            "exp": now + lifetime,
            "iat": now,
            "nbf": now,
            "iss": awsidentity.ISSUER,
            "jti": "0b5c1ab0-0000-4000-8000-000000000000",
            "kubernetes.io": {"namespace": namespace, "serviceaccount": {"name": service_account, "uid": "1"}},
            "sub": f"system:serviceaccount:{namespace}:{service_account}",
        }
        return self.sign(standard | claims)
