"""A local S3 (and STS, for IRSA's web identity) server: moto in server mode, on loopback."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import boto3

from localcluster.cluster import free_port

REGION = "us-west-2"


@contextmanager
def moto_server(log: Path) -> Iterator[str]:
    """Yields the endpoint URL; fails loudly if the server does not come up."""
    port = free_port()
    with log.open("ab") as out:
        process = subprocess.Popen(
            [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(url + "/moto-api/", timeout=1).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not start; its log: {log.read_text()[-2000:]}") from None
                time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(10)


def client(endpoint: str) -> Any:  # boto3 generates its client types at run time
    return boto3.client(
        "s3", endpoint_url=endpoint, region_name=REGION, aws_access_key_id="test", aws_secret_access_key="test"
    )


def upload_tree(endpoint: str, bucket: str, prefix: str, root: Path) -> int:
    s3 = client(endpoint)
    existing = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
    if bucket not in existing:
        s3.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": REGION})
    files = [p for p in root.rglob("*") if p.is_file()]
    for path in files:
        s3.upload_file(str(path), bucket, f"{prefix}{path.relative_to(root).as_posix()}")
    return len(files)
