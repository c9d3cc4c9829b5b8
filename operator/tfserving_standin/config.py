"""The text-format config files the real server reads, parsed by protobuf itself against their real schemas.

``MonitoringConfig`` and ``BatchingParameters`` (tensorflow_serving/config/monitoring_config.proto,
servables/tensorflow/session_bundle_config.proto) are declared here field for field, so an unknown field or a
wrong type fails the way ``ParseProtoTextFile`` fails: ``Invalid protobuf file: '<file>'``.
"""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message, text_format, wrappers_pb2
from google.protobuf.message_factory import GetMessageClass

from .status import StatusError, invalid_argument

_F = descriptor_pb2.FieldDescriptorProto
_WRAPPERS = {"int64": ".google.protobuf.Int64Value", "string": ".google.protobuf.StringValue",
             "bool": ".google.protobuf.BoolValue"}  # fmt: skip


def _message(file: descriptor_pb2.FileDescriptorProto, name: str, fields: list[tuple[str, int, object]]) -> None:
    msg = file.message_type.add(name=name)
    for field_name, number, kind in fields:
        field = msg.field.add(name=field_name, number=number, label=_F.LABEL_OPTIONAL)
        if kind == "bool":
            field.type = _F.TYPE_BOOL
        elif kind == "string":
            field.type = _F.TYPE_STRING
        elif kind == "repeated int64":
            field.type, field.label = _F.TYPE_INT64, _F.LABEL_REPEATED
        else:  # a message type name
            field.type, field.type_name = _F.TYPE_MESSAGE, str(kind)


def _classes() -> dict[str, type[message.Message]]:
    pool = descriptor_pool.DescriptorPool()
    wrappers = descriptor_pb2.FileDescriptorProto()
    wrappers_pb2.DESCRIPTOR.CopyToProto(wrappers)
    pool.Add(wrappers)
    file = descriptor_pb2.FileDescriptorProto(
        name="tfserving_standin/config.proto",
        package="tensorflow.serving",
        syntax="proto3",
        dependency=[wrappers.name],
    )
    _message(file, "PrometheusConfig", [("enable", 1, "bool"), ("path", 2, "string")])
    _message(file, "MonitoringConfig", [("prometheus_config", 1, ".tensorflow.serving.PrometheusConfig")])
    _message(
        file,
        "BatchingParameters",
        [
            ("max_batch_size", 1, _WRAPPERS["int64"]),
            ("batch_timeout_micros", 2, _WRAPPERS["int64"]),
            ("max_enqueued_batches", 3, _WRAPPERS["int64"]),
            ("num_batch_threads", 4, _WRAPPERS["int64"]),
            ("thread_pool_name", 5, _WRAPPERS["string"]),
            ("allowed_batch_sizes", 6, "repeated int64"),
            ("pad_variable_length_inputs", 7, "bool"),
            ("enable_large_batch_splitting", 8, _WRAPPERS["bool"]),
            ("max_execution_batch_size", 9, _WRAPPERS["int64"]),
        ],
    )
    pool.Add(file)
    names = ("MonitoringConfig", "BatchingParameters")
    return {n: GetMessageClass(pool.FindMessageTypeByName(f"tensorflow.serving.{n}")) for n in names}


_CLASSES = _classes()


def parse_text_file(path: str, proto: message.Message) -> message.Message:
    """``ParseProtoTextFile``: the file must exist and hold a valid text-format message of that type."""
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except FileNotFoundError:
        raise StatusError("NOT_FOUND", f"{path}; No such file or directory") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise StatusError("FAILED_PRECONDITION", f"{path}; {exc}") from None
    try:
        text_format.Parse(text, proto)
    except text_format.ParseError:
        raise invalid_argument(f"Invalid protobuf file: '{path}'") from None
    return proto


def monitoring_path(path: str) -> str | None:
    """The Prometheus path the REST port serves, or None when the config leaves Prometheus off."""
    config = parse_text_file(path, _CLASSES["MonitoringConfig"]())
    if not config.prometheus_config.enable:
        return None
    return config.prometheus_config.path or "/monitoring/prometheus/metrics"


def check_batching_parameters(path: str) -> None:
    parse_text_file(path, _CLASSES["BatchingParameters"]())
