"""A control plane with simulated Neuron nodes and the node agent: what the tests, the demo and benchmarks use."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from kubernetes import client, config

from . import images
from .agent import NodeAgent, now
from .cluster import LocalCluster
from .identitywebhook import IdentityWebhook
from .nodes import SIMULATED_LABEL, node_manifest, node_names, node_status
from .realnode import GATEWAY, NODE_USER, PROXY_USER, RealNode

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

# Enough variety for the operator's tests: 2-core inf2/trn1, a 12-core inf2.24xlarge, 32-core trn1.32xlarge.
DEFAULT_NODES = {"inf2.xlarge": 2, "inf2.24xlarge": 1, "trn1.2xlarge": 1, "trn1.32xlarge": 2}


def example_serving_images() -> list[str]:
    """The TF Serving images the examples name: the stand-in is imported under each, so they pull nothing."""
    refs = set()
    for path in EXAMPLES.glob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "NeuronModel":
                refs.add((doc["spec"].get("serving") or {}).get("image"))
    return sorted(r for r in refs if r)


# The namespace labels of Pod Security Admission's strictest level, at the apiserver's own (latest) policy version.
RESTRICTED_PODS = {
    "pod-security.kubernetes.io/enforce": "restricted",
    "pod-security.kubernetes.io/enforce-version": "latest",
}


@dataclass
class SimulatedCluster:
    """Start with ``start()`` or as a context manager; ``api`` is a ready kubernetes ApiClient."""

    nodes: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_NODES))
    taints: list[dict[str, str]] | None = None  # e.g. [NEURON_TAINT], as Neuron node groups are often tainted
    workdir: Path | None = None
    # One real kubelet node beside the simulated ones, with these images imported (``images.ensure_images()``).
    real_node_images: dict[str, images.Image] | None = None
    cluster: LocalCluster = field(init=False)
    agent: NodeAgent | None = field(init=False, default=None)
    # EKS's pod identity webhook: IRSA and Pod Identity for every pod (``associate`` on it).
    identity_webhook: IdentityWebhook | None = field(init=False, default=None)
    api: client.ApiClient | None = field(init=False, default=None)
    real_node: RealNode | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if self.real_node_images is None:
            self.cluster = LocalCluster(workdir=self.workdir)
        else:
            self.cluster = LocalCluster(
                workdir=self.workdir, users={NODE_USER: "system:nodes", PROXY_USER: ""}, advertise_address=GATEWAY
            )
            # The examples name real TF Serving images: the stand-in is imported under those names too.
            standin = self.real_node_images[images.STANDIN].ref
            self.real_node = RealNode(
                self.cluster, list(self.real_node_images.values()), aliases={standin: example_serving_images()}
            )

    def __enter__(self) -> SimulatedCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def kubeconfig(self) -> Path:
        return self.cluster.kubeconfig

    def start(self) -> None:
        try:
            if self.real_node is not None:
                self.real_node.prepare()
            self.cluster.start()
            self.api = config.new_client_from_config(str(self.kubeconfig))
            self.identity_webhook = IdentityWebhook(self.cluster)  # before any pod is created
            self.identity_webhook.start()
            self.add_nodes(self.nodes, taints=self.taints)
            assert self.cluster.workdir is not None
            host = self.cluster.advertise_address or "127.0.0.1"
            self.agent = NodeAgent(self.kubeconfig, self.cluster.workdir / "agent", self.cluster.api_port, host)
            self.agent.start()
            if self.real_node is not None:
                self.real_node.start()
        except BaseException:
            self.stop()
            raise

    def add_nodes(
        self,
        counts: dict[str, int],
        *,
        taints: list[dict[str, str]] | None = None,
        prefix: str = "",
        labels: dict[str, str] | None = None,
    ) -> list[str]:
        core = client.CoreV1Api(self.api)
        names = []
        for name, instance_type in node_names(counts, prefix):
            core.create_node(node_manifest(name, instance_type, taints=taints, labels=labels))
            core.patch_node_status(name, node_status(instance_type, now()))
            # Admission taints every new node not-ready; without a node lifecycle controller, lift it ourselves.
            core.patch_node(name, {"spec": {"taints": taints or []}})
            names.append(name)
        return names

    @contextlib.contextmanager
    def place_on_real_node(self) -> Iterator[str]:
        """While inside, new pods can only schedule onto the real node: the simulated nodes are cordoned."""
        if self.real_node is None:
            raise RuntimeError("this cluster has no real node: start it with real_node_images")
        core = client.CoreV1Api(self.api)
        simulated = [n.metadata.name for n in core.list_node(label_selector=f"{SIMULATED_LABEL}=true").items]

        def cordon(names: list[str], unschedulable: bool) -> None:
            for name in names:
                core.patch_node(name, {"spec": {"unschedulable": unschedulable}})

        cordon(simulated, True)
        cordon([self.real_node.name], False)
        try:
            yield self.real_node.name
        finally:
            cordon([self.real_node.name], True)
            cordon(simulated, False)

    def create_namespace(self, name: str, timeout: float = 30, labels: dict[str, str] | None = None) -> str:
        """A namespace whose default service account exists, so pods can be created right away."""
        core = client.CoreV1Api(self.api)
        core.create_namespace({"metadata": {"name": name, "labels": labels or {}}})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            accounts = core.list_namespaced_service_account(name, field_selector="metadata.name=default").items
            if accounts:
                return name
            time.sleep(0.1)
        raise TimeoutError(f"namespace {name}: no default service account in {timeout} s")

    def restrict_pods(self, namespace: str) -> None:
        """Pod Security Admission's ``restricted`` level on ``namespace``, as platform teams set on shared clusters:
        the apiserver then refuses any pod that could run as root, escalate privileges, keep capabilities or run
        without a seccomp profile."""
        client.CoreV1Api(self.api).patch_namespace(namespace, {"metadata": {"labels": RESTRICTED_PODS}})

    def hostpath_volume(self, namespace: str, claim: str, path: Path, storage_class: str = "") -> str:
        """A PersistentVolume at ``path``, reserved for the claim ``namespace/claim``, as a static provisioner would
        make it: a PVC of that name and storage class (created before or after) binds to it. Returns the PV's name."""
        name = f"pv-{namespace}-{claim}"[:253]
        client.CoreV1Api(self.api).create_persistent_volume(
            {
                "metadata": {"name": name, "labels": {SIMULATED_LABEL: "true"}},
                "spec": {
                    "capacity": {"storage": "1Ti"},
                    "accessModes": ["ReadWriteMany", "ReadWriteOnce", "ReadOnlyMany"],
                    "hostPath": {"path": str(path)},
                    "storageClassName": storage_class,
                    "claimRef": {"namespace": namespace, "name": claim},
                    "persistentVolumeReclaimPolicy": "Retain",
                },
            }
        )
        return name

    def stop(self) -> None:
        if self.real_node is not None:
            self.real_node.stop()
        if self.agent is not None:
            self.agent.stop()
            self.agent = None
        if self.identity_webhook is not None:
            self.identity_webhook.stop()
            self.identity_webhook = None
        self.cluster.stop()
