"""Helpers of the fault tests: restarting control-plane parts, watching a model's status, checking convergence."""

from __future__ import annotations

import contextlib
import json
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kubernetes import client, watch

from conftest import GROUP, PLURAL, VERSION, Env, serving_pods, wait_for
from localcluster.simcluster import SimulatedCluster
from neuron_rewrite import inspect_model
from neuronmodel_operator.naming import MANAGED_BY, MANAGED_BY_LABEL, MODEL_LABEL, model_label, serving_name

NEURONCORE = "aws.amazon.com/neuroncore"
MANAGED = f"{MANAGED_BY_LABEL}={MANAGED_BY}"
POOL_LABEL = "faults.neuron.dev/pool"


def api_ready(cluster: SimulatedCluster) -> bool:
    result = cluster.cluster.kubectl("get", "--raw", "/readyz", check=False)
    return result.returncode == 0 and result.stdout.strip() == "ok"


def restart(cluster: SimulatedCluster, component: str, timeout: float = 120) -> float:
    """Restart kube-apiserver or etcd and wait until the apiserver is ready again; return the seconds it took.

    The session cluster is shared by every test: it must be healthy again before the next one starts.
    """
    started = time.monotonic()
    cluster.cluster.restart(component)
    wait_for(lambda: api_ready(cluster), timeout, f"/readyz after restarting {component}")
    return time.monotonic() - started


class NodePool:
    """Simulated nodes only one test's pods land on (their own label and taint), removed by ``delete()``."""

    def __init__(self, cluster: SimulatedCluster, instance_type: str, count: int) -> None:
        self.cluster = cluster
        self.key = f"pool-{uuid.uuid4().hex[:8]}"
        taint = {"key": POOL_LABEL, "value": self.key, "effect": "NoSchedule"}
        self.names = cluster.add_nodes(
            {instance_type: count}, prefix=f"{self.key}-", labels={POOL_LABEL: self.key}, taints=[taint]
        )

    @property
    def placement(self) -> dict[str, Any]:
        """The NeuronModel spec fields that put its serving pods on this pool."""
        return {
            "nodeSelector": {POOL_LABEL: self.key},
            "tolerations": [{"key": POOL_LABEL, "operator": "Equal", "value": self.key, "effect": "NoSchedule"}],
        }

    def delete(self, name: str) -> None:
        client.CoreV1Api(self.cluster.api).delete_node(name)
        self.names.remove(name)

    def delete_all(self) -> None:
        for name in list(self.names):
            with contextlib.suppress(client.ApiException):
                self.delete(name)


def live(items: list[Any]) -> list[Any]:
    """Objects not being deleted."""
    return [i for i in items if i.metadata.deletion_timestamp is None]


def children(env: Env, selector: str) -> dict[str, list[Any]]:
    """The Jobs, Deployments, Services, ConfigMaps and pods of the test's namespace that match ``selector``."""
    listings: dict[str, Callable[..., Any]] = {
        "Job": env.batch.list_namespaced_job,
        "Deployment": env.apps.list_namespaced_deployment,
        "Service": env.core.list_namespaced_service,
        "ConfigMap": env.core.list_namespaced_config_map,
        "Pod": env.core.list_namespaced_pod,
    }
    return {kind: list_(env.namespace, label_selector=selector).items for kind, list_ in listings.items()}


def convergence_problems(env: Env, name: str) -> list[str]:
    """Everything by which ``name``'s status or children differ from its spec and from each other; [] when none."""
    body = env.model(name)
    spec, status = body["spec"], body.get("status") or {}
    cores, replicas = spec["numCores"], spec.get("replicas", 1)
    problems = []
    expected = {
        "phase": "Ready" if replicas else "Idle",  # a model scaled to zero is published and deployed, serving nobody
        "servedCores": cores,
        "replicas": replicas,
        "readyReplicas": replicas,
        "observedGeneration": body["metadata"]["generation"],
    }
    for key, value in expected.items():
        if status.get(key) != value:
            problems.append(f"status.{key} is {status.get(key)!r}, expected {value!r}")
    owned = children(env, f"{MODEL_LABEL}={model_label(name)}")
    jobs = [j.metadata.name for j in live(owned["Job"])]
    if jobs != [(status.get("rewrite") or {}).get("job")]:
        problems.append(f"Jobs {jobs}, status names {status.get('rewrite')}")
    for kind in ("Deployment", "Service"):
        if [o.metadata.name for o in owned[kind]] != [serving_name(name)]:
            problems.append(f"{kind}s {[o.metadata.name for o in owned[kind]]}, expected [{serving_name(name)}]")
    pods = serving_pods(env, name)
    if len(pods) != replicas or not all(p.metadata.deletion_timestamp is None for p in pods):
        problems.append(f"{len(pods)} serving pod(s) (some terminating?), expected {replicas}")
    wrong = [p.metadata.name for p in pods if p.spec.containers[0].resources.limits.get(NEURONCORE) != str(cores)]
    if wrong:
        problems.append(f"pods {wrong} do not have {cores} NeuronCores")
    return problems


def evict(env: Env, pod: str) -> tuple[bool, str]:
    """POST an Eviction, as `kubectl drain` and Karpenter do: (accepted, the apiserver's words)."""
    body = {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": pod, "namespace": env.namespace}}
    path = f"/api/v1/namespaces/{env.namespace}/pods/{pod}/eviction"
    done = env.cluster.cluster.kubectl("create", "--raw", path, "-f", "-", input=json.dumps(body), check=False)
    return done.returncode == 0, done.stdout + done.stderr


def describe(env: Env, name: str) -> str:
    """What the cluster holds for ``name``: its Jobs and pods with their states, for a failure message."""
    owned = children(env, f"{MODEL_LABEL}={model_label(name)}")
    jobs = [
        f"Job {j.metadata.name} active={j.status.active} succeeded={j.status.succeeded} failed={j.status.failed} "
        f"conditions={[(c.type, c.status) for c in j.status.conditions or []]}"
        for j in owned["Job"]
    ]
    pods = [
        f"pod {p.metadata.name} node={p.spec.node_name} phase={p.status.phase} "
        f"containers={[(c.name, c.ready, c.state.to_dict()) for c in p.status.container_statuses or []]}"
        for p in owned["Pod"]
    ]
    return "\n".join(jobs + pods)


def wait_until_none(
    problems: Callable[[], list[str]],
    timeout: float,
    what: str,
    log: Path | None = None,
    detail: Callable[[], str] | None = None,
) -> None:
    """Wait until ``problems()`` is empty; on timeout, fail with the last problems seen (and the operator's log)."""
    last: list[str] = []

    def none_left() -> bool:
        last[:] = problems()
        return not last

    try:
        wait_for(none_left, timeout, what)
    except AssertionError:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:]) if log and log.exists() else ""
        more = detail() if detail else ""
        raise AssertionError(f"{what}: still {last} after {timeout} s\n{more}\noperator log:\n{tail}") from None


def assert_converged(env: Env, name: str, timeout: float = 180) -> dict[str, Any]:
    """Wait until ``name`` serves exactly what its spec asks, then check the rewrite in the store; return status."""
    wait_until_none(
        lambda: convergence_problems(env, name), timeout, f"{name} converged", env.log, lambda: describe(env, name)
    )
    status = env.status(name)
    ops = inspect_model(env.tmp / "store" / status["rewrite"]["path"] / str(status["servedVersion"])).models[0]
    assert ops.neuron_ops and {op.automatic_multicore for op in ops.neuron_ops} == {status["servedCores"]}
    return status


class StatusRecorder:
    """Every status a NeuronModel goes through, from a watch (polling can miss a phase that lasts a moment)."""

    def __init__(self, env: Env, name: str) -> None:
        self.env, self.name = env, name
        self.statuses: list[dict[str, Any]] = []
        self._changed = threading.Condition()
        self._stopped = threading.Event()
        self._watch = watch.Watch()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        version = None
        while not self._stopped.is_set():
            try:
                for event in self._watch.stream(
                    self.env.custom.list_namespaced_custom_object,
                    GROUP,
                    VERSION,
                    self.env.namespace,
                    PLURAL,
                    field_selector=f"metadata.name={self.name}",
                    resource_version=version,
                    timeout_seconds=30,
                ):
                    version = event["object"]["metadata"]["resourceVersion"]
                    with self._changed:
                        self.statuses.append(event["object"].get("status") or {})
                        self._changed.notify_all()
            except Exception:  # the apiserver restarting under the watch: start a new one
                version = None
                self._stopped.wait(0.5)

    def wait(self, predicate: Callable[[dict[str, Any]], bool], timeout: float, what: str, start: int = 0) -> int:
        """Index of the first recorded status from ``start`` on that satisfies ``predicate``, waiting for it."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = next((i for i in range(start, len(self.statuses)) if predicate(self.statuses[i])), None)
                if found is not None:
                    return found
                if time.monotonic() > deadline:
                    phases = [s.get("phase") for s in self.statuses]
                    raise AssertionError(f"timed out after {timeout} s waiting for {what}; phases seen: {phases}")
                self._changed.wait(0.5)

    def stop(self) -> None:
        self._stopped.set()
        self._watch.stop()


def copy_model(source: Path, target: Path) -> Path:
    """A private copy of a session model, for a test that damages or moves its source."""
    shutil.copytree(source, target, symlinks=True)
    return target


def orphans(env: Env, models: dict[str, str]) -> list[str]:
    """Children labelled as the operator's whose model (``models``: name -> uid) no longer exists, or that an
    existing model does not own. Pods are owned through their Job or ReplicaSet: their model label decides."""
    by_label = {model_label(name): uid for name, uid in models.items()}
    found = []
    for kind, objects in children(env, MANAGED).items():
        for obj in objects:
            uid = by_label.get((obj.metadata.labels or {}).get(MODEL_LABEL, ""))
            owners = {ref.uid for ref in obj.metadata.owner_references or [] if ref.kind == "NeuronModel"}
            if uid is None or (kind != "Pod" and owners != {uid}):
                found.append(f"{kind} {obj.metadata.name}")
    return found
