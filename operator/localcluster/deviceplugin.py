"""A Neuron device plugin for the local cluster's real kubelet.

On EKS the AWS Neuron device plugin advertises ``aws.amazon.com/neuroncore`` and, when the kubelet allocates cores to
a container, sets ``NEURON_RT_VISIBLE_CORES`` to them. This plugin does the same without hardware, speaking the
kubelet's device plugin API v1beta1 over gRPC: it serves ``DevicePlugin`` on a socket in the kubelet's device plugin
directory and registers it with the kubelet's ``Registration`` service on ``kubelet.sock`` there. A kubelet that
starts deletes every plugin socket in that directory, so the plugin watches for that and serves and registers again.

The Python stubs are generated at run time from the ``api.proto`` build-kubernetes.sh copies out of the
``k8s.io/kubelet`` module of the release (without its gogoproto lines, which only tune Go code generation) into
``<cache>/deviceplugin-stubs-<hash>/``, outside the work tree, once per proto and grpcio-tools version.

    python -m localcluster.deviceplugin --cores 2 [--plugin-dir /var/lib/kubelet/device-plugins] [--resource NAME]
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import importlib.util
import logging
import re
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
from grpc_tools import protoc

from .cluster import binaries_dir, cache_dir
from .nodes import NEURONCORE

API_VERSION = "v1beta1"
PLUGIN_DIR = Path("/var/lib/kubelet/device-plugins")
KUBELET_SOCKET = "kubelet.sock"
VISIBLE_CORES_ENV = "NEURON_RT_VISIBLE_CORES"
DEVICE_PREFIX = "neuroncore-"
HEALTHY = "Healthy"
BUILT_PROTO = "deviceplugin-v1beta1-api.proto"  # in the build's share/ directory
STUB_MODULE = "deviceplugin_v1beta1"  # a distinctive top-level name for the generated modules
GOGOPROTO_LINE = re.compile(r'^\s*(import\s+"github\.com/gogo/|option\s+\(gogoproto\.)')

log = logging.getLogger("deviceplugin")


class DevicePluginError(RuntimeError):
    """The device plugin API definition is missing or could not be compiled; the message says what to run."""


def api_proto() -> Path:
    """The API definition the build copied into share/."""
    path = binaries_dir().parent / "share" / BUILT_PROTO
    if not path.is_file():
        raise DevicePluginError(f"no device plugin API definition at {path}: run `make kubernetes` (as root)")
    return path


@functools.cache
def load_api() -> tuple[ModuleType, ModuleType]:
    """The generated message and service modules (``*_pb2``, ``*_pb2_grpc``), generated only when not cached yet."""
    source = api_proto()
    lines = source.read_text().splitlines(keepends=True)
    text = "".join(line for line in lines if not GOGOPROTO_LINE.match(line))
    digest = hashlib.sha256(f"{text}\0grpcio-tools {metadata.version('grpcio-tools')}".encode()).hexdigest()[:12]
    stubs = cache_dir() / f"deviceplugin-stubs-{digest}"
    if not (stubs / f"{STUB_MODULE}_pb2_grpc.py").is_file():
        _generate(text, source, stubs)
    return _import(f"{STUB_MODULE}_pb2", stubs), _import(f"{STUB_MODULE}_pb2_grpc", stubs)


def _generate(text: str, source: Path, stubs: Path) -> None:
    """Run protoc in a sibling staging directory and rename it into place, so that concurrent first runs never see
    half a directory."""
    stubs.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=stubs.parent, prefix=f".{stubs.name}."))
    try:
        proto = staging / f"{STUB_MODULE}.proto"
        proto.write_text(text)
        code = protoc.main(
            ["protoc", f"-I{staging}", f"--python_out={staging}", f"--grpc_python_out={staging}", str(proto)]
        )
        if code != 0:
            raise DevicePluginError(f"grpc_tools.protoc failed ({code}) on {source} without its gogoproto lines")
        try:
            staging.rename(stubs)
        except OSError:
            if not stubs.is_dir():  # else another process generated them first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _import(name: str, directory: Path) -> ModuleType:
    """Load a generated module under its top-level name: the service module imports the message module by it."""
    spec = importlib.util.spec_from_file_location(name, directory / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def device_id(core: int) -> str:
    return f"{DEVICE_PREFIX}{core}"


def visible_cores(cores: Iterable[int]) -> str:
    """``NEURON_RT_VISIBLE_CORES`` as the Neuron device plugin writes it: "3", a contiguous range "0-1", else a
    comma list "0,2,5"."""
    ordered = sorted(set(cores))
    if len(ordered) > 1 and ordered[-1] - ordered[0] == len(ordered) - 1:
        return f"{ordered[0]}-{ordered[-1]}"
    return ",".join(map(str, ordered))


class _DevicePluginService:
    """The ``DevicePlugin`` service; the method names are the RPC names the generated stubs dispatch to."""

    def __init__(self, cores: int, messages: ModuleType) -> None:
        self.cores = cores
        self.pb = messages
        self.closed = threading.Event()  # set when its server stops, so that open ListAndWatch streams return

    def options(self) -> Any:
        return self.pb.DevicePluginOptions(pre_start_required=False, get_preferred_allocation_available=True)

    def GetDevicePluginOptions(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self.options()

    def ListAndWatch(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        """All cores, healthy, once: nothing here ever changes their health. The stream stays open (the kubelet
        treats its end as the plugin going away) until the kubelet hangs up or the server stops."""
        log.info("ListAndWatch: %d healthy devices", self.cores)
        yield self.pb.ListAndWatchResponse(
            devices=[self.pb.Device(ID=device_id(core), health=HEALTHY) for core in range(self.cores)]
        )
        while not self.closed.wait(1.0) and context.is_active():
            continue

    def GetPreferredAllocation(self, request: Any, context: grpc.ServicerContext) -> Any:
        """The lowest-numbered available cores, so that a container on a fresh node gets a contiguous range (the
        kubelet's own pick is in arbitrary order)."""
        responses = []
        for container in request.container_requests:
            chosen = list(container.must_include_deviceIDs)
            rest = [d for d in container.available_deviceIDs if d not in chosen]
            rest.sort(key=lambda d: self._core(d, context))
            chosen += rest[: max(0, container.allocation_size - len(chosen))]
            responses.append(self.pb.ContainerPreferredAllocationResponse(deviceIDs=chosen))
        return self.pb.PreferredAllocationResponse(container_responses=responses)

    def Allocate(self, request: Any, context: grpc.ServicerContext) -> Any:
        responses = []
        for container in request.container_requests:
            cores = visible_cores(self._core(d, context) for d in container.devices_ids)
            log.info("Allocate %s: %s=%s", ",".join(container.devices_ids), VISIBLE_CORES_ENV, cores)
            responses.append(self.pb.ContainerAllocateResponse(envs={VISIBLE_CORES_ENV: cores}))
        return self.pb.AllocateResponse(container_responses=responses)

    def PreStartContainer(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self.pb.PreStartContainerResponse()

    def _core(self, device: str, context: grpc.ServicerContext) -> int:
        number = device.removeprefix(DEVICE_PREFIX)
        if device == number or not number.isdigit() or int(number) >= self.cores:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unknown device {device!r}")
        return int(number)


class NeuronDevicePlugin:
    """Serve ``cores`` NeuronCores as ``resource`` on a socket in ``plugin_dir`` and keep them registered with the
    kubelet there: a supervisor thread checks every ``poll_interval`` seconds whether the kubelet deleted the socket
    or recreated ``kubelet.sock`` (it restarted), and whether registration is still to do (no kubelet yet)."""

    def __init__(
        self, cores: int, plugin_dir: Path = PLUGIN_DIR, resource: str = NEURONCORE, poll_interval: float = 0.2
    ) -> None:
        if cores < 1:
            raise ValueError(f"cores must be at least 1, not {cores}")
        self.cores = cores
        self.plugin_dir = plugin_dir
        self.resource = resource
        self.poll_interval = poll_interval
        self.socket = plugin_dir / f"{resource.replace('/', '_')}.sock"
        self.kubelet_socket = plugin_dir / KUBELET_SOCKET
        self._messages, self._services = load_api()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._server: grpc.Server | None = None
        self._service: _DevicePluginService | None = None
        self._registered_with: tuple[int, int] | None = None  # the kubelet.sock it registered through
        self._problem: str | None = None

    def __enter__(self) -> NeuronDevicePlugin:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self._stopping.clear()
        self._thread = threading.Thread(target=self._supervise, name="deviceplugin", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and remove the socket (the kubelet then marks the devices unhealthy)."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._stop_server()
        self.socket.unlink(missing_ok=True)
        log.info("stopped")

    def _supervise(self) -> None:
        while True:
            try:
                self._check()
            except (OSError, RuntimeError) as exc:  # e.g. an unwritable plugin directory: retried next time
                self._report(f"{type(exc).__name__}: {exc}")
            if self._stopping.wait(self.poll_interval):
                return

    def _check(self) -> None:
        kubelet = _identity(self.kubelet_socket)
        if self._server is None:
            self._serve("starting")
        elif not self.socket.exists():
            self._serve(f"{self.socket.name} was deleted (kubelet restarted)")
        elif self._registered_with is not None and kubelet != self._registered_with:
            self._serve(f"{KUBELET_SOCKET} was {'removed' if kubelet is None else 'recreated'} (kubelet restarted)")
        if self._registered_with is not None:
            return
        if kubelet is None:
            self._report(f"waiting for {self.kubelet_socket}")
        else:
            self._register(kubelet)

    def _serve(self, reason: str) -> None:
        self._stop_server()
        self.plugin_dir.mkdir(parents=True, exist_ok=True)
        self.socket.unlink(missing_ok=True)
        service = _DevicePluginService(self.cores, self._messages)
        server = grpc.server(ThreadPoolExecutor(max_workers=4, thread_name_prefix="deviceplugin-rpc"))
        self._services.add_DevicePluginServicer_to_server(service, server)
        server.add_insecure_port(f"unix://{self.socket}")
        server.start()
        self._server, self._service, self._registered_with = server, service, None
        log.info("%s: serving %d x %s on %s", reason, self.cores, self.resource, self.socket)

    def _stop_server(self) -> None:
        if self._service is not None:
            self._service.closed.set()
        if self._server is not None:
            self._server.stop(grace=None).wait()
        self._server = self._service = None

    def _register(self, kubelet: tuple[int, int]) -> None:
        assert self._service is not None
        request = self._messages.RegisterRequest(
            version=API_VERSION, endpoint=self.socket.name, resource_name=self.resource, options=self._service.options()
        )
        try:
            with grpc.insecure_channel(f"unix://{self.kubelet_socket}") as channel:
                self._services.RegistrationStub(channel).Register(request, timeout=5)
        except grpc.RpcError as exc:
            self._report(f"registration failed, retrying: {exc.code().name}: {exc.details()}")
            return
        self._registered_with, self._problem = kubelet, None
        log.info("registered %s (endpoint %s) with %s", self.resource, self.socket.name, self.kubelet_socket)

    def _report(self, problem: str) -> None:
        """Log a problem once, not at every retry."""
        if problem != self._problem:
            log.warning("%s", problem)
            self._problem = problem


def _identity(path: Path) -> tuple[int, int] | None:
    """Which file is at ``path``: a recreated socket differs in inode or change time."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_ctime_ns


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m localcluster.deviceplugin", description=__doc__.splitlines()[0])
    parser.add_argument("--cores", type=int, required=True, help="NeuronCores to advertise")
    parser.add_argument("--plugin-dir", type=Path, default=PLUGIN_DIR, help=f"the kubelet's (default {PLUGIN_DIR})")
    parser.add_argument("--resource", default=NEURONCORE, help=f"extended resource name (default {NEURONCORE})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s deviceplugin: %(message)s", stream=sys.stderr)
    done = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: done.set())
    with NeuronDevicePlugin(args.cores, args.plugin_dir, args.resource):
        done.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
