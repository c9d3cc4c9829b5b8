"""End to end on the real node: the chart's operator image as a real pod, the rewrite Job in the rewrite image, TF
Serving stand-in pods answering predict requests through their Service, under scaling, a numCores change and
killed containers.

Everything here runs in containers on the kubelet node (``localcluster.realnode``): the kubelet enforces the
securityContexts (uid 65532, read-only root), mounts the claims (subPath included), sends the probes, and the
Neuron device plugin hands each pod its cores in ``NEURON_RT_VISIBLE_CORES``, which the stand-in checks against the
rewrite's tags. The simulated nodes are cordoned meanwhile (the ``real_node`` fixture).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from kubernetes import client

from localcluster import realnode
from localcluster.helm import helm, install_operator
from localcluster.httpserver import serving
from localcluster.images import Image
from localcluster.pytest_plugin import wait_for
from localcluster.realnode import example_on_real_node
from localcluster.simcluster import RESTRICTED_PODS, SimulatedCluster
from neuron_modelgen import Options, build_model, deneuronized_copy, run_serving_default, sample_input
from neuronmodel_operator.naming import MODEL_LABEL, model_label

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]
GROUP, VERSION, PLURAL = "serving.neuron.dev", "v1alpha1", "neuronmodels"
STORE_UID = 65532  # as an EFS access point owns the store's root: the uid the rewrite Job runs as
MODEL = "resnet50"


@dataclass
class Deployment:
    """The namespace where the chart's operator serves the example, and the handles the tests need."""

    cluster: SimulatedCluster
    namespace: str
    release: str
    sources: Path  # the directory behind the compiled-models claim
    expected: dict[str, np.ndarray]
    core: client.CoreV1Api = field(init=False)
    custom: client.CustomObjectsApi = field(init=False)

    def __post_init__(self) -> None:
        self.core = client.CoreV1Api(self.cluster.api)
        self.custom = client.CustomObjectsApi(self.cluster.api)

    def kubectl(self, *args: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
        return self.cluster.cluster.kubectl("-n", self.namespace, *args, check=check, input=input)

    def status(self, name: str = MODEL) -> dict[str, Any]:
        model = self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)
        return model.get("status") or {}

    def wait_status(self, check: Any, what: str, timeout: float = 300, name: str = MODEL) -> dict[str, Any]:
        try:
            return wait_for(lambda: check(self.status(name)) and self.status(name), timeout, what)
        except AssertionError:
            status = json.dumps(self.status(name), indent=1)
            raise AssertionError(f"{what}: never; status {status}\noperator log:\n{self.logs()}") from None

    def patch(self, spec: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, MODEL, {"spec": spec})

    def pods(self, selector: str) -> list[Any]:
        return self.core.list_namespaced_pod(self.namespace, label_selector=selector).items

    def serving_pods(self) -> list[Any]:
        return self.pods(f"{MODEL_LABEL}={model_label(MODEL)},app.kubernetes.io/component=serving")

    def operator_pod(self) -> Any:
        pods = [p for p in self.pods(f"app.kubernetes.io/instance={self.release}") if not p.metadata.deletion_timestamp]
        return pods[0] if len(pods) == 1 and _ready(pods[0]) else None

    def predict_url(self, name: str = MODEL, served_as: str = MODEL) -> str:
        service = self.core.read_namespaced_service(name, self.namespace)
        return f"http://{service.spec.cluster_ip}:8501/v1/models/{served_as}:predict"

    def logs(self) -> str:
        """The operator pod's log tail, read through the kubelet (what ``kubectl logs`` shows a user)."""
        pod = self.operator_pod()
        return self.kubectl("logs", pod.metadata.name, "--tail=30", check=False).stdout if pod else "(no operator pod)"


def _ready(pod: Any) -> bool:
    return pod.status.phase == "Running" and all(c.ready for c in pod.status.container_statuses or [])


@pytest.fixture(scope="module")
def deployed(
    cluster: SimulatedCluster, built_images: dict[str, Image], real_node: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    """The chart installed from the operator image, the example's claims bound to host directories, the example
    applied; the model is not waited for (the first test does)."""
    namespace = cluster.create_namespace("realnode-e2e", labels=RESTRICTED_PODS)
    tmp = tmp_path_factory.mktemp("realnode")
    (tmp / "compiled").mkdir()
    source = build_model(tmp / "compiled" / MODEL)
    expected = run_serving_default(deneuronized_copy(source, tmp / "cpu-copy"), sample_input(3))
    store = tmp / "store"
    store.mkdir()
    os.chown(store, STORE_UID, STORE_UID)
    for claim, path in (("compiled-models", source.parent), ("neuron-model-store", store)):
        cluster.hostpath_volume(namespace, claim, path, storage_class="efs-sc")  # the example claims' class
    release = "nmo"
    install_operator(cluster.kubeconfig, namespace, release, built_images["operator"].ref, built_images["rewrite"].ref)
    env = Deployment(cluster, namespace, release, source.parent, expected)
    env.kubectl("apply", "-f", str(REPO / "examples" / "store-pvc.yaml"))
    example = example_on_real_node((REPO / "examples" / "resnet50-inf2.yaml").read_text())
    env.kubectl("apply", "-f", "-", input=yaml.safe_dump(example))
    yield env
    env.kubectl("delete", "neuronmodel", MODEL, "--wait=true", "--timeout=120s", check=False)
    helm("uninstall", release, "-n", namespace, "--wait", kubeconfig=cluster.kubeconfig)
    env.core.delete_namespace(namespace)
    for claim in ("compiled-models", "neuron-model-store"):
        env.core.delete_persistent_volume(f"pv-{namespace}-{claim}")


def predict(url: str, x: np.ndarray) -> np.ndarray:
    return np.asarray(realnode.predict(url, x.tolist())["predictions"], dtype=np.float32)


def first_answer(url: str, x: np.ndarray) -> np.ndarray:
    return np.asarray(realnode.first_answer(url, x.tolist())["predictions"], dtype=np.float32)


class Traffic(threading.Thread):
    """A steady client: one request at a time, each on a new connection (as kube-proxy balances them), counted."""

    def __init__(self, url: str, x: np.ndarray, expected: np.ndarray) -> None:
        super().__init__(daemon=True)
        self.url, self.x, self.expected = url, x, expected
        self.ok = 0
        self.failures: list[str] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                answer = predict(self.url, self.x)
                if np.allclose(answer, self.expected, atol=1e-5):
                    self.ok += 1
                else:
                    self.failures.append(f"wrong answer {answer.tolist()}")
            except (OSError, RuntimeError, ValueError) as exc:
                self.failures.append(f"{time.strftime('%H:%M:%S')} {exc}")
            time.sleep(0.05)

    def stop(self) -> None:
        self.stopping.set()
        self.join(30)


def test_the_chart_runs_the_operator_image_as_a_real_non_root_pod(deployed: Deployment, real_node: str) -> None:
    pod = wait_for(deployed.operator_pod, what="the operator pod ready (the kubelet's probes pass)")
    assert pod.spec.node_name == real_node
    assert pod.status.container_statuses[0].image_id  # pulled into containerd, not played by the agent
    name = pod.metadata.name
    assert deployed.kubectl("exec", name, "--", "python", "-c", "import os; print(os.getuid())").stdout.strip() == (
        "65532"
    )
    write = deployed.kubectl("exec", name, "--", "python", "-c", "open('/probe', 'w')", check=False)
    assert write.returncode != 0 and "Read-only file system" in write.stderr
    # Only what production runs is in the image: the test harness is not.
    harness = deployed.kubectl("exec", name, "--", "python", "-c", "import localcluster", check=False)
    assert harness.returncode != 0 and "No module named 'localcluster'" in harness.stderr


def test_the_example_reaches_ready_on_the_real_node_and_answers_predict_through_its_service(
    deployed: Deployment, real_node: str
) -> None:
    status = deployed.wait_status(lambda s: s.get("phase") == "Ready", "the example Ready")
    assert status["servedCores"] == 2 and status["readyReplicas"] == 1
    # The rewrite ran in its image on the real node, as uid 65532 writing the store through its subPath.
    (job_pod,) = deployed.pods(f"{MODEL_LABEL}={model_label(MODEL)},app.kubernetes.io/component=rewrite")
    assert job_pod.spec.node_name == real_node
    assert job_pod.status.container_statuses[0].state.terminated.exit_code == 0
    (pod,) = deployed.serving_pods()
    assert pod.spec.node_name == real_node
    cores = deployed.kubectl("exec", pod.metadata.name, "--", "printenv", "NEURON_RT_VISIBLE_CORES").stdout.strip()
    assert len(_core_list(cores)) == 2  # the device plugin's allocation, which the stand-in checked the tags against
    x = sample_input(3)
    assert np.allclose(first_answer(deployed.predict_url(), x), deployed.expected["logits"], atol=1e-5)


def _core_list(cores: str) -> list[int]:
    out: list[int] = []
    for part in cores.split(","):
        low, _, high = part.partition("-")
        out += range(int(low), int(high or low) + 1)
    return out


def test_scaling_and_a_numcores_change_under_steady_traffic_lose_no_request(deployed: Deployment) -> None:
    deployed.wait_status(lambda s: s.get("phase") == "Ready", "the example Ready")
    first_answer(deployed.predict_url(), sample_input(3))
    traffic = Traffic(deployed.predict_url(), sample_input(3), deployed.expected["logits"])
    traffic.start()
    try:
        deployed.patch({"replicas": 2})
        deployed.wait_status(lambda s: s.get("phase") == "Ready" and s.get("readyReplicas") == 2, "2 replicas Ready")
        served_before = deployed.status()["rewrite"]["id"]
        deployed.patch({"numCores": 1})
        status = deployed.wait_status(
            lambda s: s.get("phase") == "Ready" and s.get("servedCores") == 1 and s.get("readyReplicas") == 2,
            "2 replicas Ready on 1 NeuronCore each",
            timeout=420,
        )
        assert status["rewrite"]["id"] != served_before
        wait_for(lambda: len(deployed.serving_pods()) == 2, what="the old pods gone")
        ok_at_change = traffic.ok
        wait_for(lambda: traffic.ok > ok_at_change + 10, what="requests answered by the new pods")
    finally:
        traffic.stop()
    assert traffic.failures == [], f"{len(traffic.failures)} of {traffic.ok + len(traffic.failures)} lost"
    assert traffic.ok > 50
    print(f"{traffic.ok} predict requests answered through the scale and the numCores change, none lost")


def test_a_killed_serving_container_and_a_deleted_operator_pod_recover(deployed: Deployment) -> None:
    deployed.wait_status(lambda s: s.get("phase") == "Ready", "the example Ready")
    pod = deployed.serving_pods()[0]
    container_id = pod.status.container_statuses[0].container_id.removeprefix("containerd://")
    assert deployed.cluster.real_node is not None
    deployed.cluster.real_node.kill_container(container_id)

    def restarted_and_ready() -> bool:
        now = deployed.core.read_namespaced_pod(pod.metadata.name, deployed.namespace)
        return now.status.container_statuses[0].restart_count >= 1 and _ready(now)

    wait_for(restarted_and_ready, timeout=180, what="the serving container restarted by the kubelet and ready")
    deployed.wait_status(lambda s: s.get("phase") == "Ready", "the model Ready again")
    assert np.allclose(first_answer(deployed.predict_url(), sample_input(3)), deployed.expected["logits"], atol=1e-5)

    old = wait_for(deployed.operator_pod, what="the operator pod")
    deployed.kubectl("delete", "pod", old.metadata.name, "--wait=false")
    new = wait_for(
        lambda: (p := deployed.operator_pod()) and p.metadata.name != old.metadata.name and p,
        timeout=180,
        what="a new operator pod ready",
    )
    assert new.spec.node_name == old.spec.node_name
    # The new pod picks the work up where the old one left it: a change after the restart is served.
    deployed.patch({"replicas": 1})
    deployed.wait_status(lambda s: s.get("phase") == "Ready" and s.get("replicas") == 1, "scaled to 1 by the new pod")


def test_after_a_kubelet_restart_the_device_plugin_registers_again_and_new_pods_get_cores(
    deployed: Deployment, real_node: str
) -> None:
    deployed.wait_status(lambda s: s.get("phase") == "Ready" and s.get("replicas") == 1, "the example Ready")
    node_api = deployed.core
    real = deployed.cluster.real_node
    assert real is not None
    plugin_log = deployed.cluster.cluster.workdir / "deviceplugin.log"
    registered = plugin_log.read_text().count("registered aws.amazon.com/neuroncore")
    real.restart("kubelet")  # the kubelet wipes the device plugin directory as it starts
    wait_for(
        lambda: plugin_log.read_text().count("registered aws.amazon.com/neuroncore") > registered,
        timeout=60,
        what="the device plugin registered with the new kubelet",
    )
    wait_for(
        lambda: (node_api.read_node(real_node).status.allocatable or {}).get("aws.amazon.com/neuroncore") == "12",
        timeout=60,
        what="the node's 12 NeuronCores advertised again",
    )
    # A pod admitted by the new kubelet gets its cores from the re-registered plugin, and serves.
    deployed.patch({"replicas": 2})
    deployed.wait_status(lambda s: s.get("phase") == "Ready" and s.get("readyReplicas") == 2, "2 replicas Ready")
    assert np.allclose(first_answer(deployed.predict_url(), sample_input(3)), deployed.expected["logits"], atol=1e-5)


def test_the_bert_example_with_batching_serves_a_tf1_model_on_eight_cores(deployed: Deployment) -> None:
    source = build_model(deployed.sources / "bert", Options(kind="tf1"))  # the claim path the example names
    expected = run_serving_default(deneuronized_copy(source, deployed.sources.parent / "bert-cpu"), sample_input(3))
    example = example_on_real_node((REPO / "examples" / "bert-trn1.yaml").read_text())
    example["spec"]["replicas"] = 1  # its 4 replicas of 8 cores need a trn1.32xlarge; the real node has 12 cores
    deployed.kubectl("apply", "-f", "-", input=yaml.safe_dump(example))
    status = deployed.wait_status(lambda s: s.get("phase") == "Ready", "the bert example Ready", name="bert")
    assert status["servedCores"] == 8
    # Served as spec.model.name, with the example's batching parameters file, which the stand-in parsed.
    answer = first_answer(deployed.predict_url("bert", served_as="bert-base"), sample_input(3))
    assert np.allclose(answer, expected["y"], atol=1e-5)


def test_a_tf_serving_base_path_source_serves_its_newest_version(deployed: Deployment) -> None:
    # As AWS's TF Serving tutorials upload a model: numbered version folders under one base path.
    base = deployed.sources / "tutorial"
    for version in ("1", "2"):
        shutil.copytree(deployed.sources / MODEL, base / version)
    manifest = example_on_real_node((REPO / "examples" / "resnet50-inf2.yaml").read_text())
    manifest["metadata"]["name"] = "tutorial"
    manifest["spec"]["source"]["pvc"]["path"] = "tutorial"
    manifest["spec"]["numCores"] = 1
    deployed.kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest))
    status = deployed.wait_status(lambda s: s.get("phase") == "Ready", "the base-path model Ready", name="tutorial")
    assert status["rewrite"]["sourceVersion"] == 2
    # The stand-in loads what TF Serving loads (saved_model.pb directly in the newest version folder) or nothing.
    answer = first_answer(deployed.predict_url("tutorial", served_as="tutorial"), sample_input(3))
    assert np.allclose(answer, deployed.expected["logits"], atol=1e-5)


def test_tf_serving_and_the_operator_serve_their_metrics_where_the_annotations_say(deployed: Deployment) -> None:
    first_answer(deployed.predict_url(), sample_input(3))  # at least one request for the server to count
    pod = next(p for p in deployed.serving_pods() if _ready(p))
    marks = pod.metadata.annotations
    assert marks["prometheus.io/scrape"] == "true"
    url = f"http://{pod.status.pod_ip}:{marks['prometheus.io/port']}{marks['prometheus.io/path']}"
    with urllib.request.urlopen(url, timeout=10) as page:  # the stand-in serves it only as its config file says
        text = page.read().decode()
    assert f':tensorflow:serving:request_count{{model_name="{MODEL}",status="OK"}}' in text, text

    operator = deployed.operator_pod()
    marks = operator.metadata.annotations
    url = f"http://{operator.status.pod_ip}:{marks['prometheus.io/port']}{marks['prometheus.io/path']}"
    with urllib.request.urlopen(url, timeout=10) as page:
        text = page.read().decode()
    assert 'neuronmodel_models{phase="Ready"}' in text and "neuronmodel_reconciles_total" in text, text


def test_pod_template_additions_run_on_the_kubelet(deployed: Deployment, built_images: dict[str, Image]) -> None:
    # What a platform team adds to the serving pods: a mesh's labels, a PriorityClass, a spread, slower probes, a
    # file from a ConfigMap (a warmup request, say) and a sidecar that reads it too.
    deployed.kubectl("create", "configmap", "dressed-warmup", "--from-literal=request.json={}")
    deployed.kubectl(
        "apply", "-f", "-",
        input=yaml.safe_dump(
            {"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass", "metadata": {"name": "neuron-serving"},
             "value": 100000, "description": "serving pods"}
        ),
    )  # fmt: skip
    manifest = example_on_real_node((REPO / "examples" / "resnet50-inf2.yaml").read_text())
    manifest["metadata"]["name"] = "dressed"
    manifest["spec"]["numCores"] = 1
    sidecar = {
        "name": "reader",
        "image": built_images["rewrite"].ref,  # any image on the node with a shell's tools
        "command": ["sleep", "infinity"],
        "volumeMounts": [{"name": "warmup", "mountPath": "/warmup", "readOnly": True}],
        "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "32Mi"}},
        # What the namespace's restricted Pod Security level asks of every container the pod's context does not
        # cover (without it the apiserver refuses the pods and the model says PodsRefused).
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    manifest["spec"]["serving"] |= {
        "podLabels": {"team": "search"},
        "podAnnotations": {"example.com/cost-center": "ml-42"},
        "priorityClassName": "neuron-serving",
        "terminationGracePeriodSeconds": 45,
        "topologySpreadConstraints": [
            {"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "ScheduleAnyway"}
        ],
        "probes": {"readiness": {"periodSeconds": 2, "timeoutSeconds": 2}},
        "volumes": [{"name": "warmup", "configMap": {"name": "dressed-warmup"}}],
        "volumeMounts": [{"name": "warmup", "mountPath": "/warmup", "readOnly": True}],
        "sidecars": [sidecar],
    }
    deployed.kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest))
    deployed.wait_status(lambda s: s.get("phase") == "Ready", "the dressed model Ready", name="dressed")

    (pod,) = deployed.pods(f"{MODEL_LABEL}={model_label('dressed')},app.kubernetes.io/component=serving")
    assert pod.metadata.labels["team"] == "search"
    assert pod.metadata.annotations["example.com/cost-center"] == "ml-42"
    assert pod.spec.priority == 100000  # resolved by the apiserver's Priority admission
    assert pod.spec.termination_grace_period_seconds == 45
    assert pod.spec.topology_spread_constraints[0].label_selector.match_labels[MODEL_LABEL] == model_label("dressed")
    assert sorted((c.name, c.ready) for c in pod.status.container_statuses) == [("reader", True), ("tfserving", True)]
    for container in ("tfserving", "reader"):  # the kubelet mounted the ConfigMap in both
        read = deployed.kubectl("exec", pod.metadata.name, "-c", container, "--", "cat", "/warmup/request.json")
        assert read.stdout == "{}", (container, read.stdout, read.stderr)
    answer = first_answer(deployed.predict_url("dressed", served_as="dressed"), sample_input(3))
    assert np.allclose(answer, deployed.expected["logits"], atol=1e-5)
    deployed.kubectl("delete", "neuronmodel", "dressed", "--wait=true", "--timeout=120s")


def test_an_http_archive_source_is_unpacked_by_the_rewrite_image_and_served(deployed: Deployment) -> None:
    """The rewrite image, as uid 65532 in containerd, fetches the archive across the pod network (the bridge's
    address is the host's), unpacks it into the store as it downloads, and the served model answers."""
    www = deployed.sources.parent / "www"
    www.mkdir(exist_ok=True)
    with tarfile.open(www / "resnet50.tar.gz", "w:gz") as tar:
        tar.add(deployed.sources / MODEL, arcname=MODEL)
    with serving(www, host=realnode.GATEWAY) as server:
        manifest = example_on_real_node((REPO / "examples" / "resnet50-inf2.yaml").read_text())
        manifest["metadata"]["name"] = "fromweb"
        manifest["spec"]["source"] = {"http": {"url": f"{server.url}/resnet50.tar.gz"}}
        manifest["spec"]["numCores"] = 1
        deployed.kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest))
        status = deployed.wait_status(lambda s: s.get("phase") == "Ready", "the archive's model Ready", name="fromweb")
        assert server.log[:1] == ["GET /resnet50.tar.gz range=None -> 200"]
    assert status["rewrite"]["neuronOps"] >= 1
    answer = first_answer(deployed.predict_url("fromweb", served_as="fromweb"), sample_input(3))
    assert np.allclose(answer, deployed.expected["logits"], atol=1e-5)
    deployed.kubectl("delete", "neuronmodel", "fromweb", "--wait=true")
