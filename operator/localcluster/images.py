"""Build the project's container images on this machine, with no registry and no Docker daemon.

The Dockerfiles stay as a user would run them (``FROM python:3.11-slim-bookworm``). The base they name is made
here instead of pulled: a Debian bookworm minbase from ``mmdebstrap`` with a venv at ``/usr/local`` (as in the
official image: ``/usr/local/bin/python``, ``pip``), the host's extra CA certificates trusted and pip told to use
the system bundle (PyPI is reached through a proxy with its own CA). It is tagged under the official name in
buildah's storage, so ``buildah build --pull=never`` resolves the Dockerfiles' ``FROM`` to it.

Every image is kept as a docker-archive in the cache, named by a content hash of what decides it: the Dockerfile,
the context files its ``COPY``/``ADD`` lines name and the base's hash. A warm machine builds nothing; an edited
source rebuilds only the images it feeds. The build context is a temporary copy of exactly those files (the files
git knows, minus ``.dockerignore``): the repository root also holds ``.venv``. The kubelet gets the images through
``import_images`` (``ctr images import``).

    python -m localcluster.images build
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

from .cluster import cache_dir

REPO = Path(__file__).resolve().parents[2]
BASE_REF = "docker.io/library/python:3.11-slim-bookworm"  # what the Dockerfiles' FROM resolves to locally
BASE_REPO = "localhost/neuronmodel-base"
HOST_CAS = Path("/usr/local/share/ca-certificates")
# crun fails on this machine's cgroup layout; chroot isolation needs no network namespace or cgroup setup.
BUILDAH_RUN = ["--isolation=chroot", "--runtime=/usr/bin/runc"]
BASE_ENV = {
    "PATH": "/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
}
# Run inside the new root by mmdebstrap; part of the base's key, so editing them rebuilds it.
BASE_HOOKS = (
    'chroot "$1" python3 -m venv /usr/local',
    'chroot "$1" update-ca-certificates',
    "printf '[global]\\ncert = /etc/ssl/certs/ca-certificates.crt\\n' > \"$1/etc/pip.conf\"",
)
STANDIN = "tfserving-standin"
DOCKERFILES = {
    "operator": "images/operator.Dockerfile",
    "rewrite": "images/rewrite.Dockerfile",
    "tfserving-standin": "operator/tfserving_standin/Dockerfile",
}
REPOS = {
    "operator": "localhost/neuronmodel-operator",
    "rewrite": "localhost/neuronmodel-rewrite",
    "tfserving-standin": "localhost/neuronmodel-tfserving-standin",
}


class ImageError(RuntimeError):
    """A build or import step failed; the message names the step and ends with the tail of its output."""


@dataclass(frozen=True)
class Image:
    """One built image: the reference pods name, and the docker-archive that carries it to a containerd."""

    name: str
    ref: str
    archive: Path


def progress(message: str) -> None:
    print(f"[images] {message}", file=sys.stderr, flush=True)


def run(step: str, argv: Sequence[str]) -> str:
    """Run one step; on failure raise naming it, with the tail of its output (buildah and mmdebstrap are verbose)."""
    proc = subprocess.run(
        list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.splitlines()[-40:])
        raise ImageError(f"{step} failed (exit {proc.returncode}): {shlex.join(argv)}\n{tail}")
    return proc.stdout


def images_dir() -> Path:
    path = cache_dir() / "images"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _digest(parts: Iterable[tuple[str, bytes]]) -> str:
    h = hashlib.sha256()
    for name, data in parts:
        h.update(f"{name}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()[:16]


def _host_cas() -> list[Path]:
    return sorted(HOST_CAS.glob("*.crt")) if HOST_CAS.is_dir() else []


def _mmdebstrap_argv(rootfs: Path) -> list[str]:
    hooks = list(BASE_HOOKS)
    cas = _host_cas()
    if cas:
        hooks.insert(1, "copy-in " + " ".join(shlex.quote(str(c)) for c in cas) + f" {HOST_CAS}")
    return [
        "mmdebstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates",
        "--skip=output/dev",  # the runtime provides /dev; device nodes in a layer only get in the way
        # As the official slim images do: no docs, manuals or translations (a fifth of the base), licences kept.
        *(f"--dpkgopt=path-exclude=/usr/share/{d}/*" for d in ("doc", "man", "info", "locale")),
        "--dpkgopt=path-include=/usr/share/doc/*/copyright",
        *(f"--customize-hook={hook}" for hook in hooks),
        "bookworm", str(rootfs),
    ]  # fmt: skip


def base_key() -> str:
    """The recipe (mmdebstrap command, image config) and the host CA certificates it copies in."""
    recipe = json.dumps({"argv": _mmdebstrap_argv(Path("rootfs.tar")), "env": BASE_ENV}).encode()
    return _digest([("recipe", recipe), *((f"ca/{c.name}", c.read_bytes()) for c in _host_cas())])


def _buildah_has(ref: str) -> bool:
    return subprocess.run(["buildah", "inspect", "--type", "image", ref], capture_output=True).returncode == 0


def _push_archive(ref: str, archive: Path) -> None:
    """Write atomically: a half-written archive must never look like a cache hit."""
    staging = archive.with_name(archive.name + ".partial")
    staging.unlink(missing_ok=True)
    run(f"buildah push {ref}", ["buildah", "push", "--quiet", ref, f"docker-archive:{staging}:{ref}"])
    staging.rename(archive)


def _remove_superseded(repo: str, prefix: str, current: Path) -> None:
    """Keep one archive and one buildah tag per image: each source edit would otherwise leave hundreds of MB."""
    for old in images_dir().glob(f"{prefix}-*.tar"):
        if old != current:
            old.unlink()
            progress(f"removed superseded {old.name}")
    current_tag = current.stem.removeprefix(f"{prefix}-")
    tags = run("buildah images", ["buildah", "images", "--format", "{{.Name}}:{{.Tag}}"]).split()
    stale = [t for t in tags if t.startswith(f"{repo}:") and t != f"{repo}:{current_tag}"]
    if stale:
        # Housekeeping only: the tag goes even when a layer stays (a container still uses it); say so, go on.
        out = subprocess.run(["buildah", "rmi", *stale], capture_output=True, text=True)
        if out.returncode != 0:
            progress(f"buildah rmi {' '.join(stale)}: {out.stderr.strip().splitlines()[-1:]}")


def ensure_base() -> str:
    """Have the base in buildah's storage under the official name, built once per key; return the key."""
    key = base_key()
    ref = f"{BASE_REPO}:{key}"
    archive = images_dir() / f"base-{key}.tar"
    if not _buildah_has(ref):
        start = time.monotonic()
        if archive.exists():
            run(f"buildah pull {archive.name}", ["buildah", "pull", "--quiet", f"docker-archive:{archive}"])
            run("buildah tag", ["buildah", "tag", BASE_REF, ref])
            progress(f"base {ref}: loaded from {archive} in {time.monotonic() - start:.1f} s")
        else:
            _build_base(ref, archive)
            progress(f"base {ref}: built in {time.monotonic() - start:.1f} s -> {archive}")
        _remove_superseded(BASE_REPO, "base", archive)
    # Tagged every time: the official name may point at an older base (or, on another machine, the real one).
    run("buildah tag", ["buildah", "tag", ref, BASE_REF])
    return key


def _build_base(ref: str, archive: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="neuronmodel-base-") as tmp:
        rootfs = Path(tmp) / "rootfs.tar"
        run("mmdebstrap (base image root filesystem)", _mmdebstrap_argv(rootfs))
        container = run("buildah from scratch", ["buildah", "from", "scratch"]).strip()
        try:
            run("buildah add (base root filesystem)", ["buildah", "add", "--quiet", container, str(rootfs), "/"])
            env = [f"--env={k}={v}" for k, v in BASE_ENV.items()]
            run("buildah config", ["buildah", "config", *env, "--cmd=python3", container])
            run(f"buildah commit {ref}", ["buildah", "commit", "--quiet", "--rm", container, ref])
        except BaseException:
            subprocess.run(["buildah", "rm", container], capture_output=True)
            raise
    run("buildah tag", ["buildah", "tag", ref, BASE_REF])
    _push_archive(BASE_REF, archive)


def _copy_sources(dockerfile: str) -> list[str]:
    """The context paths (or globs) the Dockerfile's COPY/ADD lines read; ``--from`` copies are not context."""
    text = re.sub(r"\\\n", " ", dockerfile)
    sources: list[str] = []
    for line in text.splitlines():
        words = line.strip().split(None, 1)
        if len(words) < 2 or words[0].upper() not in ("COPY", "ADD"):
            continue
        rest = words[1].strip()
        args = json.loads(rest) if rest.startswith("[") else shlex.split(rest)
        flags = [a for a in args if a.startswith("--")]
        if any(f.startswith("--from=") for f in flags):
            continue
        sources += [a for a in args if not a.startswith("--")][:-1]
    return sources


def _dockerignore() -> list[str]:
    lines = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()]
    patterns = [line for line in lines if line and not line.startswith("#")]
    if any(p.startswith("!") for p in patterns):
        raise ImageError(".dockerignore: exceptions (!) are not supported by localcluster.images")
    return patterns


def context_files() -> list[str]:
    """What a build may see: tracked and untracked files that neither .gitignore nor .dockerignore exclude."""
    out = run("git ls-files", ["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"])
    ignored = _dockerignore()
    return sorted({f for f in out.split("\0") if f and (REPO / f).is_file() and not _covered(f, ignored)})


def _covered(path: str, sources: list[str]) -> bool:
    """Whether a COPY source or ignore pattern names ``path``, itself or a directory above it."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    for source in sources:
        pattern = source.removeprefix("./").rstrip("/")
        if pattern in ("", "."):
            return True
        if any(fnmatchcase(p, pattern) for p in prefixes):
            return True
    return False


@dataclass(frozen=True)
class _Recipe:
    name: str
    dockerfile: Path
    files: list[str]
    key: str

    @property
    def ref(self) -> str:
        return f"{REPOS[self.name]}:{self.key}"

    @property
    def archive(self) -> Path:
        return images_dir() / f"{self.name}-{self.key}.tar"


def recipe(name: str, base: str, files: list[str]) -> _Recipe:
    """The image's key: its Dockerfile, the context files it copies (path, mode, bytes) and the base's key."""
    dockerfile = REPO / DOCKERFILES[name]
    if not dockerfile.is_file():
        raise ImageError(f"{name}: {dockerfile} does not exist")
    text = dockerfile.read_text()
    sources = _copy_sources(text)
    used = [f for f in files if _covered(f, sources)]
    parts = [("base", base.encode()), ("dockerfile", text.encode())]
    parts += [(f"{f}:{(REPO / f).stat().st_mode & 0o111 != 0}", (REPO / f).read_bytes()) for f in used]
    return _Recipe(name, dockerfile, used, _digest(parts))


def _build(r: _Recipe) -> None:
    """Build from a context holding only the files the key covers: the repository root may hold GBs (.venv)."""
    with tempfile.TemporaryDirectory(prefix=f"neuronmodel-{r.name}-context-") as tmp:
        for f in r.files:
            (Path(tmp) / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, Path(tmp) / f)
        run(
            f"buildah build {r.dockerfile.relative_to(REPO)}",
            ["buildah", "build", "--pull=never", "--layers", "--force-rm", "--network=host", *BUILDAH_RUN,
             "-f", str(r.dockerfile), "-t", r.ref, tmp],
        )  # fmt: skip
    _push_archive(r.ref, r.archive)


def available() -> list[str]:
    """The images whose Dockerfile is in the tree (the TF Serving stand-in arrives after the two product images)."""
    return [name for name, path in DOCKERFILES.items() if (REPO / path).is_file()]


@contextlib.contextmanager
def _exclusive() -> Iterator[None]:
    """One builder at a time per cache: concurrent sessions (pytest runs, the demo) share the archives."""
    with (images_dir() / ".lock").open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress("waiting for another build of the images to finish")
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def ensure_images(names: Iterable[str] | None = None) -> dict[str, Image]:
    """Each image's archive for the current sources (default: ``available()``), building only those not cached."""
    start = time.monotonic()
    names = available() if names is None else names
    files = context_files()
    key = base_key()
    recipes = [recipe(name, key, files) for name in names]
    with _exclusive():
        missing = [r for r in recipes if not r.archive.exists()]
        if missing:
            ensure_base()
        for r in missing:
            t = time.monotonic()
            _build(r)
            progress(f"{r.name} {r.ref}: built in {time.monotonic() - t:.1f} s -> {r.archive}")
            _remove_superseded(REPOS[r.name], r.name, r.archive)
    progress(f"{len(recipes)} images ready ({len(missing)} built) in {time.monotonic() - start:.1f} s")
    return {r.name: Image(r.name, r.ref, r.archive) for r in recipes}


def import_images(images: Iterable[Image], address: str, ctr: str, aliases: dict[str, list[str]] | None = None) -> None:
    """Import into containerd's ``k8s.io`` namespace (the kubelet's) those not already there, e.g. in a kept root,
    and tag each under its ``aliases`` (``{ref: [other refs]}``) too.

    Older tags of the same images are removed: a kept root would otherwise gain a copy with every source edit.
    """
    base = [ctr, f"--address={address}", "--namespace=k8s.io"]
    present = set(run("ctr images ls", [*base, "images", "ls", "-q"]).split())
    images = list(images)
    for image in images:
        if image.ref in present:
            continue
        start = time.monotonic()
        run(f"ctr images import {image.archive.name}", [*base, "images", "import", str(image.archive)])
        progress(f"{image.ref}: imported in {time.monotonic() - start:.1f} s")
    for ref, others in (aliases or {}).items():
        for other in others:  # always: an alias kept from an earlier build would name that build's image
            run(f"ctr images tag {other}", [*base, "images", "tag", "--force", ref, other])
    wanted = {image.ref for image in images}
    repos = {image.ref.rsplit(":", 1)[0] for image in images}
    stale = [ref for ref in present - wanted if ref.rsplit(":", 1)[0] in repos]
    if stale:
        run("ctr images rm", [*base, "images", "rm", *stale])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m localcluster.images", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build what is missing and print each image's reference and archive")
    build.add_argument(
        "names",
        nargs="*",
        metavar="name",
        help=f"any of {', '.join(DOCKERFILES)} (default: those whose Dockerfile exists)",
    )
    args = parser.parse_args(argv)
    unknown = set(args.names) - set(DOCKERFILES)
    if unknown:
        parser.error(f"unknown image {', '.join(sorted(unknown))}")
    for image in ensure_images(args.names or None).values():
        print(f"{image.name}\t{image.ref}\t{image.archive}\t{image.archive.stat().st_size / 1e6:.0f} MB")


if __name__ == "__main__":
    main()
