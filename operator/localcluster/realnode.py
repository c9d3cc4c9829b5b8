"""One real Kubernetes node beside the simulated ones: containerd, runc, CNI, kubelet, kube-proxy, a device plugin.

Pods bound to it run for real in the project's own images: the operator from the Helm chart, the rewrite Job and
TF Serving stand-in pods, with the kubelet enforcing securityContexts, mounting volumes (subPath included) and
sending the probes. It is labelled as an ``inf2.24xlarge`` and the device plugin (``localcluster.deviceplugin``)
advertises that type's 12 NeuronCores and sets ``NEURON_RT_VISIBLE_CORES`` as the Neuron device plugin does.

Networking: a bridge ``nmo0`` (10.89.0.1/24) that the CNI ``bridge`` plugin attaches pods to, and kube-proxy in
iptables mode for ClusterIP Services. The apiserver advertises the bridge's address, so ``kubernetes.default``
from a pod lands on it. The kubelet serves logs and exec (``kubectl logs/exec``) on the bridge address to the
apiserver's client certificate only.

Needs root, and one real kubelet per machine (the device plugin directory is a fixed path). Every host change is
recorded before and undone by ``stop()`` (``hostsettings``). containerd's root (images) is kept in the cache, so a
warm start imports nothing.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from kubernetes import client, config

from .agent import SIMULATED_POD_CIDR
from .cluster import (
    KUBELET_CLIENT_CA,
    SERVICE_CIDR,
    ClusterError,
    LocalCluster,
    ManagedProcess,
    cache_dir,
    free_port,
    restart,
    spawn,
    terminate_groups,
)
from .hostsettings import HostSnapshot
from .images import Image, import_images
from .nodes import INSTANCE_TYPE_LABEL, INSTANCE_TYPES, NEURONCORE

log = logging.getLogger("localcluster.realnode")

NODE_NAME = "real-inf2-24xlarge-0"
INSTANCE_TYPE = "inf2.24xlarge"
REAL_NODE_LABEL = "localcluster.neuron.dev/real-node"
BRIDGE, GATEWAY, POD_SUBNET = "nmo0", "10.89.0.1", "10.89.0.0/24"
PAUSE_IMAGE = "localhost/pause:local"
KUBELET_PORT = 10250
NETNS_DIR = Path("/var/run/netns")
NODE_USER, PROXY_USER = f"system:node:{NODE_NAME}", "system:kube-proxy"


def example_on_real_node(text: str) -> dict:
    """An example NeuronModel placed on the real node's instance type, with a CPU request this 2-core machine can
    grant; everything else (image, claims, cores, tolerations) as the example has it."""
    example = yaml.safe_load(text)
    example["spec"]["nodeSelector"] = {INSTANCE_TYPE_LABEL: INSTANCE_TYPE}
    example["spec"].setdefault("serving", {})["resources"] = {"requests": {"cpu": "100m", "memory": "512Mi"}}
    return example


def predict(url: str, instances: list, timeout: float = 10) -> dict:
    """One TF Serving REST predict request (row format); an HTTP error is raised with the server's own words."""
    body = json.dumps({"instances": instances}).encode()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"POST {url}: {exc.code} {exc.read().decode(errors='replace')}") from None


def first_answer(url: str, instances: list, timeout: float = 60) -> dict:
    """The answer once the Service routes: kube-proxy programs a Service's endpoints a moment after pods are ready."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return predict(url, instances)
        except (OSError, RuntimeError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


class RealNodeError(ClusterError):
    """The real node could not be prepared or started; the message names the part and its log."""


def pause_archive(pause_binary: Path, out: Path) -> Path:
    """A docker-archive of the sandbox image: the static pause binary alone (no registry to pull one from). Kept
    beside the build it comes from, so a new build (and its image name) never finds an older archive."""
    if out.exists():
        return out
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w") as tar:
        info = tar.gettarinfo(str(pause_binary), arcname="pause")
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.mtime = 0
        info.mode = 0o755
        with pause_binary.open("rb") as f:
            tar.addfile(info, f)
    layer_bytes = layer.getvalue()
    diff_id = hashlib.sha256(layer_bytes).hexdigest()
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Entrypoint": ["/pause"]},
            "rootfs": {"type": "layers", "diff_ids": [f"sha256:{diff_id}"]},
        }
    ).encode()
    config_name = f"{hashlib.sha256(config).hexdigest()}.json"
    manifest = json.dumps([{"Config": config_name, "RepoTags": [PAUSE_IMAGE], "Layers": [f"{diff_id}/layer.tar"]}])
    staging = out.with_suffix(".tmp")
    with tarfile.open(staging, mode="w") as tar:
        for name, data in ((f"{diff_id}/layer.tar", layer_bytes), (config_name, config), ("manifest.json", manifest)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data if isinstance(data, bytes) else data.encode()))
    staging.rename(out)
    return out


def containerd_config(work: Path, root: Path) -> str:
    """containerd 2's configuration (version 3) for this node: the local pause image, runc, the CNI bridge."""
    cri_images, cri_runtime = "plugins.'io.containerd.cri.v1.images'", "plugins.'io.containerd.cri.v1.runtime'"
    return f"""version = 3
root = "{root}"
state = "{work / "state"}"
[grpc]
  address = "{work / "containerd.sock"}"
[{cri_images}]
  snapshotter = "overlayfs"
[{cri_images}.pinned_images]
  sandbox = "{PAUSE_IMAGE}"
[{cri_runtime}]
  # Root here lacks CAP_SYS_RESOURCE: without this every sandbox fails ("can't get final child's PID from pipe").
  restrict_oom_score_adj = true
[{cri_runtime}.containerd]
  default_runtime_name = "runc"
[{cri_runtime}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
[{cri_runtime}.containerd.runtimes.runc.options]
  BinaryName = "/usr/bin/runc"
  # The kubelet takes its cgroup driver from this (CRI RuntimeConfig): cgroupfs, as this host runs no systemd.
  SystemdCgroup = false
[{cri_runtime}.cni]
  bin_dirs = ["/usr/lib/cni"]
  conf_dir = "{work / "cni"}"
[plugins.'io.containerd.grpc.v1.cri']
  stream_server_address = "127.0.0.1"
"""


def cni_config(ipam_dir: Path) -> dict:
    return {
        "cniVersion": "0.4.0",
        "name": "localcluster",
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": True,
                "hairpinMode": True,  # a pod reaching its own Service
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": POD_SUBNET, "gateway": GATEWAY}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": str(ipam_dir),
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }


def kubelet_config(client_ca: Path) -> str:
    """What differs from the defaults on this machine: cgroupfs, swap, the bridge address, quick status."""
    return json.dumps(
        {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": GATEWAY,
            "port": KUBELET_PORT,
            "readOnlyPort": 0,
            "healthzPort": 0,
            # Only the apiserver holds a certificate of this CA: pods on the bridge get 401.
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": False},
                "x509": {"clientCAFile": str(client_ca)},
            },
            "authorization": {"mode": "AlwaysAllow"},
            # These hosts mount cgroup v1 (the unified hierarchy is empty); kubelets from 1.35 refuse it unless told.
            "failCgroupV1": False,
            "failSwapOn": False,
            "nodeStatusUpdateFrequency": "2s",
            "fileCheckFrequency": "5s",
            "syncFrequency": "10s",
            "serializeImagePulls": False,
            # The test images stay imported: no eviction or image GC because this shared disk is well used.
            "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%"},
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
        },
        indent=1,
    )


@dataclass
class RealNode:
    """Use ``prepare()`` before the control plane starts (the bridge the apiserver advertises), then ``start()``."""

    cluster: LocalCluster
    images: list[Image] = field(default_factory=list)
    aliases: dict[str, list[str]] = field(default_factory=dict)  # more refs for an image: {ref: [other refs]}
    name: str = NODE_NAME
    instance_type: str = INSTANCE_TYPE
    processes: list[ManagedProcess] = field(default_factory=list)
    snapshot: HostSnapshot | None = None
    netns_before: set[str] = field(default_factory=set)

    @property
    def work(self) -> Path:
        assert self.cluster.workdir is not None
        return self.cluster.workdir / "node"

    @property
    def socket(self) -> Path:
        return self.work / "containerd.sock"

    @property
    def cores(self) -> int:
        return INSTANCE_TYPES[self.instance_type].neuroncores

    def prepare(self) -> None:
        """Check what the node needs, record the host, create the bridge; before the apiserver starts."""
        if os.geteuid() != 0:
            raise RealNodeError("the real node needs root (containerd, kubelet, iptables): run as root")
        node_binaries = ("kubelet", "kube-proxy", "pause", "containerd", "containerd-shim-runc-v2", "ctr")
        missing = [b for b in node_binaries if not (self.cluster.bin_dir / b).exists()]
        missing += [t for t in ("runc", "iptables", "ip") if shutil.which(t) is None]
        missing += [p for p in ("/usr/lib/cni/bridge", "/usr/lib/cni/host-local") if not Path(p).exists()]
        if missing:
            raise RealNodeError(f"missing for the real node: {', '.join(missing)}: run `make kubernetes` as root")
        if Path("/var/lib/kubelet/device-plugins/kubelet.sock").exists() and _kubelet_running():
            raise RealNodeError("another kubelet runs on this machine: only one real node per machine")
        self.snapshot = HostSnapshot.take()
        self.netns_before = set(os.listdir(NETNS_DIR)) if NETNS_DIR.exists() else set()
        for key in ("net/ipv4/ip_forward", "net/bridge/bridge-nf-call-iptables"):
            Path("/proc/sys", key).write_text("1")
        _run("ip", "link", "add", BRIDGE, "type", "bridge", check=False)
        _run("ip", "addr", "replace", f"{GATEWAY}/24", "dev", BRIDGE)
        _run("ip", "link", "set", BRIDGE, "up")
        # Cluster addresses never leave this machine: a ClusterIP kube-proxy has not programmed yet, or a simulated
        # pod's address behind one, goes to the bridge (and nowhere) rather than out of the default route; pods'
        # own traffic is forwarded to each other and to nothing else.
        for cidr in (SERVICE_CIDR, SIMULATED_POD_CIDR):
            _run("ip", "route", "replace", cidr, "dev", BRIDGE)
        _run("iptables", "-I", "FORWARD", "-s", POD_SUBNET, "!", "-d", POD_SUBNET, "-j", "DROP")

    def start(self, timeout: float = 120) -> None:
        """Start containerd, import the images (not counted in ``timeout``), then the node until it is Ready."""
        deadline = time.monotonic() + timeout
        self.work.mkdir(parents=True, exist_ok=True)
        (self.work / "cni").mkdir(exist_ok=True)
        (self.work / "cni" / "10-localcluster.conflist").write_text(json.dumps(cni_config(self.work / "ipam")))
        root = cache_dir() / "containerd"
        (self.work / "containerd.toml").write_text(containerd_config(self.work, root))
        self._spawn(
            "containerd", [str(self.cluster.bin_dir / "containerd"), f"--config={self.work / 'containerd.toml'}"]
        )
        self._wait(lambda: self._ctr("version", check=False).returncode == 0, deadline, "containerd")
        self._forget_old_containers()
        built = self.cluster.bin_dir
        pause = Image("pause", PAUSE_IMAGE, pause_archive(built / "pause", built.parent / "pause.tar"))
        import_images([pause, *self.images], str(self.socket), ctr=self._ctr_path, aliases=self.aliases)
        deadline = time.monotonic() + timeout  # a cold import of the stand-in's TensorFlow takes most of a minute
        self._authorize()
        settings = self._write("kubelet.json", kubelet_config(self.cluster.pki / KUBELET_CLIENT_CA))
        self._spawn(
            "kubelet",
            [str(self.cluster.bin_dir / "kubelet"), f"--config={settings}",
             f"--kubeconfig={self._kubeconfig('kubelet', NODE_USER)}",
             f"--container-runtime-endpoint=unix://{self.socket}",
             f"--root-dir={self.work / 'kubelet'}", f"--cert-dir={self.work / 'kubelet-pki'}",
             f"--hostname-override={self.name}", f"--node-ip={GATEWAY}",
             f"--node-labels={INSTANCE_TYPE_LABEL}={self.instance_type},{REAL_NODE_LABEL}=true", "--v=1"],
        )  # fmt: skip
        self._spawn(
            "kube-proxy",
            [str(self.cluster.bin_dir / "kube-proxy"), f"--kubeconfig={self._kubeconfig('kube-proxy', PROXY_USER)}",
             "--proxy-mode=iptables", "--conntrack-max-per-core=0", f"--hostname-override={self.name}",
             f"--cluster-cidr={POD_SUBNET}", "--bind-address=127.0.0.1",
             f"--healthz-bind-address=127.0.0.1:{free_port()}", f"--metrics-bind-address=127.0.0.1:{free_port()}"],
        )  # fmt: skip
        self._spawn("deviceplugin", [sys.executable, "-m", "localcluster.deviceplugin", "--cores", str(self.cores)])
        self._wait(self._ready, deadline, f"node {self.name} Ready with {self.cores} {NEURONCORE}")
        # Admission taints a new node not-ready; no node lifecycle controller runs here to lift it. Cordoned: only
        # the tests and the demo that ask for it (``place_on_real_node``) put pods here.
        client.CoreV1Api(self._api).patch_node(self.name, {"spec": {"taints": [], "unschedulable": True}})

    @functools.cached_property
    def _api(self) -> client.ApiClient:
        return config.new_client_from_config(str(self.cluster.kubeconfig))

    def _ready(self) -> bool:
        try:
            node = client.CoreV1Api(self._api).read_node(self.name)
        except client.ApiException:
            return False
        ready = any(c.type == "Ready" and c.status == "True" for c in node.status.conditions or [])
        return ready and (node.status.allocatable or {}).get(NEURONCORE) == str(self.cores)

    def _authorize(self) -> None:
        """RBAC alone (no Node authorizer) gives a kubelet nothing: bind the node role to its user."""
        rbac = client.RbacAuthorizationV1Api(self._api)
        binding = {
            "metadata": {"name": "localcluster:real-node"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:node"},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": NODE_USER}],
        }
        with contextlib.suppress(client.ApiException):
            rbac.create_cluster_role_binding(binding)

    def _kubeconfig(self, name: str, user: str) -> Path:
        text = self.cluster.kubeconfig.read_text().replace(self.cluster.token, self.cluster.tokens[user])
        return self._write(f"{name}.kubeconfig", text)

    def _write(self, name: str, text: str) -> Path:
        path = self.work / name
        path.write_text(text)
        return path

    def _spawn(self, name: str, argv: list[str]) -> None:
        self.processes.append(spawn(name, argv, self.cluster.workdir))

    def _wait(self, condition: Callable[[], object], deadline: float, what: str) -> None:
        while not condition():
            for process in self.processes:
                if process.popen.poll() is not None:
                    raise RealNodeError(
                        f"{process.name} exited with {process.popen.returncode} while waiting for {what}:\n"
                        f"{self.cluster.log_tail(process.name)}"
                    )
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {p.name}:\n{self.cluster.log_tail(p.name, 15)}" for p in self.processes)
                raise RealNodeError(f"timed out waiting for {what}\n{logs}")
            time.sleep(0.2)

    def _ctr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _run(self._ctr_path, f"--address={self.socket}", "-n", "k8s.io", *args, check=check)

    @property
    def _ctr_path(self) -> str:
        return str(self.cluster.bin_dir / "ctr")

    def _forget_old_containers(self) -> None:
        """The kept containerd root still lists the containers of a run that did not stop cleanly."""
        old = self._ctr("containers", "list", "-q").stdout.split()
        if old:
            self._ctr("containers", "delete", *old, check=False)

    def restart(self, name: str) -> None:
        """Stop one of the node's processes (kubelet, kube-proxy, containerd, deviceplugin) and start it again."""
        assert self.cluster.workdir is not None
        restart(self.processes, name, self.cluster.workdir)

    def kill_container(self, container_id: str) -> None:
        """SIGKILL a container's process, as an OOM kill or a crash would end it (the kubelet restarts it)."""
        self._ctr("tasks", "kill", "--signal", "SIGKILL", container_id)

    def stop(self) -> None:
        """Kill every container, stop the node's processes, then undo each host change."""
        if self.snapshot is None:
            return
        node_processes = [p for p in self.processes if p.name != "containerd"]
        terminate_groups([p.popen for p in node_processes])
        if any(p.name == "containerd" and p.popen.poll() is None for p in self.processes):
            tasks = self._ctr("tasks", "list", "-q", check=False).stdout.split()
            for task in tasks:
                self._ctr("tasks", "kill", "-s", "SIGKILL", task, check=False)
            for task in tasks:
                self._ctr("tasks", "delete", "-f", task, check=False)
            containers = self._ctr("containers", "list", "-q", check=False).stdout.split()
            if containers:
                self._ctr("containers", "delete", *containers, check=False)
        terminate_groups([p.popen for p in self.processes if p.name == "containerd"])
        self.processes.clear()
        _kill_shims(self.work)
        _unmount_below(self.work)
        for name in set(os.listdir(NETNS_DIR)) - self.netns_before if NETNS_DIR.exists() else ():
            _run("umount", str(NETNS_DIR / name), check=False)
            with contextlib.suppress(OSError):
                (NETNS_DIR / name).unlink()
        _run("ip", "link", "delete", BRIDGE, check=False)
        _remove_cgroups("kubepods")
        self.snapshot.restore()
        self.snapshot = None


@contextlib.contextmanager
def bridge_address(address: str) -> Iterator[str]:
    """``address`` on the pod bridge while the block runs: a host service the pods reach at a fixed address, as EKS's
    Pod Identity Agent answers on 169.254.170.23 on every node (a link-local address: it never leaves the host)."""
    _run("ip", "addr", "replace", f"{address}/32", "dev", BRIDGE)
    try:
        yield address
    finally:
        _run("ip", "addr", "del", f"{address}/32", "dev", BRIDGE, check=False)


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, capture_output=True, text=True)
    if check and done.returncode != 0:
        raise RealNodeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done


def _kubelet_running() -> bool:
    return any(
        Path(f"/proc/{pid}/comm").read_text().strip() == "kubelet" for pid in os.listdir("/proc") if pid.isdigit()
    )


def _kill_shims(work: Path) -> None:
    """containerd's shims outlive it by design; ours are the ones whose command line names our socket."""
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        with contextlib.suppress(OSError):
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if argv and argv[0].endswith(b"containerd-shim-runc-v2") and str(work).encode() in b" ".join(argv):
                os.kill(int(pid), 9)


def _unmount_below(top: Path) -> None:
    """Pod volumes, rootfs overlays and shm mounts left below ``top``: deepest first."""
    mounts = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
    for point in sorted((m for m in mounts if m.startswith(f"{top}/")), key=len, reverse=True):
        _run("umount", "-l", point, check=False)


def _remove_cgroups(name: str) -> None:
    """The kubelet's pod cgroups (cgroupfs driver): empty once every container is gone; children first."""
    for controller in Path("/sys/fs/cgroup").iterdir():
        top = controller / name
        if top.is_dir():
            children = sorted((d for d in top.rglob("*") if d.is_dir()), key=lambda d: len(d.parts), reverse=True)
            for directory in children:
                with contextlib.suppress(OSError):
                    directory.rmdir()
            with contextlib.suppress(OSError):
                top.rmdir()
