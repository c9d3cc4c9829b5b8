"""The TF Serving stand-in, run as the serving pods run it: a process with flags, env and a base path.

Models are real TensorFlow SavedModels shaped like Neuron-compiled ones (neuron_modelgen), tagged by the rewrite.
Every wait polls for evidence (an HTTP answer, a log line, an exit) against a deadline.
"""

from __future__ import annotations

import json
import os
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

import numpy as np
import pytest

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
