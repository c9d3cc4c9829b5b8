"""What the REST and gRPC APIs share, as the real server shares it: ServerCore's model lookup, the predictor
(predict_util.cc's RunPredict), GetModelStatusImpl and GetModelMetadataImpl.

Each API turns its own request into a ``ModelSpec`` and its inputs, calls in here, and writes the answer its own
way; the checks and their error texts are made once, here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import tensorflow as tf
from tensorflow.core.protobuf import error_codes_pb2, meta_graph_pb2

from .loader import LoadedModel
from .manager import Servable, VersionState
from .status import StatusError, invalid_argument, not_found
from .tensor_proto import from_proto

DEFAULT_SIGNATURE = "serving_default"  # kDefaultServingSignatureDefKey
SIGNATURE_DEF = "signature_def"  # GetModelMetadataImpl::kSignatureDef, the one metadata field there is
Value = TypeVar("Value")  # one input as the API carries it: a TensorProto (gRPC), an array (REST)


@dataclass(frozen=True)
class ModelSpec:
    """model.proto's ModelSpec: ``version`` and ``label`` are the oneof version_choice (at most one is set)."""

    name: str
    version: int | None = None
    label: str | None = None
    signature_name: str = ""


@dataclass(frozen=True)
class Prediction:
    version: int
    signature_name: str
    outputs: dict[str, tf.Tensor]  # output alias -> tensor, in the order the aliases were asked for


def _keys(keys: Any) -> str:
    """absl::StrJoin of a std::set<string>: sorted, comma-separated."""
    return ",".join(sorted(keys))


class Core:
    def __init__(self, servable: Servable) -> None:
        self.servable = servable

    def model(self, spec: ModelSpec) -> LoadedModel:
        """ServerCore::GetServableHandle: ServableRequestFromModelSpec, then the manager's lookup."""
        if not spec.name:
            raise invalid_argument("ModelSpec has no name specified.")
        if spec.label is not None:
            # No --model_config_file, so no model has labels: GetModelVersionForLabel knows none.
            raise invalid_argument(f"Unrecognized servable version label: {spec.label}")
        model = self.servable.model(spec.version) if spec.name == self.servable.name else None
        if model is None:
            request = f"Latest({spec.name})" if spec.version is None else f"Specific({spec.name}, {spec.version})"
            raise not_found(f"Servable not found for request: {request}")
        return model

    def statuses(self, spec: ModelSpec) -> list[tuple[int, VersionState]]:
        """GetModelStatusWithModelSpec: the state monitor's versions, highest first (its VersionMap order)."""
        states = self.servable.states() if spec.name == self.servable.name else {}
        if spec.version is not None:
            if spec.version not in states:
                raise not_found(f"Could not find version {spec.version} of model {spec.name}")
            return [(spec.version, states[spec.version])]
        if not states:
            raise not_found(f"Could not find any versions of model {spec.name}")
        return sorted(states.items(), reverse=True)

    def metadata(self, spec: ModelSpec, fields: Sequence[str]) -> LoadedModel:
        """GetModelMetadataWithModelSpec: the fields are checked before the model is looked up."""
        if not fields:
            raise invalid_argument("GetModelMetadataRequest must specify at least one metadata_field")
        for field in fields:
            if field != SIGNATURE_DEF:
                raise invalid_argument(f"Metadata field {field} is not supported")
        return self.model(spec)

    def input_map(self, spec: ModelSpec) -> Mapping[str, meta_graph_pb2.TensorInfo]:
        """HttpRestApiHandler::GetInfoMap: the REST API reads the inputs' types before it parses the JSON."""
        model = self.model(spec)
        name = spec.signature_name or DEFAULT_SIGNATURE
        if name not in model.signature_defs:
            raise invalid_argument(f'Serving signature name: "{name}" not found in signature def')
        return model.signature_defs[name].inputs

    def predict(
        self,
        spec: ModelSpec,
        inputs: Mapping[str, Value],
        decode: Callable[[Value], tf.Tensor | None],
        output_filter: Sequence[str] = (),
    ) -> Prediction:
        """TensorflowPredictor::Predict and internal::RunPredict; ``decode`` is Tensor::FromProto (None: failed)."""
        model = self.model(spec)
        name = spec.signature_name or DEFAULT_SIGNATURE
        # The loaded object's functions come from the same signature defs; a def TensorFlow could not make a
        # function of is as absent to the stand-in as an unknown key.
        if name not in model.signature_defs or name not in model.signatures:
            raise StatusError("FAILED_PRECONDITION", f'Serving signature key "{name}" not found.')
        signature = model.signature_defs[name]
        feeds = self._input_values(signature, inputs, decode)
        aliases = self._output_aliases(signature, output_filter)
        try:
            outputs = model.signatures[name](**feeds)
        except tf.errors.OpError as exc:
            # A dtype or shape the graph refuses: the real server returns its session's error; this is the stand-in
            # tf.function runtime's, with the same code (INVALID_ARGUMENT) but not the same words.
            raise StatusError(error_codes_pb2.Code.Name(exc.error_code), exc.message.strip()) from None
        except (TypeError, ValueError) as exc:  # the stand-in's Python binding refused the feeds
            raise invalid_argument(str(exc).strip()) from None
        return Prediction(model.version, name, {alias: outputs[alias] for alias in aliases})

    @staticmethod
    def _input_values(
        signature: meta_graph_pb2.SignatureDef, inputs: Mapping[str, Value], decode: Callable[[Value], tf.Tensor | None]
    ) -> dict[str, tf.Tensor]:
        """VerifyRequestInputsSize (predict_util.cc), then saved_model::GetInputValues (TensorFlow's util.cc).

        The real loop walks the signature's proto map in its hash order; here it is sorted, which only matters
        when several inputs are wrong at once.
        """
        wanted, sent = set(signature.inputs), set(inputs)
        if len(sent) > len(wanted) or (len(sent) < len(wanted) and not signature.defaults):
            raise invalid_argument(
                f"input size does not match signature: {len(sent)}!={len(wanted)} len({{{_keys(sent)}}}) != "
                f"len({{{_keys(wanted)}}}). Sent extra: {{{_keys(sent - wanted)}}}. "
                f"Missing but required: {{{_keys(wanted - sent)}}}."
            )
        feeds: dict[str, tf.Tensor] = {}
        for alias in sorted(wanted):
            if alias in inputs:
                tensor = decode(inputs[alias])
            elif alias in signature.defaults:
                tensor = from_proto(signature.defaults[alias])
            else:
                raise invalid_argument(
                    f"Signature input alias: {alias}(feed name: {signature.inputs[alias].name}) not found in request "
                    f"and no default value provided. Inputs expected to be in the request {{{_keys(sent)}}}, or "
                    f"default input alias set: {_keys(signature.defaults)}"
                )
            if tensor is None:
                raise invalid_argument(f"tensor parsing error: {alias}")
            feeds[alias] = tensor
        if sent and not sent <= wanted:
            raise invalid_argument(
                f"Inputs contains invalid name. Used request inputs: {_keys(sent & wanted)}, "
                f"request input: {_keys(sent)}"
            )
        return feeds

    @staticmethod
    def _output_aliases(signature: meta_graph_pb2.SignatureDef, output_filter: Sequence[str]) -> list[str]:
        """PreProcessPrediction's run targets: the filter's aliases, each once, or every output."""
        seen: list[str] = []
        for alias in output_filter:
            if alias not in signature.outputs:
                raise invalid_argument(
                    f"output tensor alias not found in signature: {alias} Outputs expected to be in the set "
                    f"{{{_keys(signature.outputs)}}}."
                )
            if alias in seen:
                raise invalid_argument(f"duplicate output tensor alias: {alias}")
            seen.append(alias)
        return seen or list(signature.outputs)
