"""neuron-model-fetch, the rewrite Job's init container for http(s) archives: nothing lands outside DEST."""

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
