"""The rewrite the CLI, the Python API and the operator's Job share."""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from .archive import is_http, unpacked
from .errors import InvalidModelError, NotReplicableError, UsageError
from .files import (
    atomic_directory,
    check_output_free,
    check_output_location,
    copy_file,
    copy_tree,
    describe_os_error,
    move_tree,
    tree_bytes,
    write_pieces,
)
from .marker import FORMAT_VERSION, MARKER_FILE, read_marker, recorded_target, write_marker
from .report import ModelReport, RewriteReport
from .s3tree import S3Path, S3Reader, is_s3, open_s3, write_pieces_from_s3
from .scan import Piece, SavedModelScanner
from .wire import FileReader

SAVED_MODEL = "saved_model.pb"
FINGERPRINT = "fingerprint.pb"
LATEST = "latest"
_VERSION_NAME = re.compile(r"[0-9]+")  # TF Serving's version folders: names that parse as an integer


@dataclass
class _Model:
    """One SavedModel found under the input: where it is, what it holds, and how to write it."""

    version: str | None
    relative: Path  # from the directory the output mirrors: the input, or its selected version
    report: ModelReport
    plan: list[Piece] | None  # None: saved_model.pb is copied unchanged


def _is_saved_model(root: Path) -> bool:
    """True for a SavedModel directory, False for what may be a base path; refuses anything else."""
    if not root.exists():
        raise InvalidModelError(f"{root}: no such directory")
    if not root.is_dir():
        raise InvalidModelError(f"{root}: not a directory (expected a SavedModel directory)")
    if (root / SAVED_MODEL).is_file():
        return True
    if (root / "saved_model.pbtxt").exists():
        raise InvalidModelError(f"{root / 'saved_model.pbtxt'}: text-format SavedModels are not supported")
    return False


def _numbered_children(root: Path) -> list[tuple[int, Path]]:
    """Every child whose name is a version number, file or folder alike (as TF Serving counts them), oldest first."""
    return sorted((int(p.name), p) for p in root.iterdir() if _VERSION_NAME.fullmatch(p.name))


def _not_a_model(root: Path) -> InvalidModelError:
    return InvalidModelError(
        f"{root}: not a SavedModel (no {SAVED_MODEL}) nor a TF Serving base path (no numbered version folder)"
    )


def _refuse_link_outside(path: Path, root: Path) -> None:
    if path.is_symlink() and root.resolve() not in path.resolve().parents:
        # Reading through it would carry a file from elsewhere into the output.
        raise InvalidModelError(f"{path}: symbolic link points outside the model (to {path.resolve()})")


def find_saved_models(root: Path) -> list[tuple[str | None, Path]]:
    """The SavedModel at ``root`` itself, or every numbered version of a TF Serving base path (as AWS's tool)."""
    if _is_saved_model(root):
        return [(None, Path("."))]
    versions = [path for _, path in _numbered_children(root) if path.is_dir()]
    if not versions:
        raise _not_a_model(root)
    for version in versions:
        if not (version / SAVED_MODEL).is_file():
            raise InvalidModelError(f"{version}: version folder without {SAVED_MODEL}")
    return [(v.name, Path(v.name)) for v in versions]


def check_select_version(select_version: object) -> int | str:
    """``"latest"``, or a version number given as a positive int or its decimal string."""
    if select_version == LATEST:
        return LATEST
    version = select_version
    if isinstance(version, str) and version.isascii() and version.isdigit():
        version = int(version)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise UsageError(f"select_version must be 'latest' or a positive integer, got {select_version!r}")
    return version


def select_saved_model(root: Path, select_version: int | str) -> tuple[Path, int | None]:
    """The SavedModel TF Serving would load from ``root`` for ``select_version`` (see check_select_version), and
    its version number: None when ``root`` is a SavedModel itself.

    Only the selected version is looked at: TF Serving never reads the others, so a broken older one is no concern.
    """
    if _is_saved_model(root):
        if select_version != LATEST:
            raise InvalidModelError(
                f"{root}: a SavedModel ({SAVED_MODEL} directly inside), not a TF Serving base path, "
                f"so there is no version {select_version}"
            )
        return root, None
    numbered = _numbered_children(root)
    if not numbered:
        raise _not_a_model(root)
    number = numbered[-1][0] if select_version == LATEST else int(select_version)
    chosen = [path for n, path in numbered if n == number]
    if not chosen:
        present = ", ".join(p.name for _, p in numbered)
        raise InvalidModelError(f"{root}: no version {number} (versions present: {present})")
    if len(chosen) > 1:
        raise InvalidModelError(f"{root}: {' and '.join(p.name for p in chosen)} name the same version {number}")
    (path,) = chosen
    if not (path.is_dir() and (path / SAVED_MODEL).is_file()):
        raise InvalidModelError(
            f"{path}: version {number} is not a SavedModel (expected a directory with {SAVED_MODEL} directly inside)"
        )
    _refuse_link_outside(path, root)
    return path, number


@contextlib.contextmanager
def _opened(model_dir: str | os.PathLike[str], beside: Path | None, fsync: bool) -> Iterator[Path | S3Path]:
    """The model to read: a local directory; an ``s3://`` prefix, read in place; an http(s) archive, unpacked
    beside the output (on its filesystem, so its files are then moved into it), or in a temporary directory when
    there is no output."""
    if not is_http(model_dir):
        yield open_s3(model_dir) if is_s3(model_dir) else Path(model_dir)
        return
    with contextlib.ExitStack() as stack:
        if beside is None:
            beside = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="neuron-inspect-"))) / "model"
        yield stack.enter_context(unpacked(str(model_dir), beside, fsync))


def _shown(model_dir: str | os.PathLike[str], source: Path | S3Path, models: list[_Model]) -> str:
    """How the report names the source and its models: an archive by its URL, not where it was unpacked."""
    if not is_http(model_dir):
        return str(source)
    for model in models:
        model.report.path = model.report.path.replace(str(source), str(model_dir), 1)
    return str(model_dir)


def _scan(root: Path | S3Path, version: str | None, relative: Path, num_cores: int | None) -> _Model:
    pb = root / relative / SAVED_MODEL
    _refuse_link_outside(pb, root)
    fingerprint = "present" if (root / relative / FINGERPRINT).exists() else "absent"
    if isinstance(pb, S3Path):
        scanner = SavedModelScanner(S3Reader(pb), str(pb), num_cores)
        plan = scanner.scan()
    else:
        fd = os.open(pb, os.O_RDONLY)
        try:
            scanner = SavedModelScanner(FileReader(fd, os.fstat(fd).st_size), str(pb), num_cores)
            plan = scanner.scan()
        finally:
            os.close(fd)
    report = ModelReport(
        path=str(root / relative),
        version=version,
        neuron_ops=scanner.neuron_ops,
        fingerprint=fingerprint,
        target=scanner.target.target,
        target_evidence=scanner.target.evidence,
        compiler=scanner.target.compiler,
    )
    return _Model(version, relative, report, plan)


def _copy_file(src: Path | S3Path, dst: Path, fsync: bool, move: bool) -> None:
    if isinstance(src, S3Path):
        write_pieces_from_s3(src, dst, [(0, src.size)], fsync)
    elif move:
        os.rename(src, dst)
    else:
        copy_file(src, dst, fsync)


def _copy_tree(root: Path | S3Path, staging: Path, skip: set[Path], fsync: bool, move: bool) -> None:
    """Every file of the model but ``skip`` into ``staging``: copied, or moved (``move``) out of an unpacked
    archive, which is the rewrite's own and on the output's filesystem."""
    if move:
        move_tree(Path(root), staging, skip)
        return
    if not isinstance(root, S3Path):
        copy_tree(root, staging, skip, fsync)
        return
    skipped = {str(p) for p in skip}
    for relative, obj in root.files():
        if str(relative) not in skipped:
            (staging / relative).parent.mkdir(parents=True, exist_ok=True)
            write_pieces_from_s3(obj, staging / relative, [(0, obj.size)], fsync)


def _scan_all(
    source: Path | S3Path, num_cores: int | None, select_version: int | str | None
) -> tuple[Path | S3Path, int | None, list[_Model]]:
    """The directory the output mirrors (``source``, or its selected version), that version, and its models."""
    try:
        if select_version is None:
            root, version, found = source, None, find_saved_models(source)
        else:
            root, version = select_saved_model(source, select_version)
            found = [(None if version is None else str(version), Path("."))]
        return root, version, [_scan(root, v, rel, num_cores) for v, rel in found]
    except OSError as exc:
        raise describe_os_error(exc) from None


def inspect_model(model_dir: str | os.PathLike[str], *, select_version: str | int | None = None) -> RewriteReport:
    """List every NeuronOp of a SavedModel (or of each version of a base path, or of the selected one) without
    writing anything."""
    if select_version is not None:
        select_version = check_select_version(select_version)
    with _opened(model_dir, None, fsync=False) as source:
        _, version, models = _scan_all(source, None, select_version)
        shown = _shown(model_dir, source, models)
        return RewriteReport(shown, None, None, [m.report for m in models], source_version=version)


def check_num_cores(num_cores: object) -> int:
    if isinstance(num_cores, bool) or not isinstance(num_cores, int) or num_cores < 1:
        raise UsageError(f"num_cores must be an integer of at least 1, got {num_cores!r}")
    return num_cores


class _PublishedMeanwhile(Exception):
    """Not an error: a twin run published the same rewrite first, and its output stays."""

    def __init__(self, report: RewriteReport) -> None:
        self.report = report


def _reuse(source: object, target: Path, num_cores: int, rewrite_id: str | None, start: float) -> RewriteReport | None:
    """The report of a reuse when ``target`` holds the complete output of rewrite ``rewrite_id``, else None."""
    marker = None if rewrite_id is None else read_marker(target)
    if marker is None or marker["rewriteId"] != rewrite_id or marker["numCores"] != num_cores:
        return None
    compiled_for, evidence, compiler = recorded_target(marker)
    return RewriteReport(
        str(source),
        str(target),
        num_cores,
        source_version=marker["sourceVersion"],
        rewrite_id=rewrite_id,
        reused=True,
        format_version=marker["formatVersion"],
        bytes_written=marker["bytesWritten"],
        seconds=_since(start),
        neuron_op_count=marker["neuronOps"],
        target=compiled_for,
        target_evidence=evidence,
        compiler=compiler,
    )


def _since(start: float) -> float:
    return round(time.monotonic() - start, 3)


def rewrite_model(
    model_dir: str | os.PathLike[str],
    new_model_dir: str | os.PathLike[str],
    num_cores: int,
    *,
    force: bool = False,
    allow_no_neuron_ops: bool = False,
    recompute_fingerprint: bool = False,
    fsync: bool = False,
    select_version: str | int | None = None,
    rewrite_id: str | None = None,
) -> RewriteReport:
    """Write a copy of ``model_dir`` whose every NeuronOp carries ``_automatic_multicore = num_cores``.

    ``model_dir`` is a local directory, an ``s3://bucket/prefix`` (read in place), or the http(s) URL of a
    ``.tar.gz``/``.tgz``/``.tar``/``.zip`` archive (unpacked beside the output as it downloads; its files are then
    moved into the output, so nothing but ``saved_model.pb`` is written twice).

    Everything is checked before anything is written; the output then appears in one rename beside
    ``new_model_dir``, or not at all. The input is only ever opened for reading. ``fsync`` makes the output
    durable across a power loss before it is published (a process crash cannot half-write it either way).

    ``select_version`` (``"latest"`` or a number) writes the one SavedModel TF Serving would load from a base path
    into ``new_model_dir`` itself, instead of every version into numbered folders.

    ``rewrite_id`` publishes a completion marker with the output. If ``new_model_dir`` already holds one for the
    same ``rewrite_id`` and ``num_cores``, it is left untouched, even with ``force`` (pods may be serving it), and
    the report says ``reused``: the source is not read at all, so it may be gone by then.
    """
    start = time.monotonic()
    check_num_cores(num_cores)
    if select_version is not None:
        select_version = check_select_version(select_version)
    if rewrite_id is not None and (not isinstance(rewrite_id, str) or not rewrite_id):
        raise UsageError(f"rewrite_id must be a non-empty string, got {rewrite_id!r}")
    target = Path(new_model_dir)
    reused = _reuse(model_dir, target, num_cores, rewrite_id, start)  # before the source is even listed
    if reused is not None:
        return reused
    check_output_free(target, force)  # before any byte of the source is read
    move = is_http(model_dir)  # an unpacked archive is the rewrite's own: its files are moved, not copied
    with _opened(model_dir, target, fsync) as source:
        root, version, models = _scan_all(source, num_cores, select_version)
        for model in models:
            if not model.report.neuron_ops and not allow_no_neuron_ops:
                raise NotReplicableError(
                    f"{root / model.relative / SAVED_MODEL}: no NeuronOp found, the model is not compiled for "
                    "Neuron (pass --allow-no-neuron-ops to copy it unchanged)"
                )
        check_output_location(source, target)
        shown = _shown(model_dir, source, models)
        report = RewriteReport(
            shown,
            str(target),
            num_cores,
            [m.report for m in models],
            source_version=version,
            rewrite_id=rewrite_id,
            format_version=FORMAT_VERSION,
        )
        try:
            with atomic_directory(target, force, fsync) as staging:
                # A marker in the input vouches for the input, never for a copy of it.
                names = (SAVED_MODEL, FINGERPRINT, MARKER_FILE)
                skip = {Path(MARKER_FILE)} | {m.relative / name for m in models for name in names}
                _copy_tree(root, staging, {p for p in skip if (root / p).exists()}, fsync, move)
                for model in models:
                    _write_model(root, staging, model, recompute_fingerprint, fsync, move)
                report.bytes_written = tree_bytes(staging)
                report.seconds = _since(start)
                if rewrite_id is not None:
                    # A twin run (a Job's replacement pod) may have published the same rewrite while this one wrote.
                    earlier = _reuse(shown, target, num_cores, rewrite_id, start)
                    if earlier is not None:
                        raise _PublishedMeanwhile(earlier)
                    write_marker(staging, report, fsync)  # the last file: the output is complete once it exists
        except _PublishedMeanwhile as published:
            return published.report
        except OSError as exc:
            raise describe_os_error(exc) from None
    for model in models:  # report the output as it now is
        model.report.path = str(target / model.relative)
        model.report.neuron_ops = [replace(op, automatic_multicore=num_cores) for op in model.report.neuron_ops]
    return report


def _write_model(
    root: Path | S3Path, staging: Path, model: _Model, recompute_fingerprint: bool, fsync: bool, move: bool
) -> None:
    src_dir, out_dir = root / model.relative, staging / model.relative
    had_fingerprint = model.report.fingerprint == "present"
    if model.plan is None:  # nothing to tag: the file and its fingerprint stay valid as they are
        _copy_file(src_dir / SAVED_MODEL, out_dir / SAVED_MODEL, fsync, move)
        if had_fingerprint:
            _copy_file(src_dir / FINGERPRINT, out_dir / FINGERPRINT, fsync, move)
        model.report.fingerprint = "kept" if had_fingerprint else "absent"
        return
    pb = src_dir / SAVED_MODEL
    if isinstance(pb, S3Path):
        write_pieces_from_s3(pb, out_dir / SAVED_MODEL, model.plan, fsync)
    else:
        fd = os.open(pb, os.O_RDONLY)
        try:
            write_pieces(fd, out_dir / SAVED_MODEL, model.plan, fsync)
        finally:
            os.close(fd)
    if recompute_fingerprint:
        from .fingerprint import write_fingerprint  # imports TensorFlow: only on request

        write_fingerprint(out_dir)
        model.report.fingerprint = "recomputed"
    else:
        # Its checksum covers the old saved_model.pb; TensorFlow loads a SavedModel without one.
        model.report.fingerprint = "dropped" if had_fingerprint else "absent"
