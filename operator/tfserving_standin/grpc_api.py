"""The gRPC port: ``tensorflow.serving.PredictionService`` and ``ModelService`` on grpcio, whose core is the gRPC
core the real server links, so channel arguments behave the same.

Built as ``Server::BuildAndStart`` builds it: ``0.0.0.0:<port>``, insecure, messages up to INT32_MAX bytes, then
each ``--grpc_channel_arguments`` key=value (after the size limits, as ServerBuilder orders them; a value that
absl::SimpleAtoi reads as an int32 is passed as an int, any other as a string), and ``--grpc_max_threads`` as the
handler pool's size (the real one's ResourceQuota thread limit). Predict, GetModelMetadata and GetModelStatus are
answered by core.py, as the REST API's are; Classify, Regress, MultiInference and HandleReloadConfigRequest are
refused with UNIMPLEMENTED; the profiler service is not there (grpcio answers UNIMPLEMENTED "Method not found!").
Predict, Classify and Regress count in ``:tensorflow:serving:request_count``, as prediction_service_impl.cc counts.

Where each error comes from (tensorflow/serving at 9d981c5c2708d23c5407c7c1e30309e6f9798874, paths under
tensorflow_serving/; TensorFlow's tensorflow/cc/saved_model/util.cc at 23b4afc8646550d13671859ffa3c9979b33a34b8):

=====================================  ==============================================================================
source                                 code: message
=====================================  ==============================================================================
servables/tensorflow/predict_impl.cc,  INVALID_ARGUMENT: Missing ModelSpec
get_model_metadata_impl.cc,
model_servers/get_model_status_impl.cc
model_servers/server_core.cc           INVALID_ARGUMENT: ModelSpec has no name specified.
                                       INVALID_ARGUMENT: Unrecognized servable version label: <label>
core/basic_manager.cc, core/manager.h  NOT_FOUND: Servable not found for request: Latest(<m>) | Specific(<m>, <v>)
model_servers/get_model_status_impl.cc NOT_FOUND: Could not find any versions of model <m>
                                       NOT_FOUND: Could not find version <v> of model <m>
servables/tensorflow/predict_util.cc   FAILED_PRECONDITION: Serving signature key "<s>" not found.
                                       INVALID_ARGUMENT: input size does not match signature: <n>!=<n> len({...}) ...
                                       INVALID_ARGUMENT: output tensor alias not found in signature: <a> Outputs ...
                                       INVALID_ARGUMENT: duplicate output tensor alias: <a>
TensorFlow's util.cc, GetInputValues   INVALID_ARGUMENT: Signature input alias: <a>(feed name: <f>) not found ...
                                       INVALID_ARGUMENT: Inputs contains invalid name. ...
                                       INVALID_ARGUMENT: tensor parsing error: <a>
servables/tensorflow/                  INVALID_ARGUMENT: GetModelMetadataRequest must specify at least one ...
get_model_metadata_impl.cc             INVALID_ARGUMENT: Metadata field <f> is not supported
model_servers/grpc_status_util.cc      any message over 1024 characters is cut and "...TRUNCATED" added
(the graph refuses a dtype or shape)   TensorFlow's own code (INVALID_ARGUMENT) with the words of the stand-in's
                                       tf.function runtime, not those of the real server's session
=====================================  ==============================================================================
"""

from __future__ import annotations

import re
from collections.abc import Callable
from concurrent import futures
from functools import partial
from typing import Any, TypeVar

import grpc
from tensorflow.core.protobuf import error_codes_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
    status_pb2,
)

from .core import SIGNATURE_DEF, Core, ModelSpec
from .flags import Options
from .metrics import Metrics
from .status import StatusError, invalid_argument
from .tensor_proto import from_proto, to_proto

INT32_MAX = 2**31 - 1
_MESSAGE_LIMIT = 1024  # ToGRPCStatus's kErrorMessageLimit
_SIMPLE_ATOI = re.compile(r"[ \t\n\v\f\r]*[+-]?[0-9]+[ \t\n\v\f\r]*")
Reply = TypeVar("Reply")


def channel_arguments(text: str) -> list[tuple[str, int | str]]:
    """parseGrpcChannelArgs: split at ',' then at '=' (tensorflow::str_util::Split: empty text, no parts)."""
    arguments: list[tuple[str, int | str]] = []
    for item in text.split(",") if text else []:
        key_value = item.split("=") if item else []
        if len(key_value) < 2:  # the real server indexes past the end of its list: undefined behaviour
            raise invalid_argument(
                f"--grpc_channel_arguments: {item!r} is not key=value; the TF Serving stand-in refuses it"
            )
        key, value = key_value[0], key_value[1]  # as the real one, "a=b=c" is a=b
        is_int32 = _SIMPLE_ATOI.fullmatch(value) is not None and -(2**31) <= int(value) <= INT32_MAX
        arguments.append((key, int(value) if is_int32 else value))
    return arguments


def _answer(context: grpc.ServicerContext, work: Callable[[], Reply], count: Callable[[str], None] | None) -> Reply:
    """Run one RPC; a StatusError ends it with its code and message as ToGRPCStatus passes them on."""
    try:
        reply = work()
    except StatusError as error:
        if count is not None:
            count(error.code)
        message = error.message
        if len(message) > _MESSAGE_LIMIT:
            message = message[:_MESSAGE_LIMIT] + "...TRUNCATED"
        context.abort(grpc.StatusCode[error.code], message)
    if count is not None:
        count("OK")
    return reply


def _unimplemented(rpc: str) -> Callable[[], Any]:
    def refuse() -> Any:
        raise StatusError("UNIMPLEMENTED", f"{rpc} is not implemented by the TF Serving stand-in")

    return refuse


def _spec(request: Any) -> ModelSpec:
    """The request's model_spec, which Predict, GetModelMetadata and GetModelStatus all require."""
    if not request.HasField("model_spec"):
        raise invalid_argument("Missing ModelSpec")
    spec: model_pb2.ModelSpec = request.model_spec
    choice = spec.WhichOneof("version_choice")
    return ModelSpec(
        spec.name,
        spec.version.value if choice == "version" else None,
        spec.version_label if choice == "version_label" else None,
        spec.signature_name,
    )


class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, core: Core, metrics: Metrics, as_content: bool) -> None:
        self.core = core
        self.metrics = metrics
        self.as_content = as_content  # --enable_serialization_as_tensor_content

    def _count(self, request: Any) -> Callable[[str], None]:
        return partial(self.metrics.request, request.model_spec.name)

    def Predict(self, request: predict_pb2.PredictRequest, context: grpc.ServicerContext) -> Any:
        return _answer(context, partial(self._predict, request), self._count(request))

    def GetModelMetadata(
        self, request: get_model_metadata_pb2.GetModelMetadataRequest, context: grpc.ServicerContext
    ) -> Any:
        return _answer(context, partial(self._metadata, request), None)

    def Classify(self, request: Any, context: grpc.ServicerContext) -> Any:
        return _answer(context, _unimplemented("Classify"), self._count(request))

    def Regress(self, request: Any, context: grpc.ServicerContext) -> Any:
        return _answer(context, _unimplemented("Regress"), self._count(request))

    def MultiInference(self, request: Any, context: grpc.ServicerContext) -> Any:
        return _answer(context, _unimplemented("MultiInference"), None)

    def _predict(self, request: predict_pb2.PredictRequest) -> predict_pb2.PredictResponse:
        result = self.core.predict(_spec(request), request.inputs, from_proto, request.output_filter)
        response = predict_pb2.PredictResponse()
        response.model_spec.name = request.model_spec.name  # MakeModelSpec
        response.model_spec.signature_name = result.signature_name
        response.model_spec.version.value = result.version
        for alias, tensor in result.outputs.items():
            response.outputs[alias].CopyFrom(to_proto(tensor, self.as_content))
        return response

    def _metadata(
        self, request: get_model_metadata_pb2.GetModelMetadataRequest
    ) -> get_model_metadata_pb2.GetModelMetadataResponse:
        spec = _spec(request)
        model = self.core.metadata(spec, list(request.metadata_field))
        signatures = get_model_metadata_pb2.SignatureDefMap()
        for key, signature in model.signature_defs.items():
            signatures.signature_def[key].CopyFrom(signature)
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = spec.name
        response.model_spec.version.value = model.version
        response.metadata[SIGNATURE_DEF].Pack(signatures)
        return response


class ModelService(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, core: Core) -> None:
        self.core = core

    def GetModelStatus(self, request: get_model_status_pb2.GetModelStatusRequest, context: grpc.ServicerContext) -> Any:
        return _answer(context, partial(self._status, request), None)

    def HandleReloadConfigRequest(self, request: Any, context: grpc.ServicerContext) -> Any:
        return _answer(context, _unimplemented("HandleReloadConfigRequest"), None)

    def _status(
        self, request: get_model_status_pb2.GetModelStatusRequest
    ) -> get_model_status_pb2.GetModelStatusResponse:
        response = get_model_status_pb2.GetModelStatusResponse()
        for version, state in self.core.statuses(_spec(request)):
            error = state.error
            response.model_version_status.add(
                version=version,
                state=get_model_status_pb2.ModelVersionStatus.State.Value(state.state),
                status=status_pb2.StatusProto(  # ToStatusProto: set even when OK, with no message then
                    error_code=error_codes_pb2.Code.Value(error.code if error else "OK"),
                    error_message=error.message if error else "",
                ),
            )
        return response


def serve(options: Options, core: Core, metrics: Metrics) -> grpc.Server:
    """The started server; the caller keeps it (grpcio stops a server that is garbage collected)."""
    if options.grpc_max_threads < 1:
        raise invalid_argument("--grpc_max_threads must be at least 1 for the TF Serving stand-in")
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=options.grpc_max_threads, thread_name_prefix="grpc"),
        options=[
            ("grpc.max_receive_message_length", INT32_MAX),
            ("grpc.max_send_message_length", INT32_MAX),
            *channel_arguments(options.grpc_channel_arguments),
        ],
    )
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelService(core), server)
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
        PredictionService(core, metrics, options.enable_serialization_as_tensor_content), server
    )
    try:
        bound = server.add_insecure_port(f"0.0.0.0:{options.port}")
    except RuntimeError:  # newer grpcio raises where older ones return 0
        bound = 0
    if not bound:
        raise invalid_argument("Failed to BuildAndStart gRPC server")
    server.start()
    return server
