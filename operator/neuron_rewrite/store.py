"""``neuron-store-clean``: remove the rewrites of one model's store directory that nothing serves or will serve.

A model's store directory holds one directory per rewrite, named by its ID (``<id>/<version>/``, published by
``tf-neuron-auto-multicore --rewrite_id``). The operator runs this in a Job, naming the rewrites to keep: the one
being served and the last few it replaced (a rollback's fallback). Everything else that is the rewrite's own goes:
rewrites no longer kept, staging directories an interrupted rewrite left behind (``.<version>.tmp-*``), and the
remains of an interrupted clean-up. Anything else in the directory is not ours and is left alone.

A rewrite directory is first renamed to a hidden name, then deleted: a clean-up stopped half way never leaves a
half-deleted rewrite under its ID.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UsageError
from .files import tree_bytes

PROG = "neuron-store-clean"
REWRITE_ID = re.compile(r"^[0-9a-f]{10}$")  # the operator's rewrite IDs: a 10-hex-digit digest
STAGING = re.compile(r"^\.[^/]+\.tmp-[0-9a-f]{8}$")  # tf-neuron-auto-multicore's staging directories
DELETING = re.compile(r"^\.[0-9a-f]{10}\.deleting$")


@dataclass
class CleanReport:
    kept: list[str]
    removed: list[str] = field(default_factory=list)
    staging_removed: int = 0
    bytes_freed: int = 0

    def to_json(self) -> dict:
        return {
            "kept": self.kept,
            "removed": self.removed,
            "stagingRemoved": self.staging_removed,
            "bytesFreed": self.bytes_freed,
        }


def clean_store(directory: Path, keep: set[str]) -> CleanReport:
    """Remove from ``directory`` every rewrite not in ``keep`` and every leftover of an interrupted rewrite or
    clean-up; ``keep`` empty removes them all (the model is gone). A missing directory has nothing to clean."""
    report = CleanReport(kept=sorted(keep))
    if not directory.is_dir():
        return report
    for entry in sorted(directory.iterdir(), key=lambda p: p.name):
        if not entry.is_dir() or entry.is_symlink():
            continue
        if REWRITE_ID.match(entry.name) and entry.name not in keep:
            report.bytes_freed += _remove(entry, directory / f".{entry.name}.deleting")
            report.removed.append(entry.name)
        elif DELETING.match(entry.name):
            report.bytes_freed += _remove(entry, entry)
        elif REWRITE_ID.match(entry.name):
            for staging in sorted(p for p in entry.iterdir() if p.is_dir() and STAGING.match(p.name)):
                report.bytes_freed += _remove(staging, staging)
                report.staging_removed += 1
    if not keep and not any(directory.iterdir()):
        directory.rmdir()  # the model is gone and nothing else lives here
    return report


def _remove(path: Path, hidden: Path) -> int:
    """Delete ``path`` (renamed to ``hidden`` first); the bytes it held."""
    size = tree_bytes(path)
    if hidden != path:
        os.rename(path, hidden)
    shutil.rmtree(hidden)
    return size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", type=Path, help="the model's directory in the store (its store.path)")
    parser.add_argument("--keep", action="append", default=[], metavar="ID", help="a rewrite to keep (repeatable)")
    parser.add_argument("--report_file", type=Path, help="write the JSON report here too (a termination message)")
    args = parser.parse_args(argv)
    bad = [k for k in args.keep if not REWRITE_ID.match(k)]
    if bad:
        parser.exit(
            UsageError.exit_code, f"{PROG}: error: --keep {bad[0]!r} is not a rewrite ID (10 hexadecimal digits)\n"
        )
    try:
        report = clean_store(args.directory, set(args.keep))
    except OSError as exc:
        print(f"{PROG}: error: {exc.filename or args.directory}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    text = json.dumps(report.to_json())
    print(text)
    if args.report_file is not None:
        args.report_file.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
