"""The streaming rewrite on SavedModel protos built field by field."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from neuron_rewrite import (
    InvalidModelError,
    NotReplicableError,
    OutputError,
    UsageError,
    auto_multicore,
    inspect_model,
    rewrite_model,
)
from neuron_rewrite.scan import multicore_attr_entry
from neuron_rewrite.wire import as_int64, decode_varint, encode_varint
from synthetic_models import (
    TAG,
    all_nodes,
    neuron_op,
    read_model,
    saved_model,
    tree_digest,
    with_raw_node,
    without_tags,
    write_model,
)

CLI = [sys.executable, "-m", "neuron_rewrite"]


def neuron_ops(model):
    return [n for n in all_nodes(model) if n.op == "NeuronOp"]


def assert_rewritten(src: Path, out: Path, num_cores: int) -> None:
    before, after = read_model(src), read_model(out)
    ops = neuron_ops(after)
    assert ops, "the model under test has NeuronOps"
    assert all(op.attr[TAG].i == num_cores for op in ops)
    assert without_tags(after) == without_tags(before)


@pytest.mark.parametrize("value", [0, 1, 127, 128, 16383, 16384, 2**31, 2**63 - 1, -1, -(2**63)])
def test_varint_round_trip(value: int) -> None:
    encoded = encode_varint(value)
    decoded, end = decode_varint(encoded, 0)
    assert end == len(encoded)
    assert as_int64(decoded) == value


def test_every_neuron_op_is_tagged_and_nothing_else_changes(tmp_path: Path) -> None:
    src = write_model(tmp_path / "m", saved_model(meta_graphs=3, functions=4))
    before = tree_digest(src)
    report = rewrite_model(src, tmp_path / "out", 8)
    assert_rewritten(src, tmp_path / "out", 8)
    assert report.neuron_op_count == 3 * (1 + 4)
    assert {op.meta_graph for op in report.models[0].neuron_ops} == {0, 1, 2}
    assert tree_digest(src) == before, "the source is never modified"
    out = tree_digest(tmp_path / "out")
    for rel in ("variables/variables.index", "variables/variables.data-00000-of-00001", "assets/vocab.txt"):
        assert out[rel] == before[rel]
    assert "fingerprint.pb" not in out and report.models[0].fingerprint == "dropped"


def test_embedded_graph_def_of_a_neuron_op_is_left_alone(tmp_path: Path) -> None:
    src = write_model(tmp_path / "m", saved_model())
    rewrite_model(src, tmp_path / "out", 2)
    for op in neuron_ops(read_model(tmp_path / "out")):
        embedded = type(read_model(src).meta_graphs[0].graph_def)()
        embedded.ParseFromString(op.attr["graph_def"].s)
        assert [n.name for n in embedded.node] == ["inner_neuron_op"]
        assert TAG not in embedded.node[0].attr


@pytest.mark.parametrize("pad", [*range(100, 130), *range(16340, 16390)])
def test_length_prefixes_that_grow_a_byte(tmp_path: Path, pad: int) -> None:
    """Sizes around 127 and 16383 make the new tag lengthen every enclosing varint prefix by one byte."""
    src = write_model(tmp_path / "m", saved_model(functions=1, pad=pad), extra_files=False)
    rewrite_model(src, tmp_path / "out", 3)
    assert_rewritten(src, tmp_path / "out", 3)


def test_retag_replaces_the_old_value_and_duplicates(tmp_path: Path) -> None:
    # A repeated map key is legal on the wire (the last wins when parsed): every copy must go.
    node = neuron_op("dup", tag=4).SerializeToString() + multicore_attr_entry(5)
    src = write_model(tmp_path / "m", with_raw_node(saved_model(tag=4), node))
    assert [op.automatic_multicore for op in inspect_model(src).models[0].neuron_ops][-1] == 5
    rewrite_model(src, tmp_path / "out", 1)
    data = (tmp_path / "out" / "saved_model.pb").read_bytes()
    assert data.count(TAG.encode()) == len(neuron_ops(read_model(src)))
    assert_rewritten(src, tmp_path / "out", 1)


def test_fields_in_any_order(tmp_path: Path) -> None:
    """Protobuf lets fields come in any order: here attrs come before op and name, the node after the library."""
    op = neuron_op("reordered")
    attrs = type(op)()
    attrs.attr.MergeFrom(op.attr)
    node = (
        attrs.SerializeToString() + type(op)(op=op.op).SerializeToString() + type(op)(name=op.name).SerializeToString()
    )
    src = write_model(tmp_path / "m", with_raw_node(saved_model(functions=1), node))
    report = rewrite_model(src, tmp_path / "out", 6)
    assert "reordered" in {o.node for o in report.models[0].neuron_ops}
    assert_rewritten(src, tmp_path / "out", 6)


def test_inspect_lists_every_op_and_writes_nothing(tmp_path: Path) -> None:
    src = write_model(tmp_path / "m", saved_model(functions=2, executable=b"x" * 5000, tag=2))
    before = tree_digest(tmp_path)
    ops = inspect_model(src).models[0].neuron_ops
    assert tree_digest(tmp_path) == before
    assert sorted((o.function or "", o.node) for o in ops) == [
        ("", "graph_op_0"),
        ("__inference_f0", "fn_op_0"),
        ("__inference_f1", "fn_op_1"),
    ]
    assert all(o.executable_bytes == 5000 and o.pipeline_size == 1 and o.automatic_multicore == 2 for o in ops)


def test_base_path_with_versions(tmp_path: Path) -> None:
    base = tmp_path / "base"
    write_model(base / "1", saved_model())
    write_model(base / "2", saved_model(functions=3))
    (base / "README").write_text("kept as is")
    report = rewrite_model(base, tmp_path / "out", 4)
    assert [m.version for m in report.models] == ["1", "2"]
    for version in ("1", "2"):
        assert_rewritten(base / version, tmp_path / "out" / version, 4)
    assert (tmp_path / "out" / "README").read_text() == "kept as is"


def test_no_neuron_op_is_refused_unless_allowed(tmp_path: Path) -> None:
    model = saved_model(functions=0)
    del model.meta_graphs[0].graph_def.node[1]
    src = write_model(tmp_path / "m", model)
    with pytest.raises(NotReplicableError, match="not compiled for Neuron"):
        rewrite_model(src, tmp_path / "out", 2)
    report = rewrite_model(src, tmp_path / "out", 2, allow_no_neuron_ops=True)
    assert tree_digest(tmp_path / "out") == tree_digest(src), "copied unchanged, fingerprint kept"
    assert report.models[0].fingerprint == "kept"


def test_force_replaces_an_existing_output(tmp_path: Path) -> None:
    src = write_model(tmp_path / "m", saved_model())
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "stale").write_text("old")
    with pytest.raises(OutputError, match="already exists"):
        rewrite_model(src, tmp_path / "out", 2)
    rewrite_model(src, tmp_path / "out", 2, force=True)
    assert not (tmp_path / "out" / "stale").exists()
    assert_rewritten(src, tmp_path / "out", 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "out"], "no staging directory left behind"


def test_auto_multicore_api(tmp_path: Path) -> None:
    src = write_model(tmp_path / "model", saved_model())
    out = auto_multicore(str(src), example_inputs=None, num_cores=4)
    assert out == str(tmp_path / "model_multicore_4")
    assert_rewritten(src, Path(out), 4)
    with pytest.raises(UsageError):
        auto_multicore(str(src), None, num_cores=0)


def _symlink_out(tmp_path: Path) -> Path:
    src = write_model(tmp_path / "m", saved_model())
    (tmp_path / "secret").write_text("outside")
    os.symlink(tmp_path / "secret", src / "assets" / "link")
    return src


def _truncated(tmp_path: Path) -> Path:
    data = saved_model(executable=b"n" * 10000).SerializeToString()
    return write_model(tmp_path / "m", data[: len(data) // 2])


def _pipelined(tmp_path: Path) -> Path:
    return write_model(tmp_path / "m", saved_model(pipeline=4))


def _random_bytes(tmp_path: Path) -> Path:
    return write_model(tmp_path / "m", os.urandom(4096))


def _empty_pb(tmp_path: Path) -> Path:
    return write_model(tmp_path / "m", b"")


def _no_pb(tmp_path: Path) -> Path:
    (tmp_path / "m" / "variables").mkdir(parents=True)
    return tmp_path / "m"


def _ok(tmp_path: Path) -> Path:
    return write_model(tmp_path / "m", saved_model())


@pytest.mark.parametrize(
    ("make_input", "args", "code", "message"),
    [
        (_ok, ["--num_cores", "0"], 2, "num_cores must be an integer of at least 1"),
        (_ok, ["--num_cores", "-3"], 2, "num_cores must be an integer of at least 1"),
        (_ok, ["--num_cores", "two"], 2, "invalid int value"),
        (_no_pb, ["--num_cores", "2"], 3, "not a SavedModel"),
        (_empty_pb, ["--num_cores", "2"], 3, "not a SavedModel (it holds no meta graph)"),
        (_truncated, ["--num_cores", "2"], 3, "corrupt or truncated"),
        (_random_bytes, ["--num_cores", "2"], 3, "saved_model.pb"),
        (_pipelined, ["--num_cores", "2"], 4, "--neuroncore-pipeline-cores=4"),
        (_symlink_out, ["--num_cores", "2"], 3, "points outside the model"),
    ],
)
def test_cli_refuses_bad_input_and_writes_nothing(tmp_path, make_input, args, code, message) -> None:
    src = make_input(tmp_path)
    before = tree_digest(tmp_path)
    result = subprocess.run(
        [*CLI, str(src), *args, "--new_model_dir", str(tmp_path / "out")], capture_output=True, text=True
    )
    assert result.returncode == code, result.stderr
    assert message in result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("tf-neuron-auto-multicore: error: ")
    assert tree_digest(tmp_path) == before, "nothing written, no temporary files, source unchanged"


def test_cli_missing_input(tmp_path: Path) -> None:
    result = subprocess.run([*CLI, str(tmp_path / "nope"), "--num_cores", "1", "--new_model_dir", str(tmp_path / "o")],
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 3 and "no such directory" in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("where", ["same", "inside", "parent"])
def test_output_must_not_overlap_the_input(tmp_path: Path, where: str) -> None:
    src = write_model(tmp_path / "models" / "m", saved_model())
    target = {"same": src, "inside": src / "out", "parent": tmp_path / "models"}[where]
    before = tree_digest(tmp_path)
    with pytest.raises(OutputError, match="input"):
        rewrite_model(src, target, 2, force=True)
    assert tree_digest(tmp_path) == before


def test_cli_json_report(tmp_path: Path) -> None:
    import json

    src = write_model(tmp_path / "m", saved_model(functions=1))
    result = subprocess.run(
        [*CLI, str(src), "--num_cores", "2", "--new_model_dir", str(tmp_path / "out"), "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    report = json.loads(result.stdout)
    assert report["num_cores"] == 2 and report["neuron_op_count"] == 2
    assert report["models"][0]["fingerprint"] == "dropped"
    assert {op["automatic_multicore"] for op in report["models"][0]["neuron_ops"]} == {2}


def test_invalid_model_error_names_the_file(tmp_path: Path) -> None:
    src = write_model(tmp_path / "m", b"\xff" * 20)
    with pytest.raises(InvalidModelError, match=r"m/saved_model\.pb"):
        inspect_model(src)
