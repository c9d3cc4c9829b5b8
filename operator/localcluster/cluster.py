"""Start and stop a real Kubernetes control plane on loopback: etcd, kube-apiserver, controller-manager, scheduler.

Everything lives in a private temporary directory (data, certificates, logs, kubeconfig) and every process runs in
its own process group, so ``stop()`` leaves nothing behind, even after a failed test.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
BUILD_SCRIPT = HERE / "build-kubernetes.sh"
SERVICE_CIDR = "10.96.0.0/16"  # reached only through a real node's kube-proxy rules, on this machine


class ClusterError(RuntimeError):
    """The control plane could not be found, started or reached; the message says why and what to run."""


KUBELET_CLIENT_CA = "kubelet-client-ca.crt"  # in the cluster's pki/: what a real kubelet trusts
BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl")


def cache_dir() -> Path:
    """The project's cache outside the work tree (build-kubernetes.sh uses the same)."""
    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "neuron-model-operator"
    path = Path(os.environ.get("NEURON_OPERATOR_CACHE") or default)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _build_script(flag: str) -> str:
    return subprocess.run(["bash", str(BUILD_SCRIPT), flag], capture_output=True, text=True, check=True).stdout.strip()


def binaries_dir() -> Path:
    """Where build-kubernetes.sh caches the binaries for the current recipe."""
    return Path(_build_script("--print-bin-dir"))


@functools.cache
def kubernetes_version() -> str:
    """The Kubernetes release build-kubernetes.sh builds (``v1.36.3``): the one place its number is written."""
    return _build_script("--print-version")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ManagedProcess:
    name: str
    popen: subprocess.Popen
    log: Path


def spawn(name: str, argv: list[str], logdir: Path) -> ManagedProcess:
    """Start ``argv`` in its own process group (so it can be stopped whole), logging to ``logdir/<name>.log``."""
    log = logdir / f"{name}.log"
    with log.open("ab") as out:
        popen = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return ManagedProcess(name, popen, log)


@dataclass
class LocalCluster:
    """A control plane in ``workdir`` (a fresh temporary directory unless given). Use as a context manager."""

    workdir: Path | None = None
    keep_workdir: bool = False
    api_port: int = 0
    token: str = field(default_factory=lambda: secrets.token_hex(16))
    # More users of the token file, as {user: group}: a real node's kubelet and kube-proxy.
    users: dict[str, str] = field(default_factory=dict)
    tokens: dict[str, str] = field(default_factory=dict)  # user -> token, filled at start
    # Where pods reach the apiserver (``kubernetes.default``): a real node's bridge. Loopback only when unset.
    advertise_address: str | None = None
    processes: list[ManagedProcess] = field(default_factory=list)
    bin_dir: Path = field(default_factory=binaries_dir)

    @property
    def kubeconfig(self) -> Path:
        assert self.workdir is not None
        return self.workdir / "kubeconfig"

    @property
    def pki(self) -> Path:
        assert self.workdir is not None
        return self.workdir / "pki"

    @property
    def server(self) -> str:
        """The address the apiserver's self-signed serving certificate names (clients that ignore the kubeconfig's
        tls-server-name, like Kopf's, check the address): the advertised one when there is one."""
        return f"https://{self.advertise_address or '127.0.0.1'}:{self.api_port}"

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 60) -> None:
        bin_dir = self.bin_dir
        missing = [b for b in BINARIES if not (bin_dir / b).exists()]
        if missing:
            raise ClusterError(f"{', '.join(missing)} not built in {bin_dir}: run `make kubernetes` (as root)")
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="localcluster-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        atexit.register(self.stop)
        try:
            self._start(bin_dir, time.monotonic() + timeout)
        except BaseException:
            self.stop()
            raise

    def _start(self, bin_dir: Path, deadline: float) -> None:
        work = self.workdir
        assert work is not None
        pki = self.pki
        pki.mkdir(exist_ok=True)
        _openssl("genrsa", "-out", str(pki / "sa.key"), "2048")
        _openssl("rsa", "-in", str(pki / "sa.key"), "-pubout", "-out", str(pki / "sa.pub"))
        self.tokens = {"admin": self.token, **{user: secrets.token_hex(16) for user in self.users}}
        groups = {"admin": "system:masters", **self.users}
        (work / "tokens.csv").write_text(
            "".join(f"{t},{u},{u}" + (f',"{groups[u]}"' if groups[u] else "") + "\n" for u, t in self.tokens.items())
        )
        # Pods on a real node reach the advertised address through the kubernetes Service: listen beyond loopback.
        bind = ["--bind-address=127.0.0.1"]
        if self.advertise_address is not None:
            bind = ["--bind-address=0.0.0.0", f"--advertise-address={self.advertise_address}",
                    *_kubelet_client_certificate(pki), "--kubelet-preferred-address-types=InternalIP"]  # fmt: skip
        etcd_port, etcd_peer = free_port(), free_port()
        self.api_port = free_port()
        self._spawn(
            "etcd",
            [str(bin_dir / "etcd"), "--name=local", f"--data-dir={work / 'etcd'}",
             f"--listen-client-urls=http://127.0.0.1:{etcd_port}",
             f"--advertise-client-urls=http://127.0.0.1:{etcd_port}",
             f"--listen-peer-urls=http://127.0.0.1:{etcd_peer}",
             f"--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer}",
             f"--initial-cluster=local=http://127.0.0.1:{etcd_peer}"],
        )  # fmt: skip
        self._spawn(
            "kube-apiserver",
            [str(bin_dir / "kube-apiserver"), f"--etcd-servers=http://127.0.0.1:{etcd_port}",
             *bind, f"--secure-port={self.api_port}",
             f"--cert-dir={pki}", f"--token-auth-file={work / 'tokens.csv'}", "--authorization-mode=RBAC",
             f"--service-account-key-file={pki / 'sa.pub'}", f"--service-account-signing-key-file={pki / 'sa.key'}",
             "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
             f"--service-cluster-ip-range={SERVICE_CIDR}",
             f"--audit-policy-file={_audit_policy(work)}", f"--audit-log-path={work / 'audit.log'}",
             "--profiling=false"],
        )  # fmt: skip
        self._wait_healthy(deadline)
        self._write_kubeconfig(pki / "apiserver.crt")
        common = [f"--kubeconfig={self.kubeconfig}", "--leader-elect=false", "--bind-address=127.0.0.1"]
        self._spawn(
            "kube-controller-manager",
            [str(bin_dir / "kube-controller-manager"), *common, f"--secure-port={free_port()}",
             f"--service-account-private-key-file={pki / 'sa.key'}", f"--root-ca-file={pki / 'apiserver.crt'}",
             "--controllers=*,-node-ipam-controller,-node-lifecycle-controller"],
        )  # fmt: skip
        self._spawn("kube-scheduler", [str(bin_dir / "kube-scheduler"), *common, f"--secure-port={free_port()}"])
        self._wait_default_service_account(deadline)

    def _spawn(self, name: str, argv: list[str]) -> None:
        assert self.workdir is not None
        self.processes.append(spawn(name, argv, self.workdir))

    def _check_alive(self) -> None:
        for proc in self.processes:
            if proc.popen.poll() is not None:
                raise ClusterError(f"{proc.name} exited with {proc.popen.returncode}:\n{self.log_tail(proc.name)}")

    def _wait_healthy(self, deadline: float) -> None:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # the serving certificate is written by the apiserver as it starts
        request = urllib.request.Request(f"{self.server}/readyz", headers={"Authorization": f"Bearer {self.token}"})
        while True:
            self._check_alive()
            with (
                contextlib.suppress(OSError, urllib.error.URLError),
                urllib.request.urlopen(request, context=context, timeout=2) as response,
            ):
                if response.status == 200:
                    return
            if time.monotonic() > deadline:
                raise ClusterError(f"kube-apiserver not ready in time:\n{self.log_tail('kube-apiserver')}")
            time.sleep(0.2)

    def _write_kubeconfig(self, ca: Path) -> None:
        self.kubeconfig.write_text(
            "apiVersion: v1\nkind: Config\n"
            f"clusters:\n- name: local\n  cluster:\n    server: {self.server}\n"
            f"    certificate-authority: {ca}\n    tls-server-name: kubernetes\n"
            f"users:\n- name: admin\n  user:\n    token: {self.token}\n"
            "contexts:\n- name: local\n  context:\n    cluster: local\n    user: admin\n"
            "current-context: local\n"
        )

    def _wait_default_service_account(self, deadline: float) -> None:
        """Pods can only be created once the service account controller has made the default service account (its
        token is requested by the kubelet for each pod, through the TokenRequest API)."""
        while True:
            self._check_alive()
            if self.kubectl("get", "serviceaccount", "default", check=False).returncode == 0:
                return
            if time.monotonic() > deadline:
                raise ClusterError(f"no default service account:\n{self.log_tail('kube-controller-manager')}")
            time.sleep(0.2)

    def kubectl(self, *args: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.bin_dir / "kubectl"), f"--kubeconfig={self.kubeconfig}", *args],
            capture_output=True,
            text=True,
            check=check,
            input=input,
        )

    def log_tail(self, name: str, lines: int = 30) -> str:
        assert self.workdir is not None
        path = self.workdir / f"{name}.log"
        if not path.exists():
            return "(no log)"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def pids(self) -> list[int]:
        return [p.popen.pid for p in self.processes]

    def stop(self) -> None:
        """Stop every process group (TERM, then KILL), newest first, and remove the work directory."""
        terminate_groups([p.popen for p in self.processes])
        self.processes.clear()
        if self.workdir is not None and not self.keep_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        atexit.unregister(self.stop)

    def restart(self, name: str) -> None:
        """Kill one component and start it again with the same command line (for fault tests)."""
        assert self.workdir is not None
        restart(self.processes, name, self.workdir)


def restart(processes: list[ManagedProcess], name: str, logdir: Path) -> None:
    """Stop the process ``name`` of ``processes`` and start it again in its place with the same command line."""
    proc = next(p for p in processes if p.name == name)
    terminate_groups([proc.popen])
    processes[processes.index(proc)] = spawn(name, list(proc.popen.args), logdir)


def terminate_groups(popens: list[subprocess.Popen], grace: float = 5) -> None:
    """TERM every process group at once, KILL whatever is left after ``grace`` seconds."""
    for popen in popens:
        if popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(popen.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for popen in popens:
        try:
            popen.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(popen.pid, signal.SIGKILL)
            popen.wait()


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def _kubelet_client_certificate(pki: Path) -> list[str]:
    """The apiserver's client certificate for kubelets (logs, exec), from a CA the real node's kubelet trusts."""
    ca, ca_key = str(pki / KUBELET_CLIENT_CA), str(pki / "kubelet-client-ca.key")
    cert, key, csr = (str(pki / f"kubelet-client.{ext}") for ext in ("crt", "key", "csr"))
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "7",
             "-subj", "/CN=localcluster-kubelet-client-ca", "-keyout", ca_key, "-out", ca)  # fmt: skip
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/O=system:masters/CN=kube-apiserver-kubelet-client",
             "-keyout", key, "-out", csr)  # fmt: skip
    _openssl("x509", "-req", "-days", "7", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", cert)
    return [f"--kubelet-client-certificate={cert}", f"--kubelet-client-key={key}"]


def _audit_policy(work: Path) -> Path:
    """Record who did what (metadata only): benchmarks count the operator's requests from this log."""
    path = work / "audit-policy.yaml"
    path.write_text(
        "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived]\nrules:\n- level: Metadata\n"
    )
    return path
