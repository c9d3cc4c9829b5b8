"""`make demo` runs the README's story end to end: the example NeuronModel reaches Ready."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.cluster


def test_demo_reaches_ready_and_stops_cleanly() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "localcluster.demo", "--exit-when-ready", "--timeout", "240"],
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["NAME", "CORES"])  # kubectl get nm
    assert lines[header].split() == ["NAME", "CORES", "REPLICAS", "READY", "VERSION", "PHASE", "AGE"]
    assert lines[header + 1].split()[:6] == ["resnet50", "2", "1", "1", "1", "Ready"]
    assert "Job/resnet50-rewrite-" in result.stdout and "Complete" in result.stdout
    assert "stopped; files kept in" in result.stdout
