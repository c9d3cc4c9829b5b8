"""What a platform team relies on next to the model itself, against the real control plane: the disruption budget
(the apiserver refuses an eviction beyond it), an HPA scaling the model through its scale subresource (the
controller-manager's HPA controller), numCores auto, the operator's metrics and ServiceMonitors."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from faults import evict
from kubernetes import client
from kubernetes.client.rest import ApiException

from conftest import Env, neuron_model, serving_pods, wait_for
from localcluster.cluster import free_port

pytestmark = pytest.mark.cluster
INSTANCE_TYPE = "node.kubernetes.io/instance-type"


def budget(env: Env, name: str) -> dict[str, Any] | None:
    """The model's PodDisruptionBudget as kubectl reads it (the apiserver's preferred policy version), or None."""
    got = env.cluster.cluster.kubectl("get", "pdb", name, "-n", env.namespace, "-o", "json", check=False)
    return json.loads(got.stdout) if got.returncode == 0 else None


def allowed(env: Env, name: str) -> int | None:
    """The disruptions the disruption controller allows now, once it has seen the budget's latest spec."""
    got = budget(env, name) or {}
    status = got.get("status") or {}
    seen = status.get("observedGeneration") == got.get("metadata", {}).get("generation")
    return status.get("disruptionsAllowed") if seen else None


def policy_version(env: Env) -> str:
    groups = client.ApisApi(env.cluster.api).get_api_versions().groups
    return next(g.preferred_version.group_version for g in groups if g.name == "policy")


def test_the_budget_lets_a_drain_evict_one_serving_pod_at_a_time(env: Env, models: dict[str, Path]) -> None:
    env.hostpath_claim("compiled", models["resnet50"])
    assert env.apply(neuron_model("spread", "compiled", cores=1, replicas=3)).returncode == 0
    env.wait_phase("spread", "Ready")

    policy = policy_version(env)
    assert policy == "policy/v1"
    made = wait_for(lambda: budget(env, "spread"), what="the PodDisruptionBudget")
    assert made["apiVersion"] == policy and made["spec"]["maxUnavailable"] == 1
    assert [ref["name"] for ref in made["metadata"]["ownerReferences"]] == ["spread"]
    # The disruption controller (controller-manager) counts the healthy pods before the apiserver allows any.
    wait_for(lambda: allowed(env, "spread") == 1, what="1 disruption allowed")
    first, second, _ = sorted(p.metadata.name for p in serving_pods(env, "spread"))
    accepted, words = evict(env, first)
    assert accepted, words

    # A budget that allows none (the spec's, over the default): the apiserver refuses the next eviction. (Two
    # evictions in a row under maxUnavailable 1 race the simulated replacement pod, which is Ready within a second.)
    env.patch_spec("spread", {"disruptionBudget": {"maxUnavailable": 0}})
    wait_for(lambda: (budget(env, "spread") or {}).get("spec", {}).get("maxUnavailable") == 0, what="the new limit")
    wait_for(lambda: allowed(env, "spread") == 0, what="no disruption allowed")
    accepted, words = evict(env, second)
    assert not accepted
    assert "Cannot evict pod as it would violate the pod's disruption budget" in words, words

    # Turned off in the spec: the budget goes, and nothing else changes.
    env.patch_spec("spread", {"disruptionBudget": {"enabled": False}})
    wait_for(lambda: budget(env, "spread") is None, what="the budget removed")
    env.wait_phase("spread", "Ready")
    assert len(env.jobs()) == 1


def test_a_drain_evicts_unready_serving_pods_while_the_budget_keeps_the_ready_ones(
    env: Env, models: dict[str, Path]
) -> None:
    """Unready serving pods (crash-looping, a broken model) must not stall a drain: under the apiserver's default
    policy (IfHealthyBudget) they are evictable only while the model is otherwise within its budget, so two unready
    pods of three would block every drain of their nodes. The budget still refuses evicting a ready pod."""
    env.hostpath_claim("compiled", models["resnet50"])
    assert env.apply(neuron_model("flaky", "compiled", cores=1, replicas=3)).returncode == 0
    env.wait_phase("flaky", "Ready")
    wait_for(lambda: allowed(env, "flaky") == 1, what="1 disruption allowed")
    first, second, third = sorted(p.metadata.name for p in serving_pods(env, "flaky"))

    # What the kubelet reports of a pod whose readiness probe fails (the node agent reports a status only when its
    # check of the model changes, so this one stays).
    unready = [
        {"type": kind, "status": "False", "reason": "ReadinessProbeFailed"} for kind in ("Ready", "ContainersReady")
    ]
    for pod in (first, second):
        env.core.patch_namespaced_pod_status(pod, env.namespace, {"status": {"conditions": unready}})
    wait_for(lambda: ((budget(env, "flaky") or {}).get("status") or {}).get("currentHealthy") == 1, what="1 healthy")
    assert allowed(env, "flaky") == 0

    accepted, words = evict(env, third)
    assert not accepted
    assert "Cannot evict pod as it would violate the pod's disruption budget" in words, words
    accepted, words = evict(env, first)
    assert accepted, words
    assert (budget(env, "flaky") or {})["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"


def test_an_hpa_scales_the_model_through_its_scale_subresource_without_a_rewrite(
    env: Env, models: dict[str, Path]
) -> None:
    env.hostpath_claim("compiled", models["resnet50"])
    assert env.apply(neuron_model("autoscaled", "compiled", cores=1)).returncode == 0
    env.wait_phase("autoscaled", "Ready")
    jobs = [j.metadata.name for j in env.jobs()]
    assert budget(env, "autoscaled") is None  # one replica: no budget

    hpa = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "autoscaled"},
        "spec": {
            "scaleTargetRef": {
                "apiVersion": "serving.neuron.dev/v1alpha1",
                "kind": "NeuronModel",
                "name": "autoscaled",
            },
            "minReplicas": 2,
            "maxReplicas": 4,
            # No metrics server here: the HPA controller still holds the model within [min, max].
            "metrics": [
                {
                    "type": "Resource",
                    "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 80}},
                }
            ],
        },
    }
    assert env.apply(hpa).returncode == 0
    wait_for(lambda: env.model("autoscaled")["spec"]["replicas"] == 2, timeout=120, what="the HPA scaling to 2")
    wait_for(
        lambda: env.status("autoscaled").get("readyReplicas") == 2 and env.status("autoscaled")["phase"] == "Ready",
        what="2 pods Ready",
    )
    assert wait_for(lambda: budget(env, "autoscaled"), what="a budget once there are 2 replicas")

    hpa["spec"] |= {"minReplicas": 1, "maxReplicas": 1}
    assert env.apply(hpa).returncode == 0
    wait_for(lambda: env.model("autoscaled")["spec"]["replicas"] == 1, timeout=120, what="the HPA scaling to 1")
    wait_for(lambda: budget(env, "autoscaled") is None, what="the budget removed at 1 replica")
    env.wait_phase("autoscaled", "Ready")
    assert [j.metadata.name for j in env.jobs()] == jobs  # scaling never re-runs the rewrite


def test_num_cores_auto_takes_every_core_of_the_pinned_instance_type(env: Env, models: dict[str, Path]) -> None:
    env.hostpath_claim("compiled", models["resnet50"])
    pinned = neuron_model("whole", "compiled", nodeSelector={INSTANCE_TYPE: "inf2.xlarge"})
    pinned["spec"]["numCores"] = "auto"
    assert env.apply(pinned).returncode == 0
    status = env.wait_phase("whole", "Ready")
    assert status["servedCores"] == 2
    (pod,) = serving_pods(env, "whole")
    assert pod.spec.containers[0].resources.limits["aws.amazon.com/neuroncore"] == "2"
    (job,) = env.jobs()
    command = job.spec.template.spec.containers[0].command
    assert command[command.index("--num_cores") + 1] == "2"
    got = env.cluster.cluster.kubectl("get", "nm", "whole", "-n", env.namespace, "-o", "wide").stdout
    assert got.splitlines()[1].split()[1] == "2", got  # the Cores column: cores in use

    unpinned = neuron_model("anywhere", "compiled")
    unpinned["spec"]["numCores"] = "auto"
    assert env.apply(unpinned).returncode == 0
    env.wait_phase("anywhere", "Failed")
    ready = env.condition("anywhere", "Ready")
    assert ready["reason"] == "InvalidSpec"
    assert ready["message"].startswith('spec.numCores is "auto" but the pods are not pinned to an instance type')
    assert [j.metadata.name for j in env.jobs()] == [job.metadata.name]


def scrape(port: int) -> dict[str, float]:
    """The operator's metrics page as {"name{labels}": value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as page:
        lines = page.read().decode().splitlines()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in lines if not line.startswith("#")}


def test_the_operator_counts_reconciles_errors_phases_and_rewrite_durations(env: Env, models: dict[str, Path]) -> None:
    port = free_port()
    env.stop_operator()
    env.start_operator(NEURONMODEL_METRICS_PORT=str(port))
    env.hostpath_claim("compiled", models["resnet50"])
    assert env.apply(neuron_model("counted", "compiled", cores=1)).returncode == 0
    status = env.wait_phase("counted", "Ready")
    metrics = wait_for(lambda: scrape(port), what="the metrics page")
    assert metrics['neuronmodel_models{phase="Ready"}'] == 1
    assert metrics['neuronmodel_models{phase="Failed"}'] == 0
    assert metrics["neuronmodel_reconciles_total"] >= 3  # created, rewritten, deployed at least
    assert metrics["neuronmodel_rewrite_duration_seconds_count"] == 1
    assert metrics["neuronmodel_rewrite_duration_seconds_sum"] == pytest.approx(status["rewrite"]["durationSeconds"])

    # A child the API refuses: an error by its reason, a Failed model.
    bad = neuron_model("refused", "compiled", cores=1)
    bad["spec"]["serving"]["env"] = [{"name": "A", "valueFrom": {"fieldRef": {"fieldPath": "spec.nowhere"}}}]
    assert env.apply(bad).returncode == 0
    wait_for(
        lambda: scrape(port).get('neuronmodel_reconcile_errors_total{reason="ChildRejected"}', 0) >= 1,
        what="the refusal counted",
    )
    wait_for(lambda: scrape(port)['neuronmodel_models{phase="Failed"}'] == 1, what="the Failed model counted")
    env.cluster.cluster.kubectl("delete", "nm", "refused", "-n", env.namespace)
    wait_for(lambda: scrape(port)['neuronmodel_models{phase="Failed"}'] == 0, what="the deleted model forgotten")


OPEN_SCHEMA = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
# A ServiceMonitor schema without spec.namespaceSelector, which the operator sets: a trimmed or older copy of the
# Prometheus operator's CRD. Without strict field validation the API would drop the field at every write.
NARROW_SCHEMA = {
    "type": "object",
    "properties": {
        "spec": {
            "type": "object",
            "properties": {
                "selector": OPEN_SCHEMA,
                "endpoints": {"type": "array", "items": OPEN_SCHEMA},
            },
        }
    },
}


def service_monitor_crd(schema: dict[str, Any]) -> dict[str, Any]:
    version = {"name": "v1", "served": True, "storage": True, "schema": {"openAPIV3Schema": schema}}
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "servicemonitors.monitoring.coreos.com"},
        "spec": {
            "group": "monitoring.coreos.com",
            "names": {"kind": "ServiceMonitor", "plural": "servicemonitors", "singular": "servicemonitor"},
            "scope": "Namespaced",
            "versions": [version],
        },
    }


@pytest.fixture(params=[OPEN_SCHEMA], ids=["open"])
def prometheus_operator_crd(env: Env, request: pytest.FixtureRequest) -> Iterator[None]:
    """The Prometheus operator's ServiceMonitor CRD (its schema left open unless the test asks for another), for one
    test: the others run without. The operator is restarted to see it (it reads the served API groups at start)."""
    extensions = client.ApiextensionsV1Api(env.cluster.api)
    crd = service_monitor_crd(request.param)
    extensions.create_custom_resource_definition(crd)
    wait_for(
        lambda: any(
            c.type == "Established" and c.status == "True"
            for c in extensions.read_custom_resource_definition(crd["metadata"]["name"]).status.conditions or []
        ),
        what="the ServiceMonitor CRD established",
    )
    env.stop_operator()
    env.start_operator()
    yield
    name = crd["metadata"]["name"]
    extensions.delete_custom_resource_definition(name)
    wait_for(
        lambda: name not in {c.metadata.name for c in extensions.list_custom_resource_definition().items},
        what="the ServiceMonitor CRD gone",
    )


def service_monitor(env: Env, name: str) -> dict[str, Any] | None:
    try:
        return env.custom.get_namespaced_custom_object(
            "monitoring.coreos.com", "v1", env.namespace, "servicemonitors", name
        )
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def test_a_service_monitor_points_prometheus_at_tf_servings_metrics_where_its_crd_is_installed(
    env: Env, models: dict[str, Path], prometheus_operator_crd: None
) -> None:
    env.hostpath_claim("compiled", models["resnet50"])
    assert env.apply(neuron_model("watched", "compiled", cores=1)).returncode == 0
    env.wait_phase("watched", "Ready")
    monitor = wait_for(lambda: service_monitor(env, "watched"), what="the ServiceMonitor")
    assert monitor["spec"]["endpoints"] == [{"port": "http", "path": "/monitoring/prometheus/metrics"}]
    service = env.core.read_namespaced_service("watched", env.namespace)
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service.metadata.labels.items()
    assert [ref["name"] for ref in monitor["metadata"]["ownerReferences"]] == ["watched"]
    (pod,) = serving_pods(env, "watched")
    assert pod.metadata.annotations["prometheus.io/scrape"] == "true"

    env.patch_spec("watched", {"serving": {"metrics": {"enabled": False}}})
    wait_for(lambda: service_monitor(env, "watched") is None, what="the ServiceMonitor removed with the metrics")
    env.wait_phase("watched", "Ready")


@pytest.mark.parametrize("prometheus_operator_crd", [NARROW_SCHEMA], ids=["narrow"], indirect=True)
def test_a_field_the_apis_schema_lacks_is_refused_in_its_words_not_dropped_and_repaired_forever(
    env: Env, models: dict[str, Path], prometheus_operator_crd: None
) -> None:
    env.hostpath_claim("compiled", models["resnet50"])
    offset = env.audit_offset()
    assert env.apply(neuron_model("strict", "compiled", cores=1)).returncode == 0
    condition = wait_for(
        lambda: (c := env.condition("strict", "Ready")).get("reason") == "ChildRejected" and c,
        what="the ServiceMonitor refused",
    )
    assert condition["message"].startswith("the API refused to create ServiceMonitor strict: "), condition
    assert 'unknown field "spec.namespaceSelector"' in condition["message"], condition
    assert service_monitor(env, "strict") is None  # not created without the field, to be "repaired" ever after
    assert not [w for w in env.operator_writes(offset) if w[:2] == ("update", "servicemonitors")]
