"""An http(s) archive source on the local control plane: the rewrite Job unpacks it into the store as it downloads
(no init container, no scratch volume), survives a transfer that breaks off, and a refused archive fails the model
with the rewrite's own line."""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import Env, neuron_model
from localcluster.httpserver import ArchiveServer, serving
from localcluster.pytest_plugin import wait_for
from neuron_rewrite import rewrite_model
from neuron_rewrite.marker import MARKER_FILE
from synthetic_models import tree_digest

pytestmark = pytest.mark.cluster


@pytest.fixture
def www(tmp_path: Path) -> Iterator[ArchiveServer]:
    """The archive server, on the loopback the node agent's Job processes share with it."""
    (tmp_path / "www").mkdir()
    with serving(tmp_path / "www") as server:
        yield server


def http_model(name: str, url: str, **spec: object) -> dict:
    manifest = neuron_model(name, "unused", rewrite={"backoffLimit": 0}, **spec)
    manifest["spec"]["source"] = {"http": {"url": url}}
    return manifest


def test_an_archive_is_unpacked_into_the_store_as_it_downloads_and_served(
    env: Env, models: dict[str, Path], www: ArchiveServer
) -> None:
    with tarfile.open(www.root / "resnet50.tar.gz", "w:gz") as tar:
        tar.add(models["resnet50"], arcname="resnet50")
    size = (www.root / "resnet50.tar.gz").stat().st_size
    www.fault("/resnet50.tar.gz", after=size // 2, times=1)  # the download breaks off halfway, once
    assert env.apply(http_model("fromweb", f"{www.url}/resnet50.tar.gz")).returncode == 0
    status = env.wait_phase("fromweb", "Ready")

    (job,) = env.jobs()
    pod = job.spec.template.spec
    assert not pod.init_containers and [v.name for v in pod.volumes] == ["store"]  # no scratch volume
    (rewrite,) = pod.containers
    assert rewrite.command[1] == f"{www.url}/resnet50.tar.gz"
    assert rewrite.resources.limits["ephemeral-storage"] == "64Mi"

    assert f"fault: dropped GET /resnet50.tar.gz after {size // 2} bytes" in www.log
    assert f"GET /resnet50.tar.gz range=bytes={size // 2}- -> 206" in www.log, www.log  # resumed where it broke
    rewrite_dir = env.tmp / "store" / status["rewrite"]["path"]
    assert sorted(p.name for p in rewrite_dir.iterdir()) == ["1"]  # nothing unpacked is left beside it
    expected = rewrite_model(models["resnet50"], env.tmp / "from-disk", 2)
    served = {path: digest for path, digest in tree_digest(rewrite_dir / "1").items() if path != MARKER_FILE}
    assert served == tree_digest(env.tmp / "from-disk")  # the same bytes as a rewrite from disk, marker aside
    assert status["rewrite"]["bytesWritten"] == expected.bytes_written


def test_a_refused_archive_fails_the_model_with_the_rewrites_line_and_leaves_nothing(
    env: Env, models: dict[str, Path], www: ArchiveServer
) -> None:
    with tarfile.open(www.root / "evil.tgz", "w:gz") as tar:
        tar.add(models["resnet50"] / "saved_model.pb", arcname="saved_model.pb")
        link = tarfile.TarInfo("variables")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc"
        tar.addfile(link)
    assert env.apply(http_model("evil", f"{www.url}/evil.tgz")).returncode == 0
    env.wait_phase("evil", "Failed")
    rewrite = env.condition("evil", "RewriteSucceeded")
    assert rewrite["reason"] == "RewriteFailed"
    assert f"{www.url}/evil.tgz: member 'variables' is a link (links are refused" in rewrite["message"], rewrite
    store = env.tmp / "store"
    wait_for(lambda: all(not p.name.startswith(".") for p in store.rglob("*")), what="no staging left in the store")
    assert not any(p.is_file() for p in store.rglob("*"))
