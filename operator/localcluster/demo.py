"""``python -m localcluster.demo`` (``make demo``): the whole product on this machine, in about a minute warm.

Starts the local control plane with simulated inf2 and trn1 nodes (tainted as Neuron node groups usually are) and
one real kubelet node, builds the project's images if the sources changed, installs the Helm chart (the operator
runs as a real pod from its image), generates a Neuron-shaped ResNet-50 stand-in, applies the repository's own
examples (``store-pvc.yaml`` unchanged, ``resnet50-inf2.yaml`` placed on the real node's instance type) and shows the
model's progress until it is Ready: the rewrite Job and the TF Serving stand-in pods run in containers on the real
node. Then it sends a predict request through the model's Service and prints the answer, and keeps everything
running for you to explore, until Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client

from .cluster import kubernetes_version
from .helm import install_operator
from .images import ensure_images
from .nodes import NEURON_TAINT
from .realnode import example_on_real_node, first_answer
from .simcluster import SimulatedCluster

GROUP = "serving.neuron.dev"
REPO = Path(__file__).resolve().parents[2]
NAMESPACE = "default"
MODEL = "resnet50"
RELEASE = "nmo"
STORE_UID = 65532  # the store's root is owned by the uid the rewrite Job runs as, as an EFS access point makes it


def say(started: float, message: str) -> None:
    print(f"{time.monotonic() - started:6.1f}s  {message}", flush=True)


def prepare_volumes(sim: SimulatedCluster, work: Path) -> Path:
    """Host directories behind the examples' two claims, and the compiled model in the source one."""
    compiled, store = work / "compiled-models", work / "neuron-model-store"
    compiled.mkdir(parents=True)
    store.mkdir(parents=True)
    # In a child process: TensorFlow's start-up chatter on stderr is not the demo's, unless it fails.
    code = f"from neuron_modelgen import Options, build_model; build_model({str(compiled / MODEL)!r}, Options('tf2'))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"generating the model failed:\n{result.stderr[-3000:]}")
    os.chown(store, STORE_UID, STORE_UID)
    for claim, path in (("compiled-models", compiled), ("neuron-model-store", store)):
        sim.hostpath_volume(NAMESPACE, claim, path, storage_class="efs-sc")  # the examples' storage class
    return store


def demo_predict(sim: SimulatedCluster) -> str:
    """One predict request through the model's Service (ClusterIP, kube-proxy), as a client in the cluster sends."""
    service = client.CoreV1Api(sim.api).read_namespaced_service(MODEL, NAMESPACE)
    url = f"http://{service.spec.cluster_ip}:8501/v1/models/{MODEL}:predict"
    instances = [[0.5] * 8, [-1.0] * 8]
    answer = first_answer(url, instances)  # printed on one line: the server pretty-prints it over many
    return f"POST {url}\n  {json.dumps({'instances': instances})}\n-> {json.dumps(answer)}"


class Progress:
    """Prints each change of the model's phase, its Job and its pods, once."""

    def __init__(self, sim: SimulatedCluster, started: float) -> None:
        self.core, self.batch = client.CoreV1Api(sim.api), client.BatchV1Api(sim.api)
        self.custom = client.CustomObjectsApi(sim.api)
        self.started = started
        self.seen: dict[str, str] = {}

    def _show(self, key: str, text: str) -> None:
        if self.seen.get(key) != text:
            self.seen[key] = text
            say(self.started, text)

    def poll(self) -> dict[str, Any]:
        model = self.custom.get_namespaced_custom_object(GROUP, "v1alpha1", NAMESPACE, "neuronmodels", MODEL)
        status = model.get("status") or {}
        ready = next((c for c in status.get("conditions") or [] if c["type"] == "Ready"), {})
        if status.get("phase"):
            self._show("phase", f"NeuronModel/{MODEL}: {status['phase']} ({ready.get('message', '')})")
        for job in self.batch.list_namespaced_job(NAMESPACE).items:
            done = next((c.type for c in job.status.conditions or [] if c.status == "True"), "running")
            self._show(f"job/{job.metadata.name}", f"Job/{job.metadata.name}: {done}")
        for pod in self.core.list_namespaced_pod(NAMESPACE).items:
            ready_pod = any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])
            where = f" on {pod.spec.node_name}" if pod.spec.node_name else ""
            state = f"{pod.status.phase}{', ready' if ready_pod else ''}{where}"
            self._show(f"pod/{pod.metadata.name}", f"Pod/{pod.metadata.name}: {state}")
        return status


def run(timeout: float, stay: bool) -> int:
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="neuronmodel-demo-"))
    say(started, "building the project's images if the sources changed (minutes the first time)")
    built = ensure_images()
    sim = SimulatedCluster(taints=[NEURON_TAINT], workdir=work / "cluster", real_node_images=built)
    say(started, "starting etcd, the control plane, EKS's pod identity webhook, the node agent and the real node")
    sim.start()
    try:
        nodes = sim.cluster.kubectl("get", "nodes", "-L", "node.kubernetes.io/instance-type").stdout
        say(started, "control plane up; simulated Neuron nodes and the real one:\n" + nodes)
        with sim.place_on_real_node() as node:
            say(started, f"pods go to the real node {node} from now on; helm install (the operator image as a pod)")
            sim.restrict_pods(NAMESPACE)  # as on a shared cluster: Pod Security's restricted level
            install_operator(sim.kubeconfig, NAMESPACE, RELEASE, built["operator"].ref, built["rewrite"].ref)
            say(started, "generating a Neuron-shaped ResNet-50 stand-in (a real TensorFlow SavedModel with NeuronOps)")
            prepare_volumes(sim, work)
            sim.cluster.kubectl("apply", "-n", NAMESPACE, "-f", str(REPO / "examples" / "store-pvc.yaml"))
            say(started, "kubectl apply -f examples/store-pvc.yaml")
            example = example_on_real_node((REPO / "examples" / "resnet50-inf2.yaml").read_text())
            sim.cluster.kubectl("apply", "-n", NAMESPACE, "-f", "-", input=yaml.safe_dump(example))
            say(started, "kubectl apply -f examples/resnet50-inf2.yaml (placed on the real node's inf2.24xlarge)")
            progress = Progress(sim, started)
            deadline = time.monotonic() + timeout
            while progress.poll().get("phase") != "Ready":
                if time.monotonic() > deadline:
                    logs = sim.cluster.kubectl("logs", "-n", NAMESPACE, f"deploy/{RELEASE}-neuronmodel-operator",
                                               "--tail=40", check=False)  # fmt: skip
                    print(f"\nthe model did not become Ready; operator log:\n{logs.stdout}", file=sys.stderr)
                    return 1
                time.sleep(0.5)
            print("\n" + sim.cluster.kubectl("get", "nm", "-n", NAMESPACE).stdout)
            print(sim.cluster.kubectl("get", "jobs,deployments,pods,services", "-n", NAMESPACE, "-o", "wide").stdout)
            say(started, "a predict request through the Service:\n" + demo_predict(sim))
            if not stay:
                return 0
            rewrite_cli = Path(sys.executable).parent / "tf-neuron-auto-multicore"
            print(
                "Explore it from another shell:\n"
                f"  export KUBECONFIG={sim.kubeconfig} PATH={sim.cluster.bin_dir}:$PATH"
                f"  # kubectl {kubernetes_version()}\n"
                f"  kubectl describe nm {MODEL}              # conditions and events\n"
                f"  kubectl logs deploy/{MODEL}              # the TF Serving stand-in on the real node\n"
                f"  kubectl scale nm/{MODEL} --replicas=2    # the scale subresource; the rewrite does not re-run\n"
                f'  kubectl patch nm/{MODEL} --type=merge -p \'{{"spec":{{"numCores":1}}}}\'  # new rewrite, rollout\n'
                f"  {rewrite_cli} --inspect {work / 'neuron-model-store'}/*/*/*/1\n"
                "Press Ctrl-C to stop everything (nothing is left running, the host is restored).",
                flush=True,
            )
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
            signal.sigwait({signal.SIGINT, signal.SIGTERM})
            return 0
    finally:
        sim.stop()
        say(started, f"stopped; files kept in {work}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m localcluster.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=300, help="seconds to wait for Ready (default 300)")
    parser.add_argument("--exit-when-ready", action="store_true", help="stop as soon as the model is Ready")
    args = parser.parse_args(argv)
    return run(args.timeout, stay=not args.exit_when_ready)


if __name__ == "__main__":
    sys.exit(main())
