"""Zero-copy file copies and atomic publication of an output directory."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import InvalidModelError, OutputError, RewriteError

_CHUNK = 1 << 30
_FALLBACK_ERRNOS = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP}


def copy_range(src_fd: int, dst_fd: int, offset: int, length: int) -> None:
    """Append [offset, offset + length) of src to dst, in the kernel where it can (reflink or page-cache copy)."""
    end = offset + length
    try:
        while offset < end:
            copied = os.copy_file_range(src_fd, dst_fd, min(_CHUNK, end - offset), offset)
            if copied == 0:
                raise OSError(errno.EIO, "source file shrank while being copied")
            offset += copied
        return
    except OSError as exc:
        if exc.errno not in _FALLBACK_ERRNOS:
            raise
    while offset < end:  # copy_file_range unsupported here (old kernel, cross-device): plain reads and writes
        chunk = os.pread(src_fd, min(1 << 20, end - offset), offset)
        if not chunk:
            raise OSError(errno.EIO, "source file shrank while being copied")
        os.write(dst_fd, chunk)
        offset += len(chunk)


def write_pieces(src_fd: int, dst: Path, pieces: Iterable[tuple[int, int] | bytes], fsync: bool) -> None:
    """Write a file made of source byte ranges and literal bytes, in order."""
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        for piece in pieces:
            if isinstance(piece, bytes):
                os.write(fd, piece)
            else:
                copy_range(src_fd, fd, piece[0], piece[1] - piece[0])
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def write_file(dst: Path, data: bytes, fsync: bool) -> None:
    write_pieces(-1, dst, [data], fsync)  # literal bytes only: the source descriptor is never read


def copy_file(src: Path, dst: Path, fsync: bool) -> None:
    src_fd = os.open(src, os.O_RDONLY)
    try:
        size = os.fstat(src_fd).st_size
        write_pieces(src_fd, dst, [(0, size)], fsync)
    finally:
        os.close(src_fd)
    shutil.copymode(src, dst)


def copy_tree(src: Path, dst: Path, skip: set[Path], fsync: bool) -> None:
    """Copy ``src`` into the existing directory ``dst`` byte for byte, leaving out the relative paths in ``skip``.

    A symbolic link is kept as a link when it points inside the model and refused when it points outside it:
    a rewrite must not carry files from elsewhere into the model, nor follow a link out of it.
    """
    root = src.resolve()
    for dirpath, dirnames, filenames in os.walk(src):
        here = Path(dirpath)
        out = dst / here.relative_to(src)
        for name in sorted(dirnames + filenames):
            path = here / name
            rel = path.relative_to(src)
            if rel in skip:
                continue
            if path.is_symlink():
                try:
                    target = path.resolve()
                except (RuntimeError, OSError) as exc:  # a loop of links
                    raise InvalidModelError(f"{path}: symbolic link cannot be resolved ({exc})") from exc
                if target != root and root not in target.parents:
                    raise InvalidModelError(f"{path}: symbolic link points outside the model (to {target})")
                os.symlink(os.readlink(path), out / name)
            elif path.is_dir():
                (out / name).mkdir()
                shutil.copymode(path, out / name)
            elif path.is_file():
                copy_file(path, out / name, fsync)
            else:
                raise InvalidModelError(f"{path}: not a regular file or directory")
        dirnames[:] = [d for d in dirnames if not (here / d).is_symlink()]


def tree_bytes(root: Path) -> int:
    """Total size of the regular files under ``root``; links are neither followed nor counted."""
    total = 0
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            info = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISREG(info.st_mode):
                total += info.st_size
    return total


def _fsync_directory(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rename_exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    if ctypes.get_errno() in _FALLBACK_ERRNOS:
        return False
    raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), str(b))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


@contextlib.contextmanager
def atomic_directory(target: Path, force: bool, fsync: bool = False) -> Iterator[Path]:
    """Yield a fresh directory beside ``target``; on success it becomes ``target`` in one rename.

    On any failure the directory is removed, so readers see the whole output or none of it. With ``force`` an
    existing target is swapped out atomically and then deleted. With ``fsync`` (the files themselves are synced by
    whoever writes them) the directories are synced before the rename, so it cannot publish entries a power loss
    would lose, and the parent after it, so the publication itself survives one.
    """
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)  # as AWS's tool does (TensorFlow's save creates them)
    except OSError as exc:
        raise RewriteError(f"{target}: cannot create the directory {exc.filename} ({exc.strerror})") from None
    staging = parent / f".{target.name}.tmp-{os.urandom(4).hex()}"
    try:
        staging.mkdir()
    except OSError as exc:
        raise RewriteError(f"{target}: cannot create the output beside it ({exc.strerror})") from None
    try:
        yield staging
        if fsync:
            for dirpath, _, _ in os.walk(staging):
                _fsync_directory(dirpath)
        _publish(staging, target, force)
        if fsync:
            _fsync_directory(parent)
    except BaseException:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
        raise


def _publish(staging: Path, target: Path, force: bool) -> None:
    if not target.exists() and not target.is_symlink():
        try:
            os.rename(staging, target)  # a directory rename fails rather than replace a non-empty directory
            return
        except OSError as exc:
            if not (exc.errno in (errno.ENOTEMPTY, errno.EEXIST) and force):
                raise OutputError(f"{target}: appeared while the rewrite ran ({exc.strerror})") from None
    if not force:
        raise OutputError(f"{target}: already exists (use --force to replace it)")
    if _rename_exchange(staging, target):
        _remove(staging)  # now holds the old output
        return
    aside = target.parent / f".{target.name}.old-{os.urandom(4).hex()}"
    os.rename(target, aside)
    os.rename(staging, target)
    _remove(aside)


def check_output_free(target: Path, force: bool) -> None:
    if (target.exists() or target.is_symlink()) and not force:
        raise OutputError(f"{target}: already exists (use --force to replace it)")


def check_output_location(source: Path | object, target: Path) -> None:
    """Refuse an output that is, contains or sits inside a local input (a remote one cannot overlap it)."""
    if not isinstance(source, Path):
        return
    src = source.resolve()
    out = target.resolve()
    if out == src:
        raise OutputError(f"{target}: output is the input model itself; choose another --new_model_dir")
    if src in out.parents:
        raise OutputError(f"{target}: output is inside the input model {source}; choose a directory outside it")
    if out in src.parents:
        raise OutputError(f"{target}: output contains the input model {source}; choose another --new_model_dir")


def move_tree(src: Path, dst: Path, skip: set[Path]) -> None:
    """Move the contents of ``src`` into the existing directory ``dst`` by renames (one filesystem), leaving the
    relative paths in ``skip`` behind: a directory holding none of them moves whole."""

    def move(here: Path) -> None:
        for path in sorted(here.iterdir()):
            rel = path.relative_to(src)
            if rel in skip:
                continue
            if any(rel in kept.parents for kept in skip):
                (dst / rel).mkdir()
                move(path)
            else:
                os.rename(path, dst / rel)

    move(src)


def describe_os_error(exc: OSError) -> RewriteError:
    """Turn an unexpected OS failure into a one-line error naming the file."""
    where = exc.filename or "I/O"
    return RewriteError(f"{where}: {exc.strerror or exc}")
