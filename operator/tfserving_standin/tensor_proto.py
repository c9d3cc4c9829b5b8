"""TensorProto <-> tensors for the gRPC API, as TensorFlow's Tensor::FromProto, AsProtoField and AsProtoTensorContent.

Decoding is TensorFlow's own: ``tf.io.parse_tensor`` runs Tensor::FromProto on the proto, so the stand-in accepts
what the real server accepts (fewer typed values than the shape holds: the last one repeats; more: the first ones
count; none: zeros) and refuses what it refuses (a negative dimension, ``tensor_content`` of the wrong size,
DT_INVALID, a reference type). Encoding writes the typed ``*_val`` field (PredictResponse's default) or, with
``--enable_serialization_as_tensor_content``, the raw ``tensor_content``.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2, types_pb2

from .status import StatusError

# ProtoHelper<T> in tensor.cc: the repeated field each type's values go to.
_FIELDS = {
    types_pb2.DT_FLOAT: "float_val",
    types_pb2.DT_DOUBLE: "double_val",
    types_pb2.DT_INT32: "int_val",
    types_pb2.DT_UINT8: "int_val",
    types_pb2.DT_UINT16: "int_val",
    types_pb2.DT_INT16: "int_val",
    types_pb2.DT_INT8: "int_val",
    types_pb2.DT_INT64: "int64_val",
    types_pb2.DT_UINT32: "uint32_val",
    types_pb2.DT_UINT64: "uint64_val",
    types_pb2.DT_BOOL: "bool_val",
    types_pb2.DT_STRING: "string_val",
    types_pb2.DT_HALF: "half_val",  # the bits, as uint16
    types_pb2.DT_BFLOAT16: "half_val",
    types_pb2.DT_COMPLEX64: "scomplex_val",  # real and imaginary parts interleaved
    types_pb2.DT_COMPLEX128: "dcomplex_val",
}
_BITS = {types_pb2.DT_HALF: np.uint16, types_pb2.DT_BFLOAT16: np.uint16}
_PARTS = {types_pb2.DT_COMPLEX64: np.float32, types_pb2.DT_COMPLEX128: np.float64}


def from_proto(proto: tensor_pb2.TensorProto) -> tf.Tensor | None:
    """The tensor, or None where ``Tensor::FromProto`` returns false."""
    try:
        return tf.io.parse_tensor(proto.SerializeToString(), out_type=proto.dtype)
    except (tf.errors.OpError, TypeError, ValueError):  # TypeError, ValueError: no such DataType at all
        return None


def _varint32(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def to_proto(tensor: tf.Tensor, as_content: bool) -> tensor_pb2.TensorProto:
    """``AsProtoField`` or, when ``as_content``, ``AsProtoTensorContent``."""
    dtype = tensor.dtype.as_datatype_enum
    if dtype not in _FIELDS:
        raise StatusError(
            "UNIMPLEMENTED", f"the TF Serving stand-in does not serialize {types_pb2.DataType.Name(dtype)} outputs"
        )
    proto = tensor_pb2.TensorProto(dtype=dtype)
    for size in tensor.shape:
        proto.tensor_shape.dim.add(size=size)
    flat = tensor.numpy().ravel()
    if as_content and dtype == types_pb2.DT_STRING:  # port::EncodeStringList: every length, then every string
        proto.tensor_content = b"".join(_varint32(len(s)) for s in flat) + b"".join(flat)
    elif as_content:
        proto.tensor_content = flat.tobytes()
    else:
        flat = flat.view(_BITS[dtype]) if dtype in _BITS else flat.view(_PARTS[dtype]) if dtype in _PARTS else flat
        getattr(proto, _FIELDS[dtype]).extend(flat.tolist())
    return proto
