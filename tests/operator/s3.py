"""The local S3 (and STS, for IRSA's web identity) of the tests: moto, as strict as AWS about regions, on loopback."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import boto3

from localcluster import s3server

if TYPE_CHECKING:
    import pytest

REGION = "us-west-2"  # of the buckets upload_tree creates: requests on them must be signed for it


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


def client(endpoint: str, region: str = REGION) -> Any:  # boto3 generates its client types at run time
    return boto3.client(
        "s3", endpoint_url=endpoint, region_name=region, aws_access_key_id="test", aws_secret_access_key="test"
    )


def upload_tree(endpoint: str, bucket: str, prefix: str, root: Path, region: str = REGION) -> int:
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
