"""The TF Serving stand-in, run as the serving pods run it: a process with flags, env and a base path.

Models are real TensorFlow SavedModels shaped like Neuron-compiled ones (neuron_modelgen), tagged by the rewrite.
Every wait polls for evidence (an HTTP answer, a log line, an exit) against a deadline. The gRPC tests share one
stand-in process; their clients are TF Serving's own stubs (tensorflow-serving-api).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import wrappers_pb2
from tensorflow.core.framework import tensor_pb2, types_pb2
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    inference_pb2,
    model_management_pb2,
    model_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
    regression_pb2,
)

from localcluster.pytest_plugin import wait_for
from neuron_modelgen import Options, build_base_path, deneuronized_copy, run_serving_default, sample_input
from neuron_rewrite import rewrite_model

STARTUP = 120.0  # seconds: importing TensorFlow on a busy 2-core machine
NAME = "m"
FAILED = (
    "Failed to start server. Error: UNKNOWN: 1 model(s) did not become available: {{name: m version: 1} due to error: "
)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("standin-models")
    raw = build_base_path(root / "raw", [1])
    built = {
        "untagged": raw,
        "cores2": rewrite_model(raw, root / "cores2", 2).output,
        "cores4": rewrite_model(raw, root / "cores4", 4).output,
        "plain": build_base_path(root / "plain", [1], Options(neuron=False)),
        "pipelined": build_base_path(root / "pipelined", [1], Options(pipeline=2)),
    }
    (root / "no_saved_model" / "1").mkdir(parents=True)
    built["no_saved_model"] = root / "no_saved_model"
    return {key: Path(value) for key, value in built.items()}


@pytest.fixture(scope="module")
def expected(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    """What plain TensorFlow computes with the NeuronOps inlined: the numbers the stand-in must serve."""
    cpu = deneuronized_copy(models["cores2"] / "1", tmp_path_factory.mktemp("cpu") / "model")
    return run_serving_default(cpu, sample_input())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def is_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


class Standin:
    """One stand-in process with its own ports, TMPDIR and log files."""

    def __init__(self, tmp_path: Path, base_path: Path, *args: str, cores: str | None = "0-1") -> None:
        self.grpc, self.rest = free_port(), free_port()
        self.tmp = tmp_path / "tmp"
        self.tmp.mkdir(exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k != "NEURON_RT_VISIBLE_CORES"} | {"TMPDIR": str(self.tmp)}
        if cores is not None:
            env["NEURON_RT_VISIBLE_CORES"] = cores
        self.out, self.err = tmp_path / "stdout", tmp_path / "stderr"
        argv = [f"--port={self.grpc}", f"--rest_api_port={self.rest}", f"--model_name={NAME}"]
        argv = [sys.executable, "-m", "tfserving_standin", *argv, f"--model_base_path={base_path}", *args]
        with self.out.open("wb") as out, self.err.open("wb") as err:
            self.process = subprocess.Popen(argv, stdout=out, stderr=err, env=env)

    def output(self) -> str:
        return self.out.read_text() + self.err.read_text()

    def wait_exit(self, timeout: float = STARTUP) -> int:
        return self.process.wait(timeout)

    def request(self, path: str, body: Any = None) -> tuple[int, str]:
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        request = urllib.request.Request(f"http://127.0.0.1:{self.rest}{path}", data=data)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def status(self) -> dict[str, Any] | None:
        if not is_open(self.rest):
            return None
        code, body = self.request(f"/v1/models/{NAME}")
        return json.loads(body) if code == 200 else None

    def wait_available(self) -> None:
        wait_for(lambda: self.status() or self.process.poll() is not None, STARTUP, "the REST port to answer")
        assert self.process.poll() is None, self.output()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(30)


@pytest.fixture
def run(tmp_path: Path) -> Iterator[Callable[..., Standin]]:
    started: list[Standin] = []

    def start(base_path: Path, *args: str, cores: str | None = "0-1") -> Standin:
        directory = tmp_path / f"standin{len(started)}"
        directory.mkdir()
        started.append(Standin(directory, base_path, *args, cores=cores))
        return started[-1]

    yield start
    for standin in started:
        standin.stop()


def version_status(version: int, state: str) -> dict[str, Any]:
    return {"version": str(version), "state": state, "status": {"error_code": "OK", "error_message": ""}}


def test_serves_the_cpu_numbers_with_the_real_api(
    models: dict[str, Path], expected: dict[str, np.ndarray], run: Callable[..., Standin], tmp_path: Path
) -> None:
    monitoring = tmp_path / "monitoring.config"
    monitoring.write_text('prometheus_config { enable: true, path: "/monitoring/metrics" }\n')
    server = run(models["cores2"], "--no_such_flag=1", f"--monitoring_config_file={monitoring}")
    server.wait_available()
    assert "unknown argument: --no_such_flag=1" in server.output()
    assert server.status() == {"model_version_status": [version_status(1, "AVAILABLE")]}
    assert server.request(f"/V1/MODELS/{NAME}/versions/1")[0] == 200  # paths match case-insensitively
    assert is_open(server.grpc)

    x = sample_input()
    code, body = server.request(f"/v1/models/{NAME}:predict", {"instances": x.tolist()})
    assert code == 200, body
    assert np.allclose(np.array(json.loads(body)["predictions"]), expected["logits"], rtol=1e-5, atol=1e-5)
    code, body = server.request(f"/v1/models/{NAME}/versions/1:predict", {"inputs": {"x": x.tolist()}})
    assert code == 200, body
    assert np.allclose(np.array(json.loads(body)["outputs"]), expected["logits"], rtol=1e-5, atol=1e-5)

    code, body = server.request(f"/v1/models/{NAME}/metadata")
    assert code == 200
    signatures = json.loads(body)["metadata"]["signature_def"]["signature_def"]
    assert signatures["serving_default"]["inputs"]["x"]["dtype"] == "DT_FLOAT"
    assert signatures["serving_default"]["method_name"] == "tensorflow/serving/predict"

    assert server.request("/v1/models/nope") == (404, '{\n    "error": "Could not find any versions of model nope"\n}')
    assert json.loads(server.request(f"/v1/models/{NAME}/versions/7")[1]) == {
        "error": f"Could not find version 7 of model {NAME}"
    }
    code, body = server.request(f"/v1/models/{NAME}:predict", {"instances": [["a"] * 8]})
    assert code == 400
    assert json.loads(body)["error"].startswith("Failed to process element: 0 of 'instances' list. Error: ")
    assert "is not of expected type: float" in body
    assert server.request(f"/v1/models/{NAME}:predict", b"")[1] == (
        '{\n    "error": "JSON Parse error: The document is empty"\n}'
    )
    assert server.request("/healthz")[0] == 404  # outside (?i)/v1/.*: the dispatcher ignores it

    code, page = server.request("/monitoring/metrics")
    assert code == 200
    assert f':tensorflow:serving:request_count{{model_name="{NAME}",status="OK"}}' in page
    assert f':tensorflow:serving:request_count{{model_name="{NAME}",status="INVALID_ARGUMENT"}}' in page
    assert f':tensorflow:cc:saved_model:load_latency{{model_path="{models["cores2"] / "1"}"}}' in page


def test_new_version_loads_and_removed_versions_unload(
    models: dict[str, Path], expected: dict[str, np.ndarray], run: Callable[..., Standin], tmp_path: Path
) -> None:
    base = tmp_path / "base"
    shutil.copytree(models["cores2"], base)
    server = run(base, "--file_system_poll_wait_seconds=1")
    server.wait_available()
    staging = tmp_path / "staging"
    shutil.copytree(base / "1", staging)
    staging.rename(base / "3")  # appears at once, as a rewrite publishes it
    wanted = {"model_version_status": [version_status(3, "AVAILABLE"), version_status(1, "END")]}
    wait_for(lambda: server.status() == wanted, 60, "version 3 to replace version 1")
    code, body = server.request(f"/v1/models/{NAME}/versions/3:predict", {"instances": sample_input().tolist()})
    assert code == 200 and np.allclose(json.loads(body)["predictions"], expected["logits"], rtol=1e-5, atol=1e-5)
    assert "Successfully loaded servable version {name: m version: 3}" in server.output()

    shutil.rmtree(base / "3")
    shutil.rmtree(base / "1")
    gone = {"model_version_status": [version_status(3, "END"), version_status(1, "END")]}
    wait_for(lambda: server.status() == gone, 60, "every version to unload")
    assert server.request(f"/v1/models/{NAME}:predict", {"instances": sample_input().tolist()}) == (
        404,
        '{\n    "error": "Servable not found for request: Latest(m)"\n}',
    )


@pytest.mark.parametrize(
    ("model", "cores", "cause"),
    [
        # It names the NeuronOp and its function (which one comes first follows the graph's function order).
        ("untagged", "0-1", "Neuron runtime: nrt_init failed: NeuronOp neuron_op_"),
        ("untagged", "0-1", " in function __inference_"),
        ("untagged", "0-1", "is not tagged _automatic_multicore but 2 NeuronCore(s) are visible"),
        ("cores4", "0,1", "is tagged _automatic_multicore=4 but 2 NeuronCore(s) are visible"),
        ("cores2", "3", "is tagged _automatic_multicore=2 but 1 NeuronCore(s) are visible"),
        ("cores2", None, "NEURON_RT_VISIBLE_CORES is not set"),
        ("plain", "0-1", "the model is not compiled for Neuron"),
        ("pipelined", "0-1", "was compiled with a NeuronCore pipeline of 2 cores"),
        ("no_saved_model", "0-1", "NOT_FOUND: Specified file path does not appear to contain a SavedModel bundle"),
    ],
)
def test_start_up_fails_with_the_real_words_and_the_cause(
    models: dict[str, Path], run: Callable[..., Standin], model: str, cores: str | None, cause: str
) -> None:
    server = run(models[model], "--max_num_load_retries=1", "--load_retry_interval_micros=0", cores=cores)
    assert server.wait_exit() == 255
    output = server.output()
    assert FAILED in output and cause in output, output
    assert "Retrying of Loading servable: {name: m version: 1} retry: 1" in output
    assert "exhausted max_num_retries: 1" in output
    assert "Running gRPC ModelServer" not in output and "Exporting HTTP/REST API" not in output
    assert not is_open(server.grpc) and not is_open(server.rest)


def test_waits_with_ports_closed_until_a_numbered_version_exists(run: Callable[..., Standin], tmp_path: Path) -> None:
    base = tmp_path / "missing"
    server = run(base)
    wait_for(
        lambda: f"Could not find base path {base} for servable m with error" in server.output(), STARTUP, "the error"
    )
    base.mkdir()
    (base / "latest").mkdir()
    warning = (
        f"No versions of servable m found under base path {base}. "
        "Did you forget to name your leaf directory as a number (eg. '/1/')?"
    )
    wait_for(lambda: warning in server.output(), STARTUP, "the no-version warning")
    assert server.process.poll() is None
    assert not is_open(server.grpc) and not is_open(server.rest)
    started = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    assert server.wait_exit(10) == -signal.SIGTERM
    assert time.monotonic() - started < 10
    assert not any(server.tmp.iterdir())  # no model copy left behind in TMPDIR


@pytest.mark.parametrize(("flag", "complaint"), [("--port=abc", "abc"), ("--enable_batching=maybe", "maybe")])
def test_malformed_known_flag_prints_usage_and_exits_255(
    run: Callable[..., Standin], tmp_path: Path, flag: str, complaint: str
) -> None:
    server = run(tmp_path, flag)
    assert server.wait_exit(30) == 255
    output = server.output()
    assert "usage: tensorflow_model_server\nFlags:\n" in output
    assert "\t--port=8500                      \tint32\t" in output
    assert f"Couldn't interpret value {complaint} for flag {flag[2:].split('=')[0]}." in output


def test_flag_parsing_follows_tensorflow_flags() -> None:
    from tfserving_standin import flags

    options, unknown = flags.parse(["--enable_batching", "--port=+9000", "--rest_api_port", "--", "--model_name=x"])
    assert options is not None
    assert (options.enable_batching, options.port, options.model_name) == (True, 9000, "default")
    assert unknown == ["--rest_api_port", "--", "--model_name=x"]  # an int flag needs '='; '--' ends parsing
    assert flags.parse(["--help"])[0] is None
    assert flags.parse(["--port=99999999999"])[0] is None  # out of int32 range: refused
    assert flags.parse(["--per_process_gpu_memory_fraction=0.5"])[0].per_process_gpu_memory_fraction == 0.5


# gRPC. The error texts are TF Serving's (see tfserving_standin/grpc_api.py for the source of each).
X = tf.make_tensor_proto(sample_input())  # float32 [3, 8], in tensor_content
STANDIN = "is not implemented by the TF Serving stand-in"


@pytest.fixture(scope="module")
def served(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Standin]:
    """One stand-in for the gRPC tests, on the rewritten model, with its metrics page."""
    directory = tmp_path_factory.mktemp("grpc-standin")
    monitoring = directory / "monitoring.config"
    monitoring.write_text('prometheus_config { enable: true, path: "/monitoring/metrics" }\n')
    server = Standin(directory, models["cores2"], f"--monitoring_config_file={monitoring}")
    try:
        server.wait_available()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def channel(served: Standin) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{served.grpc}") as channel:
        yield channel


def spec(name: str = NAME, **fields: Any) -> model_pb2.ModelSpec:
    return model_pb2.ModelSpec(name=name, **fields)


def predict(
    model_spec: model_pb2.ModelSpec | None = None,
    inputs: dict[str, tensor_pb2.TensorProto] | None = None,
    output_filter: tuple[str, ...] = (),
) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest(inputs={"x": X} if inputs is None else inputs, output_filter=output_filter)
    request.model_spec.CopyFrom(spec() if model_spec is None else model_spec)
    return request


def tensor(dtype: int, shape: list[int], **values: Any) -> tensor_pb2.TensorProto:
    proto = tensor_pb2.TensorProto(dtype=dtype, **values)
    for size in shape:
        proto.tensor_shape.dim.add(size=size)
    return proto


def metadata(model_spec: model_pb2.ModelSpec | None, *fields: str) -> get_model_metadata_pb2.GetModelMetadataRequest:
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=fields)
    if model_spec is not None:
        request.model_spec.CopyFrom(model_spec)
    return request


def status(model_spec: model_pb2.ModelSpec | None) -> get_model_status_pb2.GetModelStatusRequest:
    request = get_model_status_pb2.GetModelStatusRequest()
    if model_spec is not None:
        request.model_spec.CopyFrom(model_spec)
    return request


def call(channel: grpc.Channel, rpc: str, request: Any) -> Any:
    """``Service/Method`` through TF Serving's generated stubs."""
    service, method = rpc.split("/")
    stubs = {
        "PredictionService": prediction_service_pb2_grpc.PredictionServiceStub,
        "ModelService": model_service_pb2_grpc.ModelServiceStub,
    }
    return getattr(stubs[service](channel), method)(request, timeout=30)


def test_grpc_predict_serves_the_numbers_tensorflow_computes(
    channel: grpc.Channel, expected: dict[str, np.ndarray]
) -> None:
    typed = tensor(types_pb2.DT_FLOAT, [3, 8], float_val=sample_input().ravel().tolist())  # the *_val form
    requests = [predict(), predict(spec(version=wrappers_pb2.Int64Value(value=1)), {"x": typed}, ("logits",))]
    for request in requests:
        response = call(channel, "PredictionService/Predict", request)
        assert response.model_spec == spec(version=wrappers_pb2.Int64Value(value=1), signature_name="serving_default")
        assert list(response.outputs) == ["logits"]
        logits = response.outputs["logits"]
        assert logits.float_val and not logits.tensor_content  # AsProtoField, the real default
        assert np.array_equal(tf.make_ndarray(logits), expected["logits"])


def test_grpc_model_status_and_metadata(channel: grpc.Channel) -> None:
    answer = call(channel, "ModelService/GetModelStatus", status(spec()))
    assert [(s.version, s.state, s.HasField("status"), s.status.error_code) for s in answer.model_version_status] == [
        (1, get_model_status_pb2.ModelVersionStatus.AVAILABLE, True, 0)
    ]
    answer = call(channel, "PredictionService/GetModelMetadata", metadata(spec(), "signature_def"))
    assert answer.model_spec == spec(version=wrappers_pb2.Int64Value(value=1))
    signatures = get_model_metadata_pb2.SignatureDefMap()
    assert answer.metadata["signature_def"].Unpack(signatures)
    serving = signatures.signature_def["serving_default"]
    assert {"serving_default", "embed"} <= set(signatures.signature_def)
    assert (serving.method_name, serving.inputs["x"].dtype, list(serving.outputs)) == (
        "tensorflow/serving/predict",
        types_pb2.DT_FLOAT,
        ["logits"],
    )


INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
PREDICT = "PredictionService/Predict"
GRPC_ERRORS = {
    "no model_spec": (PREDICT, predict_pb2.PredictRequest(inputs={"x": X}), INVALID, "Missing ModelSpec"),
    "no model name": (PREDICT, predict(spec("")), INVALID, "ModelSpec has no name specified."),
    "unknown model": (PREDICT, predict(spec("nope")), NOT_FOUND, "Servable not found for request: Latest(nope)"),
    "unknown version": (
        PREDICT,
        predict(spec(version=wrappers_pb2.Int64Value(value=7))),
        NOT_FOUND,
        f"Servable not found for request: Specific({NAME}, 7)",
    ),
    "unknown label": (
        PREDICT,
        predict(spec(version_label="stable")),
        INVALID,
        "Unrecognized servable version label: stable",
    ),
    "wrong signature": (
        PREDICT,
        predict(spec(signature_name="nope")),
        grpc.StatusCode.FAILED_PRECONDITION,
        'Serving signature key "nope" not found.',
    ),
    "missing input": (
        PREDICT,
        predict(inputs={}),
        INVALID,
        "input size does not match signature: 0!=1 len({}) != len({x}). Sent extra: {}. Missing but required: {x}.",
    ),
    "extra input": (
        PREDICT,
        predict(inputs={"x": X, "y": X}),
        INVALID,
        "input size does not match signature: 2!=1 len({x,y}) != len({x}). Sent extra: {y}. Missing but required: {}.",
    ),
    "misnamed input": (
        PREDICT,
        predict(inputs={"y": X}),
        INVALID,
        "Signature input alias: x(feed name: serving_default_x:0) not found in request and no default value "
        "provided. Inputs expected to be in the request {y}, or default input alias set: ",
    ),
    "message over 1024 characters": (
        PREDICT,
        predict(inputs={"x": X} | {f"extra_{i:03}": X for i in range(100)}),
        INVALID,
        (
            "input size does not match signature: 101!=1 len({"
            + ",".join([*(f"extra_{i:03}" for i in range(100)), "x"])  # sorted, as the std::set
            + "}) != len({x}). Sent extra: {"
        )[:1024]
        + "...TRUNCATED",
    ),
    "unknown output": (
        PREDICT,
        predict(output_filter=("nope",)),
        INVALID,
        "output tensor alias not found in signature: nope Outputs expected to be in the set {logits}.",
    ),
    "output twice": (
        PREDICT,
        predict(output_filter=("logits", "logits")),
        INVALID,
        "duplicate output tensor alias: logits",
    ),
    "content of the wrong size": (
        PREDICT,
        predict(inputs={"x": tensor(types_pb2.DT_FLOAT, [3, 8], tensor_content=b"abc")}),
        INVALID,
        "tensor parsing error: x",
    ),
    "negative dimension": (
        PREDICT,
        predict(inputs={"x": tensor(types_pb2.DT_FLOAT, [-1, 8], float_val=[1.0])}),
        INVALID,
        "tensor parsing error: x",
    ),
    "DT_INVALID": (
        PREDICT,
        predict(inputs={"x": tensor(types_pb2.DT_INVALID, [3, 8])}),
        INVALID,
        "tensor parsing error: x",
    ),
    # Refused inside the graph: the code is TensorFlow's, the words the stand-in's runtime's (None: not compared).
    "int32 for float": (
        PREDICT,
        predict(inputs={"x": tf.make_tensor_proto(sample_input().astype(np.int32))}),
        INVALID,
        None,
    ),
    "3 features for 8": (PREDICT, predict(inputs={"x": tf.make_tensor_proto(sample_input()[:, :3])}), INVALID, None),
    "metadata, no model_spec": (
        "PredictionService/GetModelMetadata",
        metadata(None, "signature_def"),
        INVALID,
        "Missing ModelSpec",
    ),
    "metadata, no field": (
        "PredictionService/GetModelMetadata",
        metadata(spec()),
        INVALID,
        "GetModelMetadataRequest must specify at least one metadata_field",
    ),
    "metadata, unknown field": (
        "PredictionService/GetModelMetadata",
        metadata(spec(), "signature_def", "nope"),
        INVALID,
        "Metadata field nope is not supported",
    ),
    "metadata, unknown model": (
        "PredictionService/GetModelMetadata",
        metadata(spec("nope"), "signature_def"),
        NOT_FOUND,
        "Servable not found for request: Latest(nope)",
    ),
    "status, no model_spec": ("ModelService/GetModelStatus", status(None), INVALID, "Missing ModelSpec"),
    "status, unknown model": (
        "ModelService/GetModelStatus",
        status(spec("nope")),
        NOT_FOUND,
        "Could not find any versions of model nope",
    ),
    "status, unknown version": (
        "ModelService/GetModelStatus",
        status(spec(version=wrappers_pb2.Int64Value(value=7))),
        NOT_FOUND,
        f"Could not find version 7 of model {NAME}",
    ),
    **{
        rpc: (rpc, request, grpc.StatusCode.UNIMPLEMENTED, f"{rpc.split('/')[1]} {STANDIN}")
        for rpc, request in [
            ("PredictionService/Classify", classification_pb2.ClassificationRequest(model_spec=spec())),
            ("PredictionService/Regress", regression_pb2.RegressionRequest(model_spec=spec())),
            ("PredictionService/MultiInference", inference_pb2.MultiInferenceRequest()),
            ("ModelService/HandleReloadConfigRequest", model_management_pb2.ReloadConfigRequest()),
        ]
    },
}


@pytest.mark.parametrize("case", GRPC_ERRORS)
def test_grpc_errors_carry_tf_serving_codes_and_messages(channel: grpc.Channel, case: str) -> None:
    rpc, request, code, message = GRPC_ERRORS[case]
    with pytest.raises(grpc.RpcError) as failure:
        call(channel, rpc, request)
    assert failure.value.code() == code, failure.value.details()
    if message is not None:
        assert failure.value.details() == message
    else:
        assert failure.value.details()


def request_counts(server: Standin) -> dict[tuple[str, str], int]:
    code, page = server.request("/monitoring/metrics")
    assert code == 200
    pattern = r':tensorflow:serving:request_count\{model_name="([^"]*)",status="([A-Z_]+)"\} (\d+)'
    return {(name, status): int(count) for name, status, count in re.findall(pattern, page)}


def test_grpc_predict_classify_and_regress_are_counted_as_the_real_server_counts_them(
    served: Standin, channel: grpc.Channel
) -> None:
    before = request_counts(served)
    call(channel, "PredictionService/Predict", predict())
    for rpc, request in [
        ("PredictionService/Predict", predict(spec("nope"))),
        ("PredictionService/Classify", classification_pb2.ClassificationRequest(model_spec=spec())),
        ("PredictionService/GetModelMetadata", metadata(spec(), "signature_def")),  # not counted
        ("ModelService/GetModelStatus", status(spec())),  # not counted
    ]:
        with contextlib.suppress(grpc.RpcError):
            call(channel, rpc, request)
    after = request_counts(served)
    changed = {key: after[key] - before.get(key, 0) for key in after if after[key] != before.get(key, 0)}
    assert changed == {(NAME, "OK"): 1, ("nope", "NOT_FOUND"): 1, (NAME, "UNIMPLEMENTED"): 1}


def client_ports(server_port: int) -> set[int]:
    """Local ports of this machine's established TCP connections to ``server_port``: one per client connection."""
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, remote, state = line.split()[1:4]
            if state == "01" and int(remote.rsplit(":", 1)[1], 16) == server_port:
                ports.add(int(local.rsplit(":", 1)[1], 16))
    return ports


def test_grpc_port_opens_after_the_model_loads_and_connections_end_at_their_max_age(
    models: dict[str, Path], served: Standin, channel: grpc.Channel, run: Callable[..., Standin], tmp_path: Path
) -> None:
    base = tmp_path / "base"
    age = "--grpc_channel_arguments=grpc.max_connection_age_ms=1000,grpc.max_connection_age_grace_ms=1000"
    server = run(base, age)
    wait_for(lambda: f"Could not find base path {base} for servable m" in server.output(), STARTUP, "the error")
    assert not is_open(server.grpc)
    base.mkdir()
    shutil.copytree(models["cores2"] / "1", tmp_path / "staging")
    (tmp_path / "staging").rename(base / "1")  # appears at once, as a rewrite publishes it
    server.wait_available()
    output = server.output()
    assert output.index("Successfully loaded servable version {name: m version: 1}") < output.index(
        f"Running gRPC ModelServer at 0.0.0.0:{server.grpc} ..."
    )

    # One channel each, RPCs every 50 ms for 4 s: the server with the arguments ends every connection after about
    # 1 s (GOAWAY) and the channel reconnects while every call succeeds; the one without keeps its first.
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc}") as aged:
        seen: set[int] = set()
        kept: set[int] = set()
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            for target, ports in ((aged, seen), (channel, kept)):
                assert call(target, "ModelService/GetModelStatus", status(spec())).model_version_status
                ports |= client_ports(served.grpc if target is channel else server.grpc)
            time.sleep(0.05)
    assert len(seen) >= 3 and len(kept) == 1, (seen, kept)

    started = time.monotonic()
    server.process.send_signal(signal.SIGTERM)  # dies at once, as the real server (no handler, no GOAWAY)
    assert server.wait_exit(10) == -signal.SIGTERM
    assert time.monotonic() - started < 5


def test_tensor_protos_round_trip_through_tensorflows_own_parser() -> None:
    from tfserving_standin.tensor_proto import from_proto, to_proto

    values = [
        np.arange(6, dtype=np.float32).reshape(2, 3),
        np.array([True, False]),
        np.array([b"a", b"bc", b""], dtype=object),
        np.array([1 + 2j, -3j], dtype=np.complex64),
        np.arange(-2, 2, dtype=np.int8),
        np.array(3.5, dtype=np.float16),
        np.array([2**64 - 1], dtype=np.uint64),
    ]
    for value in values:
        for as_content in (False, True):
            proto = to_proto(tf.constant(value), as_content)
            assert bool(proto.tensor_content) == as_content
            back = from_proto(proto)
            assert back is not None and back.dtype == tf.as_dtype(value.dtype), (value, as_content)
            assert back.shape == value.shape and np.array_equal(back.numpy(), value), (value, as_content)
    assert to_proto(tf.constant([1.5, 2.5]), False).float_val == [1.5, 2.5]
    # Tensor::FromProto's rules: fewer values than the shape holds repeat the last, none are zeros.
    assert from_proto(tensor(types_pb2.DT_FLOAT, [4], float_val=[1, 2])).numpy().tolist() == [1, 2, 2, 2]
    assert from_proto(tensor(types_pb2.DT_INT32, [2])).numpy().tolist() == [0, 0]
    assert from_proto(tensor(types_pb2.DT_FLOAT, [2], tensor_content=b"12345678")) is not None
    assert from_proto(tensor(types_pb2.DT_FLOAT, [2], tensor_content=b"1234567")) is None
    assert from_proto(tensor(types_pb2.DT_FLOAT_REF, [1], float_val=[1])) is None
    assert from_proto(tensor(999, [1])) is None


def test_grpc_channel_arguments_are_parsed_as_server_cc_parses_them() -> None:
    from tfserving_standin.grpc_api import channel_arguments
    from tfserving_standin.status import StatusError

    assert channel_arguments("") == []
    assert channel_arguments("grpc.max_connection_age_ms=5000,k= +7 ,a=b=c,big=2147483648,s=x,e=") == [
        ("grpc.max_connection_age_ms", 5000),  # int32: passed as an int
        ("k", 7),  # absl::SimpleAtoi takes the sign and surrounding blanks
        ("a", "b"),  # split at every '=': the third part is dropped
        ("big", "2147483648"),  # beyond int32: a string
        ("s", "x"),
        ("e", ""),
    ]
    for bad in ("a=1,,b=2", "flag"):
        with pytest.raises(StatusError, match="is not key=value"):
            channel_arguments(bad)
