"""The rewrite on real TensorFlow SavedModels shaped like Neuron-compiled ones (TF2 functions, TF1 graphs)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from neuron_modelgen import (
    Options,
    build_base_path,
    build_model,
    deneuronized_copy,
    read_saved_model,
    run_serving_default,
    sample_input,
)
from neuron_rewrite import auto_multicore, inspect_model, rewrite_model
from synthetic_models import TAG, all_nodes, tree_digest, without_tags

CLI = [sys.executable, "-m", "neuron_rewrite"]


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each model built once per session; tests copy what they might touch."""
    root = tmp_path_factory.mktemp("models")
    built = {
        "tf2": build_model(root / "tf2", Options(kind="tf2", variable_bytes=1 << 16)),
        "tf1": build_model(root / "tf1", Options(kind="tf1")),
        "tagged": build_model(root / "tagged", Options(tag=4)),
        "pipelined": build_model(root / "pipelined", Options(pipeline=4)),
        "plain": build_model(root / "plain", Options(neuron=False)),
        "base": build_base_path(root / "base", [1, 3]),
    }
    (built["tf2"] / "keras_metadata.pb").write_bytes(b"\x0a\x03abc")  # any other file must come out as it was
    return built


def cli(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True)


@pytest.mark.parametrize("kind", ["tf2", "tf1"])
def test_every_neuron_op_tagged_and_nothing_else_changed(models: dict[str, Path], tmp_path: Path, kind: str) -> None:
    src = models[kind]
    before = tree_digest(src)
    result = cli(src, "--num_cores", 4, "--new_model_dir", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    original, rewritten = read_saved_model(src), read_saved_model(tmp_path / "out")
    ops = [n for n in all_nodes(rewritten) if n.op == "NeuronOp"]
    assert len(ops) == (4 if kind == "tf2" else 1)  # TF2: two functions, each traced twice
    assert all(op.attr[TAG].i == 4 for op in ops)
    assert without_tags(rewritten) == without_tags(original)
    after = tree_digest(tmp_path / "out")
    for rel, digest in before.items():
        if rel not in ("saved_model.pb", "fingerprint.pb"):
            assert after[rel] == digest, rel
    assert tree_digest(src) == before, "the source is never modified"


def test_neuron_ops_sit_in_nested_functions(models: dict[str, Path]) -> None:
    ops = inspect_model(models["tf2"]).models[0].neuron_ops
    functions = {op.function.rsplit("_", 1)[0] for op in ops}
    assert functions == {"__inference_hidden", "__inference_logits"}  # logits calls hidden: two levels deep
    assert {op.meta_graph for op in ops} == {0}
    tf1_ops = inspect_model(models["tf1"]).models[0].neuron_ops
    assert [(op.function, op.pipeline_size, op.executable_bytes) for op in tf1_ops] == [(None, 1, 4096)]


@pytest.mark.parametrize("kind", ["tf2", "tf1"])
def test_cpu_equivalence_before_and_after_the_rewrite(models: dict[str, Path], tmp_path: Path, kind: str) -> None:
    """Inlining each NeuronOp's embedded graph gives the original model's outputs, before and after the rewrite."""
    from neuron_modelgen.models import _save_tf1, _save_tf2

    reference = tmp_path / "reference"
    (_save_tf2 if kind == "tf2" else _save_tf1)(reference, 0)
    x = sample_input()
    expected = run_serving_default(reference, x)
    before = run_serving_default(deneuronized_copy(models[kind], tmp_path / "cpu-before"), x)
    rewrite_model(models[kind], tmp_path / "rewritten", 2)
    after = run_serving_default(deneuronized_copy(tmp_path / "rewritten", tmp_path / "cpu-after"), x)
    assert expected.keys() == before.keys() == after.keys()
    for key in expected:
        np.testing.assert_allclose(before[key], expected[key], rtol=1e-6)
        np.testing.assert_allclose(after[key], expected[key], rtol=1e-6)


def test_stale_fingerprint_is_dropped_and_reported(models: dict[str, Path], tmp_path: Path) -> None:
    assert (models["tf2"] / "fingerprint.pb").exists()
    result = cli(models["tf2"], "--num_cores", 2, "--new_model_dir", tmp_path / "out", "--json")
    assert json.loads(result.stdout)["models"][0]["fingerprint"] == "dropped"
    assert not (tmp_path / "out" / "fingerprint.pb").exists()


def test_fingerprint_recomputed_on_request(models: dict[str, Path], tmp_path: Path) -> None:
    from tensorflow.core.protobuf import fingerprint_pb2
    from tensorflow.python.saved_model.pywrap_saved_model import fingerprinting

    report = rewrite_model(models["tf2"], tmp_path / "out", 2, recompute_fingerprint=True)
    assert report.models[0].fingerprint == "recomputed"
    written = fingerprint_pb2.FingerprintDef.FromString((tmp_path / "out" / "fingerprint.pb").read_bytes())
    fresh = fingerprint_pb2.FingerprintDef.FromString(fingerprinting.CreateFingerprintDef(str(tmp_path / "out")))
    stale = fingerprint_pb2.FingerprintDef.FromString((models["tf2"] / "fingerprint.pb").read_bytes())
    assert written.saved_model_checksum == fresh.saved_model_checksum != stale.saved_model_checksum


def test_already_tagged_model_is_retagged(models: dict[str, Path], tmp_path: Path) -> None:
    assert {op.automatic_multicore for op in inspect_model(models["tagged"]).models[0].neuron_ops} == {4}
    rewrite_model(models["tagged"], tmp_path / "out", 1)
    assert {op.automatic_multicore for op in inspect_model(tmp_path / "out").models[0].neuron_ops} == {1}
    assert (tmp_path / "out" / "saved_model.pb").read_bytes().count(TAG.encode()) == 4


def test_pipelined_model_is_refused_with_node_and_flag(models: dict[str, Path], tmp_path: Path) -> None:
    result = cli(models["pipelined"], "--num_cores", 2, "--new_model_dir", tmp_path / "out")
    assert result.returncode == 4
    assert "NeuronOp 'neuron_op_" in result.stderr and "--neuroncore-pipeline-cores=4" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_model_without_neuron_op(models: dict[str, Path], tmp_path: Path) -> None:
    result = cli(models["plain"], "--num_cores", 2, "--new_model_dir", tmp_path / "out")
    assert result.returncode == 4 and "not compiled for Neuron" in result.stderr
    assert list(tmp_path.iterdir()) == []
    result = cli(models["plain"], "--num_cores", 2, "--new_model_dir", tmp_path / "out", "--allow-no-neuron-ops")
    assert result.returncode == 0, result.stderr
    assert tree_digest(tmp_path / "out") == tree_digest(models["plain"])


def test_serving_base_path_keeps_its_layout(models: dict[str, Path], tmp_path: Path) -> None:
    report = rewrite_model(models["base"], tmp_path / "out", 8)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["1", "3"]
    assert [m.version for m in report.models] == ["1", "3"]
    for version in ("1", "3"):
        ops = inspect_model(tmp_path / "out" / version).models[0].neuron_ops
        assert ops and {op.automatic_multicore for op in ops} == {8}


def test_inspect_json_lists_every_op(models: dict[str, Path]) -> None:
    result = cli(models["tf2"], "--inspect", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["output"] is None and report["neuron_op_count"] == 4
    op = report["models"][0]["neuron_ops"][0]
    assert set(op) == {
        "meta_graph",
        "function",
        "node",
        "automatic_multicore",
        "pipeline_size",
        "executable_bytes",
        "target",
        "target_evidence",
        "compiler",
    }
    text = cli(models["tf2"], "--inspect").stdout
    assert "neuron_op_0" in text and "__inference_logits" in text and "4.0 KiB" in text


def test_auto_multicore_on_a_saved_model_path(models: dict[str, Path], tmp_path: Path) -> None:
    src = shutil.copytree(models["tf1"], tmp_path / "rn50")
    out = auto_multicore(src, example_inputs=sample_input(), num_cores=2)
    assert Path(out) == tmp_path / "rn50_multicore_2"
    assert {op.automatic_multicore for op in inspect_model(out).models[0].neuron_ops} == {2}
