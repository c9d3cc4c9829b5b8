"""Turn a real SavedModel into one shaped like a Neuron-compiled model, and back.

``neuronize`` swaps each compute subgraph (MatMul/AddV2/Relu...) of a graph or function for one ``NeuronOp``
node carrying the attributes tf-neuron writes, with the replaced subgraph in its ``graph_def`` attribute and a byte
string standing for the NEFF (with a NEFF header, or a placeholder without one). ``deneuronize`` inlines each
NeuronOp's embedded graph again: the result loads in plain TensorFlow and must compute what the original model
computed (the CPU check of the rewrite).

Graphs (TF1) name tensors ``node:index``; functions (TF2) name them ``node:output_arg:index`` and refer to their
arguments by bare name. ``_Scope`` hides that difference.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from tensorflow.core.framework import attr_value_pb2, graph_pb2, node_def_pb2, types_pb2
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow.python.framework import op_def_registry

COMPUTE_OPS = frozenset({"MatMul", "AddV2", "BiasAdd", "Relu", "Tanh"})
NEURON_OUTPUT_ARG = "output_tensors"


@dataclass
class _Scope:
    """The nodes of one GraphDef or FunctionDef, and how its tensor references are spelled."""

    nodes: list[node_def_pb2.NodeDef]
    function: object | None  # FunctionDef, or None for a graph
    signatures: list[object]  # TF1: SignatureDefs whose tensor names point into this graph

    def tensor(self, node: str, index: int, op: str) -> str:
        """How a consumer in this scope names output ``index`` of ``node``."""
        if self.function is None:
            return f"{node}:{index}"
        arg = NEURON_OUTPUT_ARG if op == "NeuronOp" else op_def_registry.get(op).output_arg[0].name
        return f"{node}:{arg}:{index}"

    def parse(self, ref: str) -> tuple[str, int]:
        """(node, index) of a reference; bare names are index 0 (or a function argument)."""
        parts = ref.split(":")
        return parts[0], int(parts[-1]) if len(parts) > 1 else 0

    def replace_refs(self, mapping: dict[str, str]) -> None:
        """Point every consumer (node inputs, function results, signatures) at new tensors."""

        def fix(ref: str) -> str:
            if ref.startswith("^"):
                return ref
            node, index = self.parse(ref)
            return mapping.get(f"{node}:{index}", ref)

        for node in self.nodes:
            node.input[:] = [fix(r) for r in node.input]
        if self.function is not None:
            for key, ref in list(self.function.ret.items()):
                self.function.ret[key] = fix(ref)
        for signature in self.signatures:
            for tensors in (signature.inputs, signature.outputs):
                for info in tensors.values():
                    info.name = fix(info.name)


def _scopes(model: saved_model_pb2.SavedModel) -> Iterator[_Scope]:
    for meta in model.meta_graphs:
        yield _Scope(meta.graph_def.node, None, list(meta.signature_def.values()))
        for function in meta.graph_def.library.function:
            yield _Scope(function.node_def, function, [])


def _type_list(n: int) -> attr_value_pb2.AttrValue:
    value = attr_value_pb2.AttrValue()
    value.list.type.extend([types_pb2.DT_FLOAT] * n)
    return value


def _shape_list(n: int) -> attr_value_pb2.AttrValue:
    value = attr_value_pb2.AttrValue()
    for _ in range(n):
        value.list.shape.add(unknown_rank=True)
    return value


def _int_list(values: list[int]) -> attr_value_pb2.AttrValue:
    value = attr_value_pb2.AttrValue()
    value.list.i.extend(values)
    return value


def _string_list(values: list[str]) -> attr_value_pb2.AttrValue:
    value = attr_value_pb2.AttrValue()
    value.list.s.extend(v.encode() for v in values)
    return value


def neuronize_scope(scope: _Scope, name: str, executable: bytes, pipeline: int) -> bool:
    """Replace the scope's compute nodes by one NeuronOp; False where it has none."""
    compute = [n for n in scope.nodes if n.op in COMPUTE_OPS]
    if not compute:
        return False
    names = {n.name for n in compute}
    external: list[str] = []  # references from inside the subgraph to tensors outside it, in first-use order
    inner = graph_pb2.GraphDef()
    for node in compute:
        copy = inner.node.add()
        copy.CopyFrom(node)
        del copy.input[:]
        for ref in node.input:
            if ref.startswith("^"):
                continue  # control edges stay outside: the NeuronOp runs when its inputs are ready
            producer, index = scope.parse(ref)
            if producer in names:
                copy.input.append(f"{producer}:{index}")
            else:
                if ref not in external:
                    external.append(ref)
                copy.input.append(f"input_{external.index(ref)}")
    for i in range(len(external)):
        placeholder = inner.node.add(name=f"input_{i}", op="Placeholder")
        placeholder.attr["dtype"].type = types_pb2.DT_FLOAT
    consumed = []  # tensors of the subgraph used outside it
    outside_refs = [r for n in scope.nodes if n.name not in names for r in n.input]
    if scope.function is not None:
        outside_refs += list(scope.function.ret.values())
    outside_refs += [i.name for s in scope.signatures for t in (s.inputs, s.outputs) for i in t.values()]
    for ref in outside_refs:
        producer, index = scope.parse(ref.lstrip("^"))
        if not ref.startswith("^") and producer in names and f"{producer}:{index}" not in consumed:
            consumed.append(f"{producer}:{index}")
    neuron = node_def_pb2.NodeDef(name=name, op="NeuronOp", input=external)
    neuron.attr["graph_def"].s = inner.SerializeToString()
    neuron.attr["input_names"].CopyFrom(_string_list([f"input_{i}:0" for i in range(len(external))]))
    neuron.attr["input_dtypes"].CopyFrom(_type_list(len(external)))
    neuron.attr["input_shapes"].CopyFrom(_shape_list(len(external)))
    neuron.attr["output_names"].CopyFrom(_string_list(consumed))
    neuron.attr["output_dtypes"].CopyFrom(_type_list(len(consumed)))
    neuron.attr["output_shapes"].CopyFrom(_shape_list(len(consumed)))
    neuron.attr["executable"].s = executable
    neuron.attr["input_batch_axis"].CopyFrom(_int_list([0] * len(external)))
    neuron.attr["output_batch_axis"].CopyFrom(_int_list([0] * len(consumed)))
    neuron.attr["model_config"].CopyFrom(_int_list([pipeline, pipeline, 1, 10]))
    kept = [n for n in scope.nodes if n.name not in names]
    del scope.nodes[:]
    scope.nodes.extend([*kept, neuron])
    mapping = {}
    for i, tensor in enumerate(consumed):
        producer, index = scope.parse(tensor)
        mapping[f"{producer}:{index}"] = scope.tensor(name, i, "NeuronOp")
    scope.replace_refs(mapping)
    return True


def neuron_ops(model: saved_model_pb2.SavedModel) -> list[node_def_pb2.NodeDef]:
    """Every NeuronOp, in the order they are serialized (each meta graph's graph, then its library's functions)."""
    return [n for scope in _scopes(model) for n in scope.nodes if n.op == "NeuronOp"]


def neuronize(model: saved_model_pb2.SavedModel, executable: bytes, pipeline: int = 1) -> int:
    """Swap the compute subgraph of every graph and function for a NeuronOp; return how many were made."""
    count = 0
    for scope in _scopes(model):
        if neuronize_scope(scope, f"neuron_op_{count}", executable, pipeline):
            count += 1
    return count


def deneuronize(model: saved_model_pb2.SavedModel) -> int:
    """Inline every NeuronOp's embedded graph where the NeuronOp stands; return how many were inlined."""
    count = 0
    for scope in _scopes(model):
        for neuron in [n for n in scope.nodes if n.op == "NeuronOp"]:
            _inline(scope, neuron)
            count += 1
    return count


def _inline(scope: _Scope, neuron: node_def_pb2.NodeDef) -> None:
    inner = graph_pb2.GraphDef.FromString(neuron.attr["graph_def"].s)
    prefix = f"{neuron.name}/"
    inputs = {name.decode().split(":")[0]: neuron.input[i] for i, name in enumerate(neuron.attr["input_names"].list.s)}
    ops = {n.name: n.op for n in inner.node}
    inlined = []
    for node in inner.node:
        if node.name in inputs:
            continue
        copy = node_def_pb2.NodeDef()
        copy.CopyFrom(node)
        copy.name = prefix + node.name
        del copy.input[:]
        for ref in node.input:
            producer, index = scope.parse(ref)
            copy.input.append(
                inputs[producer] if producer in inputs else scope.tensor(prefix + producer, index, ops[producer])
            )
        inlined.append(copy)
    mapping = {}
    for i, name in enumerate(neuron.attr["output_names"].list.s):
        producer, index = scope.parse(name.decode())
        mapping[f"{neuron.name}:{i}"] = scope.tensor(prefix + producer, index, ops[producer])
    kept = [n for n in scope.nodes if n.name != neuron.name]
    del scope.nodes[:]
    scope.nodes.extend([*kept, *inlined])
    scope.replace_refs(mapping)
