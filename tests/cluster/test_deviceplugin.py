"""The Neuron device plugin at the protocol level: a stand-in for the kubelet's Registration service (generated from
the same API definition) on ``kubelet.sock``, and calls to the plugin's endpoint as the kubelet makes them.

The stubs come from the proto build-kubernetes.sh produces; without it these tests fail, they never skip."""

from __future__ import annotations

import contextlib
import queue
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import pytest

from localcluster.deviceplugin import (
    API_VERSION,
    KUBELET_SOCKET,
    VISIBLE_CORES_ENV,
    NeuronDevicePlugin,
    load_api,
    visible_cores,
)
from localcluster.nodes import NEURONCORE
from localcluster.pytest_plugin import wait_for

TIMEOUT = 10  # seconds for any one piece of evidence


@pytest.fixture(scope="module")
def api() -> tuple[ModuleType, ModuleType]:
    return load_api()


@pytest.fixture
def plugin_dir() -> Iterator[Path]:
    """Short, unlike pytest's tmp_path: a unix socket path must fit in 108 bytes."""
    with tempfile.TemporaryDirectory(prefix="dp-") as directory:
        yield Path(directory)


class FakeKubelet:
    """The kubelet's Registration service on ``<plugin_dir>/kubelet.sock``, recording every RegisterRequest."""

    def __init__(self, api: tuple[ModuleType, ModuleType], plugin_dir: Path) -> None:
        self.messages, services = api
        self.socket = plugin_dir / KUBELET_SOCKET
        self.requests: queue.Queue[Any] = queue.Queue()
        self.server = grpc.server(ThreadPoolExecutor(max_workers=2))
        services.add_RegistrationServicer_to_server(self, self.server)
        self.server.add_insecure_port(f"unix://{self.socket}")
        self.server.start()

    def Register(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.requests.put(request)
        return self.messages.Empty()

    def next_registration(self) -> Any:
        try:
            return self.requests.get(timeout=TIMEOUT)
        except queue.Empty:
            raise AssertionError(f"no registration on {self.socket} within {TIMEOUT} s") from None

    def stop(self) -> None:
        self.server.stop(grace=None).wait()
        self.socket.unlink(missing_ok=True)


@pytest.fixture
def kubelet(api: tuple[ModuleType, ModuleType], plugin_dir: Path) -> Iterator[FakeKubelet]:
    fake = FakeKubelet(api, plugin_dir)
    yield fake
    fake.stop()


@contextlib.contextmanager
def plugin_client(api: tuple[ModuleType, ModuleType], socket: Path) -> Iterator[Any]:
    """A DevicePlugin client on the plugin's endpoint, as the kubelet dials it."""
    with grpc.insecure_channel(f"unix://{socket}") as channel:
        yield api[1].DevicePluginStub(channel)


def list_devices(api: tuple[ModuleType, ModuleType], socket: Path) -> list[tuple[str, str]]:
    """The first ListAndWatch response, then hang up (the plugin keeps the stream open)."""
    with plugin_client(api, socket) as stub:
        stream = stub.ListAndWatch(api[0].Empty(), timeout=TIMEOUT)
        first = next(stream)
        stream.cancel()
    return [(device.ID, device.health) for device in first.devices]


def assert_registration(request: Any, plugin: NeuronDevicePlugin) -> None:
    assert request.version == API_VERSION
    assert request.resource_name == NEURONCORE
    assert request.endpoint == plugin.socket.name
    assert plugin.socket.parent / request.endpoint == plugin.socket


def test_visible_cores_format() -> None:
    assert visible_cores([3]) == "3"
    assert visible_cores([1, 0]) == "0-1"
    assert visible_cores([4, 2, 3, 5]) == "2-5"
    assert visible_cores([0, 2, 3]) == "0,2,3"


def test_registers_lists_and_allocates(api: tuple[ModuleType, ModuleType], plugin_dir: Path, kubelet: FakeKubelet):
    messages = api[0]
    with NeuronDevicePlugin(4, plugin_dir, poll_interval=0.05) as plugin:
        request = kubelet.next_registration()
        assert_registration(request, plugin)
        assert request.options.get_preferred_allocation_available
        assert list_devices(api, plugin.socket) == [(f"neuroncore-{i}", "Healthy") for i in range(4)]

        with plugin_client(api, plugin.socket) as stub:
            options = stub.GetDevicePluginOptions(messages.Empty(), timeout=TIMEOUT)
            assert options == request.options
            response = stub.Allocate(
                messages.AllocateRequest(
                    container_requests=[
                        messages.ContainerAllocateRequest(devices_ids=["neuroncore-3", "neuroncore-2"]),
                        messages.ContainerAllocateRequest(devices_ids=["neuroncore-0", "neuroncore-2"]),
                        messages.ContainerAllocateRequest(devices_ids=["neuroncore-1"]),
                    ]
                ),
                timeout=TIMEOUT,
            )
            assert [dict(c.envs) for c in response.container_responses] == [
                {VISIBLE_CORES_ENV: "2-3"},
                {VISIBLE_CORES_ENV: "0,2"},
                {VISIBLE_CORES_ENV: "1"},
            ]
            with pytest.raises(grpc.RpcError) as error:
                stub.Allocate(
                    messages.AllocateRequest(
                        container_requests=[messages.ContainerAllocateRequest(devices_ids=["neuroncore-4"])]
                    ),
                    timeout=TIMEOUT,
                )
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT

            preferred = stub.GetPreferredAllocation(
                messages.PreferredAllocationRequest(
                    container_requests=[
                        messages.ContainerPreferredAllocationRequest(
                            available_deviceIDs=["neuroncore-3", "neuroncore-1", "neuroncore-2", "neuroncore-0"],
                            must_include_deviceIDs=["neuroncore-2"],
                            allocation_size=2,
                        )
                    ]
                ),
                timeout=TIMEOUT,
            )
            assert list(preferred.container_responses[0].deviceIDs) == ["neuroncore-2", "neuroncore-0"]
            stub.PreStartContainer(messages.PreStartContainerRequest(devices_ids=["neuroncore-0"]), timeout=TIMEOUT)
    assert not plugin.socket.exists()


def test_registers_again_after_kubelet_restart(api: tuple[ModuleType, ModuleType], plugin_dir: Path):
    first = FakeKubelet(api, plugin_dir)
    try:
        with NeuronDevicePlugin(2, plugin_dir, poll_interval=0.05) as plugin:
            assert_registration(first.next_registration(), plugin)

            # A kubelet that starts deletes the plugin sockets, then listens on a new kubelet.sock.
            first.stop()
            plugin.socket.unlink()
            second = FakeKubelet(api, plugin_dir)
            try:
                assert_registration(second.next_registration(), plugin)
                assert list_devices(api, plugin.socket) == [("neuroncore-0", "Healthy"), ("neuroncore-1", "Healthy")]

                # Only the plugin's socket deleted: it serves and registers again all the same.
                plugin.socket.unlink()
                assert_registration(second.next_registration(), plugin)
                assert len(list_devices(api, plugin.socket)) == 2
            finally:
                second.stop()
    finally:
        first.stop()


def test_waits_for_the_kubelet(api: tuple[ModuleType, ModuleType], plugin_dir: Path):
    with NeuronDevicePlugin(1, plugin_dir, poll_interval=0.05) as plugin:
        wait_for(plugin.socket.exists, TIMEOUT, f"{plugin.socket} before any kubelet")
        kubelet = FakeKubelet(api, plugin_dir)
        try:
            assert_registration(kubelet.next_registration(), plugin)
        finally:
            kubelet.stop()


def test_cli_registers_and_exits_on_sigterm(plugin_dir: Path, kubelet: FakeKubelet):
    command = [sys.executable, "-m", "localcluster.deviceplugin", "--cores", "2", "--plugin-dir", str(plugin_dir)]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        request = kubelet.next_registration()
        assert request.resource_name == NEURONCORE
        assert (plugin_dir / request.endpoint).exists()
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, stderr
    assert "registered" in stderr
    assert not (plugin_dir / request.endpoint).exists()
