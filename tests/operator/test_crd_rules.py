"""The CRD's CEL rules (x-kubernetes-validations): the apiserver refuses a spec the operator could not serve at
apply, naming the field and what is expected, instead of the operator reporting InvalidSpec afterwards."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from conftest import GROUP, PLURAL, VERSION, Env, neuron_model
from localcluster.pytest_plugin import wait_for
from localcluster.simcluster import SimulatedCluster

pytestmark = pytest.mark.cluster

INSTANCE_TYPE = "node.kubernetes.io/instance-type"


def serving(**fields: Any) -> dict[str, Any]:
    """spec.serving: neuron_model()'s, with ``fields``."""
    return {"serving": {**neuron_model("any", "any")["spec"]["serving"], **fields}}


WARMUP = {"name": "warmup", "configMap": {"name": "warmup"}}


def mounted_at(path: str) -> dict[str, Any]:
    return serving(volumes=[WARMUP], volumeMounts=[{"name": "warmup", "mountPath": path}])


@pytest.mark.parametrize(
    ("spec", "refusal"),
    [
        pytest.param({"source": {}}, "spec.source: Invalid value: set exactly one of pvc, s3, http", id="no-source"),
        pytest.param(
            {"source": {"pvc": {"claimName": "compiled"}, "http": {"url": "https://models.example.com/m.tar.gz"}}},
            "spec.source: Invalid value: set exactly one of pvc, s3, http",
            id="two-sources",
        ),
        pytest.param(
            {"disruptionBudget": {"maxUnavailable": 1, "minAvailable": 2}},
            "spec.disruptionBudget: Invalid value: set at most one of maxUnavailable and minAvailable",
            id="two-budget-limits",
        ),
        pytest.param(
            serving(volumes=[{"name": "models", "emptyDir": {}}]),
            "spec.serving.volumes[0].name: Invalid value: 'models' is the operator's own (models, tmp, batching, "
            "monitoring are taken); choose another",
            id="operator-volume-name",
        ),
        pytest.param(
            mounted_at("/etc/"),
            "spec.serving.volumeMounts[0].mountPath: Invalid value: '/etc/' would hide or overlap the operator's "
            "mounts (/models, /tmp, /etc/tfserving); mount elsewhere",
            id="mount-above-operators",
        ),
        pytest.param(
            mounted_at("/tmp/cache"),
            "spec.serving.volumeMounts[0].mountPath: Invalid value: '/tmp/cache' would hide or overlap",
            id="mount-inside-operators",
        ),
        pytest.param(
            mounted_at("/models"),
            "spec.serving.volumeMounts[0].mountPath: Invalid value: '/models' would hide or overlap",
            id="mount-on-operators",
        ),
        pytest.param(
            mounted_at("/"), "spec.serving.volumeMounts[0].mountPath: Invalid value: '/' would hide", id="mount-on-root"
        ),
        pytest.param(
            serving(volumeMounts=[{"name": "cache", "mountPath": "/cache"}]),
            "spec.serving.volumeMounts: Invalid value: each name must be one of spec.serving.volumes",
            id="mount-of-no-volume",
        ),
        pytest.param(
            serving(podLabels={"team": "search", "serving.neuron.dev/model": "other"}),
            "spec.serving.podLabels: Invalid value: serving.neuron.dev/model is set by the operator",
            id="operator-pod-label",
        ),
        pytest.param(
            {"rewrite": {"podLabels": {"app.kubernetes.io/component": "batch"}}},
            "spec.rewrite.podLabels: Invalid value: app.kubernetes.io/component is set by the operator",
            id="operator-rewrite-pod-label",
        ),
        pytest.param(
            serving(sidecars=[{"name": "tfserving", "image": "fluent/fluent-bit:3.0"}]),
            "spec.serving.sidecars[0].name: Invalid value: 'tfserving' is the server container's; choose another",
            id="server-container-name",
        ),
        pytest.param(
            {"rewrite": {"env": [{"name": "AWS_ENDPOINT_URL_STS", "value": "http://sts"}, {"name": "AWS_REGION"}]}},
            "spec.rewrite.env: Invalid value: AWS_DEFAULT_REGION, AWS_REGION and AWS_ENDPOINT_URL_S3 are set from "
            "spec.source.s3.region and spec.source.s3.endpointUrl, not here",
            id="rewrite-env-of-the-s3-source",
        ),
        pytest.param(
            serving(terminationGracePeriodSeconds=16),
            "spec.serving.terminationGracePeriodSeconds: Invalid value: 16: spec.serving.terminationGracePeriodSeconds "
            "in body should be greater than or equal to 17",
            id="grace-shorter-than-the-drain",
        ),
        pytest.param(
            {"numCores": 4, "nodeSelector": {INSTANCE_TYPE: "inf2.xlarge"}},
            "spec.numCores: Invalid value: 4 NeuronCores per pod, but spec.nodeSelector pins the pods to inf2.xlarge "
            "(2 NeuronCores per node): no such node can ever run them",
            id="cores-beyond-instance-type",
        ),
        pytest.param(
            {"numCores": 64, "nodeSelector": {"beta.kubernetes.io/instance-type": "trn1.32xlarge"}},
            "spec.numCores: Invalid value: 64 NeuronCores per pod, but spec.nodeSelector pins the pods to "
            "trn1.32xlarge (32 NeuronCores per node)",
            id="cores-beyond-beta-instance-type",
        ),
    ],
)
def test_the_apiserver_refuses_what_the_rules_forbid_naming_the_field(
    env: Env, spec: dict[str, Any], refusal: str
) -> None:
    manifest = neuron_model("refused", "compiled")
    manifest["spec"].update(spec)
    result = env.apply(manifest)
    assert result.returncode != 0 and refusal in result.stderr, result.stderr
    assert not env.custom.list_namespaced_custom_object(GROUP, VERSION, env.namespace, PLURAL)["items"]


def test_a_spec_next_to_every_rule_is_accepted_and_served_as_written(env: Env, models: dict[str, Path]) -> None:
    """Names, paths, labels and cores just beside what the rules refuse pass the apiserver and the operator."""
    env.hostpath_claim("compiled", models["resnet50"])
    manifest = neuron_model(
        "accepted",
        "compiled",
        cores=2,
        nodeSelector={INSTANCE_TYPE: "inf2.xlarge"},
        disruptionBudget={"minAvailable": 1},
        **serving(
            volumes=[WARMUP],
            volumeMounts=[
                {"name": "warmup", "mountPath": "/tmpfiles/"},
                {"name": "warmup", "mountPath": "/etc/tfserving-warmup"},
            ],
            podLabels={"team": "search", "app.kubernetes.io/part-of": "search"},
            sidecars=[{"name": "logs", "image": "fluent/fluent-bit:3.0"}],
            terminationGracePeriodSeconds=17,
        ),
        rewrite={
            "env": [{"name": "AWS_ENDPOINT_URL_STS", "value": "https://vpce-1.sts.us-west-2.vpce.amazonaws.com"}],
            "podLabels": {"sidecar.istio.io/inject": "false"},
            "podAnnotations": {"karpenter.sh/do-not-disrupt": "true"},
        },
    )
    result = env.apply(manifest)
    assert result.returncode == 0, result.stderr

    def deployment() -> Any:
        found = env.apps.list_namespaced_deployment(env.namespace).items
        return found[0] if found else None

    template = wait_for(deployment, what="the serving Deployment").spec.template
    assert template.metadata.labels["app.kubernetes.io/part-of"] == "search"
    assert [c.name for c in template.spec.containers] == ["tfserving", "logs"]
    assert [m.mount_path for m in template.spec.containers[0].volume_mounts][-2:] == [
        "/tmpfiles/",
        "/etc/tfserving-warmup",
    ]
    assert template.spec.termination_grace_period_seconds == 17
    (job,) = env.batch.list_namespaced_job(env.namespace, label_selector="app.kubernetes.io/component=rewrite").items
    assert [(e.name, e.value) for e in job.spec.template.spec.containers[0].env] == [
        ("AWS_ENDPOINT_URL_STS", "https://vpce-1.sts.us-west-2.vpce.amazonaws.com")
    ]
    # What a cluster needs on the Job's pod (Karpenter, a mesh), on the pod the Job controller made.
    (pod,) = env.core.list_namespaced_pod(
        env.namespace, label_selector=f"batch.kubernetes.io/job-name={job.metadata.name}"
    ).items
    assert pod.metadata.annotations["karpenter.sh/do-not-disrupt"] == "true"
    assert pod.metadata.labels["sidecar.istio.io/inject"] == "false"
    assert pod.metadata.labels["app.kubernetes.io/component"] == "rewrite"


def test_kubectl_explain_still_documents_the_source(cluster: SimulatedCluster, crd: None) -> None:
    def explained() -> str:
        result = cluster.cluster.kubectl("explain", "neuronmodel.spec.source", check=False)
        return result.stdout if result.returncode == 0 else ""

    text = wait_for(explained, what="kubectl explain neuronmodel.spec.source")
    assert "Set exactly one of pvc, s3 or http" in " ".join(text.split()), text
    fields = {
        line.split()[0] for line in text.split("FIELDS:")[1].splitlines() if line.startswith("  ") and line[2] != " "
    }
    assert fields == {"http", "pvc", "s3", "version"}, text
