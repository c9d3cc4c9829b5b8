"""The simulated server's model check: it follows the model on disk, though it parses each graph only once."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from localcluster.serving import check_serving_container
from neuron_rewrite import rewrite_model
from synthetic_models import saved_model, write_model

SERVER = SimpleNamespace(
    command=["tensorflow_model_server_neuronx"], args=["--model_name=m", "--model_base_path=/models/m"]
)


def check(base: Path, cores: int) -> str | None:
    return check_serving_container(SERVER, {}, cores, lambda path: path.replace("/models/m", str(base)))


def test_a_version_replaced_in_place_is_checked_again(tmp_path: Path) -> None:
    compiled = write_model(tmp_path / "compiled", saved_model())
    base = tmp_path / "base"
    base.mkdir()
    rewrite_model(compiled, base / "1", 2)
    assert check(base, 2) is None
    assert "is tagged _automatic_multicore=2 but the pod has 1" in (check(base, 1) or "")
    rewrite_model(compiled, base / "1", 1, force=True)  # the same version, retagged: a new graph file
    assert check(base, 1) is None
    assert "is tagged _automatic_multicore=1 but the pod has 2" in (check(base, 2) or "")
    (base / "1" / "saved_model.pb").write_bytes(b"\x0a\xff")  # edited in place into garbage
    assert (check(base, 1) or "").startswith("failed to load servable m version 1:")
