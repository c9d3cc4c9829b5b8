"""JSON <-> tensors for ``:predict``, following tensorflow_serving/util/json_tensor.cc rule for rule.

Requests: ``{"instances": [...]}`` (row format: one element per batch item, an object per item when the signature
has several inputs) or ``{"inputs": ...}`` (columnar: the whole tensor, an object when several inputs). Values must
be of the input's type exactly (an integer for an int32 input, no bool for a float...), lists must be dense.
Responses: ``predictions`` (row) or ``outputs`` (columnar); a single output is written bare, several as objects.
Floats are written as the real server writes them (shortest of %g and full precision that round-trips, ``.0``
added to whole numbers). Only the error texts quoting a JSON value may differ in spacing.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from typing import Any

import numpy as np
from tensorflow.core.framework import types_pb2

from .status import StatusError, invalid_argument

_MAX_DEBUG = 256
_INT_RANGES = {
    types_pb2.DT_INT32: (-(2**31), 2**31 - 1),
    # The real server reads these three as any int32 and lets the cast wrap; the stand-in refuses instead.
    types_pb2.DT_INT16: (-(2**15), 2**15 - 1),
    types_pb2.DT_INT8: (-(2**7), 2**7 - 1),
    types_pb2.DT_UINT8: (0, 2**8 - 1),
    types_pb2.DT_INT64: (-(2**63), 2**63 - 1),
    types_pb2.DT_UINT32: (0, 2**32 - 1),
    types_pb2.DT_UINT64: (0, 2**64 - 1),
}
_NUMPY = {
    types_pb2.DT_FLOAT: np.float32,
    types_pb2.DT_DOUBLE: np.float64,
    types_pb2.DT_INT32: np.int32,
    types_pb2.DT_INT16: np.int16,
    types_pb2.DT_INT8: np.int8,
    types_pb2.DT_UINT8: np.uint8,
    types_pb2.DT_INT64: np.int64,
    types_pb2.DT_UINT32: np.uint32,
    types_pb2.DT_UINT64: np.uint64,
    types_pb2.DT_BOOL: np.bool_,
    types_pb2.DT_STRING: object,
}
ROW, COLUMNAR = "row", "columnar"


def dtype_string(dtype: int) -> str:
    """tensorflow::DataTypeString: DT_FLOAT -> "float"."""
    return types_pb2.DataType.Name(dtype)[3:].lower()


def debug_string(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)[:_MAX_DEBUG]


def _json_type(value: Any) -> str:
    if value is None:
        return "Null"
    if isinstance(value, bool):
        return "True" if value else "False"
    return {dict: "Object", list: "Array", str: "String"}.get(type(value), "Number")


def _is_b64(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and isinstance(value.get("b64"), str)


def _type_error(value: Any, dtype: int) -> StatusError:
    return invalid_argument(
        f"JSON Value: {debug_string(value)} Type: {_json_type(value)} is not of expected type: {dtype_string(dtype)}"
    )


def _leaf(value: Any, dtype: int) -> Any:
    if isinstance(value, dict):
        if dtype != types_pb2.DT_STRING:
            raise _type_error(value, dtype)
        if not _is_b64(value):
            raise invalid_argument(f"JSON Value: {debug_string(value)} not formatted correctly for base64 data")
        try:
            return base64.b64decode(value["b64"], validate=True)
        except (binascii.Error, ValueError):
            raise invalid_argument("Unable to base64 decode") from None
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if dtype in (types_pb2.DT_FLOAT, types_pb2.DT_DOUBLE):
        if not is_number:
            raise _type_error(value, dtype)
        return value
    if dtype in _INT_RANGES:
        low, high = _INT_RANGES[dtype]
        if not (is_number and isinstance(value, int) and low <= value <= high):
            raise _type_error(value, dtype)
        return value
    if dtype == types_pb2.DT_STRING:
        if not isinstance(value, str):
            raise _type_error(value, dtype)
        return value.encode()
    if dtype == types_pb2.DT_BOOL:
        if not isinstance(value, bool):
            raise _type_error(value, dtype)
        return value
    raise StatusError(
        "UNIMPLEMENTED", f"Conversion of JSON Value: {debug_string(value)} to type: {dtype_string(dtype)}"
    )


def _dense_shape(value: Any) -> list[int]:
    shape = []
    while isinstance(value, list):
        shape.append(len(value))
        if not value:
            break
        value = value[0]
    return shape


def _fill(value: Any, level: int, shape: list[int], dtype: int, out: list[Any]) -> None:
    """FillTensorProto: every leaf at the same depth, every list as long as the first one at its level."""
    if not isinstance(value, list):
        if level != len(shape):
            raise invalid_argument(
                f"JSON Value: {debug_string(value)} found at incorrect level: {level + 1} in the JSON DOM. "
                f"Expected at level: {len(shape)}"
            )
        out.append(_leaf(value, dtype))
        return
    if level >= len(shape):
        raise invalid_argument(f"Encountered list at unexpected level: {level} expected < {len(shape)}")
    if len(value) != shape[level]:
        raise invalid_argument(
            f"Encountered list at unexpected size: {len(value)} at level: {level} expected size: {shape[level]}"
        )
    for item in value:
        _fill(item, level + 1, shape, dtype, out)


def _tensor(value: Any, dtype: int) -> tuple[list[int], list[Any]]:
    shape, values = _dense_shape(value), []
    _fill(value, 0, shape, dtype, values)
    return shape, values


def _array(shape: list[int], values: list[Any], dtype: int) -> np.ndarray:
    if dtype == types_pb2.DT_STRING:
        array = np.empty(len(values), dtype=object)
        array[:] = values
        return array.reshape(shape)
    return np.array(values, dtype=_NUMPY[dtype]).reshape(shape)


def parse(body: bytes) -> dict[str, Any]:
    """ParseJson: a JSON object; like rapidjson with kParseStopWhenDoneFlag, text after it is ignored."""
    if not body:
        raise invalid_argument("JSON Parse error: The document is empty")
    text = body.decode("utf-8", errors="replace")
    stripped = text.lstrip()
    try:
        doc, _ = json.JSONDecoder().raw_decode(stripped)
    except json.JSONDecodeError as exc:
        raise invalid_argument(
            f"JSON Parse error: {exc.msg} at offset: {exc.pos + len(text) - len(stripped)}"
        ) from None
    if not isinstance(doc, dict):
        raise invalid_argument(f"JSON Value: {debug_string(doc)} Is not object")
    return doc


def signature_name(doc: dict[str, Any]) -> str:
    name = doc.get("signature_name", "")
    if not isinstance(name, str):
        raise invalid_argument(
            f"JSON Value: {debug_string(doc)} not formatted correctly. 'signature_name' key must be a string value."
        )
    return name


def _instances(items: list[Any], inputs: dict[str, int]) -> dict[str, np.ndarray]:
    if not isinstance(items[0], dict) and len(inputs) > 1:
        raise invalid_argument(
            "instances is a plain list, but expecting list of objects as multiple input tensors required as per "
            "tensorinfo_map"
        )
    objects = isinstance(items[0], dict) and not _is_b64(items[0])
    names = sorted(inputs)
    shapes: dict[str, list[int]] = {}
    sizes: dict[str, int] = {}
    values: dict[str, list[Any]] = {name: [] for name in names}

    def add(item: Any, name: str) -> None:
        if name not in inputs:
            raise invalid_argument(f"JSON object: does not have named input: {name}")
        shape, flat = _tensor(item, inputs[name])
        if name not in sizes:
            sizes[name], shapes[name] = len(flat), shape
        elif sizes[name] != len(flat):
            raise invalid_argument(f"Expecting tensor size: {sizes[name]} but got: {len(flat)}")
        elif shapes[name] != shape:
            raise invalid_argument(
                f"Expecting shape [{','.join(map(str, shapes[name]))}] but got: [{','.join(map(str, shape))}]"
            )
        values[name].extend(flat)

    for count, item in enumerate(items):
        if objects:
            if not isinstance(item, dict) or _is_b64(item):
                raise invalid_argument(f"Expecting object but got list at item {count} of input list")
            for name, value in item.items():
                try:
                    add(value, name)
                except StatusError as exc:
                    raise invalid_argument(
                        f"Failed to process element: {count} key: {name} of 'instances' list. Error: {exc}"
                    ) from None
            if set(item) != set(names):
                raise invalid_argument(
                    f"Failed to process element: {count} of 'instances' list. JSON object: {debug_string(item)} "
                    f"keys must be equal to: {','.join(names)}"
                )
        else:
            if isinstance(item, dict) and not _is_b64(item):
                raise invalid_argument(f"Expecting value/list but got object at item {count} of input list")
            try:
                add(item, names[0])
            except StatusError as exc:
                raise invalid_argument(
                    f"Failed to process element: {count} of 'instances' list. Error: {exc}"
                ) from None
    return {name: _array([len(items), *shapes[name]], values[name], inputs[name]) for name in shapes}


def _columnar(value: Any, inputs: dict[str, int]) -> dict[str, np.ndarray]:
    if not isinstance(value, dict) or _is_b64(value):
        if len(inputs) > 1:
            raise invalid_argument(
                "inputs is a plain value/list, but expecting an object as multiple input tensors required as per "
                "tensorinfo_map"
            )
        name = next(iter(inputs))
        return {name: _array(*_tensor(value, inputs[name]), inputs[name])}
    tensors = {}
    for name in sorted(inputs):
        if name not in value:
            raise invalid_argument(f"Missing named input: {name} in 'inputs' object.")
        tensors[name] = _array(*_tensor(value[name], inputs[name]), inputs[name])
    return tensors


def request_tensors(doc: dict[str, Any], inputs: dict[str, int]) -> tuple[str, dict[str, np.ndarray]]:
    """(ROW or COLUMNAR, input name -> array) from a parsed request; ``inputs`` maps names to DataType enums."""
    has_instances, has_inputs = "instances" in doc, "inputs" in doc
    if has_instances and has_inputs:
        raise invalid_argument(
            f"JSON Value: {debug_string(doc)} Not formatted correctly expecting only one of 'inputs' or "
            "'instances' keys to exist "
        )
    if has_instances:
        if not isinstance(doc["instances"], list):
            raise invalid_argument(f"JSON Value: {debug_string(doc)} Expecting 'instances' to be an list/array")
        if not doc["instances"]:
            raise invalid_argument(f"JSON Value: {debug_string(doc)} No values in 'instances' array")
        return ROW, _instances(doc["instances"], inputs)
    if has_inputs:
        return COLUMNAR, _columnar(doc["inputs"], inputs)
    raise invalid_argument("Missing 'inputs' or 'instances' key")


def _decimal(value: float, single: bool) -> str:
    """WriteDecimal: %g when it round-trips, else full precision; whole numbers get '.0'."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "-Infinity" if value < 0 else "Infinity"
    text = f"{value:g}"
    parsed = float(np.float32(text)) if single else float(text)
    if parsed != value:
        text = f"{value:.{9 if single else 17}g}"
    if "." not in text and "e" not in text:
        text += ".0"
    return text


def _value_json(array: np.ndarray, as_bytes: bool) -> str:
    if array.ndim:
        return "[" + ", ".join(_value_json(item, as_bytes) for item in array) + "]"
    item = array.item()
    if array.dtype == np.float32:
        return _decimal(item, single=True)
    if array.dtype == np.float64:
        return _decimal(item, single=False)
    if isinstance(item, bool):
        return "true" if item else "false"
    if isinstance(item, bytes):
        if as_bytes:
            return json.dumps({"b64": base64.b64encode(item).decode()})
        return json.dumps(item.decode("utf-8", errors="replace"), ensure_ascii=False)
    if isinstance(item, int):
        return str(item)
    raise invalid_argument(f"Failed to write JSON value for tensor type: {array.dtype}")


def _is_bytes(name: str, array: np.ndarray) -> bool:
    return array.dtype == object and name.endswith("_bytes")


def _entry(outputs: dict[str, np.ndarray], index: int | None) -> str:
    """One output written bare, several as an object keyed by output name."""
    names = sorted(outputs)
    parts = {}
    for name in names:
        array = outputs[name] if index is None else outputs[name][index]
        parts[name] = _value_json(array, _is_bytes(name, outputs[name]))
    if len(names) == 1:
        return parts[names[0]]
    return "{" + ", ".join(f"{json.dumps(name)}: {part}" for name, part in parts.items()) + "}"


def response(outputs: dict[str, np.ndarray], format: str) -> str:
    """MakeJsonFromTensors for the request's format."""
    if not outputs:
        raise invalid_argument("Cannot convert empty tensor map to JSON")
    if format == COLUMNAR:
        return '{\n    "outputs": ' + _entry(outputs, None) + "\n}"
    batch = -1
    for name in sorted(outputs):
        if outputs[name].ndim == 0:
            raise invalid_argument(f"Tensor name: {name} has no shape information ")
        if batch >= 0 and outputs[name].shape[0] != batch:
            raise invalid_argument(
                f"Tensor name: {name} has inconsistent batch size: {outputs[name].shape[0]} expecting: {batch}"
            )
        batch = outputs[name].shape[0]
    items = [_entry(outputs, i) for i in range(batch)]
    return '{\n    "predictions": [' + ",\n        ".join(items) + "\n    ]\n}"
