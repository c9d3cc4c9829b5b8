"""Log lines shaped like TensorFlow Serving's (``<time>: <severity> <source file>] <message>``) on stderr.

Line numbers of the real sources are left out: they change with every release and nothing should depend on them.
"""

from __future__ import annotations

import sys
import threading
from datetime import datetime

_lock = threading.Lock()


def _write(severity: str, source: str, message: str) -> None:
    stamp = datetime.now().strftime("%Y-%m-%d %H:%M:%S.%f")
    with _lock:
        sys.stderr.write(f"{stamp}: {severity} {source}] {message}\n")
        sys.stderr.flush()


def info(source: str, message: str) -> None:
    _write("I", source, message)


def warning(source: str, message: str) -> None:
    _write("W", source, message)


def error(source: str, message: str) -> None:
    _write("E", source, message)


def stdout(text: str) -> None:
    """What the real ``main`` prints with ``std::cout``: the usage, unknown arguments, the start-up failure."""
    sys.stdout.write(text)
    sys.stdout.flush()
