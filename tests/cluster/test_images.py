"""The project's images build here without a registry and carry only production code, run as the chart runs them.

The images are run the kubelet's way: imported into a containerd of the test's own and started with ``ctr run`` as
the image's user (65532) on a read-only root. A build that fails fails these tests; nothing is skipped.
"""

from __future__ import annotations

import re
import subprocess
import time
import uuid
from collections.abc import Iterator

import pytest

from localcluster.cluster import binaries_dir, cache_dir
from localcluster.images import Image, ImageError, available, context_files, ensure_images, import_images, recipe, run

# What each image must run (exit 0) as uid 65532 on a read-only root.
COMMANDS = {
    "operator": [["neuronmodel-operator", "--help"]],
    "rewrite": [["tf-neuron-auto-multicore", "--help"], ["neuron-store-clean", "--help"]],
}
PRODUCTION = "import neuron_rewrite, neuronmodel_operator"
HARNESS = ("localcluster", "neuron_modelgen", "tfserving_standin")
PRODUCT_IMAGES = ("operator", "rewrite")


@pytest.fixture(scope="module")
def images() -> dict[str, Image]:
    return ensure_images()


@pytest.fixture(scope="module")
def containerd(images: dict[str, Image], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A containerd of its own (no CRI) with the images imported; yields its socket.

    Its root is kept in the cache, as the real node's is, so a warm run imports nothing.
    """
    work = tmp_path_factory.mktemp("containerd")
    root = cache_dir() / "test-images-containerd"
    socket = work / "containerd.sock"
    (work / "config.toml").write_text(
        f'version = 3\nroot = "{root}"\nstate = "{work / "state"}"\n'
        'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
        f'[grpc]\n  address = "{socket}"\n'
    )
    with (work / "containerd.log").open("wb") as log:
        proc = subprocess.Popen(
            [str(binaries_dir() / "containerd"), f"--config={work / 'config.toml'}"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        while ctr(str(socket), "version").returncode != 0:
            assert proc.poll() is None, f"containerd exited:\n{(work / 'containerd.log').read_text()[-3000:]}"
            assert time.monotonic() < deadline, "containerd not serving after 30 s"
            time.sleep(0.2)
        import_images(images.values(), str(socket), ctr=str(binaries_dir() / "ctr"))
        yield str(socket)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def ctr(address: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(binaries_dir() / "ctr"), f"--address={address}", "--namespace=k8s.io", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def run_in(containerd: str, image: Image, *argv: str) -> subprocess.CompletedProcess[str]:
    """Run as the kubelet would with the chart's securityContext: the image's user, read-only root, no network."""
    return ctr(containerd, "run", "--rm", "--read-only", image.ref, f"test-{uuid.uuid4().hex[:12]}", *argv)


def test_every_dockerfile_is_built_into_a_cached_archive(images: dict[str, Image]) -> None:
    assert set(images) == set(available()) >= set(PRODUCT_IMAGES)
    for image in images.values():
        key = image.ref.rsplit(":", 1)[1]
        assert image.archive.is_file() and image.archive.stat().st_size > 10_000_000
        assert image.archive.name == f"{image.name}-{key}.tar"


def test_warm_build_is_instant(images: dict[str, Image]) -> None:
    start = time.monotonic()
    assert ensure_images() == images
    assert time.monotonic() - start < 5


def test_import_skips_images_already_present(
    containerd: str, images: dict[str, Image], capsys: pytest.CaptureFixture[str]
) -> None:
    listed = ctr(containerd, "images", "ls", "-q").stdout.split()
    assert {image.ref for image in images.values()} <= set(listed)
    capsys.readouterr()
    import_images(images.values(), containerd, ctr=str(binaries_dir() / "ctr"))
    assert "imported" not in capsys.readouterr().err


def test_an_alias_names_the_current_image_even_when_it_named_another(containerd: str, images: dict[str, Image]) -> None:
    """The examples' serving image names are aliases of the stand-in: one kept from an earlier build (a kept
    containerd root) must be moved to the current build, or the pods would run the old stand-in."""
    alias = "example.com/serving:alias-test"
    ctr(containerd, "images", "tag", "--force", images["rewrite"].ref, alias)  # as if an older image held it
    standin = images["tfserving-standin"]
    import_images([standin], containerd, ctr=str(binaries_dir() / "ctr"), aliases={standin.ref: [alias]})

    def digest(ref: str) -> str:
        listed = ctr(containerd, "images", "ls").stdout.splitlines()
        (line,) = [line for line in listed if line.split()[:1] == [ref]]
        return line.split()[2]

    assert digest(alias) == digest(standin.ref)


@pytest.mark.parametrize("name", available())
def test_runs_as_nonroot_on_a_read_only_root(containerd: str, images: dict[str, Image], name: str) -> None:
    probe = "import os; print(os.getuid(), os.getgid(), flush=True); open('/probe', 'w')"
    out = run_in(containerd, images[name], "python", "-c", probe)
    assert out.returncode != 0 and out.stdout.split() == ["65532", "65532"], out
    assert "Read-only file system" in out.stderr, out


@pytest.mark.parametrize("name", PRODUCT_IMAGES)
def test_entry_points_start(containerd: str, images: dict[str, Image], name: str) -> None:
    for argv in COMMANDS[name]:
        out = run_in(containerd, images[name], *argv)
        assert out.returncode == 0 and "usage" in out.stdout.lower(), out


@pytest.mark.parametrize("name", PRODUCT_IMAGES)
def test_only_production_packages_are_installed(containerd: str, images: dict[str, Image], name: str) -> None:
    out = run_in(containerd, images[name], "python", "-c", PRODUCTION)
    assert out.returncode == 0, out
    for package in HARNESS:
        out = run_in(containerd, images[name], "python", "-c", f"import {package}")
        assert out.returncode != 0 and "ModuleNotFoundError" in out.stderr, out


def test_standin_answers_as_tf_serving(containerd: str, images: dict[str, Image]) -> None:
    """The serving pods' command runs the Python stand-in; the control-plane harness is not in it."""
    image = images["tfserving-standin"]
    out = run_in(containerd, image, "tensorflow_model_server_neuronx", "--help")
    assert re.match(r"usage: \S*tensorflow_model_server_neuronx\nFlags:", out.stdout + out.stderr), out
    out = run_in(containerd, image, "python", "-c", "import tfserving_standin, localcluster")
    assert "No module named 'localcluster'" in out.stderr, out


def test_a_failed_step_is_named_with_its_output() -> None:
    with pytest.raises(ImageError, match=r"(?s)buildah build x failed \(exit 3\).*layer missing"):
        run("buildah build x", ["sh", "-c", "echo layer missing; exit 3"])


def test_keys_cover_what_each_dockerfile_copies_and_not_the_harness() -> None:
    files = recipe("operator", "base", context_files()).files
    assert {"pyproject.toml", "README.md", "operator/neuronmodel_operator/__main__.py"} <= set(files)
    assert not [f for f in files if f.startswith(("operator/localcluster/", "tests/", ".venv/", ".git/"))]
