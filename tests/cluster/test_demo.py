"""`make demo` runs the README's story end to end: the example NeuronModel reaches Ready."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from localcluster.hostsettings import HostSnapshot
from neuron_modelgen import deneuronized_copy, run_serving_default

pytestmark = [pytest.mark.cluster, pytest.mark.own_cluster]


def test_demo_reaches_ready_and_stops_cleanly() -> None:
    host = HostSnapshot.take()
    result = subprocess.run(
        [sys.executable, "-m", "localcluster.demo", "--exit-when-ready", "--timeout", "400"],
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["NAME", "CORES"])  # kubectl get nm
    assert lines[header].split() == ["NAME", "CORES", "REPLICAS", "READY", "VERSION", "PHASE", "AGE"]
    assert lines[header + 1].split()[:6] == ["resnet50", "2", "1", "1", "1", "Ready"]
    assert "Job/resnet50-rewrite-" in result.stdout and "Complete" in result.stdout
    # Served on the real node: the pods ran there, and the predict request through the Service got the model's answer.
    assert re.search(r"Pod/resnet50-\S+: Running, ready on real-", result.stdout)
    answer = result.stdout.split("-> ", 1)[1].splitlines()[0]
    predictions = np.asarray(json.loads(answer)["predictions"], dtype=np.float32)
    work = Path(result.stdout.split("stopped; files kept in ", 1)[1].split()[0])
    model = deneuronized_copy(work / "compiled-models" / "resnet50", work / "cpu-copy")
    x = np.asarray([[0.5] * 8, [-1.0] * 8], dtype=np.float32)  # what the demo sends
    assert np.allclose(predictions, run_serving_default(model, x)["logits"], atol=1e-5)
    assert "stopped; files kept in" in result.stdout
    # The real node's changes to the host were undone: kernel settings, iptables rules, directories, the bridge.
    assert host.differences(HostSnapshot.take()) == []
    assert subprocess.run(["ip", "link", "show", "nmo0"], capture_output=True).returncode != 0
