"""The rewrite the CLI, the Python API and the operator's Job share."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

from .errors import InvalidModelError, NotReplicableError, UsageError
from .files import (
    atomic_directory,
    check_output_location,
    copy_file,
    copy_tree,
    describe_os_error,
    write_pieces,
)
from .report import ModelReport, RewriteReport
from .scan import Piece, SavedModelScanner
from .wire import FileReader

SAVED_MODEL = "saved_model.pb"
FINGERPRINT = "fingerprint.pb"


@dataclass
class _Model:
    """One SavedModel found under the input: where it is, what it holds, and how to write it."""

    version: str | None
    relative: Path  # from the input root
    report: ModelReport
    plan: list[Piece] | None  # None: saved_model.pb is copied unchanged


def find_saved_models(root: Path) -> list[tuple[str | None, Path]]:
    """The SavedModel at ``root`` itself, or the numbered versions of a TF Serving base path."""
    if not root.exists():
        raise InvalidModelError(f"{root}: no such directory")
    if not root.is_dir():
        raise InvalidModelError(f"{root}: not a directory (expected a SavedModel directory)")
    if (root / SAVED_MODEL).is_file():
        return [(None, Path("."))]
    if (root / "saved_model.pbtxt").exists():
        raise InvalidModelError(f"{root / 'saved_model.pbtxt'}: text-format SavedModels are not supported")
    versions = sorted((p for p in root.iterdir() if p.name.isdigit() and p.is_dir()), key=lambda p: int(p.name))
    if not versions:
        raise InvalidModelError(
            f"{root}: not a SavedModel (no {SAVED_MODEL}) nor a TF Serving base path (no numbered version folder)"
        )
    for version in versions:
        if not (version / SAVED_MODEL).is_file():
            raise InvalidModelError(f"{version}: version folder without {SAVED_MODEL}")
    return [(v.name, Path(v.name)) for v in versions]


def _scan(root: Path, version: str | None, relative: Path, num_cores: int | None) -> _Model:
    pb = root / relative / SAVED_MODEL
    if pb.is_symlink() and root.resolve() not in pb.resolve().parents:
        # Reading through it would carry a file from elsewhere into the output.
        raise InvalidModelError(f"{pb}: symbolic link points outside the model (to {pb.resolve()})")
    fingerprint = "present" if (root / relative / FINGERPRINT).exists() else "absent"
    report = ModelReport(path=str(root / relative), version=version, fingerprint=fingerprint)
    fd = os.open(pb, os.O_RDONLY)
    try:
        scanner = SavedModelScanner(FileReader(fd, os.fstat(fd).st_size), str(pb), num_cores)
        plan = scanner.scan()
    finally:
        os.close(fd)
    report.neuron_ops = scanner.neuron_ops
    return _Model(version, relative, report, plan)


def _scan_all(root: Path, num_cores: int | None) -> list[_Model]:
    try:
        return [_scan(root, v, rel, num_cores) for v, rel in find_saved_models(root)]
    except OSError as exc:
        raise describe_os_error(exc) from None


def inspect_model(model_dir: str | os.PathLike[str]) -> RewriteReport:
    """List every NeuronOp of a SavedModel (or of each version of a base path) without writing anything."""
    root = Path(model_dir)
    return RewriteReport(str(root), None, None, [m.report for m in _scan_all(root, None)])


def check_num_cores(num_cores: object) -> int:
    if isinstance(num_cores, bool) or not isinstance(num_cores, int) or num_cores < 1:
        raise UsageError(f"num_cores must be an integer of at least 1, got {num_cores!r}")
    return num_cores


def rewrite_model(
    model_dir: str | os.PathLike[str],
    new_model_dir: str | os.PathLike[str],
    num_cores: int,
    *,
    force: bool = False,
    allow_no_neuron_ops: bool = False,
    recompute_fingerprint: bool = False,
    fsync: bool = False,
) -> RewriteReport:
    """Write a copy of ``model_dir`` whose every NeuronOp carries ``_automatic_multicore = num_cores``.

    Everything is checked before anything is written; the output then appears in one rename beside
    ``new_model_dir``, or not at all. The input is only ever opened for reading. ``fsync`` makes the output
    durable across a power loss before it is published (a process crash cannot half-write it either way).
    """
    check_num_cores(num_cores)
    root, target = Path(model_dir), Path(new_model_dir)
    models = _scan_all(root, num_cores)
    for model in models:
        if not model.report.neuron_ops and not allow_no_neuron_ops:
            raise NotReplicableError(
                f"{root / model.relative / SAVED_MODEL}: no NeuronOp found, the model is not compiled for Neuron "
                "(pass --allow-no-neuron-ops to copy it unchanged)"
            )
    check_output_location(root, target, force)
    try:
        with atomic_directory(target, force) as staging:
            skip = {m.relative / name for m in models for name in (SAVED_MODEL, FINGERPRINT)}
            copy_tree(root, staging, {p for p in skip if (root / p).exists()}, fsync)
            for model in models:
                _write_model(root, staging, model, recompute_fingerprint, fsync)
    except OSError as exc:
        raise describe_os_error(exc) from None
    for model in models:  # report the output as it now is
        model.report.path = str(target / model.relative)
        model.report.neuron_ops = [replace(op, automatic_multicore=num_cores) for op in model.report.neuron_ops]
    return RewriteReport(str(root), str(target), num_cores, [m.report for m in models])


def _write_model(root: Path, staging: Path, model: _Model, recompute_fingerprint: bool, fsync: bool) -> None:
    src_dir, out_dir = root / model.relative, staging / model.relative
    had_fingerprint = model.report.fingerprint == "present"
    if model.plan is None:  # nothing to tag: the file and its fingerprint stay valid as they are
        copy_file(src_dir / SAVED_MODEL, out_dir / SAVED_MODEL, fsync)
        if had_fingerprint:
            copy_file(src_dir / FINGERPRINT, out_dir / FINGERPRINT, fsync)
        model.report.fingerprint = "kept" if had_fingerprint else "absent"
        return
    fd = os.open(src_dir / SAVED_MODEL, os.O_RDONLY)
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
