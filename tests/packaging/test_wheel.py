"""The distribution holds only what production runs: the test harness under operator/ stays out of the wheel."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PRODUCTION = {"neuron_rewrite", "neuronmodel_operator"}


def test_the_wheel_installs_only_the_three_production_packages(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(tmp_path), str(REPO)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("neuron_model_operator-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top_level == PRODUCTION
    info = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
    assert set(zipfile.ZipFile(wheel).read(info).decode().split()) == PRODUCTION
    harness = [n for n in names if n.split("/")[0] in {"localcluster", "neuron_modelgen", "tfserving_standin"}]
    assert harness == []
