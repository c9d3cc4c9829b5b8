"""Small SavedModel protos built field by field, for wire-level tests of the rewrite.

Real TensorFlow models (tests/rewrite/test_models.py) show the rewrite works on what TensorFlow writes; these show
it on shapes TensorFlow rarely writes but protobuf allows: odd field orders, duplicate tags, length prefixes that
grow a byte, many meta graphs.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from tensorflow.core.framework import graph_pb2, node_def_pb2
from tensorflow.core.protobuf import saved_model_pb2

TAG = "_automatic_multicore"


def neuron_op(name: str, *, pipeline: int = 1, executable: bytes = b"NEFF", tag: int | None = None, pad: int = 0):
    """A NodeDef shaped like a compiled NeuronOp (the attributes tf-neuron writes)."""
    node = node_def_pb2.NodeDef(name=name, op="NeuronOp", input=["x"])
    inner = graph_pb2.GraphDef()
    inner.node.add(name="inner_neuron_op", op="NeuronOp")  # must never be tagged: it is opaque attribute bytes
    node.attr["graph_def"].s = inner.SerializeToString()
    node.attr["input_names"].list.s.append(b"x:0")
    node.attr["output_names"].list.s.append(b"y:0")
    node.attr["executable"].s = executable
    node.attr["model_config"].list.i.extend([1, pipeline, 1, 10])
    if pad:
        node.attr["pad"].s = b"p" * pad
    if tag is not None:
        node.attr[TAG].i = tag
    return node


def saved_model(meta_graphs: int = 1, functions: int = 2, **op_kwargs) -> saved_model_pb2.SavedModel:
    """NeuronOps in every meta graph's top-level graph and in each library function."""
    model = saved_model_pb2.SavedModel(saved_model_schema_version=1)
    for m in range(meta_graphs):
        meta = model.meta_graphs.add()
        meta.meta_info_def.tags.append(f"serve{m}")
        meta.graph_def.node.add(name="x", op="Placeholder")
        meta.graph_def.node.append(neuron_op(f"graph_op_{m}", **op_kwargs))
        for f in range(functions):
            function = meta.graph_def.library.function.add()
            function.signature.name = f"__inference_f{f}"
            function.node_def.add(name="call", op="StatefulPartitionedCall")
            function.node_def.append(neuron_op(f"fn_op_{f}", **op_kwargs))
    return model


def write_model(directory: Path, model: saved_model_pb2.SavedModel | bytes, extra_files: bool = True) -> Path:
    directory.mkdir(parents=True)
    data = model if isinstance(model, bytes) else model.SerializeToString()
    (directory / "saved_model.pb").write_bytes(data)
    if extra_files:
        (directory / "variables").mkdir()
        (directory / "variables" / "variables.index").write_bytes(os.urandom(64))
        (directory / "variables" / "variables.data-00000-of-00001").write_bytes(os.urandom(4096))
        (directory / "assets").mkdir()
        (directory / "assets" / "vocab.txt").write_text("a\nb\n")
        (directory / "fingerprint.pb").write_bytes(b"\x08\x01")
    return directory


def read_model(directory: Path) -> saved_model_pb2.SavedModel:
    model = saved_model_pb2.SavedModel()
    model.ParseFromString((directory / "saved_model.pb").read_bytes())
    return model


def all_nodes(model: saved_model_pb2.SavedModel):
    for meta in model.meta_graphs:
        yield from meta.graph_def.node
        for function in meta.graph_def.library.function:
            yield from function.node_def


def without_tags(model: saved_model_pb2.SavedModel) -> saved_model_pb2.SavedModel:
    copy = saved_model_pb2.SavedModel()
    copy.CopyFrom(model)
    for node in all_nodes(copy):
        node.attr.pop(TAG, None)
    return copy


def tree_digest(root: Path) -> dict[str, str]:
    """Every file and link under root with its content hash: equal digests mean an untouched tree."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            out[rel] = "link:" + os.readlink(path)
        elif path.is_file():
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            out[rel] = "dir"
    return out


def with_raw_node(model: saved_model_pb2.SavedModel, node: bytes) -> bytes:
    """Serialize ``model`` with ``node`` (raw NodeDef bytes) added to meta graph 0's graph, after its library.

    Going through bytes keeps what a parse would fold away: repeated keys, unusual field orders.
    """
    model = saved_model_pb2.SavedModel.FromString(model.SerializeToString())
    meta = model.meta_graphs[0]
    graph = meta.graph_def.SerializeToString() + _field(1, node)
    meta.ClearField("graph_def")
    del model.meta_graphs[0]
    others = model.SerializeToString()
    return _field(2, meta.SerializeToString() + _field(2, graph)) + others


def _field(number: int, payload: bytes) -> bytes:
    from neuron_rewrite.wire import length_delimited

    return length_delimited(number, payload)
