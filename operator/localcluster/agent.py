"""The node agent: plays the kubelet's part for simulated Neuron nodes.

There is no container runtime here, so the agent does what a node must for the project's pods to behave as on EKS:

- Pods that run a command (the rewrite Job, any tool in the virtualenv): the command runs for real as a local
  process. Volumes (hostPath, PVCs bound to hostPath PVs, emptyDir, configMap, secret) become local directories;
  container paths are translated: every argument, environment value and working directory that starts with a
  volumeMount's mountPath is rewritten to the host directory behind it. Mounts under /var/run/secrets (the service
  account token, CA and namespace every Kubernetes client's in-cluster config reads at that fixed path) are bind
  mounted there instead, in a private mount namespace of the container's process (``unshare``, as root), so an
  operator pod talks to the apiserver with its own service account as on a real node.
- TensorFlow Serving pods (no TF Serving binary exists here): the agent checks what the real server needs, that the
  model base path holds a version whose NeuronOps are tagged for exactly the NeuronCores the pod requests, and then
  reports the pod Running and Ready; otherwise a waiting container with the reason, as a crash-looping server would.
- AWS identity (IRSA, EKS Pod Identity): EKS's pod identity webhook, which runs beside the apiserver
  (``localcluster.identitywebhook``), puts the variables and a projected serviceAccountToken volume into the pod as
  on EKS; the agent writes that token as the kubelet does, requested through the TokenRequest API for the pod with
  the volume's audience and path. A container given IRSA's or Pod Identity's variables also gets the endpoints in
  ``NodeAgent.aws_env`` (a local S3 and STS in tests: what the node's network would reach as AWS).
- Graceful deletion: SIGTERM, the grace period, SIGKILL, then the container's exit and the pod's terminal phase
  are reported and the pod object is removed, as a kubelet does.

Users and permissions are enforced, so that a pod fails here where it would fail on EKS (the agent needs root):

- Each command runs (``setpriv``, after the mounts) as the container's runAsUser and runAsGroup (the container's
  securityContext over the pod's), with the pod's fsGroup and supplementalGroups as supplementary groups, as the
  kubelet asks the runtime. The agent cannot read an image, so every image counts as one that names no USER, which
  the runtime runs as root: no runAsUser means uid 0, no runAsGroup gid 0 (a uid the image's /etc/passwd does not
  list), and runAsNonRoot without runAsUser is refused as for such an image, like runAsNonRoot with runAsUser 0:
  the container waits with CreateContainerConfigError and the kubelet's message, and never starts.
- HOME and the default working directory stand for the container's root filesystem: with readOnlyRootFilesystem a
  root-owned directory bind mounted read-only onto itself in the process's mount namespace (EROFS for every write,
  root's too, as on a node), else a directory owned by the container's user.
- A missing subPath is created as the kubelet's SafeMakeDir creates it: by root, with the mode of the volume's root,
  so a non-root pod can write into it only if the volume's root lets it. emptyDir is 0777; configMap and secret
  volumes are root-owned 0755 directories of 0644 files (the kubelet mounts them read-only).

The deliberate leniency: the process keeps the capability CAP_DAC_READ_SEARCH (ambient), so it reads and traverses
any file, while every write is permission-checked as on a node. The virtualenv and the tests' temporary directories
(0700, maybe under /root) stand for an image's files and a node's volume roots, which the container's user could
read on a real node; a write into a root-owned 0755 directory still fails with EACCES. Not enforced, so also more
lenient than a node: the rest of the securityContext (capabilities, seccomp, allowPrivilegeEscalation), readOnly on
volume mounts reached through path translation, and writes outside HOME and the mounts (the host's /tmp). Stricter:
a PersistentVolume's pv.beta.kubernetes.io/gid annotation is not added to the supplementary groups as the kubelet
adds it.

Pod IPs come from SIMULATED_POD_CIDR for the API's sake only; nothing ever connects to them.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import logging
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import urllib3
from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException

from .nodes import INSTANCE_TYPE_LABEL, NEURONCORE, SIMULATED_LABEL
from .serving import check_serving_container, is_serving_container

log = logging.getLogger("localcluster.agent")

SIMULATED_POD_CIDR = "10.244.0.0/16"

TERMINATION_TAIL_LINES = 80
TERMINATION_MAX_BYTES = 2048  # what a kubelet keeps of the logs for FallbackToLogsOnError
TERMINATION_MESSAGE_MAX_BYTES = 4096  # what a kubelet keeps of the termination message file
DEFAULT_TERMINATION_MESSAGE_PATH = "/dev/termination-log"
MAX_GRACE_SECONDS = 30
SERVING_RECHECK_SECONDS = 2.0
# What the pod identity webhook gives a container for IRSA and for Pod Identity: where AWS SDKs find their credentials.
AWS_CREDENTIAL_VARS = frozenset({"AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_FULL_URI"})
# Read by clients at a fixed path, which no path translation reaches: bind mounted (see in_mount_namespace).
BIND_MOUNT_PREFIX = "/var/run/secrets/"
# Runs as ``sh -c SCRIPT sh HOST CONTAINER ro|rw ... -- ARGV``: mounts each triple, then becomes ARGV. ``mkdir -p``
# creates a missing mount point on the host (an empty directory under /run, as a kubelet's runtime would). ``cd``
# enters the working directory again through the new mounts: it may be one of them (a read-only root filesystem).
_BIND_SCRIPT = (
    'while [ "$1" != -- ]; do mkdir -p "$2" && mount --bind "$1" "$2" || exit 126; '
    'if [ "$3" = ro ]; then mount -o remount,bind,ro "$2" || exit 126; fi; shift 3; done; shift; '
    'cd "$(pwd -P)" && exec "$@"'
)
# Kept by every container's process: reads and directory traversal unchecked, writes checked (the module docstring).
KEPT_CAPABILITY = "+dac_read_search"


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class VolumeNotReady(Exception):
    """A volume cannot be set up yet (for example a PVC not bound): the pod stays in ContainerCreating."""


class ContainerConfigError(Exception):
    """The kubelet cannot make the container's config (CreateContainerConfigError): the container never starts."""

    def __init__(self, container: str, init: bool, message: str) -> None:
        super().__init__(message)
        self.container, self.init = container, init


@dataclass
class Mount:
    container_path: str
    host_path: Path
    read_only: bool


def translate(value: str, mounts: list[Mount]) -> str:
    """Rewrite container paths inside ``value`` to the host directories behind their mounts.

    A path counts where it starts a word (start of the value, after white space, ``=``, ``:`` or a quote), so
    ``/models/x``, ``--model_base_path=/models/x`` and ``sh -c "cat /models/x"`` all translate.
    """
    if not mounts:
        return value
    hosts = {m.container_path.rstrip("/"): str(m.host_path) for m in mounts}
    alternatives = "|".join(re.escape(p) for p in sorted(hosts, key=len, reverse=True))  # longest mount wins
    pattern = rf"(^|[\s=:'\"])({alternatives})(?=/|$|[\s'\"])"
    return re.sub(pattern, lambda m: m[1] + hosts[m[2]], value)  # one pass: a host path is never re-translated


def in_mount_namespace(argv: list[str], binds: list[Mount]) -> list[str]:
    """``argv`` wrapped to run in a private mount namespace with ``binds`` bind mounted at their container paths;
    unchanged when there are none."""
    if not binds:
        return argv
    triples = [x for m in binds for x in (str(m.host_path), m.container_path, "ro" if m.read_only else "rw")]
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", _BIND_SCRIPT, "sh", *triples, "--", *argv]


@dataclass(frozen=True)
class RunAs:
    """The user, group and supplementary groups of a container's process."""

    uid: int
    gid: int
    groups: tuple[int, ...]


def _effective(pod: Any, container: Any, field: str) -> Any:
    """A securityContext field as the kubelet takes it: the container's value, else the pod's, else None."""
    for context in (container.security_context, pod.spec.security_context):
        value = getattr(context, field) if context is not None else None
        if value is not None:
            return value
    return None


def run_as(pod: Any, container: Any) -> RunAs:
    """What the kubelet asks the runtime for (kuberuntime determineEffectiveSecurityContext), for an image that names
    no USER: uid 0 without runAsUser, gid 0 without runAsGroup; fsGroup, then supplementalGroups."""
    context = pod.spec.security_context
    groups: list[int] = []
    if context is not None:
        groups = ([context.fs_group] if context.fs_group is not None else []) + (context.supplemental_groups or [])
    uid, gid = _effective(pod, container, "run_as_user"), _effective(pod, container, "run_as_group")
    return RunAs(uid or 0, gid or 0, tuple(groups))


def non_root_violation(pod: Any, container: Any) -> str | None:
    """The kubelet's verifyRunAsNonRoot (pkg/kubelet/kuberuntime/security_context_others.go), its words included;
    without runAsUser the image's user decides, and the agent takes every image to run as root."""
    if not _effective(pod, container, "run_as_non_root"):
        return None
    meta = pod.metadata
    where = f'(pod: "{meta.name}_{meta.namespace}({meta.uid})", container: {container.name})'
    uid = _effective(pod, container, "run_as_user")
    if uid is None:
        return f"container has runAsNonRoot and image will run as root {where}"
    return f"container's runAsUser breaks non-root policy {where}" if uid == 0 else None


def as_user(argv: list[str], user: RunAs) -> list[str]:
    """``argv`` wrapped to run as ``user`` (the agent is root), keeping only KEPT_CAPABILITY."""
    groups = ["--groups", ",".join(map(str, user.groups))] if user.groups else ["--clear-groups"]
    ids = ["--reuid", str(user.uid), "--regid", str(user.gid), *groups]
    return ["setpriv", *ids, "--inh-caps", KEPT_CAPABILITY, "--ambient-caps", KEPT_CAPABILITY, "--", *argv]


def make_subpath(volume_root: Path, sub_path: str) -> None:
    """Create a missing subPath as the kubelet does (kubelet_pods.go makeMounts: the mode of the volume's root, for
    pkg/volume/util/subpath doSafeMakeDir): each missing directory made by root (the agent, as the kubelet) with that
    mode less the umask, the last one then given that mode exactly."""
    perm = stat.S_IMODE(volume_root.stat().st_mode)
    path = volume_root
    for part in Path(sub_path).parts:
        path = path / part
        if not path.exists():
            path.mkdir(mode=perm & 0o777)
    path.chmod(perm)


class Retrying:
    """The API as a kubelet uses it: a call that fails because the apiserver is away (restarting, overloaded) is
    tried again with back-off, until it answers or the pod is stopped; answers such as 404 go to the caller."""

    def __init__(self, api: Any, stopping: threading.Event) -> None:
        self._api, self._stopping = api, stopping

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._api, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            delay = 0.2
            while True:
                try:
                    return method(*args, **kwargs)
                except (urllib3.exceptions.HTTPError, ApiException) as exc:
                    transient = not isinstance(exc, ApiException) or exc.status in (0, 429) or exc.status >= 500
                    if not transient or self._stopping.is_set():
                        raise
                    log.warning("api %s failed (%s); retrying in %.1f s", name, type(exc).__name__, delay)
                    self._stopping.wait(delay)
                    delay = min(delay * 2, 5.0)

        return call


def tail(text: str) -> str:
    lines = "\n".join(text.splitlines()[-TERMINATION_TAIL_LINES:])
    return lines.encode()[-TERMINATION_MAX_BYTES:].decode(errors="replace")


class PodRunner(threading.Thread):
    """Runs one pod to completion (or until deleted), reporting its status to the API."""

    def __init__(self, agent: NodeAgent, pod: Any) -> None:
        super().__init__(daemon=True, name=f"pod-{pod.metadata.namespace}/{pod.metadata.name}")
        self.agent = agent
        self.pod = pod
        self.stopping = threading.Event()
        self.core: Any = Retrying(client.CoreV1Api(agent.api_client), self.stopping)
        self.dir = agent.workdir / "pods" / pod.metadata.uid
        self.process: subprocess.Popen | None = None
        self.pod_ip = agent.next_pod_ip()
        self.restart_counts: dict[str, int] = {}

    @property
    def ref(self) -> str:
        return f"{self.pod.metadata.namespace}/{self.pod.metadata.name}"

    def run(self) -> None:
        try:
            self._run()
        except ContainerConfigError as exc:  # the kubelet retries with back-off, failing the same way, until deleted
            log.info("pod=%s container=%s refused: %s", self.ref, exc.container, exc)
            self._report_waiting(exc.container, "CreateContainerConfigError", str(exc), init=exc.init)
        except Exception as exc:  # a bug or an API failure must show up, not kill the agent silently
            log.exception("pod=%s agent failure: %s", self.ref, exc)
            with contextlib.suppress(Exception):  # as a kubelet reports a container it cannot create
                self._report_waiting(self.pod.spec.containers[0].name, "CreateContainerError", str(exc))

    def _run(self) -> None:
        spec = self.pod.spec
        mounts_by_volume = self._wait_for_volumes()
        if mounts_by_volume is None:
            return
        started = now()
        for init in spec.init_containers or []:
            code, message = self._run_container(init, mounts_by_volume, started, init=True)
            if self.stopping.is_set():
                return
            if code != 0:
                self._report_phase("Failed", started, {init.name: self._terminated(code, message, started)}, init=True)
                return
        containers = spec.containers
        if len(containers) != 1:
            self._report_waiting(containers[0].name, "Unsupported", "the node agent runs pods of one container")
            return
        container = containers[0]
        if is_serving_container(container):
            self._serve(container, mounts_by_volume, started)
            return
        while not self.stopping.is_set():
            code, message = self._run_container(container, mounts_by_volume, started)
            state = self._terminated(code, message, started)
            if self.stopping.is_set():
                # Deleted (an eviction, a drain): the kubelet reports the stopped container and the pod's terminal
                # phase before it removes the pod, keeping the conditions others set (the apiserver's
                # DisruptionTarget), which is what a Job's podFailurePolicy waits for and matches.
                self._report_phase("Succeeded" if code == 0 else "Failed", started, {container.name: state})
                return
            policy = spec.restart_policy or "Always"
            if code == 0 and policy != "Always":
                self._report_phase("Succeeded", started, {container.name: state})
                return
            if policy == "Never":
                self._report_phase("Failed", started, {container.name: state})
                return
            count = self.restart_counts[container.name] = self.restart_counts.get(container.name, 0) + 1
            self._report_phase("Running", started, {container.name: state}, ready=False)
            self.stopping.wait(min(2 ** (count - 1), 10))  # the kubelet's crash-loop back-off, shortened

    # Volumes ---------------------------------------------------------------------------------------------------

    def _wait_for_volumes(self) -> dict[str, Path] | None:
        while not self.stopping.is_set():
            try:
                return self._volumes()
            except VolumeNotReady as exc:
                self._report_waiting(self.pod.spec.containers[0].name, "ContainerCreating", str(exc))
                self.stopping.wait(1)
        return None

    def _volumes(self) -> dict[str, Path]:
        out: dict[str, Path] = {}
        ns = self.pod.metadata.namespace
        for volume in self.pod.spec.volumes or []:
            if volume.host_path:
                out[volume.name] = Path(volume.host_path.path)
            elif volume.persistent_volume_claim:
                out[volume.name] = self._claim_path(ns, volume.persistent_volume_claim.claim_name)
            elif volume.empty_dir is not None:
                out[volume.name] = self._fresh_dir(volume.name, 0o777)  # as the kubelet makes it: for any user
            elif volume.config_map:
                out[volume.name] = self._write_files(volume.name, self._data("ConfigMap", volume.config_map.name))
            elif volume.secret:
                out[volume.name] = self._write_files(volume.name, self._data("Secret", volume.secret.secret_name))
            elif volume.downward_api:
                items = volume.downward_api.items or []
                out[volume.name] = self._write_files(volume.name, {i.path: self._field(i).encode() for i in items})
            elif volume.projected:
                out[volume.name] = self._write_files(volume.name, self._projected(volume.projected.sources or []))
            else:
                out[volume.name] = self._fresh_dir(volume.name, 0o777)
        return out

    def _projected(self, sources: list[Any]) -> dict[str, bytes]:
        """A projected volume's files, as the kubelet writes them: the service account token the kubelet requests for
        the pod (bound to it, through the TokenRequest API: every pod's ``kube-api-access-*`` volume since Kubernetes
        1.24, and IRSA's token), configMap and secret keys, downwardAPI fields."""
        files: dict[str, bytes] = {}
        ns = self.pod.metadata.namespace
        for source in sources:
            if source.service_account_token:
                token = source.service_account_token
                request = {
                    "spec": {
                        "audiences": [token.audience] if token.audience else None,
                        "expirationSeconds": token.expiration_seconds or 3607,
                        "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": self.pod.metadata.name,
                                           "uid": self.pod.metadata.uid},
                    }
                }  # fmt: skip
                account = self.pod.spec.service_account_name or "default"
                issued = self.core.create_namespaced_service_account_token(account, ns, request)
                files[token.path] = issued.status.token.encode()
            elif source.config_map or source.secret:
                ref, kind = (source.config_map, "ConfigMap") if source.config_map else (source.secret, "Secret")
                try:
                    values = self._data(kind, ref.name)
                except ApiException as exc:
                    if exc.status != 404:
                        raise
                    if ref.optional:
                        continue
                    raise VolumeNotReady(f'{kind.lower()} "{ref.name}" not found') from None
                paths = {i.key: i.path for i in ref.items} if ref.items else {k: k for k in values}
                files.update({path: values[key] for key, path in paths.items() if key in values})
            elif source.downward_api:
                files.update({i.path: self._field(i).encode() for i in source.downward_api.items or []})
        return files

    def _data(self, kind: str, name: str) -> dict[str, bytes]:
        """A ConfigMap's or a Secret's data in the pod's namespace, as the bytes its files hold."""
        if kind == "ConfigMap":
            data = self.core.read_namespaced_config_map(name, self.pod.metadata.namespace).data or {}
            return {key: value.encode() for key, value in data.items()}
        data = self.core.read_namespaced_secret(name, self.pod.metadata.namespace).data or {}
        return {key: base64.b64decode(value) for key, value in data.items()}

    def _field(self, item: Any) -> str:
        """A downwardAPI file's content, as the kubelet writes it (a whole map as sorted key="value" lines)."""
        if item.field_ref is None:
            raise NotImplementedError(f"the node agent supports only fieldRef items in downwardAPI volumes: {item}")
        path, meta = item.field_ref.field_path, self.pod.metadata
        for name in ("labels", "annotations"):
            values = getattr(meta, name) or {}
            if path == f"metadata.{name}":
                return "\n".join(f'{k}="{values[k]}"' for k in sorted(values))
            if path.startswith(f"metadata.{name}['") and path.endswith("']"):
                return values.get(path[len(f"metadata.{name}['") : -2], "")
        simple = {"metadata.name": meta.name, "metadata.namespace": meta.namespace, "metadata.uid": meta.uid}
        if path not in simple:
            raise NotImplementedError(f"the node agent cannot resolve downwardAPI fieldPath {path}")
        return simple[path]

    def _claim_path(self, namespace: str, claim: str) -> Path:
        try:
            pvc = self.core.read_namespaced_persistent_volume_claim(claim, namespace)
        except ApiException as exc:
            raise VolumeNotReady(f'persistentvolumeclaim "{claim}" not found') from exc
        if pvc.status.phase != "Bound" or not pvc.spec.volume_name:
            raise VolumeNotReady(f'persistentvolumeclaim "{claim}" is not bound')
        pv = self.core.read_persistent_volume(pvc.spec.volume_name)
        if not pv.spec.host_path:
            raise VolumeNotReady(f"persistentvolume {pv.metadata.name} is not a hostPath volume")
        return Path(pv.spec.host_path.path)

    def _fresh_dir(self, name: str, mode: int) -> Path:
        path = self.dir / "volumes" / name
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(mode)
        return path

    def _write_files(self, name: str, files: dict[str, bytes]) -> Path:
        """A configMap, secret or downwardAPI volume: readable by any user, writable by none but root (mounted
        read-only)."""
        path = self._fresh_dir(name, 0o755)
        for key, value in files.items():
            (path / key).parent.mkdir(parents=True, exist_ok=True)
            (path / key).write_bytes(value)
            (path / key).chmod(0o644)
        return path

    def _mounts(self, container: Any, volumes: dict[str, Path]) -> list[Mount]:
        mounts = []
        for vm in container.volume_mounts or []:
            host = volumes[vm.name] / (vm.sub_path or "")
            if vm.sub_path and not host.exists():
                make_subpath(volumes[vm.name], vm.sub_path)
                log.info("pod=%s volume=%s subpath=%s created", self.ref, vm.name, vm.sub_path)
            mounts.append(Mount(vm.mount_path, host, bool(vm.read_only)))
        return mounts

    def _root_dir(self, container: Any, user: RunAs) -> Path:
        """The directory standing for the container's root filesystem (its HOME and default working directory):
        root's with readOnlyRootFilesystem (bind mounted read-only by ``_binds``), else the container's user's."""
        path = self.dir / "rootfs" / container.name
        path.mkdir(parents=True, exist_ok=True)
        owner = (0, 0) if _read_only_root(container) else (user.uid, user.gid)
        os.chown(path, *owner)
        path.chmod(0o755)
        return path

    @staticmethod
    def _binds(container: Any, mounts: list[Mount], root: Path) -> list[Mount]:
        """What the process's own mount namespace needs: mounts read at a fixed path no translation reaches (under
        /var/run/secrets), and a read-only root filesystem over itself."""
        binds = [m for m in mounts if (m.container_path.rstrip("/") + "/").startswith(BIND_MOUNT_PREFIX)]
        if _read_only_root(container):
            binds.append(Mount(str(root), root, read_only=True))
        return binds

    # Containers ------------------------------------------------------------------------------------------------

    def _environment(self, container: Any, mounts: list[Mount], root: Path) -> dict[str, str]:
        env = {
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
            "HOME": str(root),
            "HOSTNAME": self.pod.metadata.name,
            "KUBERNETES_SERVICE_HOST": self.agent.api_host,
            "KUBERNETES_SERVICE_PORT": str(self.agent.api_port),
        }
        fields = {
            "metadata.name": self.pod.metadata.name,
            "metadata.namespace": self.pod.metadata.namespace,
            "spec.nodeName": self.pod.spec.node_name,
            "status.podIP": self.pod_ip,
        }
        if AWS_CREDENTIAL_VARS & {var.name for var in container.env or []}:
            env.update(self.agent.aws_env)  # beneath the container's own: a spec's endpoint wins, as on a node
        for var in container.env or []:
            if var.value is not None:
                env[var.name] = translate(var.value, mounts)
            elif var.value_from and var.value_from.field_ref:
                env[var.name] = fields.get(var.value_from.field_ref.field_path, "")
            elif var.value_from:
                value = self._key_ref(container, var.value_from)
                if value is not None:
                    env[var.name] = value
        return env

    def _key_ref(self, container: Any, source: Any) -> str | None:
        """A secretKeyRef or configMapKeyRef value, read as the kubelet reads it; a missing object or key that is not
        optional is a CreateContainerConfigError in the kubelet's words (makeEnvironmentVariables)."""
        ref, kind = (
            (source.secret_key_ref, "Secret") if source.secret_key_ref else (source.config_map_key_ref, "ConfigMap")
        )
        if ref is None:
            return None
        namespace = self.pod.metadata.namespace
        try:
            data = self._data(kind, ref.name)
        except ApiException as exc:
            if exc.status != 404 or ref.optional:
                raise
            raise ContainerConfigError(container.name, False, f'{kind.lower()} "{ref.name}" not found') from None
        if ref.key not in data:
            if ref.optional:
                return None
            raise ContainerConfigError(
                container.name, False, f"couldn't find key {ref.key} in {kind} {namespace}/{ref.name}"
            )
        return data[ref.key].decode()

    def _verify(self, container: Any, init: bool) -> None:
        """What the kubelet checks before it asks the runtime for the container."""
        problem = non_root_violation(self.pod, container)
        if problem is not None:
            raise ContainerConfigError(container.name, init, problem)

    def _run_container(
        self, container: Any, volumes: dict[str, Path], started: str, init: bool = False
    ) -> tuple[int, str]:
        self._verify(container, init)
        name = container.name
        # The kubelet backs terminationMessagePath with a file of its own, writable by any user (0666).
        termination = self.dir / f"{name}.termination-log"
        termination.parent.mkdir(parents=True, exist_ok=True)
        termination.write_bytes(b"")
        termination.chmod(0o666)
        message_path = container.termination_message_path or DEFAULT_TERMINATION_MESSAGE_PATH
        mounts = [*self._mounts(container, volumes), Mount(message_path, termination, False)]
        argv = [translate(a, mounts) for a in [*(container.command or []), *(container.args or [])]]
        if not container.command:
            return 128, "the node agent needs an explicit command: it cannot read an image's entrypoint"
        user = run_as(self.pod, container)
        root = self._root_dir(container, user)
        env = self._environment(container, mounts, root)
        if shutil.which(argv[0], path=env["PATH"]) is None:
            return 127, f"executable file not found in $PATH: {argv[0]}"
        logfile = self.dir / f"{name}.log"
        logfile.parent.mkdir(parents=True, exist_ok=True)
        cwd = translate(container.working_dir, mounts) if container.working_dir else str(root)
        with logfile.open("wb") as out:
            self.process = subprocess.Popen(
                in_mount_namespace(as_user(argv, user), self._binds(container, mounts, root)),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=cwd,
                start_new_session=True,
            )
        log.info(
            "pod=%s container=%s started pid=%d uid=%d gid=%d groups=%s read_only_root=%s argv=%s",
            self.ref,
            name,
            self.process.pid,
            user.uid,
            user.gid,
            ",".join(map(str, user.groups)),
            _read_only_root(container),
            argv[:1],
        )
        running = {name: {"running": {"startedAt": now()}}}
        self._report_phase("Pending" if init else "Running", started, running, init=init, ready=not init)
        code = self.process.wait()
        if code < 0:  # killed by a signal: the runtime reports 128 + its number (143 for SIGTERM, 137 for SIGKILL)
            code = 128 - code
        self.process = None
        # As the kubelet: the file's content (at most 4 KiB), else, by policy, the tail of a failed container's log.
        message = termination.read_bytes()[:TERMINATION_MESSAGE_MAX_BYTES].decode(errors="replace")
        policy = container.termination_message_policy or "File"
        if not message.strip() and policy == "FallbackToLogsOnError" and code != 0:
            message = tail(logfile.read_text(errors="replace"))
        log.info("pod=%s container=%s exited code=%d", self.ref, name, code)
        return code, message

    def _serve(self, container: Any, volumes: dict[str, Path], started: str) -> None:
        self._verify(container, init=False)
        mounts = self._mounts(container, volumes)
        root = self._root_dir(container, run_as(self.pod, container))
        cores = _requested_cores(container)
        last: str | None = "(not checked yet)"
        while not self.stopping.is_set():
            reason = "CrashLoopBackOff"
            try:  # the kubelet makes the environment again at every attempt: a Secret created later is found
                env = self._environment(container, mounts, root)
                instance_type = self.agent.instance_types.get(self.pod.spec.node_name)
                problem = check_serving_container(container, env, cores, lambda p: translate(p, mounts), instance_type)
            except ContainerConfigError as exc:
                reason, problem = "CreateContainerConfigError", str(exc)
            if problem != last:
                if problem is None:
                    log.info("pod=%s serving model loaded cores=%s", self.ref, cores)
                    self._report_phase("Running", started, {container.name: {"running": {"startedAt": now()}}})
                else:
                    log.info("pod=%s serving check failed: %s %s", self.ref, reason, problem)
                    if reason == "CrashLoopBackOff":
                        self.restart_counts[container.name] = self.restart_counts.get(container.name, 0) + 1
                    state = {"waiting": {"reason": reason, "message": problem}}
                    self._report_phase("Running", started, {container.name: state}, ready=False)
                last = problem
            self.stopping.wait(SERVING_RECHECK_SECONDS)

    # Status ----------------------------------------------------------------------------------------------------

    @staticmethod
    def _terminated(code: int, message: str, started: str) -> dict[str, Any]:
        state: dict[str, Any] = {
            "exitCode": code,
            "reason": "Completed" if code == 0 else "Error",
            "startedAt": started,
            "finishedAt": now(),
        }
        if message:
            state["message"] = message
        return {"terminated": state}

    def _report_waiting(self, name: str, reason: str, message: str, *, init: bool = False) -> None:
        waiting = {name: {"waiting": {"reason": reason, "message": message}}}
        self._report_phase("Pending", None, waiting, init=init, ready=False)

    def _report_phase(
        self,
        phase: str,
        started: str | None,
        states: dict[str, dict[str, Any]],
        *,
        init: bool = False,
        ready: bool = True,
    ) -> None:
        containers = self.pod.spec.init_containers if init else self.pod.spec.containers
        statuses = [
            {
                "name": c.name,
                "image": c.image or "",
                "imageID": "",
                "containerID": f"localcluster://{self.pod.metadata.uid}/{c.name}",
                "ready": ready and "running" in states.get(c.name, {}),
                "restartCount": self.restart_counts.get(c.name, 0),
                "started": "running" in states.get(c.name, {}),
                "state": states.get(c.name, {"waiting": {"reason": "PodInitializing"}}),
            }
            for c in containers or []
        ]
        is_ready = phase == "Running" and all(s["ready"] for s in statuses) and not init
        stamp = now()
        conditions = [
            {"type": "Initialized", "status": "False" if init else "True", "lastTransitionTime": stamp},
            {"type": "ContainersReady", "status": str(is_ready), "lastTransitionTime": stamp},
            {"type": "Ready", "status": str(is_ready), "lastTransitionTime": stamp},
        ]
        status: dict[str, Any] = {
            "phase": phase,
            "conditions": conditions,
            "hostIP": self.agent.host_ip,
            "podIP": self.pod_ip,
            "podIPs": [{"ip": self.pod_ip}],
            "initContainerStatuses" if init else "containerStatuses": statuses,
        }
        if started:
            status["startTime"] = started
        try:
            self.core.patch_namespaced_pod_status(
                self.pod.metadata.name, self.pod.metadata.namespace, {"status": status}
            )
        except ApiException as exc:
            if exc.status != 404:  # a pod deleted meanwhile needs no status
                raise

    def stop(self, grace: float) -> None:
        """SIGTERM the process group, SIGKILL after the grace period (graceful deletion)."""
        self.stopping.set()
        process = self.process
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(min(grace, MAX_GRACE_SECONDS))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _read_only_root(container: Any) -> bool:
    return bool(container.security_context and container.security_context.read_only_root_filesystem)


def _requested_cores(container: Any) -> int | None:
    resources = container.resources
    for amounts in (resources and resources.limits, resources and resources.requests):
        if amounts and NEURONCORE in amounts:
            return int(amounts[NEURONCORE])
    return None


class NodeAgent:
    """Watches pods bound to simulated nodes and runs them. ``start()`` runs it in a background thread."""

    def __init__(self, kubeconfig: Path, workdir: Path, api_port: int, api_host: str = "127.0.0.1") -> None:
        self.api_client = config.new_client_from_config(str(kubeconfig))
        self.workdir = workdir
        self.api_port = api_port
        self.api_host = api_host  # the address the apiserver's serving certificate names
        self.host_ip = "10.0.0.1"
        # e.g. AWS_ENDPOINT_URL_STS/S3 of a local S3 server, for containers with IRSA or Pod Identity
        self.aws_env: dict[str, str] = {}
        self.runners: dict[str, PodRunner] = {}
        self.instance_types: dict[str, str | None] = {}  # of the simulated nodes, by name
        self._deleting: set[str] = set()
        self._ips = itertools.count(2)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._watch: watch.Watch | None = None
        self._lock = threading.Lock()

    def next_pod_ip(self) -> str:
        n = next(self._ips)
        return f"10.244.{n // 250}.{n % 250 + 2}"

    def start(self) -> None:
        if os.geteuid() != 0:  # as a kubelet: it runs containers as their users and mounts into their namespaces
            raise PermissionError("the node agent needs root: it runs each container as its user (setpriv)")
        self._thread = threading.Thread(target=self._loop, daemon=True, name="node-agent")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._watch is not None:
            self._watch.stop()
        for runner in list(self.runners.values()):
            runner.stop(grace=1)
        if self._thread is not None:
            self._thread.join(2)  # a watch blocked on a quiet stream ends with the process (daemon thread)

    def _simulated_nodes(self, core: client.CoreV1Api) -> set[str]:
        nodes = core.list_node(label_selector=f"{SIMULATED_LABEL}=true").items
        self.instance_types = {n.metadata.name: (n.metadata.labels or {}).get(INSTANCE_TYPE_LABEL) for n in nodes}
        return set(self.instance_types)

    def _loop(self) -> None:
        core = client.CoreV1Api(self.api_client)
        while not self._stop.is_set():
            try:
                listing = core.list_pod_for_all_namespaces(field_selector="spec.nodeName!=")
                nodes = self._simulated_nodes(core)
                seen = set()
                for pod in listing.items:
                    seen.add(pod.metadata.uid)
                    self._handle(core, pod, nodes)
                self._forget(seen)
                self._watch = watch.Watch()
                for event in self._watch.stream(
                    core.list_pod_for_all_namespaces,
                    field_selector="spec.nodeName!=",
                    resource_version=listing.metadata.resource_version,
                    timeout_seconds=60,
                ):
                    if self._stop.is_set():
                        return
                    pod = event["object"]
                    if pod.spec.node_name not in nodes:
                        nodes = self._simulated_nodes(core)
                    if event["type"] == "DELETED":
                        self._forget_uid(pod.metadata.uid)
                    else:
                        self._handle(core, pod, nodes)
            except ApiException as exc:
                if exc.status != 410:  # 410 Gone: the watch expired, re-list
                    log.warning("pod watch failed: %s %s; re-listing", exc.status, exc.reason)
                    self._stop.wait(1)
            except Exception as exc:  # the apiserver restarting, a dropped connection
                if not self._stop.is_set():
                    log.warning("pod watch interrupted: %s; re-listing", exc)
                    self._stop.wait(1)

    def _handle(self, core: client.CoreV1Api, pod: Any, nodes: set[str]) -> None:
        if pod.spec.node_name not in nodes:
            return
        uid = pod.metadata.uid
        if pod.metadata.deletion_timestamp is not None:
            with self._lock:
                if uid in self._deleting:
                    return
                self._deleting.add(uid)
                runner = self.runners.pop(uid, None)
            threading.Thread(target=self._delete, args=(core, pod, runner), daemon=True).start()
            return
        with self._lock:
            if uid in self.runners or (pod.status.phase in ("Succeeded", "Failed")):
                return
            runner = self.runners[uid] = PodRunner(self, pod)
        log.info("pod=%s/%s bound to node=%s: starting", pod.metadata.namespace, pod.metadata.name, pod.spec.node_name)
        runner.start()

    def _delete(self, core: client.CoreV1Api, pod: Any, runner: PodRunner | None) -> None:
        grace = pod.metadata.deletion_grace_period_seconds or 0
        if runner is not None:
            runner.stop(grace)
            runner.join(MAX_GRACE_SECONDS)  # its final status first, as a kubelet's status manager
        try:
            core.delete_namespaced_pod(
                pod.metadata.name,
                pod.metadata.namespace,
                body=client.V1DeleteOptions(
                    grace_period_seconds=0, preconditions=client.V1Preconditions(uid=pod.metadata.uid)
                ),
            )
        except ApiException as exc:
            if exc.status != 404:
                log.warning("pod=%s/%s delete failed: %s", pod.metadata.namespace, pod.metadata.name, exc.reason)
                return
        log.info("pod=%s/%s deleted after graceful stop", pod.metadata.namespace, pod.metadata.name)

    def _forget(self, seen: set[str]) -> None:
        for uid in set(self.runners) - seen:
            self._forget_uid(uid)

    def _forget_uid(self, uid: str) -> None:
        with self._lock:
            runner = self.runners.pop(uid, None)
            self._deleting.discard(uid)
        if runner is not None:
            runner.stop(grace=0)
