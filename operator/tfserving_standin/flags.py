"""The real server's command line, parsed the way ``tensorflow::Flags::Parse`` parses it.

Each argument is ``--name=value`` (a bool flag also accepts ``--name`` alone). A known flag with a malformed value
makes the parse fail: the caller prints the usage and exits -1, as ``main.cc`` does. Anything else is left over,
in order, after a ``--`` everything is; the first left-over is reported as ``unknown argument`` and ignored.

Stricter than the real parser on purpose: integers out of their type's range are refused (``sscanf`` would wrap or
saturate them), and floats must be decimal (no hexadecimal floats).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

from . import log

_INT = re.compile(r"\s*[+-]?\d+")
_FLOAT = re.compile(r"\s*[+-]?(?:(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|inf(?:inity)?|nan)", re.IGNORECASE)
_RANGES = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}
_CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass(frozen=True)
class Flag:
    name: str
    type: str  # int32, int64, bool, string, float: the C++ type of the Options field
    default: Any
    help: str


# main.cc's flag list, in its order, with server.h's defaults.
FLAGS = [
    Flag("port", "int32", 8500, "TCP port to listen on for gRPC/HTTP API. Disabled if port set to zero."),
    Flag("grpc_socket_path", "string", "", "If non-empty, listen to a UNIX socket for gRPC API on the given path."),
    Flag(
        "rest_api_port",
        "int32",
        0,
        "Port to listen on for HTTP/REST API. If set to zero HTTP/REST API will not "
        "be exported. This port must be different than the one specified in --port.",
    ),
    Flag("rest_api_num_threads", "int32", 4 * _CPUS, "Number of threads for HTTP/REST API processing."),
    Flag("rest_api_timeout_in_ms", "int32", 30000, "Timeout for HTTP/REST API calls."),
    Flag("rest_api_enable_cors_support", "bool", False, "Enable CORS headers in response"),
    Flag("enable_batching", "bool", False, "enable batching"),
    Flag(
        "allow_version_labels_for_unavailable_models",
        "bool",
        False,
        "If true, allows assigning unused version labels to models that are not available yet.",
    ),
    Flag(
        "batching_parameters_file",
        "string",
        "",
        "If non-empty, read an ascii BatchingParameters protobuf from "
        "the supplied file name and use the contained values instead of the defaults.",
    ),
    Flag(
        "enable_per_model_batching_parameters",
        "bool",
        False,
        "Enables model specific batching params read from `batching_params.pbtxt` in the SavedModel dir.",
    ),
    Flag(
        "model_config_file",
        "string",
        "",
        "If non-empty, read an ascii ModelServerConfig protobuf from the "
        "supplied file name, and serve the models in that file.",
    ),
    Flag(
        "model_config_file_poll_wait_seconds",
        "int32",
        0,
        "Interval in seconds between each poll of the filesystem for model_config_file.",
    ),
    Flag("model_name", "string", "default", "name of model (ignored if --model_config_file flag is set)"),
    Flag(
        "model_base_path",
        "string",
        "",
        "path to export (ignored if --model_config_file flag is set, otherwise required)",
    ),
    Flag("num_load_threads", "int32", 0, "The number of threads in the thread-pool used to load servables."),
    Flag("num_unload_threads", "int32", 0, "The number of threads in the thread-pool used to unload servables."),
    Flag(
        "max_num_load_retries",
        "int32",
        5,
        "maximum number of times it retries loading a model after the first "
        "failure, before giving up. If set to 0, a load is attempted only once. Default: 5",
    ),
    Flag(
        "load_retry_interval_micros",
        "int64",
        60_000_000,
        "The interval, in microseconds, between each servable "
        "load retry. If set negative, it doesn't wait. Default: 1 minute",
    ),
    Flag(
        "file_system_poll_wait_seconds",
        "int32",
        1,
        "Interval in seconds between each poll of the filesystem for "
        "new model version. If set to zero poll will be exactly done once and not periodically. Setting this to "
        "negative value will disable polling entirely causing ModelServer to indefinitely wait for a new model "
        "at startup.",
    ),
    Flag(
        "flush_filesystem_caches",
        "bool",
        True,
        "If true (the default), filesystem caches will be flushed after the initial load of all servables.",
    ),
    Flag(
        "tensorflow_session_parallelism",
        "int64",
        0,
        "Number of threads to use for running a Tensorflow session. Auto-configured by default.",
    ),
    Flag(
        "tensorflow_session_config_file",
        "string",
        "",
        "If non-empty, read an ascii TensorFlow Session ConfigProto protobuf from the supplied file name.",
    ),
    Flag(
        "tensorflow_intra_op_parallelism",
        "int64",
        0,
        "Number of threads to use to parallelize the execution of an individual op. Auto-configured by default.",
    ),
    Flag(
        "tensorflow_inter_op_parallelism",
        "int64",
        0,
        "Controls the number of operators that can be executed simultaneously. Auto-configured by default.",
    ),
    Flag("use_alts_credentials", "bool", False, "Use Google ALTS credentials"),
    Flag(
        "ssl_config_file",
        "string",
        "",
        "If non-empty, read an ascii SSLConfig protobuf from the supplied file name and set up a secure gRPC channel",
    ),
    Flag(
        "platform_config_file",
        "string",
        "",
        "If non-empty, read an ascii PlatformConfigMap protobuf from the "
        "supplied file name, and use that platform config instead of the Tensorflow platform.",
    ),
    Flag(
        "per_process_gpu_memory_fraction",
        "float",
        0.0,
        "Fraction that each process occupies of the GPU memory space the value is between 0.0 and 1.0",
    ),
    Flag(
        "saved_model_tags",
        "string",
        "serve",
        "Comma-separated set of tags corresponding to the meta graph def to load from SavedModel.",
    ),
    Flag(
        "grpc_channel_arguments", "string", "", "A comma separated list of arguments to be passed to the grpc server."
    ),
    Flag("grpc_max_threads", "int32", 4 * _CPUS, "Max grpc server threads to handle grpc messages."),
    Flag(
        "enable_model_warmup",
        "bool",
        True,
        "Enables model warmup, which triggers lazy initializations (such as "
        "TF optimizations) at load time, to reduce first request latency.",
    ),
    Flag(
        "num_request_iterations_for_warmup",
        "int32",
        0,
        "Number of times a request is iterated during warmup replay. This value is used only if > 0.",
    ),
    Flag("version", "bool", False, "Display version"),
    Flag(
        "monitoring_config_file",
        "string",
        "",
        "If non-empty, read an ascii MonitoringConfig protobuf from the supplied file name",
    ),
    Flag(
        "remove_unused_fields_from_bundle_metagraph",
        "bool",
        True,
        "Removes unused fields from MetaGraphDef proto message to save memory.",
    ),
    Flag(
        "prefer_tflite_model",
        "bool",
        False,
        "EXPERIMENTAL; CAN BE REMOVED ANYTIME! Prefer TensorFlow Lite model "
        "from `model.tflite` file in SavedModel directory.",
    ),
    Flag(
        "num_tflite_pools",
        "int32",
        _CPUS,
        "EXPERIMENTAL; CAN BE REMOVED ANYTIME! Number of TFLite interpreters in an interpreter pool.",
    ),
    Flag(
        "num_tflite_interpreters_per_pool",
        "int32",
        1,
        "EXPERIMENTAL; CAN BE REMOVED ANYTIME! Number of TFLite interpreters in an interpreter pool.",
    ),
    Flag("enable_signature_method_name_check", "bool", False, "Enable method_name check for SignatureDef."),
    Flag(
        "xla_cpu_compilation_enabled",
        "bool",
        False,
        "EXPERIMENTAL; CAN BE REMOVED ANYTIME! Enable XLA:CPU JIT (default is disabled).",
    ),
    Flag(
        "xla_gpu_compilation_enabled",
        "bool",
        False,
        "EXPERIMENTAL; CAN BE REMOVED ANYTIME! Enable both XLA:CPU JIT and XLA:GPU JIT (default is disabled).",
    ),
    Flag("enable_profiler", "bool", True, "Enable profiler service."),
    Flag(
        "thread_pool_factory_config_file",
        "string",
        "",
        "If non-empty, read an ascii ThreadPoolConfig protobuf from the supplied file name.",
    ),
    Flag("mixed_precision", "string", "", "specify mixed_precision mode"),
    Flag("skip_initialize_tpu", "bool", False, "Whether to skip auto initializing TPU."),
    Flag("enable_grpc_healthcheck_service", "bool", False, "Enable the standard gRPC healthcheck service."),
    Flag(
        "enable_serialization_as_tensor_content",
        "bool",
        False,
        "Enable serialization of predict response as tensor content.",
    ),
]


class Options(dict):
    """Flag values by name, defaults filled in; attribute access for readability."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _value(flag: Flag, text: str) -> Any:
    """The parsed value, or None when malformed (the real parser logs why)."""
    if flag.type == "string":
        return text
    if flag.type in _RANGES:
        low, high = _RANGES[flag.type]
        return int(text) if _INT.fullmatch(text) and low <= int(text) <= high else None
    if flag.type == "float":
        return float(text.strip()) if _FLOAT.fullmatch(text) else None
    lowered = text.lower()
    return True if lowered in ("true", "1") else False if lowered in ("false", "0") else None


def _match(flag: Flag, arg: str) -> tuple[bool, Any]:
    """(found, value): ``found`` with value None means a known flag with a malformed value."""
    prefix = f"--{flag.name}"
    if not arg.startswith(prefix):
        return False, None
    rest = arg[len(prefix) :]
    if flag.type == "bool" and rest == "":
        return True, True
    if not rest.startswith("="):
        return False, None
    value = _value(flag, rest[1:])
    if value is None:
        log.error(
            "tensorflow/core/util/command_line_flags.cc", f"Couldn't interpret value {rest[1:]} for flag {flag.name}."
        )
    return True, value


def parse(args: list[str]) -> tuple[Options | None, list[str]]:
    """(options or None when a value was malformed, the arguments left over)."""
    options = Options({f.name: f.default for f in FLAGS})
    ok, unknown = True, []
    for i, arg in enumerate(args):
        if arg == "--":
            unknown.extend(args[i:])
            break
        for flag in FLAGS:
            found, value = _match(flag, arg)
            if found:
                if value is None:
                    ok = False
                else:
                    options[flag.name] = value
                break
        else:
            unknown.append(arg)
    if unknown[:1] == ["--help"]:
        ok = False
    return (options if ok else None), unknown


def _display(flag: Flag) -> str:
    if flag.type == "bool":
        return "true" if flag.default else "false"
    if flag.type == "string":
        return f'"{flag.default}"'
    if flag.type == "float":
        return f"{flag.default:f}"
    return str(flag.default)


def usage(prog: str) -> str:
    """``tensorflow::Flags::Usage``: one tab-separated line per flag with its default and type."""
    lines = [f"usage: {prog}", "Flags:"]
    lines += [f"\t{f'--{f.name}={_display(f)}':<33}\t{f.type}\t{f.help}" for f in FLAGS]
    return "\n".join(lines) + "\n"
