"""``main`` and ``Server::BuildAndStart`` of the real model server, in the same order.

The model loads first; only then are the gRPC and REST ports opened (a pod is never Ready, nor live, before its
model is). A model that ends unavailable makes start-up fail with the real words and exit status 255. Both ports
answer from the same core (core.py): the gRPC API in grpc_api.py, the REST API in rest.py.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
from importlib import metadata
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from . import flags, log
from .flags import Options
from .status import StatusError, invalid_argument

if TYPE_CHECKING:
    import grpc

SERVER = "tensorflow_serving/model_servers/server.cc"
CORE = "tensorflow_serving/model_servers/server_core.cc"
PROG_ENV = "TFSERVING_STANDIN_PROG"  # the name the image's wrapper scripts were called by, for the usage line
EXIT_FAILURE = 255  # main returns -1
# Options the operator never passes and the stand-in does not emulate: refused rather than silently ignored.
UNSUPPORTED = (
    "model_config_file",
    "platform_config_file",
    "ssl_config_file",
    "use_alts_credentials",
    "grpc_socket_path",
    "thread_pool_factory_config_file",
    "enable_grpc_healthcheck_service",
)


def workdir() -> Path:
    """Where this process puts the CPU copies of its models: TMPDIR, the pod's only writable place."""
    return Path(tempfile.gettempdir()) / f"tfserving-standin-{os.getpid()}"


def _terminate(signum: int, frame: FrameType | None) -> None:
    """Remove the model copies, then die of the signal as the real server does (it installs no handler)."""
    shutil.rmtree(workdir(), ignore_errors=True)
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _check(options: Options) -> None:
    if options.port == 0 and not options.grpc_socket_path:
        raise invalid_argument(
            "At least one of server_options.grpc_port or server_options.grpc_socket_path must be set."
        )
    if options.use_alts_credentials and options.ssl_config_file:
        raise invalid_argument("Either use_alts_credentials must be false or ssl_config_file must be empty.")
    if not options.model_base_path and not options.model_config_file:
        raise invalid_argument("Both server_options.model_base_path and server_options.model_config_file are empty!")
    for name in UNSUPPORTED:
        if options[name]:
            raise StatusError(
                "UNIMPLEMENTED",
                f"--{name} is not supported by the TF Serving stand-in (test equipment): it serves one model given "
                "by --model_name and --model_base_path, over insecure TCP",
            )
    if options.enable_batching:
        if options.batching_parameters_file:
            from .config import check_batching_parameters

            check_batching_parameters(options.batching_parameters_file)
    elif options.batching_parameters_file:
        raise invalid_argument(
            "server_options.batching_parameters_file is set without setting server_options.enable_batching to true."
        )
    parallelism = (
        options.tensorflow_intra_op_parallelism,
        options.tensorflow_inter_op_parallelism,
        options.tensorflow_session_parallelism,
    )
    if all(p > 0 for p in parallelism):
        raise invalid_argument(
            "Either configure server_options.tensorflow_session_parallelism or "
            "(server_options.tensorflow_intra_op_parallelism, server_options.tensorflow_inter_op_parallelism) "
            "separately. You cannot configure all."
        )


def build_and_start(options: Options) -> grpc.Server:
    """The running gRPC server, for ``main`` to wait on as the real one waits on it."""
    _check(options)
    log.info(
        SERVER,
        "Building single TensorFlow model file config:  "
        f"model_name: {options.model_name} model_base_path: {options.model_base_path}",
    )
    from .config import monitoring_path, parse_text_file  # TensorFlow loads here, after the cheap checks
    from .core import Core
    from .grpc_api import serve
    from .manager import Servable
    from .metrics import Metrics
    from .rest import Api, RestServer

    if options.tensorflow_session_config_file:
        from tensorflow.core.protobuf import config_pb2

        parse_text_file(options.tensorflow_session_config_file, config_pb2.ConfigProto())
    metrics = Metrics()
    workdir().mkdir(exist_ok=True)
    servable = Servable(options, metrics, workdir())
    log.info(CORE, "Adding/updating models.")
    log.info(CORE, f" (Re-)adding model: {options.model_name}")
    threading.Thread(target=servable.run, name="file_system_poll", daemon=True).start()
    while not servable.settled.wait(0.5):  # no time limit, as the real one; signals are handled meanwhile
        pass
    if servable.startup_error is not None:
        raise servable.startup_error
    log.info(CORE, "Finished adding/updating models")
    core = Core(servable)
    grpc_server = serve(options, core, metrics)
    log.info(SERVER, f"Running gRPC ModelServer at 0.0.0.0:{options.port} ...")
    if options.rest_api_port == 0:
        return grpc_server
    if options.rest_api_port == options.port:
        log.error(
            SERVER,
            "server_options.http_port cannot be same as grpc_port. Please use a different port for HTTP/REST API. "
            "Skipped exporting HTTP/REST API.",
        )
        return grpc_server
    address = f"localhost:{options.rest_api_port}"
    path = monitoring_path(options.monitoring_config_file) if options.monitoring_config_file else None
    try:
        RestServer(options.rest_api_port, Api(core), metrics, path, options.rest_api_enable_cors_support)
    except OSError:
        log.error(SERVER, f"Failed to start HTTP Server at {address}")
        return grpc_server
    log.info(SERVER, f"Exporting HTTP/REST API at:{address} ...")
    return grpc_server


def _version() -> str:
    for dist in ("tensorflow-cpu", "tensorflow"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return "unknown"


def main(argv: list[str]) -> int:
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _terminate)
    usage = flags.usage(os.environ.get(PROG_ENV) or "tensorflow_model_server")
    options, unknown = flags.parse(argv[1:])
    if options is None:
        log.stdout(usage)
        return EXIT_FAILURE
    if options.version:
        log.stdout(f"TensorFlow ModelServer: 0.0.0-standin\nTensorFlow Library: {_version()}\n")
        return 0
    if unknown:
        log.stdout(f"unknown argument: {unknown[0]}\n{usage}")
    try:
        grpc_server = build_and_start(options)
    except StatusError as exc:
        log.stdout(f"Failed to start server. Error: {exc}\n")
        shutil.rmtree(workdir(), ignore_errors=True)
        return EXIT_FAILURE
    grpc_server.wait_for_termination()  # until a signal ends the process: no GOAWAY, the real one has no handler
    return 0
