"""The operator against the real local control plane: CRD, store and source volumes, the operator process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from localcluster import awsidentity, s3server
from localcluster.pytest_plugin import wait_for
from localcluster.simcluster import SimulatedCluster
from neuron_modelgen import Options, build_model
from neuronmodel_operator.naming import MODEL_LABEL, model_label

REPO = Path(__file__).resolve().parents[2]
CRD = REPO / "crds" / "neuronmodel.yaml"
GROUP, VERSION, PLURAL = "serving.neuron.dev", "v1alpha1", "neuronmodels"
REWRITE_IMAGE = "local/rewrite:test"  # the node agent runs the command: any image name will do


@pytest.fixture(scope="session")
def crd(cluster: SimulatedCluster) -> None:
    cluster.cluster.kubectl("apply", "-f", str(CRD))
    wait_for(
        lambda: cluster.cluster.kubectl("get", "neuronmodels", "-A", check=False).returncode == 0,
        what="CRD established",
    )


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Compiled models the NeuronModels' sources point at (the operator only reads them)."""
    root = tmp_path_factory.mktemp("sources")
    return {
        "resnet50": build_model(root / "resnet50", Options(kind="tf2")),
        "bert": build_model(root / "bert", Options(kind="tf1")),
        "pipelined": build_model(root / "pipelined", Options(pipeline=4)),
    }


class Env:
    """One test's namespace, volumes and operator process."""

    def __init__(self, cluster: SimulatedCluster, namespace: str, tmp: Path) -> None:
        self.cluster, self.namespace, self.tmp = cluster, namespace, tmp
        self.core = client.CoreV1Api(cluster.api)
        self.apps = client.AppsV1Api(cluster.api)
        self.batch = client.BatchV1Api(cluster.api)
        self.custom = client.CustomObjectsApi(cluster.api)
        self.operator: subprocess.Popen | None = None
        self.replicas: list[subprocess.Popen] = []  # operators started with peering
        self.log = tmp / "operator.log"
        self.volumes: list[str] = []

    def hostpath_claim(self, claim: str, path: Path, storage_class: str = "", create_claim: bool = True) -> None:
        """A PVC bound to a hostPath PV at ``path``; with ``create_claim=False`` only the PV, for a manifest's PVC."""
        self.volumes.append(self.cluster.hostpath_volume(self.namespace, claim, path, storage_class))
        if create_claim:
            self.core.create_namespaced_persistent_volume_claim(
                self.namespace,
                {
                    "metadata": {"name": claim},
                    "spec": {
                        "accessModes": ["ReadWriteMany"],
                        "resources": {"requests": {"storage": "10Gi"}},
                        "storageClassName": storage_class,
                    },
                },
            )
            # Bound before a model uses it: tests then see a model's steps, not the claim binding (RewritePending).
            wait_for(
                lambda: (
                    self.core.read_namespaced_persistent_volume_claim(claim, self.namespace).status.phase == "Bound"
                ),
                what=f"claim {claim} bound",
            )

    def _spawn_operator(
        self, log: Path, *args: str, rewrite_image: str = REWRITE_IMAGE, **settings: str
    ) -> subprocess.Popen:
        env = dict(
            os.environ, KUBECONFIG=str(self.cluster.kubeconfig), NEURONMODEL_REWRITE_IMAGE=rewrite_image, **settings
        )
        with log.open("ab") as out:
            return subprocess.Popen(
                [sys.executable, "-m", "neuronmodel_operator", "-n", self.namespace, "--liveness", "", *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )

    def start_operator(self, rewrite_image: str = REWRITE_IMAGE, **settings: str) -> None:
        """``rewrite_image``: the chart's default rewrite image, as a new operator release would change it;
        ``settings``: more of the environment the chart sets (NEURONMODEL_METRICS_PORT, say)."""
        self.operator = self._spawn_operator(self.log, "--standalone", rewrite_image=rewrite_image, **settings)

    def start_replica(self, peering: str, priority: int) -> Path:
        """One more operator process in the peering ``peering``; returns its log file."""
        log = self.tmp / f"operator-{len(self.replicas)}.log"
        self.replicas.append(self._spawn_operator(log, "--peering", peering, "--priority", str(priority)))
        return log

    def kill_operator(self) -> None:
        if self.operator is not None and self.operator.poll() is None:
            os.killpg(self.operator.pid, signal.SIGKILL)
            self.operator.wait()
        self.operator = None

    def stop_operator(self) -> None:
        for process in [self.operator, *self.replicas]:
            if process is not None and process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
        self.operator, self.replicas = None, []

    def apply(self, manifest: dict[str, Any] | str) -> subprocess.CompletedProcess[str]:
        text = manifest if isinstance(manifest, str) else yaml.safe_dump(manifest)
        return self.cluster.cluster.kubectl("apply", "-n", self.namespace, "-f", "-", input=text, check=False)

    def model(self, name: str) -> dict[str, Any]:
        return self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)

    def patch_spec(self, name: str, spec: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name, {"spec": spec})

    def status(self, name: str) -> dict[str, Any]:
        return self.model(name).get("status") or {}

    def condition(self, name: str, kind: str) -> dict[str, Any]:
        return next((c for c in self.status(name).get("conditions") or [] if c["type"] == kind), {})

    def wait_phase(self, name: str, phase: str, timeout: float = 120) -> dict[str, Any]:
        try:
            return wait_for(lambda: self.status(name).get("phase") == phase and self.status(name), timeout, phase)
        except AssertionError:
            tail = "\n".join(self.log.read_text(errors="replace").splitlines()[-40:]) if self.log.exists() else ""
            raise AssertionError(
                f"{name} never reached {phase}; status: {self.status(name)}\noperator log:\n{tail}"
            ) from None

    def scale_and_wait(self, name: str, replicas: int) -> None:
        """A change the operator must act on: evidence that it has reconciled the model since it (re)started."""
        self.patch_spec(name, {"replicas": replicas})
        wait_for(
            lambda: self.status(name).get("readyReplicas") == replicas and self.status(name).get("phase") == "Ready",
            what=f"{name} Ready with {replicas} replicas",
        )

    def audit_offset(self) -> int:
        """Where the apiserver's audit log ends now: what ``operator_writes`` reads from."""
        return (self.cluster.cluster.workdir / "audit.log").stat().st_size

    def operator_writes(self, offset: int) -> list[tuple[str, str, str]]:
        """The operator's writes in the test's namespace since ``offset`` of the apiserver's audit log, as
        (verb, resource, subresource)."""
        with (self.cluster.cluster.workdir / "audit.log").open() as log:
            log.seek(offset)
            events = [json.loads(line) for line in log if line.strip()]
        assert events, "the audit log recorded nothing: the check would be vacuous"
        return [
            (e["verb"], e["objectRef"].get("resource"), e["objectRef"].get("subresource", ""))
            for e in events
            if e["verb"] in ("create", "update", "patch", "delete", "deletecollection")
            and e.get("objectRef", {}).get("namespace") == self.namespace
            and e.get("userAgent", "").startswith(("neuronmodel-operator", "kopf/"))
        ]

    def jobs(self) -> list[Any]:
        return self.batch.list_namespaced_job(self.namespace).items


STORE_UID = 65532  # the uid (and gid) the rewrite Job runs as


def make_store(path: Path) -> Path:
    """The store's root as an EFS access point (or an NFS export's root directory) presents it: owned by the uid the
    rewrite Job runs as, since fsGroup does nothing there and the node agent, as a kubelet, enforces the Job's uid."""
    path.mkdir()
    os.chown(path, STORE_UID, STORE_UID)
    return path


@dataclass(frozen=True)
class LocalS3:
    endpoint: str
    log: Path  # where the server records the requests it refused (s3.refusals)


@pytest.fixture(scope="session")
def local_s3(cluster: SimulatedCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalS3]:
    """A local S3 and STS; the node agent points the pods EKS's pod identity webhook gave an identity at it, as their
    node's network would reach AWS. STS takes the cluster's service-account tokens for the roles the tests' service
    accounts name, and only those."""
    log = tmp_path_factory.mktemp("s3") / "s3.log"
    identity = awsidentity.Options(kubeconfig=cluster.kubeconfig)
    with s3server.running(log, identity=identity) as endpoint:
        awsidentity.trust(
            endpoint, "arn:aws:iam::111122223333:role/neuron-model-reader", "system:serviceaccount:*:model-reader"
        )
        awsidentity.trust(endpoint, "arn:aws:iam::1:role/r", "system:serviceaccount:*:reader")
        assert cluster.agent is not None
        cluster.agent.aws_env.update({"AWS_ENDPOINT_URL_S3": endpoint, "AWS_ENDPOINT_URL_STS": endpoint})
        yield LocalS3(endpoint, log)


@pytest.fixture
def env(cluster: SimulatedCluster, crd: None, namespace: str, tmp_path: Path) -> Iterator[Env]:
    cluster.restrict_pods(namespace)  # the operator's pods pass Pod Security's restricted level
    environment = Env(cluster, namespace, tmp_path)
    environment.hostpath_claim("model-store", make_store(tmp_path / "store"))
    environment.start_operator()
    yield environment
    environment.stop_operator()
    for pv in environment.volumes:
        environment.core.delete_persistent_volume(pv)


def neuron_model(name: str, source_claim: str, *, cores: int = 2, replicas: int = 1, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "NeuronModel",
        "metadata": {"name": name},
        "spec": {
            "source": {"pvc": {"claimName": source_claim}},
            "numCores": cores,
            "replicas": replicas,
            "store": {"claimName": "model-store"},
            "serving": {"image": "public.ecr.aws/neuron/tensorflow-inference-neuronx:test"},
            **spec,
        },
    }


def serving_pods(env: Env, model: str) -> list[Any]:
    selector = f"{MODEL_LABEL}={model_label(model)},app.kubernetes.io/component=serving"
    return env.core.list_namespaced_pod(env.namespace, label_selector=selector).items
