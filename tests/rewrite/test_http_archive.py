"""The rewrite reading an http(s) archive (tar.gz, tgz, tar, zip) from the local archive server: the same output as
from disk, unpacked as it downloads beside the output, the same refusals naming the URL, interrupted transfers
resumed, and nothing left behind when it fails."""

from __future__ import annotations

import gzip
import http.server
import io
import os
import stat
import subprocess
import sys
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from localcluster.httpserver import ArchiveServer, serving
from neuron_rewrite import (
    InvalidModelError,
    NotReplicableError,
    OutputError,
    RewriteError,
    inspect_model,
    rewrite_model,
)
from neuron_rewrite.wire import encode_varint
from synthetic_models import saved_model, tree_digest, write_model


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Models on disk: a SavedModel whose NEFFs and variables span several reads, a base path, a pipelined one."""
    root = tmp_path_factory.mktemp("archive-models")
    write_model(root / "resnet50", saved_model(functions=2, executable=os.urandom(3 << 20)))
    (root / "resnet50" / "variables" / "variables.data-00000-of-00001").write_bytes(os.urandom(5 << 20))
    write_model(root / "base" / "1", saved_model(functions=0))
    write_model(root / "base" / "3", saved_model(functions=1))
    write_model(root / "pipelined", saved_model(functions=0, pipeline=2))
    return root


@pytest.fixture
def www(tmp_path: Path) -> Iterator[ArchiveServer]:
    (tmp_path / "www").mkdir()
    with serving(tmp_path / "www") as server:
        yield server


def tar_of(model: Path, archive: Path, arcname: str = "", mode: str = "w:gz") -> str:
    with tarfile.open(archive, mode) as tar:
        tar.add(model, arcname=arcname or model.name)
    return archive.name


def zip_of(model: Path, archive: Path, top: str = "", compression: int = zipfile.ZIP_DEFLATED) -> str:
    with zipfile.ZipFile(archive, "w", compression) as zf:
        for path in sorted(model.rglob("*")):
            if path.is_file():
                zf.write(path, str(Path(top) / path.relative_to(model)))
    return archive.name


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


@pytest.mark.parametrize(
    "pack",
    [
        pytest.param(lambda m, w: tar_of(m, w / "resnet50.tar.gz"), id="tar.gz-with-top-folder"),
        pytest.param(lambda m, w: tar_of(m, w / "resnet50.tgz", arcname="."), id="tgz-without-top-folder"),
        pytest.param(lambda m, w: tar_of(m, w / "resnet50.tar", mode="w"), id="plain-tar"),
        pytest.param(lambda m, w: zip_of(m, w / "resnet50.zip"), id="zip-deflated"),
        pytest.param(lambda m, w: zip_of(m, w / "stored.zip", "resnet50", zipfile.ZIP_STORED), id="zip-stored-top"),
    ],
)
def test_an_archive_gives_the_model_rewritten_from_disk(pack, models: Path, www: ArchiveServer, tmp_path: Path) -> None:
    name = pack(models / "resnet50", www.root)
    from_disk = rewrite_model(models / "resnet50", tmp_path / "disk", 4)
    store = tmp_path / "store"
    report = rewrite_model(f"{www.url}/{name}", store / "resnet50" / "1", 4, fsync=True)
    assert tree_digest(store / "resnet50" / "1") == tree_digest(tmp_path / "disk")
    assert report.source == f"{www.url}/{name}" and report.bytes_written == from_disk.bytes_written
    assert [len(m.neuron_ops) for m in report.models] == [3]
    assert leftovers(store / "resnet50") == ["1"]  # the unpacked archive is gone


def test_a_zip_is_read_in_place_through_ranges_and_a_tar_in_one_get(
    models: Path, www: ArchiveServer, tmp_path: Path
) -> None:
    zip_of(models / "resnet50", www.root / "m.zip")
    tar_of(models / "resnet50", www.root / "m.tgz")
    rewrite_model(f"{www.url}/m.zip", tmp_path / "z", 2)
    rewrite_model(f"{www.url}/m.tgz", tmp_path / "t", 2)
    zip_gets = [line for line in www.log if line.startswith("GET /m.zip")]
    assert zip_gets[0] == "GET /m.zip range=None -> 200" and all("-> 206" in line for line in zip_gets[1:]), zip_gets
    assert [line for line in www.log if line.startswith("GET /m.tgz")] == ["GET /m.tgz range=None -> 200"]


def test_a_zip_from_a_server_without_ranges_is_saved_beside_the_output_first(models: Path, tmp_path: Path) -> None:
    (tmp_path / "www").mkdir()
    zip_of(models / "resnet50", tmp_path / "www" / "m.zip")
    with serving(tmp_path / "www", ranges=False) as www:
        rewrite_model(f"{www.url}/m.zip", tmp_path / "store" / "1", 2)
        assert www.log == ["GET /m.zip range=None -> 200"]
    rewrite_model(models / "resnet50", tmp_path / "disk", 2)
    assert tree_digest(tmp_path / "store" / "1") == tree_digest(tmp_path / "disk")
    assert leftovers(tmp_path / "store") == ["1"]


def test_a_base_path_archive_gives_the_version_tf_serving_would_load(
    models: Path, www: ArchiveServer, tmp_path: Path
) -> None:
    tar_of(models / "base", www.root / "base.tar.gz")
    url = f"{www.url}/base.tar.gz"
    report = rewrite_model(url, tmp_path / "latest", 2, select_version="latest", rewrite_id="abc")
    assert report.source_version == 3 and len(report.models[0].neuron_ops) == 2
    assert not (tmp_path / "latest" / "1").exists() and (tmp_path / "latest" / ".neuron-rewrite.json").is_file()
    with pytest.raises(InvalidModelError, match=rf"^{url}: no version 7 \(versions present: 1, 3\)$"):
        rewrite_model(url, tmp_path / "seven", 2, select_version=7)
    # An archive of one version folder is a base path too, not the SavedModel inside it.
    tar_of(models / "base" / "3", www.root / "v3.tgz")
    assert rewrite_model(f"{www.url}/v3.tgz", tmp_path / "v3", 2, select_version="latest").source_version == 3


def test_inspect_reads_an_archive_and_names_it_by_its_url(models: Path, www: ArchiveServer) -> None:
    tar_of(models / "resnet50", www.root / "m.tgz")
    report = inspect_model(f"{www.url}/m.tgz")
    assert report.source == f"{www.url}/m.tgz" and report.models[0].path == f"{www.url}/m.tgz"
    assert len(report.models[0].neuron_ops) == 3


def _tar_bytes(*members: tuple[tarfile.TarInfo, bytes | None]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


def _pb(models: Path) -> bytes:
    return (models / "resnet50" / "saved_model.pb").read_bytes()


def _zip_bytes(*members: tuple[zipfile.ZipInfo | str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for info, data in members:
            zf.writestr(info, data)
    return buffer.getvalue()


def _zip_link() -> zipfile.ZipInfo:
    info = zipfile.ZipInfo("variables")
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


REFUSED = {
    "escaping": (
        lambda m: _tar_bytes((_member("saved_model.pb"), _pb(m)), (_member("../escaped"), b"x")),
        InvalidModelError,
        "member '../escaped' would land outside the model (absolute or with '..')",
    ),
    "absolute": (
        lambda m: _zip_bytes(("saved_model.pb", _pb(m)), ("/etc/cron.d/x", b"x")),
        InvalidModelError,
        "member '/etc/cron.d/x' would land outside the model",
    ),
    "symlink": (
        lambda m: _tar_bytes(
            (_member("saved_model.pb"), _pb(m)), (_member("variables", tarfile.SYMTYPE, "/etc"), None)
        ),
        InvalidModelError,
        "member 'variables' is a link (links are refused",
    ),
    "hardlink": (
        lambda m: _tar_bytes((_member("saved_model.pb"), _pb(m)), (_member("v", tarfile.LNKTYPE, "/etc/passwd"), None)),
        InvalidModelError,
        "member 'v' is a link",
    ),
    "zip-symlink": (
        lambda m: _zip_bytes(("saved_model.pb", _pb(m)), (_zip_link(), b"/etc")),
        InvalidModelError,
        "member 'variables' is a link",
    ),
    "device": (
        lambda m: _tar_bytes((_member("saved_model.pb"), _pb(m)), (_member("null", tarfile.CHRTYPE), None)),
        InvalidModelError,
        "member 'null' is not a regular file or directory",
    ),
    "twice": (
        lambda m: _tar_bytes((_member("saved_model.pb"), _pb(m)), (_member("./saved_model.pb"), b"\x08\x01")),
        InvalidModelError,
        "member './saved_model.pb' appears twice in the archive",
    ),
    "not-a-model": (
        lambda m: _tar_bytes((_member("model/variables/variables.index"), b"x")),
        InvalidModelError,
        ": not a SavedModel (no saved_model.pb) nor a TF Serving base path",
    ),
    "oversize-header": (
        lambda m: _tar_bytes((_member("saved_model.pb"), _pb(m) + b"\x12" + encode_varint(2**62) + b"\x00" * 16)),
        InvalidModelError,
        "/saved_model.pb: corrupt or truncated protobuf",
    ),
    "pipelined": (
        lambda m: _tar_bytes((_member("saved_model.pb"), (m / "pipelined" / "saved_model.pb").read_bytes())),
        NotReplicableError,
        "pipeline",
    ),
    "not-an-archive": (
        lambda m: b"<html>Sign in to continue</html>",
        InvalidModelError,
        ": not a .tar.gz, .tgz, .tar or .zip archive",
    ),
    "truncated": (
        lambda m: _tar_bytes((_member("saved_model.pb"), _pb(m)), (_member("variables/v"), os.urandom(1 << 20)))[
            :-4096
        ],
        InvalidModelError,
        "the archive ends early or is corrupt (",
    ),
    "bad-zip": (
        lambda m: b"PK\x03\x04" + os.urandom(64),
        InvalidModelError,
        ": not a valid .zip archive",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_a_refused_archive_is_named_by_its_url_and_leaves_nothing(
    case: str, models: Path, www: ArchiveServer, tmp_path: Path
) -> None:
    build, error, words = REFUSED[case]
    (www.root / "model.tgz").write_bytes(build(models))
    url = f"{www.url}/model.tgz"
    store = tmp_path / "store" / "m"
    with pytest.raises(error) as refused:
        rewrite_model(url, store / "1", 2)
    message = str(refused.value)
    assert message.startswith(url) and words in message and "\n" not in message, message
    assert str(tmp_path) not in message  # never the directory it was unpacked in
    assert leftovers(store) == [] and not (tmp_path / "escaped").exists()


def test_a_missing_archive_and_an_unreachable_server_are_one_line_errors(www: ArchiveServer, tmp_path: Path) -> None:
    with pytest.raises(InvalidModelError, match=rf"^{www.url}/nothing.tgz: HTTP 404 Not Found$"):
        rewrite_model(f"{www.url}/nothing.tgz", tmp_path / "out", 2)
    with pytest.raises(RewriteError, match=r"^http://127\.0\.0\.1:9/m\.tgz: \[Errno 111\] Connection refused$"):
        rewrite_model("http://127.0.0.1:9/m.tgz", tmp_path / "out", 2)
    assert leftovers(tmp_path) == ["www"]


def test_a_server_error_that_lasts_is_not_a_refusal(tmp_path: Path) -> None:
    """A 503 after every attempt may still pass: exit 1, which the Job's podFailurePolicy leaves to its backoffLimit
    (a refusal's exit code fails the Job at once)."""

    class Unavailable(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_error(503)

        def log_message(self, format: str, *args: object) -> None:
            pass

    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Unavailable) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_address[1]}/m.tgz"
        with pytest.raises(RewriteError) as failed:
            rewrite_model(url, tmp_path / "out", 2)
        server.shutdown()
    assert type(failed.value) is RewriteError and failed.value.exit_code == 1
    assert str(failed.value) == f"{url}: HTTP 503 Service Unavailable"


def test_an_existing_output_is_refused_before_the_archive_is_fetched(
    models: Path, www: ArchiveServer, tmp_path: Path
) -> None:
    tar_of(models / "resnet50", www.root / "m.tgz")
    (tmp_path / "out").mkdir()
    with pytest.raises(OutputError, match="already exists"):
        rewrite_model(f"{www.url}/m.tgz", tmp_path / "out", 2)
    assert www.log == []


@pytest.mark.parametrize("name", ["m.tgz", "m.zip"])
def test_an_interrupted_transfer_is_resumed_where_it_broke(
    name: str, models: Path, www: ArchiveServer, tmp_path: Path
) -> None:
    (tar_of if name.endswith("tgz") else zip_of)(models / "resnet50", www.root / name)
    www.fault(f"/{name}", after=3 << 20, times=2)  # within the NEFFs, twice
    rewrite_model(f"{www.url}/{name}", tmp_path / "http", 2)
    rewrite_model(models / "resnet50", tmp_path / "disk", 2)
    assert tree_digest(tmp_path / "http") == tree_digest(tmp_path / "disk")
    assert sum(line == f"fault: dropped GET /{name} after {3 << 20} bytes" for line in www.log) == 2, www.log
    resumed = [line for line in www.log if line.startswith(f"GET /{name} range=bytes=") and "-> 206" in line]
    assert resumed, www.log


def test_a_broken_transfer_from_a_server_without_ranges_says_it_cannot_resume(models: Path, tmp_path: Path) -> None:
    (tmp_path / "www").mkdir()
    tar_of(models / "resnet50", tmp_path / "www" / "m.tgz")
    with serving(tmp_path / "www", ranges=False) as www:
        www.fault("/m.tgz", after=1 << 20, times=1)
        with pytest.raises(RewriteError) as refused:
            rewrite_model(f"{www.url}/m.tgz", tmp_path / "store" / "1", 2)
    assert str(refused.value) == (
        f"{www.url}/m.tgz: the transfer broke off at byte {1 << 20} and the server does not answer byte ranges to "
        "resume it"
    )
    assert leftovers(tmp_path / "store") == []


def test_a_file_replaced_on_the_server_mid_transfer_is_not_spliced(
    models: Path, www: ArchiveServer, tmp_path: Path
) -> None:
    tar_of(models / "resnet50", www.root / "m.tgz")
    www.fault("/m.tgz", after=1 << 20, times=1)
    original = www.take_fault

    def replace_then_break(path: str, sent: int) -> int | None:
        after = original(path, sent)
        if after is not None:  # the next GET finds another file under the URL
            tar_of(models / "base", www.root / "m.tgz")
        return after

    www.take_fault = replace_then_break  # type: ignore[method-assign]
    with pytest.raises(RewriteError, match=r": the file changed on the server while it was read$"):
        rewrite_model(f"{www.url}/m.tgz", tmp_path / "store" / "1", 2)
    assert leftovers(tmp_path / "store") == []


def test_the_cli_takes_an_archive_url(models: Path, www: ArchiveServer, tmp_path: Path) -> None:
    tar_of(models / "resnet50", www.root / "m.tgz")
    out = tmp_path / "store" / "1"
    done = subprocess.run(
        [sys.executable, "-m", "neuron_rewrite", f"{www.url}/m.tgz", "--num_cores", "2", "--new_model_dir", str(out)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert (out / "saved_model.pb").is_file() and (out / "variables").is_dir()


def test_memory_stays_bounded_however_far_an_archive_expands(tmp_path: Path, www: ArchiveServer) -> None:
    """256 MiB of zeros gzip to a few hundred KiB: a decompressor that expands a whole read at once (tarfile's own
    stream mode) would hold them in memory. The rewrite's peak RSS stays that of a small model."""
    model = write_model(tmp_path / "zeros", saved_model(functions=1))
    with (model / "variables" / "variables.data-00000-of-00001").open("wb") as sparse:
        sparse.truncate(256 << 20)
    tar_of(model, www.root / "zeros.tar.gz")
    assert (www.root / "zeros.tar.gz").stat().st_size < 2 << 20
    probe = (  # VmHWM, not ru_maxrss: that keeps the high-water mark of the forking (TensorFlow-laden) pytest
        "import re, sys; from neuron_rewrite import rewrite_model; rewrite_model(sys.argv[1], sys.argv[2], 2); "
        "print(re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read())[1])"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, f"{www.url}/zeros.tar.gz", str(tmp_path / "out")], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) < 100 << 10, f"peak RSS {int(done.stdout) >> 10} MiB"
    assert (tmp_path / "out" / "variables" / "variables.data-00000-of-00001").stat().st_size == 256 << 20


def test_a_gzip_of_several_members_is_one_archive_and_a_bad_crc_is_refused(
    models: Path, www: ArchiveServer, tmp_path: Path
) -> None:
    """pigz and `cat a.gz b.gz` write several gzip members, some tools pad the end with zeros: one stream to gzip.
    A member whose CRC does not match its bytes is refused, as gzip refuses it."""
    tar_of(models / "resnet50", tmp_path / "m.tar", mode="w")
    data = (tmp_path / "m.tar").read_bytes()
    half = len(data) // 2
    (www.root / "pigz.tar.gz").write_bytes(gzip.compress(data[:half]) + gzip.compress(data[half:]) + b"\0" * 512)
    rewrite_model(f"{www.url}/pigz.tar.gz", tmp_path / "pigz", 2)
    rewrite_model(models / "resnet50", tmp_path / "disk", 2)
    assert tree_digest(tmp_path / "pigz") == tree_digest(tmp_path / "disk")

    damaged = bytearray(gzip.compress(data))
    damaged[-8] ^= 0xFF  # the trailer's CRC-32
    (www.root / "crc.tar.gz").write_bytes(bytes(damaged))
    with pytest.raises(
        InvalidModelError, match=r"crc\.tar\.gz: the archive ends early or is corrupt \(.*incorrect data check"
    ):
        rewrite_model(f"{www.url}/crc.tar.gz", tmp_path / "store" / "1", 2)
    assert leftovers(tmp_path / "store") == []
