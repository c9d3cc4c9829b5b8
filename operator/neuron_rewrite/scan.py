"""Find the NeuronOp nodes of a ``saved_model.pb`` and plan its rewrite, in one pass over field headers.

Only the messages on the way to a NodeDef are entered:

    SavedModel.meta_graphs(2) -> MetaGraphDef.graph_def(2) -> GraphDef.node(1)                      (TF1 graphs)
                                                            -> GraphDef.library(2) -> function(1)
                                                               -> FunctionDef.node_def(3)           (TF2 functions)

Functions that call functions still live in the one flat library, so this reaches NeuronOps at any call depth.
Attribute values are never entered: a NeuronOp's own ``graph_def`` attribute is opaque bytes to us. Of its
``executable`` (the NEFF, possibly hundreds of MB) only the 1024-byte header is read, to tell what the op was
compiled for (see neff.py).

The plan is a list of pieces: ``(start, end)`` byte ranges of the source to copy as they are, and ``bytes`` to
write in between (new length prefixes, the new attribute). Everything outside the edited nodes stays a range.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import neff
from .errors import InvalidModelError, NotReplicableError
from .report import NeuronOpInfo
from .wire import (
    LENGTH_DELIMITED,
    VARINT,
    Field,
    FileReader,
    WireError,
    as_int64,
    decode_varint,
    encode_tag,
    encode_varint,
    length_delimited,
)

Piece = tuple[int, int] | bytes

NEURON_OP = b"NeuronOp"
MULTICORE_ATTR = b"_automatic_multicore"
_MODEL_CONFIG_ATTR = b"model_config"
_EXECUTABLE_ATTR = b"executable"
# Written by tensorflow-neuron's --extract-weights, as a string (see neff.py).
_INSTANCE_TYPE_ATTR = b"_instance_type"
_KEYS_OF_INTEREST = {MULTICORE_ATTR, _MODEL_CONFIG_ATTR, _EXECUTABLE_ATTR, _INSTANCE_TYPE_ATTR}
_LONGEST_KEY = max(map(len, _KEYS_OF_INTEREST))
# Names are reported, not needed in full: a bound keeps an absurd name from costing memory.
_MAX_NAME = 4096
# model_config is [global_opt_num_cores, this_opt_num_cores, opt_num_infer, timeout]: read that much of it at most.
_MODEL_CONFIG_ITEMS = 4

# Message kind -> {field number: kind of the message it holds}, for the fields on the way to NodeDefs.
_PATH = {
    "SavedModel": {2: "MetaGraphDef"},
    "MetaGraphDef": {2: "GraphDef"},
    "GraphDef": {1: "NodeDef", 2: "FunctionDefLibrary"},
    "FunctionDefLibrary": {1: "FunctionDef"},
    "FunctionDef": {3: "NodeDef"},
}
_NODE_NAME, _NODE_OP, _NODE_ATTR = 1, 2, 5
_ENTRY_KEY, _ENTRY_VALUE = 1, 2
_ATTR_LIST, _ATTR_S, _ATTR_I = 1, 2, 3
_LIST_I = 3


def multicore_attr_entry(num_cores: int) -> bytes:
    """The NodeDef.attr map entry ``_automatic_multicore: {i: num_cores}`` as a whole field."""
    attr_value = encode_tag(_ATTR_I, VARINT) + encode_varint(num_cores)
    entry = length_delimited(_ENTRY_KEY, MULTICORE_ATTR) + length_delimited(_ENTRY_VALUE, attr_value)
    return length_delimited(_NODE_ATTR, entry)


def pieces_size(pieces: list[Piece]) -> int:
    return sum(len(p) if isinstance(p, bytes) else p[1] - p[0] for p in pieces)


def _add(pieces: list[Piece], piece: Piece) -> None:
    """Append, dropping empty pieces and merging a range with the range it continues."""
    if isinstance(piece, bytes):
        if piece:
            pieces.append(piece)
        return
    start, end = piece
    if start == end:
        return
    if pieces and not isinstance(pieces[-1], bytes) and pieces[-1][1] == start:
        pieces[-1] = (pieces[-1][0], end)
    else:
        pieces.append(piece)


def _splice(start: int, end: int, cuts: list[tuple[int, int, bytes]]) -> list[Piece]:
    """Pieces for [start, end) with each cut's source range replaced by its bytes (cuts sorted, disjoint)."""
    pieces: list[Piece] = []
    cursor = start
    for cut_start, cut_end, replacement in cuts:
        _add(pieces, (cursor, cut_start))
        _add(pieces, replacement)
        cursor = cut_end
    _add(pieces, (cursor, end))
    return pieces


@dataclass
class _AttrEntry:
    field: Field
    key: bytes | None
    value: Field | None


def _where(function: str | None, meta_graph: int) -> str:
    return f"function {function}" if function else f"meta graph {meta_graph}"


class SavedModelScanner:
    """Walks one ``saved_model.pb``: lists its NeuronOps and, given ``num_cores``, plans the tagged copy."""

    def __init__(self, reader: FileReader, label: str, num_cores: int | None) -> None:
        self.reader = reader
        self.label = label
        self.num_cores = num_cores
        self.neuron_ops: list[NeuronOpInfo] = []
        self.target = neff.combine([])  # of all its NeuronOps, once scanned
        self._meta_graph = -1
        self._function: str | None = None

    def scan(self) -> list[Piece] | None:
        """Return the plan for the whole file, or None when nothing changes."""
        try:
            self._check_top_level()
            plan = self._message("SavedModel", 0, self.reader.size)
        except WireError as exc:
            raise InvalidModelError(f"{self.label}: corrupt or truncated protobuf ({exc})") from None
        ops = [
            neff.OpTarget(
                f"{op.node!r} in {_where(op.function, op.meta_graph)}", op.target, op.target_evidence, op.compiler
            )
            for op in self.neuron_ops
        ]
        self.target = neff.combine(ops)
        if self.target.conflict is not None and self.num_cores is not None:
            # Inspection reports it; a rewrite would publish a model no NeuronCore can run whole.
            raise InvalidModelError(
                f"{self.label}: {self.target.conflict}: a NEFF runs only on the NeuronCore generation it was "
                "compiled for, so no instance runs this model; recompile all of it for one generation"
            )
        return plan

    def _check_top_level(self) -> None:
        expected = {1: VARINT, 2: LENGTH_DELIMITED}  # saved_model_schema_version, meta_graphs
        meta_graphs = 0
        for field in self.reader.fields(0, self.reader.size):
            if expected.get(field.number) != field.wire_type:
                raise InvalidModelError(
                    f"{self.label}: not a SavedModel (unexpected field {field.number} at byte {field.start})"
                )
            meta_graphs += field.number == 2
        if not meta_graphs:
            raise InvalidModelError(f"{self.label}: not a SavedModel (it holds no meta graph)")

    def _message(self, kind: str, start: int, end: int) -> list[Piece] | None:
        children = _PATH[kind]
        if kind == "FunctionDef":
            self._function = self._function_name(start, end)
        pieces: list[Piece] = []
        cursor = start
        for field in self.reader.fields(start, end):
            child = children.get(field.number)
            if child is None:
                continue
            if field.wire_type != LENGTH_DELIMITED:
                raise WireError(f"{kind} field {field.number} at byte {field.start} is not a message")
            if kind == "SavedModel":
                self._meta_graph += 1
            if kind == "GraphDef" and child == "NodeDef":
                self._function = None
            if child == "NodeDef":
                body = self._node(field.value_start, field.end)
            else:
                body = self._message(child, field.value_start, field.end)
            if body is None:
                continue
            _add(pieces, (cursor, field.start))
            _add(pieces, encode_tag(field.number, LENGTH_DELIMITED) + encode_varint(pieces_size(body)))
            for piece in body:
                _add(pieces, piece)
            cursor = field.end
        if not pieces:
            return None
        _add(pieces, (cursor, end))
        return pieces

    def _function_name(self, start: int, end: int) -> str | None:
        """FunctionDef.signature(1) is an OpDef whose name(1) is the function's name."""
        for field in self.reader.fields(start, end):
            if field.number == 1 and field.wire_type == LENGTH_DELIMITED:
                for sub in self.reader.fields(field.value_start, field.end):
                    if sub.number == 1 and sub.wire_type == LENGTH_DELIMITED:
                        name = self.reader.read(sub.value_start, min(sub.value_length, _MAX_NAME))
                        return name.decode("utf-8", "replace")
        return None

    def _node(self, start: int, end: int) -> list[Piece] | None:
        name = b""
        op: bytes | None = None
        attrs: list[_AttrEntry] = []
        for field in self.reader.fields(start, end):
            if field.wire_type != LENGTH_DELIMITED:
                continue
            if field.number == _NODE_OP:
                # Most nodes stop here: reading eight bytes rules them out.
                if field.value_length != len(NEURON_OP):
                    return None
                op = self.reader.payload(field)
                if op != NEURON_OP:
                    return None
            elif field.number == _NODE_NAME:
                name = self.reader.read(field.value_start, min(field.value_length, _MAX_NAME))
            elif field.number == _NODE_ATTR:
                attrs.append(self._attr_entry(field))
        if op != NEURON_OP:
            return None
        return self._neuron_op(name.decode("utf-8", "replace"), start, end, attrs)

    def _attr_entry(self, field: Field) -> _AttrEntry:
        key = value = None
        for sub in self.reader.fields(field.value_start, field.end):
            if sub.wire_type != LENGTH_DELIMITED:
                continue
            if sub.number == _ENTRY_KEY and sub.value_length <= _LONGEST_KEY:
                key = self.reader.payload(sub)
            elif sub.number == _ENTRY_VALUE:
                value = sub
        return _AttrEntry(field, key, value)

    def _neuron_op(self, name: str, start: int, end: int, attrs: list[_AttrEntry]) -> list[Piece] | None:
        values = {a.key: a.value for a in attrs if a.key in _KEYS_OF_INTEREST and a.value is not None}
        tags = [a for a in attrs if a.key == MULTICORE_ATTR]
        model_config = self._int_list(values.get(_MODEL_CONFIG_ATTR))
        executable_bytes, head = self._bytes_head(values.get(_EXECUTABLE_ATTR), neff.HEADER_SIZE)
        instance_type = self._string(values.get(_INSTANCE_TYPE_ATTR))
        where = _where(self._function, self._meta_graph)
        try:
            found, compiler = neff.classify_op(executable_bytes, head, instance_type)
        except neff.ContradictoryEvidence as exc:
            raise InvalidModelError(
                f"{self.label}: NeuronOp {name!r} in {where} contradicts itself about the NeuronCore generation it "
                f"was compiled for: {exc.first}, but {exc.second}; the model is damaged or its attributes were edited"
            ) from None
        info = NeuronOpInfo(
            meta_graph=self._meta_graph,
            function=self._function,
            node=name,
            automatic_multicore=self._int(values.get(MULTICORE_ATTR)),
            pipeline_size=model_config[1] if len(model_config) > 1 else None,
            executable_bytes=executable_bytes,
            target=found.target,
            target_evidence=found.evidence,
            compiler=compiler,
        )
        self.neuron_ops.append(info)
        if self.num_cores is None:
            return None
        if _MODEL_CONFIG_ATTR not in values:
            raise InvalidModelError(
                f"{self.label}: NeuronOp {name!r} in {where} has no model_config attribute, which the Neuron "
                "runtime requires (its pipeline size is unknown): the model is damaged or not compiled by Neuron"
            )
        if info.pipeline_size is not None and info.pipeline_size > 1:
            raise NotReplicableError(
                f"{self.label}: NeuronOp {name!r} in {where} was compiled with pipeline size "
                f"{info.pipeline_size} (--neuroncore-pipeline-cores={info.pipeline_size}); only models compiled "
                "with --neuroncore-pipeline-cores=1 can be replicated"
            )
        entry = multicore_attr_entry(self.num_cores)
        if not tags:
            # Put the tag beside the other attributes, after the last of them.
            at = attrs[-1].field.end if attrs else end
            return _splice(start, end, [(at, at, entry)])
        # Re-tag: the first old entry becomes the new one, any others go.
        cuts = [(t.field.start, t.field.end, entry if i == 0 else b"") for i, t in enumerate(tags)]
        return _splice(start, end, cuts)

    def _attr_value_fields(self, value: Field | None) -> list[Field]:
        return [] if value is None else list(self.reader.fields(value.value_start, value.end))

    def _int(self, value: Field | None) -> int | None:
        for sub in self._attr_value_fields(value):
            if sub.number == _ATTR_I and sub.wire_type == VARINT:
                return as_int64(self.reader.varint(sub.value_start, sub.end)[0])
        return None

    def _s(self, value: Field | None) -> Field | None:
        """AttrValue.s(2), located but not read."""
        for sub in self._attr_value_fields(value):
            if sub.number == _ATTR_S and sub.wire_type == LENGTH_DELIMITED:
                return sub
        return None

    def _bytes_head(self, value: Field | None, limit: int) -> tuple[int, bytes]:
        """The length of AttrValue.s and at most its first ``limit`` bytes: (0, b"") when there is none."""
        s = self._s(value)
        if s is None:
            return 0, b""
        return s.value_length, self.reader.read(s.value_start, min(s.value_length, limit))

    def _string(self, value: Field | None) -> str | None:
        """AttrValue.s as text (bounded, as names are); None when there is none."""
        s = self._s(value)
        if s is None:
            return None
        return self.reader.read(s.value_start, min(s.value_length, _MAX_NAME)).decode("utf-8", "replace")

    def _int_list(self, value: Field | None) -> list[int]:
        """The first items of AttrValue.list(1).i(3), packed or not, as protobuf allows either on the wire."""
        out: list[int] = []
        for sub in self._attr_value_fields(value):
            if sub.number != _ATTR_LIST or sub.wire_type != LENGTH_DELIMITED:
                continue
            for item in self.reader.fields(sub.value_start, sub.end):
                if item.number != _LIST_I:
                    continue
                if item.wire_type == VARINT:
                    out.append(as_int64(self.reader.varint(item.value_start, item.end)[0]))
                elif item.wire_type == LENGTH_DELIMITED:
                    packed = self.reader.read(item.value_start, min(item.value_length, 10 * _MODEL_CONFIG_ITEMS))
                    pos = 0
                    while pos < len(packed) and len(out) < _MODEL_CONFIG_ITEMS:
                        number, pos = decode_varint(packed, pos)
                        out.append(as_int64(number))
                if len(out) >= _MODEL_CONFIG_ITEMS:
                    return out
        return out
