"""``neuron-model-fetch URL DEST``: the rewrite Job's init container for an http(s) archive of the model.

Archives are extracted with member paths checked, so nothing lands outside DEST. (An s3:// source needs no fetch:
the rewrite reads it in place.)
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tarfile
import tempfile
import urllib.request
import zipfile
from pathlib import Path
from urllib.parse import urlparse


class FetchError(Exception):
    pass


def _inside(dest: Path, rel: str) -> Path:
    target = (dest / rel).resolve()
    if dest.resolve() not in target.parents:
        raise FetchError(f"{rel}: path escapes the destination")
    return target


def fetch_http(url: str, dest: Path) -> int:
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:  # beside DEST: the root filesystem is read-only
        archive = Path(tmp) / "archive"
        with urllib.request.urlopen(url, timeout=60) as response, archive.open("wb") as out:
            shutil.copyfileobj(response, out)
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                members = zf.namelist()
                for name in members:
                    _inside(dest, name)
                zf.extractall(dest)
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tf:
                members = tf.getnames()
                tf.extractall(dest, filter="data")  # refuses links and paths that leave dest
        else:
            raise FetchError(f"{url}: not a .tar(.gz) or .zip archive")
    _strip_single_top_folder(dest)
    return len(members)


def _strip_single_top_folder(dest: Path) -> None:
    """An archive of ``model/saved_model.pb`` lands as ``dest/saved_model.pb``, as one of ``saved_model.pb`` does."""
    entries = list(dest.iterdir())
    if len(entries) == 1 and entries[0].is_dir() and not (dest / "saved_model.pb").exists():
        inner = entries[0]
        for child in inner.iterdir():
            child.rename(dest / child.name)
        inner.rmdir()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="neuron-model-fetch", description=__doc__)
    parser.add_argument("source", help="http(s)://.../model.tar.gz, .tgz or .zip")
    parser.add_argument("dest", type=Path, help="directory to create with the SavedModel")
    args = parser.parse_args(argv)
    scheme = urlparse(args.source).scheme
    try:
        args.dest.mkdir(parents=True, exist_ok=False)
        if scheme not in ("http", "https"):
            raise FetchError("not an http(s) URL (an s3:// source is read by the rewrite itself)")
        count = fetch_http(args.source, args.dest)
    except FileExistsError:
        print(f"neuron-model-fetch: error: {args.dest} already exists", file=sys.stderr)
        return 1
    except Exception as exc:  # one line the Job's status can carry, whatever went wrong
        shutil.rmtree(args.dest, ignore_errors=True)  # all or nothing
        print(f"neuron-model-fetch: error: {args.source}: {exc}", file=sys.stderr)
        return 1
    print(f"fetched {count} file(s) from {args.source} into {args.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
