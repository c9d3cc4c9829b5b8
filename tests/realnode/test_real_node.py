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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tensorflow as tf
import yaml
from kubernetes import client
from tensorflow_serving.apis import get_model_metadata_pb2, predict_pb2, prediction_service_pb2_grpc

from localcluster import awsidentity, realnode, s3server
from localcluster.helm import CHART, helm, install_operator
from localcluster.httpserver import serving
from localcluster.images import Image
from localcluster.pytest_plugin import wait_for
from localcluster.realnode import example_on_real_node
from localcluster.s3server import upload_tree
from localcluster.simcluster import RESTRICTED_PODS, SimulatedCluster
from neuron_modelgen import Options, build_model, deneuronized_copy, run_serving_default, sample_input
from neuronmodel_operator.crd import CRD_NAME, DIGEST_ANNOTATION
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

    def grpc_target(self, name: str = MODEL) -> str:
        """The model's Service, port grpc: where TF Serving's gRPC clients connect."""
        return f"{self.core.read_namespaced_service(name, self.namespace).spec.cluster_ip}:8500"

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


class GrpcClient:
    """A TF Serving gRPC client as AWS's Neuron tutorials write one: one channel, kept open, for every call."""

    def __init__(self, target: str) -> None:
        self.channel = grpc.insecure_channel(target)
        self.stub = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)

    def input_name(self, model: str = MODEL) -> str:
        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        request.model_spec.name = model
        answer = self.stub.GetModelMetadata(request, timeout=10)
        signatures = get_model_metadata_pb2.SignatureDefMap()
        answer.metadata["signature_def"].Unpack(signatures)
        (name,) = signatures.signature_def["serving_default"].inputs
        return name

    def predict(self, x: np.ndarray, input_name: str, model: str = MODEL) -> dict[str, np.ndarray]:
        request = predict_pb2.PredictRequest()
        request.model_spec.name = model
        request.model_spec.signature_name = "serving_default"
        request.inputs[input_name].CopyFrom(tf.make_tensor_proto(x))
        answer = self.stub.Predict(request, timeout=10)
        return {key: tf.make_ndarray(value) for key, value in answer.outputs.items()}

    def close(self) -> None:
        self.channel.close()


class Traffic(threading.Thread):
    """A steady client: one request at a time (``call``), each answer checked and counted, each failure recorded in the
    client's words. It retries nothing itself: a request that fails is lost."""

    def __init__(
        self,
        call: Callable[[], np.ndarray],
        expected: np.ndarray,
        pause: float,
        close: Callable[[], None] = lambda: None,
    ) -> None:
        super().__init__(daemon=True)
        self.call, self.expected, self.pause, self.close = call, expected, pause, close
        self.ok = 0
        self.failures: list[str] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                answer = self.call()
                if np.allclose(answer, self.expected, atol=1e-5):
                    self.ok += 1
                else:
                    self.failures.append(f"wrong answer {answer.tolist()}")
            except grpc.RpcError as exc:  # gRPC retried it already where its semantics allow (not yet sent)
                self.failures.append(f"{time.strftime('%H:%M:%S')} {exc.code().name}: {exc.details()}")
            except (OSError, RuntimeError, ValueError) as exc:
                self.failures.append(f"{time.strftime('%H:%M:%S')} {exc}")
            time.sleep(self.pause)

    def stop(self) -> None:
        self.stopping.set()
        self.join(30)
        self.close()


def rest_traffic(url: str, x: np.ndarray, expected: np.ndarray) -> Traffic:
    """Each request on a new connection, as kube-proxy balances them."""
    return Traffic(lambda: predict(url, x), expected, pause=0.05)


def grpc_traffic(target: str, x: np.ndarray, expected: np.ndarray) -> Traffic:
    """One channel for the client's whole life, as TF Serving's gRPC clients keep it."""
    client = GrpcClient(target)
    name = client.input_name()
    return Traffic(lambda: client.predict(x, name)["logits"], expected, pause=0.01, close=client.close)


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
    # The same numbers over gRPC, through the Service's port 8500 (TF Serving's own protos, a TensorProto input).
    client = GrpcClient(deployed.grpc_target())
    try:
        outputs = client.predict(x, client.input_name())
    finally:
        client.close()
    assert outputs.keys() == {"logits"}
    assert np.allclose(outputs["logits"], deployed.expected["logits"], atol=1e-5)


def _core_list(cores: str) -> list[int]:
    out: list[int] = []
    for part in cores.split(","):
        low, _, high = part.partition("-")
        out += range(int(low), int(high or low) + 1)
    return out


GRPC_CLIENTS = 4


def test_scaling_and_a_numcores_change_under_steady_rest_and_grpc_traffic_lose_no_request(
    deployed: Deployment,
) -> None:
    deployed.wait_status(lambda s: s.get("phase") == "Ready", "the example Ready")
    x, expected = sample_input(3), deployed.expected["logits"]
    first_answer(deployed.predict_url(), x)
    rest = rest_traffic(deployed.predict_url(), x, expected)
    grpcs = [grpc_traffic(deployed.grpc_target(), x, expected) for _ in range(GRPC_CLIENTS)]
    clients = [rest, *grpcs]
    for traffic in clients:
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
        wait_for(lambda: len(deployed.serving_pods()) == 2, timeout=120, what="the old pods gone")
        # Scale 2 -> 1: the gRPC clients whose connection is on the pod that goes must move to the other one.
        deployed.patch({"replicas": 1})
        wait_for(lambda: len(deployed.serving_pods()) == 1, timeout=120, what="the second pod gone")
        answered = [traffic.ok for traffic in clients]
        wait_for(
            lambda: all(t.ok > n + 10 for t, n in zip(clients, answered, strict=True)),
            what="every client answered by the remaining pod",
        )
    finally:
        for traffic in clients:
            traffic.stop()
    lost = {"REST": rest.failures, "gRPC": [f for t in grpcs for f in t.failures]}
    counts = {"REST": rest.ok, "gRPC": sum(t.ok for t in grpcs)}
    assert lost == {"REST": [], "gRPC": []}, f"lost {lost} of {counts} answered"
    assert counts["REST"] > 50 and counts["gRPC"] > 200
    print(f"answered through the scale up, the numCores change and the scale down, none lost: {counts}")


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
    deployed.patch({"replicas": 2})
    deployed.wait_status(
        lambda s: s.get("phase") == "Ready" and s.get("readyReplicas") == 2, "scaled to 2 by the new pod"
    )


def test_after_a_kubelet_restart_the_device_plugin_registers_again_and_new_pods_get_cores(
    deployed: Deployment, real_node: str
) -> None:
    deployed.wait_status(lambda s: s.get("phase") == "Ready" and s.get("replicas") == 2, "the example Ready")
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
    before = {p.metadata.name for p in deployed.serving_pods()}
    deployed.kubectl("delete", "pod", sorted(before)[0], "--wait=false")
    wait_for(
        lambda: any(p.metadata.name not in before and _ready(p) for p in deployed.serving_pods()),
        timeout=180,
        what="the replacement pod ready",
    )
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


# S3 through the identities EKS gives pods. The local S3 and STS listen on the pod bridge's gateway (reachable from
# the real node's pods and this machine only), the EKS Pod Identity Agent on its link-local address, added to the
# bridge as EKS adds it to each node. The STS and the agent take only tokens the apiserver signed (its issuer's keys)
# for the right audience, and S3 only the credentials they handed out. EKS's pod identity webhook injects the
# variables and the token volumes, as on EKS.
ROLE = "arn:aws:iam::111122223333:role/neuron-model-reader"  # examples/s3-irsa.yaml's
AGENT = "169.254.170.23"  # where EKS's Pod Identity Agent answers on every node
BUCKET, FAR_BUCKET = "my-neuron-models", "eu-neuron-models"


@dataclass(frozen=True)
class Aws:
    endpoint: str
    log: Path

    def logged(self, event: str) -> list[str]:
        return [line for line in self.log.read_text().splitlines() if line.startswith(event)]


@pytest.fixture(scope="module")
def aws(deployed: Deployment, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Aws]:
    log = tmp_path_factory.mktemp("aws") / "s3.log"
    identity = awsidentity.Options(kubeconfig=deployed.cluster.kubeconfig, agent=(AGENT, 80))
    with realnode.bridge_address(AGENT), s3server.running(log, host=realnode.GATEWAY, identity=identity) as endpoint:
        upload_tree(endpoint, BUCKET, f"{MODEL}/", deployed.sources / MODEL)
        upload_tree(endpoint, FAR_BUCKET, f"{MODEL}/", deployed.sources / MODEL, region="eu-west-1")
        awsidentity.trust(endpoint, ROLE, f"system:serviceaccount:{deployed.namespace}:model-reader")
        yield Aws(endpoint, log)


def s3_example(deployed: Deployment, aws: Aws, name: str, account: str, **source: str) -> dict[str, Any]:
    """examples/s3-irsa.yaml's NeuronModel on the real node, named ``name``, as ``account``, one replica; the S3 and
    STS endpoints are the local ones (a cluster without internet access sets an STS VPC endpoint the same way)."""
    _, model = yaml.safe_load_all((REPO / "examples" / "s3-irsa.yaml").read_text())
    manifest = example_on_real_node(yaml.safe_dump(model))
    manifest["metadata"]["name"] = name
    manifest["spec"] |= {"serviceAccountName": account, "replicas": 1}
    manifest["spec"]["source"]["s3"] |= {"endpointUrl": aws.endpoint, **source}
    manifest["spec"]["rewrite"] = {"env": [{"name": "AWS_ENDPOINT_URL_STS", "value": aws.endpoint}]}
    return manifest


def service_account(deployed: Deployment, name: str, role: str | None = None) -> None:
    annotations = {"eks.amazonaws.com/role-arn": role} if role else {}
    account = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "annotations": annotations}}
    deployed.kubectl("apply", "-f", "-", input=yaml.safe_dump(account))


def rewrite_env(deployed: Deployment, name: str) -> dict[str, str]:
    (pod, *_) = deployed.pods(f"{MODEL_LABEL}={model_label(name)},app.kubernetes.io/component=rewrite")
    assert pod.spec.node_name == realnode.NODE_NAME
    return {e.name: e.value for e in pod.spec.containers[0].env or []}


def test_the_s3_irsa_example_reaches_ready_on_the_real_node_through_irsa(deployed: Deployment, aws: Aws) -> None:
    account, _ = yaml.safe_load_all((REPO / "examples" / "s3-irsa.yaml").read_text())
    deployed.kubectl("apply", "-f", "-", input=yaml.safe_dump(account))  # the example's, with its role annotation
    deployed.kubectl("apply", "-f", "-", input=yaml.safe_dump(s3_example(deployed, aws, "irsa", "model-reader")))
    deployed.wait_status(lambda s: s.get("phase") == "Ready", "the IRSA model Ready", name="irsa")
    # What the webhook injected, and what the STS and S3 saw: the apiserver's token exchanged for the role's keys.
    env = rewrite_env(deployed, "irsa")
    assert env["AWS_ROLE_ARN"] == ROLE
    assert env["AWS_WEB_IDENTITY_TOKEN_FILE"] == "/var/run/secrets/eks.amazonaws.com/serviceaccount/token"
    issued = aws.logged("sts issued")
    assert any(f"subject=system:serviceaccount:{deployed.namespace}:model-reader" in line for line in issued), issued
    answer = first_answer(deployed.predict_url("irsa", served_as="irsa"), sample_input(3))
    assert np.allclose(answer, deployed.expected["logits"], atol=1e-5)
    deployed.kubectl("delete", "neuronmodel", "irsa", "--wait=true")


def test_an_s3_model_reaches_ready_on_the_real_node_through_eks_pod_identity(deployed: Deployment, aws: Aws) -> None:
    service_account(deployed, "pod-identity-reader")
    awsidentity.associate(aws.endpoint, deployed.namespace, "pod-identity-reader", ROLE)
    webhook = deployed.cluster.identity_webhook
    assert webhook is not None
    webhook.associate(deployed.namespace, "pod-identity-reader")  # as create-pod-identity-association makes EKS do
    manifest = s3_example(deployed, aws, "podidentity", "pod-identity-reader")
    deployed.kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest))
    deployed.wait_status(lambda s: s.get("phase") == "Ready", "the Pod Identity model Ready", name="podidentity")
    env = rewrite_env(deployed, "podidentity")
    assert env["AWS_CONTAINER_CREDENTIALS_FULL_URI"] == f"http://{AGENT}/v1/credentials"
    assert "AWS_ROLE_ARN" not in env
    issued = aws.logged("pod identity agent issued")
    assert any("service_account=pod-identity-reader" in line for line in issued), issued
    answer = first_answer(deployed.predict_url("podidentity", served_as="podidentity"), sample_input(3))
    assert np.allclose(answer, deployed.expected["logits"], atol=1e-5)
    deployed.kubectl("delete", "neuronmodel", "podidentity", "--wait=true")


@pytest.mark.parametrize(
    ("account", "role", "source", "refusal"),
    [
        pytest.param(
            "model-reader-elsewhere",
            "arn:aws:iam::111122223333:role/someone-elses-reader",
            {},
            "STS refused the web identity for arn:aws:iam::111122223333:role/someone-elses-reader: AccessDenied: "
            "Not authorized to perform sts:AssumeRoleWithWebIdentity",
            id="a-role-that-does-not-trust-the-account",
        ),
        pytest.param(
            "intruder",
            ROLE,
            {},
            f"STS refused the web identity for {ROLE}: AccessDenied: Not authorized to perform "
            "sts:AssumeRoleWithWebIdentity",
            id="the-role-of-another-service-account",
        ),
        pytest.param(
            "model-reader",
            ROLE,
            {"uri": f"s3://{FAR_BUCKET}/{MODEL}/"},
            f"s3://{FAR_BUCKET}/{MODEL}/: AuthorizationHeaderMalformed: The authorization header is malformed; the "
            "region 'us-west-2' is wrong; expecting 'eu-west-1' (the bucket is in eu-west-1, not in the configured "
            "region us-west-2)",
            id="a-bucket-in-another-region",
        ),
    ],
)
def test_what_sts_or_s3_refuses_is_told_in_the_models_status_in_their_words(
    deployed: Deployment, aws: Aws, account: str, role: str, source: dict[str, str], refusal: str
) -> None:
    service_account(deployed, account, role)
    name = f"refused-{account}"[:40]
    deployed.kubectl("apply", "-f", "-", input=yaml.safe_dump(s3_example(deployed, aws, name, account, **source)))
    status = deployed.wait_status(lambda s: s.get("phase") == "Failed", "the model Failed", name=name)
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["RewriteSucceeded"]["reason"] == "RewriteFailed"
    assert refusal in conditions["RewriteSucceeded"]["message"], conditions["RewriteSucceeded"]
    assert refusal in conditions["Ready"]["message"], conditions["Ready"]
    deployed.kubectl("delete", "neuronmodel", name, "--wait=true")


# The chart's old probes (liveness only: first at 15 s, then every 20 s, 3 failures) restarted a waiting operator
# after about 75 s; helm waits longer than that for the new pod.
UPGRADE_WAIT = "100s"


def test_an_upgrade_against_an_older_crd_waits_not_ready_until_the_crd_is_applied(deployed: Deployment) -> None:
    """The README's upgrade path: an operator started against another CRD is not ready, is not restarted, and
    `helm upgrade --wait` fails, while the models keep serving; applying the chart's CRDs brings it up."""
    deployed.wait_status(lambda s: s.get("phase") == "Ready", "the example Ready")
    x = sample_input(3)
    url = deployed.predict_url()
    extensions = client.ApiextensionsV1Api(deployed.cluster.api)
    older = {"metadata": {"annotations": {DIGEST_ANNOTATION: "0123456789ab"}}}
    extensions.patch_custom_resource_definition(CRD_NAME, older)
    instance = f"app.kubernetes.io/instance={deployed.release}"
    kubeconfig = deployed.cluster.kubeconfig
    upgrade = ("upgrade", deployed.release, str(CHART), "-n", deployed.namespace, "--reuse-values", "--wait")
    try:
        before = {p.metadata.uid for p in deployed.pods(instance)}
        debug = ("--set", "logLevel=debug", "--timeout", UPGRADE_WAIT)  # a new pod template: a new operator pod
        waited = helm(*upgrade, *debug, kubeconfig=kubeconfig, check=False)
        assert waited.returncode != 0, waited.stdout
        (pod,) = [p for p in deployed.pods(instance) if p.metadata.uid not in before]
        (container,) = pod.status.container_statuses
        assert container.state.running and not container.ready, container
        assert container.restart_count == 0, container  # waiting, not crash-looping
        log = deployed.kubectl("logs", pod.metadata.name).stdout
        assert "the NeuronModel CRD in the cluster has schema digest 0123456789ab" in log, log[-2000:]
        assert np.allclose(predict(url, x), deployed.expected["logits"], atol=1e-5)  # the model serves meanwhile
    finally:
        deployed.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CHART / "crds"))
    wait_for(deployed.operator_pod, timeout=120, what="the new operator pod ready once the CRD is applied")
    helm(*upgrade, "--set", "logLevel=info", "--timeout", "3m", kubeconfig=kubeconfig)
    deployed.patch({"replicas": 2})  # the upgraded operator works
    deployed.wait_status(lambda s: s.get("readyReplicas") == 2, "two replicas ready")
    deployed.patch({"replicas": 1})
    deployed.wait_status(lambda s: s.get("readyReplicas") == 1 and s.get("phase") == "Ready", "one replica again")
