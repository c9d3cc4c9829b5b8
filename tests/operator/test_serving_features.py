"""What a platform team sets on the serving pods: template additions, the disruption budget and numCores auto, as
the pure builders and validation treat them."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from unit_helpers import NAMESPACE, job_body, job_pod, make_model, make_spec

from neuronmodel_operator.builders import Model, disruption_budget, rewrite_job, serving_deployment, store_cleanup_job
from neuronmodel_operator.config import OperatorConfig
from neuronmodel_operator.naming import selector
from neuronmodel_operator.reconcile import Children, _cleaning
from neuronmodel_operator.validation import SpecError, validate

CONFIG = OperatorConfig(rewrite_image="registry.example.com/neuron/rewrite:default")
INSTANCE_TYPE = "node.kubernetes.io/instance-type"


def with_serving(**fields: Any) -> Model:
    spec = make_spec()
    spec["serving"].update(fields)
    return Model("resnet50", NAMESPACE, "uid", spec)


def pod(model: Model) -> dict[str, Any]:
    return serving_deployment(model, CONFIG, model.rewrite_id())["spec"]["template"]


def server(model: Model) -> dict[str, Any]:
    return next(c for c in pod(model)["spec"]["containers"] if c["name"] == "tfserving")


def refusal(spec: dict[str, Any]) -> str:
    with pytest.raises(SpecError) as info:
        validate(spec, CONFIG)
    return str(info.value)


# Pod template additions


def test_pod_labels_and_annotations_join_the_operators_own() -> None:
    template = pod(with_serving(podLabels={"team": "search"}, podAnnotations={"sidecar.istio.io/inject": "true"}))
    assert template["metadata"]["labels"]["team"] == "search"
    assert template["metadata"]["labels"].items() >= selector("resnet50").items()
    assert template["metadata"]["annotations"]["sidecar.istio.io/inject"] == "true"
    assert "serving.neuron.dev/rewrite" in template["metadata"]["annotations"]


def test_pod_labels_cannot_take_the_selectors_keys() -> None:
    spec = make_spec()
    spec["serving"]["podLabels"] = {"serving.neuron.dev/model": "other", "team": "search"}
    assert refusal(spec).startswith("spec.serving.podLabels: serving.neuron.dev/model is set by the operator")


def test_rewrite_pod_labels_and_annotations_reach_both_jobs_pods_under_the_operators_own() -> None:
    extra = {
        "podLabels": {"sidecar.istio.io/inject": "false"},
        "podAnnotations": {"karpenter.sh/do-not-disrupt": "true"},
    }
    model = make_model(rewrite=extra)
    for job in (rewrite_job(model, CONFIG), store_cleanup_job(model, CONFIG, [], None)):
        template = job["spec"]["template"]["metadata"]
        assert template["annotations"] == {"karpenter.sh/do-not-disrupt": "true"}
        assert template["labels"]["sidecar.istio.io/inject"] == "false"
        assert template["labels"].items() >= job["metadata"]["labels"].items()  # the operator's own, kept
    assert "annotations" not in rewrite_job(make_model(), CONFIG)["spec"]["template"]["metadata"]


def test_rewrite_pod_labels_cannot_take_the_operators_keys() -> None:
    spec = make_spec(rewrite={"podLabels": {"app.kubernetes.io/component": "batch"}})
    assert refusal(spec).startswith("spec.rewrite.podLabels: app.kubernetes.io/component is set by the operator")


def test_priority_grace_period_and_spread_reach_the_pod_spec() -> None:
    spread = {"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "DoNotSchedule"}
    own = {**spread, "topologyKey": "kubernetes.io/hostname", "labelSelector": {"matchLabels": {"team": "a"}}}
    spec = pod(
        with_serving(
            priorityClassName="serving-critical",
            terminationGracePeriodSeconds=60,
            topologySpreadConstraints=[spread, own],
        )
    )["spec"]
    assert spec["priorityClassName"] == "serving-critical"
    assert spec["terminationGracePeriodSeconds"] == 60
    # Without a selector a constraint would count no pod: it gets the model's serving pods; a given one is kept.
    assert spec["topologySpreadConstraints"] == [
        {**spread, "labelSelector": {"matchLabels": selector("resnet50")}},
        own,
    ]


def test_none_of_the_additions_appear_unless_set() -> None:
    spec = pod(make_model())["spec"]
    assert not {"priorityClassName", "terminationGracePeriodSeconds", "topologySpreadConstraints"} & spec.keys()
    assert [c["name"] for c in spec["containers"]] == ["tfserving"]


def test_probe_timing_over_the_defaults_and_the_startup_timeout_still_decides() -> None:
    probes = {
        "readiness": {"periodSeconds": 2, "timeoutSeconds": 3},
        "liveness": {"failureThreshold": 10},
        "startup": {"periodSeconds": 30},
    }
    container = server(with_serving(probes=probes, startupTimeoutSeconds=900))
    readiness, liveness, startup = (container[k] for k in ("readinessProbe", "livenessProbe", "startupProbe"))
    assert readiness["httpGet"]["path"] == "/v1/models/resnet50"
    assert (readiness["periodSeconds"], readiness["timeoutSeconds"], readiness["failureThreshold"]) == (2, 3, 3)
    assert (liveness["tcpSocket"], liveness["failureThreshold"], liveness["periodSeconds"]) == (
        {"port": "grpc"},
        10,
        10,
    )
    assert (startup["periodSeconds"], startup["failureThreshold"]) == (30, 30)  # 900 s / 30 s


def test_extra_volumes_mounts_and_sidecars_are_added_to_the_operators() -> None:
    warmup = {"name": "warmup", "configMap": {"name": "resnet50-warmup"}}
    mount = {"name": "warmup", "mountPath": "/warmup", "readOnly": True}
    shipper = {"name": "logs", "image": "fluent/fluent-bit:3.0", "resources": {"limits": {"memory": "64Mi"}}}
    model = with_serving(volumes=[warmup], volumeMounts=[mount], sidecars=[shipper])
    validate(model.spec, CONFIG)
    template = pod(model)["spec"]
    assert [v["name"] for v in template["volumes"]] == ["models", "tmp", "monitoring", "warmup"]
    assert server(model)["volumeMounts"][-1] == mount
    assert [c["name"] for c in template["containers"]] == ["tfserving", "logs"]
    assert template["containers"][1] == shipper


@pytest.mark.parametrize(
    ("serving", "expected"),
    [
        (
            {"volumes": [{"name": "models", "emptyDir": {}}]},
            "spec.serving.volumes: the name 'models' is the operator's",
        ),
        ({"volumeMounts": [{"name": "cache", "mountPath": "/cache"}]}, "spec.serving.volumeMounts[0].name: 'cache'"),
        (
            {"volumes": [{"name": "w", "emptyDir": {}}], "volumeMounts": [{"name": "w", "mountPath": "/models/x"}]},
            "spec.serving.volumeMounts[0].mountPath: '/models/x' would hide or overlap",
        ),
        (
            {"volumes": [{"name": "w", "emptyDir": {}}], "volumeMounts": [{"name": "w", "mountPath": "/etc"}]},
            "spec.serving.volumeMounts[0].mountPath: '/etc' would hide or overlap",
        ),
        ({"sidecars": [{"name": "tfserving", "image": "x"}]}, "spec.serving.sidecars[0].name: 'tfserving'"),
    ],
)
def test_additions_that_clash_with_the_operators_are_refused_naming_the_field(
    serving: dict[str, Any], expected: str
) -> None:
    spec = make_spec()
    spec["serving"].update(serving)
    assert refusal(spec).startswith(expected)


# Metrics


def test_tf_serving_metrics_are_on_by_default_on_the_rest_port_and_marked_for_scraping() -> None:
    model = make_model()
    template = pod(model)
    args = server(model)["args"]
    assert "--monitoring_config_file=/etc/tfserving/monitoring/monitoring.config" in args
    annotations = template["metadata"]["annotations"]
    # The file TF Serving reads is the pod's own annotation, through a downwardAPI volume: no extra object.
    assert annotations["serving.neuron.dev/monitoring-config"] == (
        'prometheus_config { enable: true, path: "/monitoring/prometheus/metrics" }'
    )
    (volume,) = [v for v in template["spec"]["volumes"] if v["name"] == "monitoring"]
    assert volume["downwardAPI"]["items"] == [
        {
            "path": "monitoring.config",
            "fieldRef": {"fieldPath": "metadata.annotations['serving.neuron.dev/monitoring-config']"},
        }
    ]
    assert {"name": "monitoring", "mountPath": "/etc/tfserving/monitoring", "readOnly": True} in server(model)[
        "volumeMounts"
    ]
    assert (annotations["prometheus.io/scrape"], annotations["prometheus.io/port"]) == ("true", "8501")
    assert annotations["prometheus.io/path"] == "/monitoring/prometheus/metrics"


def test_metrics_path_and_off_switch() -> None:
    moved = with_serving(metrics={"path": "/metrics"}, restPort=9000)
    annotations = pod(moved)["metadata"]["annotations"]
    assert annotations["serving.neuron.dev/monitoring-config"] == 'prometheus_config { enable: true, path: "/metrics" }'
    assert (annotations["prometheus.io/port"], annotations["prometheus.io/path"]) == ("9000", "/metrics")
    off = with_serving(metrics={"enabled": False})
    assert not any(a.startswith("--monitoring_config_file") for a in server(off)["args"])
    assert (
        not {"prometheus.io/scrape", "serving.neuron.dev/monitoring-config"}
        & pod(off)["metadata"]["annotations"].keys()
    )
    assert "monitoring" not in [v["name"] for v in pod(off)["spec"]["volumes"]]


# PodDisruptionBudget


def test_a_budget_of_one_unavailable_by_default_for_more_than_one_replica() -> None:
    budget = disruption_budget(make_model(replicas=3), CONFIG)
    assert budget is not None
    assert (budget["apiVersion"], budget["kind"]) == ("policy/v1", "PodDisruptionBudget")
    assert budget["metadata"]["name"] == "resnet50"
    assert budget["spec"] == {
        "selector": {"matchLabels": selector("resnet50")},
        "maxUnavailable": 1,
        "unhealthyPodEvictionPolicy": "AlwaysAllow",  # an unready pod never stalls a drain
    }


def test_no_budget_for_one_replica_or_when_turned_off() -> None:
    assert disruption_budget(make_model(replicas=1), CONFIG) is None
    assert disruption_budget(make_model(replicas=0), CONFIG) is None
    assert disruption_budget(make_model(replicas=3, disruptionBudget={"enabled": False}), CONFIG) is None
    off = dataclasses.replace(CONFIG, disruption_budget=False)
    assert disruption_budget(make_model(replicas=3), off) is None
    assert disruption_budget(make_model(replicas=3, disruptionBudget={"enabled": True}), off) is not None


def test_the_spec_limit_wins_over_the_operators_default() -> None:
    config = dataclasses.replace(CONFIG, max_unavailable="25%")
    by_default = disruption_budget(make_model(replicas=4), config)
    assert by_default is not None and by_default["spec"]["maxUnavailable"] == "25%"
    minimum = disruption_budget(make_model(replicas=4, disruptionBudget={"minAvailable": 3}), config)
    assert minimum is not None and minimum["spec"]["minAvailable"] == 3 and "maxUnavailable" not in minimum["spec"]


def test_the_chart_default_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEURONMODEL_MAX_UNAVAILABLE", "25%")
    monkeypatch.setenv("NEURONMODEL_DISRUPTION_BUDGET", "false")
    config = OperatorConfig.from_env()
    assert (config.max_unavailable, config.disruption_budget) == ("25%", False)
    monkeypatch.setenv("NEURONMODEL_MAX_UNAVAILABLE", "2")
    assert OperatorConfig.from_env().max_unavailable == 2


# numCores: auto


@pytest.mark.parametrize(("instance_type", "cores"), [("inf2.xlarge", 2), ("inf2.24xlarge", 12), ("trn1.32xlarge", 32)])
def test_auto_uses_every_neuroncore_of_the_pinned_instance_type(instance_type: str, cores: int) -> None:
    model = make_model(numCores="auto", nodeSelector={INSTANCE_TYPE: instance_type})
    validate(model.spec, CONFIG)
    assert model.cores == cores
    resources = server(model)["resources"]
    assert resources["requests"]["aws.amazon.com/neuroncore"] == resources["limits"]["aws.amazon.com/neuroncore"]
    assert resources["limits"]["aws.amazon.com/neuroncore"] == str(cores)
    command = next(c for c in rewrite_job(model, CONFIG)["spec"]["template"]["spec"]["containers"])["command"]
    assert command[command.index("--num_cores") + 1] == str(cores)


def test_auto_is_the_same_rewrite_as_the_number_it_stands_for() -> None:
    pinned = {"nodeSelector": {INSTANCE_TYPE: "inf2.24xlarge"}}
    assert make_model(numCores="auto", **pinned).rewrite_id() == make_model(numCores=12, **pinned).rewrite_id()


def test_auto_through_affinity_of_types_with_the_same_cores() -> None:
    terms = [
        {"matchExpressions": [{"key": INSTANCE_TYPE, "operator": "In", "values": ["trn1.32xlarge", "trn1n.32xlarge"]}]}
    ]
    affinity = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": terms}}}
    assert make_model(numCores="auto", affinity=affinity).cores == 32


@pytest.mark.parametrize(
    ("placement", "expected"),
    [
        ({}, 'spec.numCores is "auto" but the pods are not pinned to an instance type'),
        ({"nodeSelector": {"kubernetes.io/arch": "amd64"}}, 'spec.numCores is "auto" but the pods are not pinned'),
        ({"nodeSelector": {INSTANCE_TYPE: "inf9.huge"}}, 'spec.numCores is "auto" but the NeuronCores of inf9.huge'),
        (
            {
                "affinity": {
                    "nodeAffinity": {
                        "requiredDuringSchedulingIgnoredDuringExecution": {
                            "nodeSelectorTerms": [
                                {
                                    "matchExpressions": [
                                        {
                                            "key": INSTANCE_TYPE,
                                            "operator": "In",
                                            "values": ["inf2.xlarge", "inf2.48xlarge"],
                                        }
                                    ]
                                }
                            ]
                        }
                    }
                }
            },
            'spec.numCores is "auto" but the pods may run on instance types with different NeuronCores '
            "(inf2.48xlarge (24), inf2.xlarge (2))",
        ),
    ],
)
def test_auto_without_one_known_core_count_is_refused(placement: dict[str, Any], expected: str) -> None:
    error = refusal(make_spec(numCores="auto", **placement))
    assert error.startswith(expected), error


@pytest.mark.parametrize("cores", ["all", "2", 0, True])
def test_other_words_than_auto_are_refused(cores: Any) -> None:
    assert refusal(make_spec(numCores=cores)).startswith('spec.numCores: must be an integer of at least 1 or "auto"')


# Store clean-up: no rewrite starts while one runs


def test_a_running_clean_up_or_its_stopping_pod_holds_new_rewrites_back() -> None:
    def children(job: dict[str, Any], pods: list[dict[str, Any]]) -> Children:
        job["metadata"]["labels"] = {"app.kubernetes.io/component": "store-cleanup"}
        return Children([job], [], [], [], [], [], pods)

    name = "resnet50-clean-deleted"
    assert _cleaning(children(job_body(name), []))  # a deleted namesake's, still running
    finished = job_pod(name, "x1", "2025-05-01T10:00:05Z", "{}", exit_code=0)
    finished["status"]["phase"] = "Succeeded"
    assert not _cleaning(children(job_body(name, "Complete"), [finished]))
    stopping = {**finished, "status": {**finished["status"], "phase": "Running"}}  # a deleted Job's pod, stopping
    assert _cleaning(children(job_body(name, "Complete"), [stopping]))
    rewrite = job_body("resnet50-rewrite-a1b2c3d4e5")  # a rewrite Job is not a clean-up
    assert not _cleaning(Children([rewrite], [], [], [], [], [], []))


def test_a_jobs_pods_are_found_by_the_job_controllers_current_label() -> None:
    """batch.kubernetes.io/job-name, set since Kubernetes 1.27; the legacy job-name alone does not count."""
    name = "resnet50-rewrite-a1b2c3d4e5"
    current = job_pod(name, "x1", "2025-05-01T10:00:05Z", "{}")
    current["metadata"]["labels"] = {"batch.kubernetes.io/job-name": name}
    legacy = job_pod(name, "x2", "2025-05-01T10:00:06Z", "{}")
    legacy["metadata"]["labels"] = {"job-name": name}
    found = Children([job_body(name)], [], [], [], [], [], [current, legacy]).pods_of_job(name)
    assert [p["metadata"]["name"] for p in found] == [f"{name}-x1"]
