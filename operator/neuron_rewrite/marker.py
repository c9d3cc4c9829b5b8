"""The completion marker a rewrite publishes inside its output, so that a Job run again recognises its own work.

The marker is the last file written before the output is published in one rename: an output that holds it is
complete, and it names the rewrite that made it. A run with the same ``rewrite_id`` then leaves that output alone
(pods may be serving it) and reports the facts the marker recorded, without reading the source.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .files import write_file
from .report import RewriteReport

# Changes only when the rewrite's output bytes for the same input change (a new tag encoding, a file no longer
# copied, ...). The operator puts it in the rewrite's identity, so an output of another format is never reused.
FORMAT_VERSION = 1

MARKER_FILE = ".neuron-rewrite.json"
# The facts about the output; ``source`` is MODEL_DIR as the publishing run was given it.
MARKER_KEYS = ("formatVersion", "rewriteId", "numCores", "sourceVersion", "neuronOps", "bytesWritten", "seconds")
# What the model was compiled for: recorded too, but not required, as markers published before they existed lack them.
TARGET_KEYS = ("target", "targetEvidence", "compiler")


def write_marker(directory: Path, report: RewriteReport, fsync: bool) -> None:
    """Record ``report`` in ``directory``: call it after every other file of the output is written (and synced)."""
    facts = report.summary()
    marker = {key: facts[key] for key in (*MARKER_KEYS, *TARGET_KEYS)} | {"source": report.source}
    write_file(directory / MARKER_FILE, (json.dumps(marker, indent=2) + "\n").encode(), fsync)


def read_marker(directory: Path) -> dict[str, Any] | None:
    """The marker published in ``directory``; None when there is none or it is unreadable (it then vouches for
    nothing, and the directory counts as an output of unknown origin)."""
    try:
        marker = json.loads((directory / MARKER_FILE).read_bytes())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and marker.keys() >= {*MARKER_KEYS, "source"} else None


def recorded_target(marker: dict[str, Any]) -> tuple[str | None, str | None, str | None]:
    """The target, its evidence and the compiler as ``marker`` recorded them; None for any it lacks (an older
    marker) or holds as something other than text."""
    target, evidence, compiler = (value if isinstance(value := marker.get(key), str) else None for key in TARGET_KEYS)
    return target, evidence, compiler
