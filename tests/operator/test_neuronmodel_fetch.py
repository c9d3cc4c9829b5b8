"""neuron-model-fetch, the rewrite Job's init container: archives over HTTP and S3 prefixes, nothing outside DEST."""

from __future__ import annotations

import functools
import http.server
import io
import os
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from s3 import REGION, clean_aws_env, moto_server, upload_tree

from localcluster.s3server import REFUSED, refusals
from neuronmodel_fetch.cli import main


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A directory served over HTTP on loopback: (directory, base URL)."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def make_model(root: Path) -> Path:
    (root / "variables").mkdir(parents=True)
    (root / "saved_model.pb").write_bytes(b"\x08\x01")
    (root / "variables" / "variables.index").write_bytes(b"index")
    return root


def test_http_tarball_with_a_top_folder_lands_as_the_model(
    served: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    www, url = served
    model = make_model(tmp_path / "resnet50")
    with tarfile.open(www / "model.tar.gz", "w:gz") as tar:
        tar.add(model, arcname="resnet50")
    dest = tmp_path / "out"
    assert main([f"{url}/model.tar.gz", str(dest)]) == 0
    assert (dest / "saved_model.pb").read_bytes() == b"\x08\x01"
    assert (dest / "variables" / "variables.index").read_bytes() == b"index"
    assert "fetched" in capsys.readouterr().out


def test_zip_member_escaping_dest_is_refused(
    served: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    www, url = served
    with zipfile.ZipFile(www / "evil.zip", "w") as zf:
        zf.writestr("saved_model.pb", b"x")
        zf.writestr("../escaped.txt", b"owned")
    assert main([f"{url}/evil.zip", str(tmp_path / "out")]) == 1
    assert "escapes the destination" in capsys.readouterr().err
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "out").exists()


def test_tar_symlink_out_of_dest_is_refused(
    served: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    www, url = served
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        link = tarfile.TarInfo("variables")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc"
        tar.addfile(link)
    (www / "link.tgz").write_bytes(buffer.getvalue())
    assert main([f"{url}/link.tgz", str(tmp_path / "out")]) == 1
    assert "error" in capsys.readouterr().err
    assert not os.path.lexists(tmp_path / "out")


def test_not_an_archive_and_missing_url_are_one_line_errors(
    served: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    www, url = served
    (www / "model.txt").write_text("not an archive")
    assert main([f"{url}/model.txt", str(tmp_path / "a")]) == 1
    assert "not a .tar(.gz) or .zip archive" in capsys.readouterr().err
    assert main([f"{url}/missing.tar.gz", str(tmp_path / "b")]) == 1
    assert "404" in capsys.readouterr().err


def test_existing_dest_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "out").mkdir()
    assert main(["http://127.0.0.1:1/model.tar.gz", str(tmp_path / "out")]) == 1
    assert "already exists" in capsys.readouterr().err


@pytest.fixture
def s3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Path]]:
    """(endpoint, log) of a local S3 the fetch reaches as the Job's container does: by the environment only."""
    clean_aws_env(monkeypatch, tmp_path)
    log = tmp_path / "s3.log"
    with moto_server(log) as endpoint:
        for key, value in {
            "AWS_ENDPOINT_URL_S3": endpoint,
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
        }.items():
            monkeypatch.setenv(key, value)
        yield endpoint, log


def test_s3_prefix_is_downloaded_and_an_empty_prefix_is_an_error(
    s3: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    endpoint, _ = s3
    upload_tree(endpoint, "models", "bert/", make_model(tmp_path / "bert"))
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    assert main(["s3://models/bert", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "variables" / "variables.index").read_bytes() == b"index"
    assert main(["s3://models/nothing-here/", str(tmp_path / "empty")]) == 1
    assert "no object under this prefix" in capsys.readouterr().err


def test_s3_bucket_of_another_region_is_read_with_aws_default_region(
    s3: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the operator sets from ``spec.source.s3.region``: every request is signed for the bucket's region."""
    endpoint, log = s3
    upload_tree(endpoint, "eu-models", "bert/", make_model(tmp_path / "bert"), region="eu-west-1")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    assert main(["s3://eu-models/bert/", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "saved_model.pb").read_bytes() == b"\x08\x01"
    assert refusals(log) == []


def test_s3_aws_region_alone_is_not_read_by_boto3(
    s3: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """boto3 signs for us-east-1 and S3 refuses it; botocore then retries in the region S3's error names, so the
    download succeeds, against AWS as here, one refused request later."""
    endpoint, log = s3
    upload_tree(endpoint, "eu-models", "bert/", make_model(tmp_path / "bert"), region="eu-west-1")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    assert main(["s3://eu-models/bert/", str(tmp_path / "out")]) == 0
    assert refusals(log) == [
        f"{REFUSED} GET /eu-models: signed for us-east-1, bucket in eu-west-1",
    ]
