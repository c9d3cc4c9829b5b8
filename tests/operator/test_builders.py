"""The objects a NeuronModel needs, built as plain dicts: rewrite Job, serving Deployment, Service, ConfigMap."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from unit_helpers import DNS1123_LABEL, NAMESPACE, REWRITE_IMAGE, SERVING_IMAGE, make_model, make_spec

from conftest import CRD
from neuron_rewrite import InvalidModelError, OutputError, RewriteError, UsageError, cli, store
from neuronmodel_operator import builders
from neuronmodel_operator.builders import (
    NEURONCORE,
    Model,
    batching_config_map,
    endpoints,
    rewrite_job,
    serving_deployment,
    serving_service,
)
from neuronmodel_operator.config import OperatorConfig
from neuronmodel_operator.naming import SPEC_HASH_ANNOTATION, job_name

CONFIG = OperatorConfig(
    rewrite_image="registry.example.com/neuron/rewrite:default",
    scheduler_name="neuron-scheduler",
    default_tolerations=[{"key": "aws.amazon.com/neuron", "operator": "Exists", "effect": "NoSchedule"}],
)


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    return obj["spec"]["template"]["spec"]


def container(obj: dict[str, Any], name: str) -> dict[str, Any]:
    spec = pod_spec(obj)
    return next(c for c in spec["containers"] if c["name"] == name)


def volume(obj: dict[str, Any], name: str) -> dict[str, Any]:
    return next(v for v in pod_spec(obj)["volumes"] if v["name"] == name)


def mount(obj: dict[str, Any], container_name: str, name: str) -> dict[str, Any]:
    return next(m for m in container(obj, container_name)["volumeMounts"] if m["name"] == name)


def deployment(model: Model, config: OperatorConfig = CONFIG) -> dict[str, Any]:
    return serving_deployment(model, config, model.rewrite_id())


# The rewrite Job


def test_rewrite_job_for_a_pvc_source() -> None:
    model = make_model(numCores=4, model={"name": "resnet50", "version": 3})
    job = rewrite_job(model, CONFIG)
    rewrite_id = model.rewrite_id()

    assert job["apiVersion"] == "batch/v1" and job["kind"] == "Job"
    assert job["metadata"]["name"] == job_name("resnet50", rewrite_id)
    assert job["metadata"]["namespace"] == NAMESPACE
    assert job["spec"]["backoffLimit"] == 2 and job["spec"]["activeDeadlineSeconds"] == 1800
    assert pod_spec(job)["restartPolicy"] == "Never"
    assert "initContainers" not in pod_spec(job)

    assert volume(job, "source")["persistentVolumeClaim"] == {"claimName": "compiled-models", "readOnly": True}
    assert volume(job, "store")["persistentVolumeClaim"] == {"claimName": "model-store"}
    assert mount(job, "rewrite", "source") == {"name": "source", "mountPath": "/source", "readOnly": True}

    rewrite = container(job, "rewrite")
    assert rewrite["image"] == REWRITE_IMAGE
    assert rewrite["command"][:6] == [
        "tf-neuron-auto-multicore",
        "/source/resnet50/neuron",
        "--num_cores",
        "4",
        "--new_model_dir",
        f"/store/{NAMESPACE}/resnet50/{rewrite_id}/3",
    ]
    assert model.rewrite_path(rewrite_id) == f"{NAMESPACE}/resnet50/{rewrite_id}"
    assert rewrite["terminationMessagePolicy"] == "FallbackToLogsOnError"

    # The whole claim, no subPath: a directory the kubelet makes for a subPath is root's, and the Job is not root.
    assert mount(job, "rewrite", "store") == {"name": "store", "mountPath": "/store"}

    # Job, and its pods, carry the rewrite id: the reconcile finds them by it.
    assert job["metadata"]["labels"]["serving.neuron.dev/rewrite"] == rewrite_id
    assert job["spec"]["template"]["metadata"]["labels"]["serving.neuron.dev/rewrite"] == rewrite_id
    assert job["metadata"]["labels"]["app.kubernetes.io/component"] == "rewrite"


def test_rewrite_job_pvc_source_without_path_reads_the_claim_root() -> None:
    job = rewrite_job(make_model(source={"pvc": {"claimName": "compiled-models"}}), CONFIG)
    assert container(job, "rewrite")["command"][1] == "/source"


def test_rewrite_job_runs_restricted() -> None:
    for source in ({"pvc": {"claimName": "c"}}, {"s3": {"uri": "s3://models/resnet50/"}}):
        job = rewrite_job(make_model(source=source), CONFIG)
        security = pod_spec(job)["securityContext"]
        assert security["runAsNonRoot"] is True
        assert security["seccompProfile"] == {"type": "RuntimeDefault"}
        assert isinstance(security["runAsUser"], int) and security["runAsUser"] != 0
        for spec in pod_spec(job)["containers"]:
            context = spec["securityContext"]
            assert context["allowPrivilegeEscalation"] is False
            assert context["readOnlyRootFilesystem"] is True
            assert context["capabilities"] == {"drop": ["ALL"]}


def test_rewrite_job_for_an_s3_source_reads_it_in_place() -> None:
    source = {"s3": {"uri": "s3://models/resnet50/", "region": "us-west-2", "endpointUrl": "https://minio.example.com"}}
    model = make_model(source=source, serviceAccountName="model-reader", imagePullSecrets=[{"name": "ecr"}])
    job = rewrite_job(model, CONFIG)

    # No scratch volume: the rewrite streams the objects into the store.
    assert "initContainers" not in pod_spec(job)
    assert [v["name"] for v in pod_spec(job)["volumes"]] == ["store"]
    rewrite = container(job, "rewrite")
    assert rewrite["command"][:2] == ["tf-neuron-auto-multicore", "s3://models/resnet50/"]
    assert [m["name"] for m in rewrite["volumeMounts"]] == ["store"]
    # botocore reads AWS_DEFAULT_REGION (AWS_REGION alone would leave the webhook's region in force).
    assert rewrite["env"] == [
        {"name": "AWS_DEFAULT_REGION", "value": "us-west-2"},
        {"name": "AWS_REGION", "value": "us-west-2"},
        {"name": "AWS_ENDPOINT_URL_S3", "value": "https://minio.example.com"},
    ]
    assert pod_spec(job)["serviceAccountName"] == "model-reader"
    assert pod_spec(job)["imagePullSecrets"] == [{"name": "ecr"}]


def test_rewrite_job_takes_the_specs_env_before_the_s3_settings() -> None:
    extra = [
        {"name": "AWS_ENDPOINT_URL_STS", "value": "https://vpce-1.sts.us-west-2.vpce.amazonaws.com"},
        {"name": "HTTPS_PROXY", "valueFrom": {"secretKeyRef": {"name": "proxy", "key": "url"}}},
    ]
    source = {"s3": {"uri": "s3://models/resnet50/", "region": "eu-west-1"}}
    job = rewrite_job(make_model(source=source, rewrite={"env": extra}), CONFIG)
    assert container(job, "rewrite")["env"] == [
        *extra,
        {"name": "AWS_DEFAULT_REGION", "value": "eu-west-1"},
        {"name": "AWS_REGION", "value": "eu-west-1"},
    ]


def test_rewrite_job_s3_without_region_sets_no_env() -> None:
    job = rewrite_job(make_model(source={"s3": {"uri": "s3://models/resnet50/"}}), CONFIG)
    assert container(job, "rewrite")["env"] == []
    assert "serviceAccountName" not in pod_spec(job)
    assert "imagePullSecrets" not in pod_spec(job)


def test_rewrite_job_for_an_http_source_unpacks_it_into_the_store() -> None:
    url = "https://models.example.com/resnet50.tar.gz"
    job = rewrite_job(make_model(source={"http": {"url": url}}), CONFIG)
    # No init container, no scratch volume: the rewrite unpacks the archive beside its output as it downloads.
    assert "initContainers" not in pod_spec(job)
    assert [v["name"] for v in pod_spec(job)["volumes"]] == ["store"]
    rewrite = container(job, "rewrite")
    assert rewrite["command"][:2] == ["tf-neuron-auto-multicore", url]


@pytest.mark.parametrize(
    "source",
    [
        {"http": {"url": "https://models.example.com/m.tgz"}},
        {"s3": {"uri": "s3://models/m/"}},
        {"pvc": {"claimName": "compiled"}},
    ],
)
def test_the_jobs_declare_the_node_disk_they_use_whatever_the_source(source: dict) -> None:
    """Nothing but the log is written on the node, so a small ephemeral-storage request and limit, for every
    source: the scheduler counts it, and the kubelet evicts a Job that would fill the node."""
    model = make_model(source=source)
    for job in (rewrite_job(model, CONFIG), builders.store_cleanup_job(model, CONFIG, [], None)):
        (only,) = pod_spec(job)["containers"]
        assert only["resources"]["requests"]["ephemeral-storage"] == "16Mi"
        assert only["resources"]["limits"]["ephemeral-storage"] == "64Mi"
        assert all("emptyDir" not in volume for volume in pod_spec(job)["volumes"])


def test_rewrite_job_honours_backoff_and_deadline() -> None:
    model = make_model(rewrite={"image": REWRITE_IMAGE, "backoffLimit": 0, "activeDeadlineSeconds": 60})
    job = rewrite_job(model, CONFIG)
    assert job["spec"]["backoffLimit"] == 0 and job["spec"]["activeDeadlineSeconds"] == 60


def failure_rules(job: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {rule["action"]: rule for rule in job["spec"]["podFailurePolicy"]["rules"]}


def test_a_refusal_fails_the_rewrite_job_at_once_and_a_disruption_is_not_a_failure() -> None:
    job = rewrite_job(make_model(), CONFIG)
    assert [rule["action"] for rule in job["spec"]["podFailurePolicy"]["rules"]] == ["FailJob", "Ignore"]
    rules = failure_rules(job)
    # The codes of UsageError, InvalidModelError (archive and S3 refusals too), NotReplicableError, OutputError.
    assert rules["FailJob"]["onExitCodes"] == {"containerName": "rewrite", "operator": "In", "values": [2, 3, 4, 5]}
    assert rules["Ignore"]["onPodConditions"] == [{"type": "DisruptionTarget"}]
    assert pod_spec(job)["restartPolicy"] == "Never"  # what the API requires of a Job with a podFailurePolicy


# tf-neuron-auto-multicore's arguments (given a directory ``model`` holding no model), the error it refuses with.
REFUSALS: dict[str, tuple[Callable[[Path], list[str]], type[RewriteError]]] = {
    "not a SavedModel": (
        lambda model: [str(model), "--num_cores", "2", "--new_model_dir", f"{model}.out"],
        InvalidModelError,
    ),
    "bad arguments": (lambda model: [str(model), "--num_cores", "0", "--new_model_dir", f"{model}.out"], UsageError),
    "output exists": (
        lambda model: [str(model), "--num_cores", "2", "--new_model_dir", str(model.parent)],
        OutputError,
    ),
}


@pytest.mark.parametrize("refusal", REFUSALS)
def test_the_codes_the_rewrite_refuses_with_are_those_that_fail_the_job(
    refusal: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv, error = REFUSALS[refusal]
    (tmp_path / "model").mkdir()
    code = cli.main(argv(tmp_path / "model"))
    assert code == error.exit_code, capsys.readouterr().err
    assert code in failure_rules(rewrite_job(make_model(), CONFIG))["FailJob"]["onExitCodes"]["values"]


def test_an_io_failure_of_the_rewrite_is_retried_by_the_job() -> None:
    values = failure_rules(rewrite_job(make_model(), CONFIG))["FailJob"]["onExitCodes"]["values"]
    assert RewriteError.exit_code not in values


def test_the_cleanup_job_fails_at_once_on_bad_arguments_and_ignores_disruptions(tmp_path: Path) -> None:
    job = builders.store_cleanup_job(make_model(), CONFIG, ["a1b2c3d4e5"], "a1b2c3d4e5")
    rules = failure_rules(job)
    assert rules["FailJob"]["onExitCodes"] == {"containerName": "clean", "operator": "In", "values": [2]}
    assert rules["Ignore"]["onPodConditions"] == [{"type": "DisruptionTarget"}]
    with pytest.raises(SystemExit) as refused:
        store.main([str(tmp_path), "--keep", "not-an-id"])
    assert refused.value.code in rules["FailJob"]["onExitCodes"]["values"]
    assert 1 not in rules["FailJob"]["onExitCodes"]["values"]  # an I/O failure (store.main's OSError) may pass


# The rewrite id


def test_rewrite_id_ignores_what_does_not_change_the_rewritten_model() -> None:
    base = make_model().rewrite_id()
    assert make_model(replicas=7).rewrite_id() == base
    assert make_model(serving={"image": "other/tfserving:2", "restPort": 9000}).rewrite_id() == base
    assert make_model(tolerations=[{"key": "x", "operator": "Exists"}]).rewrite_id() == base
    assert make_model(model={"name": "renamed", "version": 1}).rewrite_id() == base
    # The rewrite image is a means: a new one (an operator upgrade) writes the same bytes, so nothing re-runs.
    assert make_model(rewrite={"image": "registry.example.com/neuron/rewrite:0.2.0"}).rewrite_id() == base
    assert make_model(rewrite={"podSecurityContext": {"runAsUser": 1000}}).rewrite_id() == base


def test_rewrite_id_follows_what_changes_the_rewritten_model() -> None:
    base = make_model().rewrite_id()
    changed = {
        "numCores": make_model(numCores=4),
        "source": make_model(source={"pvc": {"claimName": "compiled-models", "path": "resnet50/v2"}}),
        "source kind": make_model(source={"s3": {"uri": "s3://models/resnet50/"}}),
        "version": make_model(model={"name": "resnet50", "version": 2}),
        "source version": make_model(source={"pvc": {"claimName": "compiled-models"}, "version": 3}),
        # A new store must receive its own copy: the old Job's output is not there.
        "store claim": make_model(store={"claimName": "other-store"}),
        "store path": make_model(store={"claimName": "model-store", "path": "team-a/resnet50"}),
    }
    ids = {what: model.rewrite_id() for what, model in changed.items()}
    for what, rewrite_id in ids.items():
        assert rewrite_id != base, what
    assert len(set(ids.values())) == len(ids)


def test_rewrite_id_follows_the_rewrite_format_version(monkeypatch: pytest.MonkeyPatch) -> None:
    base = make_model().rewrite_id()
    monkeypatch.setattr(builders, "FORMAT_VERSION", builders.FORMAT_VERSION + 1)
    assert make_model().rewrite_id() != base


def test_the_job_name_follows_the_rewrite_id() -> None:
    def name(model: Model) -> str:
        return rewrite_job(model, CONFIG)["metadata"]["name"]

    assert name(make_model()) == name(make_model(replicas=3))
    assert name(make_model()) != name(make_model(numCores=4))


# The serving Deployment


def test_deployment_requests_and_limits_numcores_neuroncores() -> None:
    dep = deployment(make_model(numCores=4))
    resources = container(dep, "tfserving")["resources"]
    assert resources["requests"][NEURONCORE] == "4"
    assert resources["limits"][NEURONCORE] == "4"
    # The user's CPU and memory stay.
    assert resources["requests"]["cpu"] == "2" and resources["limits"]["memory"] == "8Gi"


def test_deployment_adds_neuroncores_when_the_spec_has_no_resources() -> None:
    spec = make_spec()
    del spec["serving"]["resources"]
    dep = deployment(Model("resnet50", NAMESPACE, "uid", spec))
    assert container(dep, "tfserving")["resources"] == {"requests": {NEURONCORE: "2"}, "limits": {NEURONCORE: "2"}}


def test_deployment_does_not_modify_the_spec_resources() -> None:
    model = make_model(numCores=4)
    deployment(model)
    assert NEURONCORE not in model.spec["serving"]["resources"]["requests"]


def test_deployment_serves_the_rewrite_read_only() -> None:
    model = make_model(model={"name": "resnet", "version": 2})
    rewrite_id = model.rewrite_id()
    dep = serving_deployment(model, CONFIG, rewrite_id)
    server = container(dep, "tfserving")
    assert server["image"] == SERVING_IMAGE
    assert server["command"] == ["tensorflow_model_server_neuronx"]
    assert server["args"] == [
        "--port=8500",
        "--rest_api_port=8501",
        "--model_name=resnet",
        "--model_base_path=/models/resnet",
        "--file_system_poll_wait_seconds=0",
        "--grpc_channel_arguments=grpc.max_connection_age_ms=5000,grpc.max_connection_age_grace_ms=5000",
        "--monitoring_config_file=/etc/tfserving/monitoring/monitoring.config",
    ]
    models = mount(dep, "tfserving", "models")
    assert models == {
        "name": "models",
        "mountPath": "/models/resnet",
        "subPath": model.rewrite_path(rewrite_id),
        "readOnly": True,
    }
    assert volume(dep, "models")["persistentVolumeClaim"] == {"claimName": "model-store", "readOnly": True}
    assert dep["metadata"]["annotations"]["serving.neuron.dev/rewrite"] == rewrite_id
    assert dep["metadata"]["annotations"]["serving.neuron.dev/version"] == "2"
    assert dep["metadata"]["annotations"]["serving.neuron.dev/cores"] == "2"
    assert dep["spec"]["template"]["metadata"]["annotations"]["serving.neuron.dev/rewrite"] == rewrite_id


def test_deployment_probes() -> None:
    server = container(deployment(make_model(model={"name": "bert_base"})), "tfserving")
    assert server["readinessProbe"]["httpGet"] == {"path": "/v1/models/bert_base", "port": "http"}
    assert server["startupProbe"]["httpGet"] == {"path": "/v1/models/bert_base", "port": "http"}
    assert server["startupProbe"]["periodSeconds"] == 10
    assert server["startupProbe"]["failureThreshold"] == 60
    assert {p["name"]: p["containerPort"] for p in server["ports"]} == {"grpc": 8500, "http": 8501}


def test_a_stopping_serving_pod_keeps_answering_until_its_grpc_connections_are_ended() -> None:
    server = container(deployment(make_model()), "tfserving")
    # gRPC's core ends each connection 5 s (+10%) after it opened, then gives its calls 5 s: every connection opened
    # before kube-proxy stopped routing to the pod (5 s) is gone before the SIGTERM, 5 + 5.5 + 5 s later.
    assert (
        "--grpc_channel_arguments=grpc.max_connection_age_ms=5000,grpc.max_connection_age_grace_ms=5000"
        in (server["args"])
    )
    # The kubelet's own sleep: no sleep binary needed in the serving image.
    assert server["lifecycle"]["preStop"] == {"sleep": {"seconds": 16}}
    schema = yaml.safe_load(CRD.read_text())["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    grace = schema["properties"]["spec"]["properties"]["serving"]["properties"]["terminationGracePeriodSeconds"]
    assert grace["minimum"] == 17  # the apiserver refuses a preStop sleep as long as the grace period


def test_deployment_startup_probe_follows_the_startup_timeout() -> None:
    spec = make_spec()
    spec["serving"]["startupTimeoutSeconds"] = 1800
    server = container(deployment(Model("resnet50", NAMESPACE, "uid", spec)), "tfserving")
    probe = server["startupProbe"]
    assert probe["failureThreshold"] == 180
    assert probe["periodSeconds"] * probe["failureThreshold"] == 1800
    spec["serving"]["startupTimeoutSeconds"] = 10
    assert (
        container(deployment(Model("resnet50", NAMESPACE, "uid", spec)), "tfserving")["startupProbe"][
            "failureThreshold"
        ]
        == 1
    )


@pytest.mark.parametrize("startup", [None, 900, 1800])
def test_deployment_progress_deadline_outlasts_the_startup_timeout(startup: int | None) -> None:
    # The Deployment controller's default, 600 s, would call a healthy load of a large model a failure.
    spec = make_spec()
    if startup is not None:
        spec["serving"]["startupTimeoutSeconds"] = startup
    built = deployment(Model("resnet50", NAMESPACE, "uid", spec))
    probe = container(built, "tfserving")["startupProbe"]
    allowed = probe["periodSeconds"] * probe["failureThreshold"]
    assert built["spec"]["progressDeadlineSeconds"] >= allowed + 300


def test_deployment_model_name_defaults_to_the_object_name() -> None:
    model = make_model(name="bert", model={"version": 1})
    server = container(deployment(model), "tfserving")
    assert "--model_name=bert" in server["args"]
    assert server["readinessProbe"]["httpGet"]["path"] == "/v1/models/bert"


def test_deployment_default_strategy_never_drops_a_serving_pod() -> None:
    dep = deployment(make_model(replicas=3))
    assert dep["spec"]["replicas"] == 3
    assert dep["spec"]["strategy"]["type"] == "RollingUpdate"
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    custom = {"type": "Recreate"}
    assert deployment(make_model(strategy=custom))["spec"]["strategy"] == custom


def test_deployment_tolerations_come_from_the_config_unless_the_spec_sets_them() -> None:
    assert pod_spec(deployment(make_model()))["tolerations"] == CONFIG.default_tolerations
    own = [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}]
    assert pod_spec(deployment(make_model(tolerations=own)))["tolerations"] == own
    assert pod_spec(deployment(make_model(), OperatorConfig()))["tolerations"] == []


def test_deployment_scheduler_name_from_the_spec_over_the_config() -> None:
    assert pod_spec(deployment(make_model()))["schedulerName"] == "neuron-scheduler"
    assert pod_spec(deployment(make_model(schedulerName="my-scheduler")))["schedulerName"] == "my-scheduler"
    assert "schedulerName" not in pod_spec(deployment(make_model(), OperatorConfig()))


def test_deployment_passes_node_selector_and_affinity_through() -> None:
    node_selector = {"node.kubernetes.io/instance-type": "inf2.xlarge"}
    node_affinity = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {
                        "matchExpressions": [
                            {"key": "node.kubernetes.io/instance-type", "operator": "In", "values": ["inf2.xlarge"]}
                        ]
                    }
                ]
            }
        }
    }
    spec = pod_spec(deployment(make_model(nodeSelector=node_selector, affinity=node_affinity)))
    assert spec["nodeSelector"] == node_selector
    assert spec["affinity"] == node_affinity
    bare = pod_spec(deployment(make_model()))
    assert "nodeSelector" not in bare and "affinity" not in bare


def test_deployment_selector_matches_its_pod_template() -> None:
    dep = deployment(make_model())
    match = dep["spec"]["selector"]["matchLabels"]
    assert match.items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    assert match == serving_service(make_model())["spec"]["selector"]


def test_deployment_runs_restricted_with_a_writable_tmp() -> None:
    dep = deployment(make_model())
    assert pod_spec(dep)["securityContext"]["runAsNonRoot"] is True
    assert container(dep, "tfserving")["securityContext"]["readOnlyRootFilesystem"] is True
    assert mount(dep, "tfserving", "tmp")["mountPath"] == "/tmp"
    assert volume(dep, "tmp") == {"name": "tmp", "emptyDir": {}}


def test_batching_adds_a_config_map_and_server_args() -> None:
    spec = make_spec()
    spec["serving"]["batching"] = {"enabled": True, "maxBatchSize": 16, "batchTimeoutMicros": 500}
    model = Model("resnet50", NAMESPACE, "uid", spec)
    config_map = batching_config_map(model)
    assert config_map is not None
    assert config_map["kind"] == "ConfigMap" and config_map["metadata"]["name"] == "resnet50-batching"
    text = config_map["data"]["batching.config"]
    assert "max_batch_size { value: 16 }" in text
    assert "batch_timeout_micros { value: 500 }" in text
    assert "num_batch_threads { value: 4 }" in text
    assert "max_enqueued_batches { value: 100 }" in text

    dep = deployment(model)
    args = container(dep, "tfserving")["args"]
    assert "--enable_batching=true" in args
    assert "--batching_parameters_file=/etc/tfserving/batching.config" in args
    assert volume(dep, "batching") == {"name": "batching", "configMap": {"name": "resnet50-batching"}}
    batching_mount = mount(dep, "tfserving", "batching")
    assert batching_mount["mountPath"] == "/etc/tfserving/batching.config"
    assert batching_mount["subPath"] == "batching.config"


def test_batching_off_adds_nothing() -> None:
    spec = make_spec()
    spec["serving"]["batching"] = {"enabled": False, "maxBatchSize": 16}
    model = Model("resnet50", NAMESPACE, "uid", spec)
    assert batching_config_map(model) is None
    assert batching_config_map(make_model()) is None
    dep = deployment(model)
    assert not any(a.startswith("--enable_batching") for a in container(dep, "tfserving")["args"])
    assert all(v["name"] != "batching" for v in pod_spec(dep)["volumes"])


def test_extra_args_env_and_command() -> None:
    spec = make_spec()
    spec["serving"].update(
        command=["/usr/bin/tf_serving_entrypoint"],
        extraArgs=["--tensorflow_intra_op_parallelism=1"],
        env=[{"name": "NEURON_RT_LOG_LEVEL", "value": "INFO"}],
    )
    server = container(deployment(Model("resnet50", NAMESPACE, "uid", spec)), "tfserving")
    assert server["command"] == ["/usr/bin/tf_serving_entrypoint"]
    assert server["args"][-1] == "--tensorflow_intra_op_parallelism=1"
    assert server["env"] == [{"name": "NEURON_RT_LOG_LEVEL", "value": "INFO"}]


# The Service


def test_service_ports_and_selector() -> None:
    service = serving_service(make_model())
    assert service["apiVersion"] == "v1" and service["kind"] == "Service"
    assert service["metadata"]["name"] == "resnet50"
    assert service["spec"]["ports"] == [
        {"name": "grpc", "port": 8500, "targetPort": "grpc", "protocol": "TCP"},
        {"name": "http", "port": 8501, "targetPort": "http", "protocol": "TCP"},
    ]
    assert service["spec"]["selector"] == {
        "serving.neuron.dev/model": "resnet50",
        "app.kubernetes.io/component": "serving",
    }


def test_service_ports_follow_the_spec() -> None:
    spec = make_spec()
    spec["serving"].update(grpcPort=9000, restPort=9001)
    model = Model("resnet50", NAMESPACE, "uid", spec)
    ports = {p["name"]: p["port"] for p in serving_service(model)["spec"]["ports"]}
    assert ports == {"grpc": 9000, "http": 9001}
    assert endpoints(model) == {
        "grpc": f"resnet50.{NAMESPACE}.svc:9000",
        "rest": f"http://resnet50.{NAMESPACE}.svc:9001/v1/models/resnet50",
    }


# Hashes and shape of every output


def spec_hash(obj: dict[str, Any]) -> str:
    return obj["metadata"]["annotations"][SPEC_HASH_ANNOTATION]


def test_spec_hash_is_stable_for_the_same_spec() -> None:
    assert spec_hash(deployment(make_model())) == spec_hash(deployment(make_model()))
    assert spec_hash(serving_service(make_model())) == spec_hash(serving_service(make_model()))
    assert spec_hash(rewrite_job(make_model(), CONFIG)) == spec_hash(rewrite_job(make_model(), CONFIG))


def test_spec_hash_changes_when_the_spec_changes() -> None:
    base = spec_hash(deployment(make_model()))
    assert spec_hash(deployment(make_model(replicas=2))) != base
    assert spec_hash(deployment(make_model(numCores=4))) != base
    assert spec_hash(deployment(make_model(nodeSelector={"node.kubernetes.io/instance-type": "inf2.xlarge"}))) != base
    assert spec_hash(deployment(make_model(), OperatorConfig())) != base  # tolerations and scheduler differ
    service = make_spec()
    service["serving"]["grpcPort"] = 9500
    assert spec_hash(serving_service(Model("resnet50", NAMESPACE, "u", service))) != spec_hash(
        serving_service(make_model())
    )


def test_spec_hash_ignores_what_is_not_in_the_object() -> None:
    # The rewrite's retry settings are no part of the Deployment; the serving image is no part of the Service.
    retry = {"image": REWRITE_IMAGE, "backoffLimit": 5}
    assert spec_hash(deployment(make_model(rewrite=retry))) == spec_hash(deployment(make_model()))
    other = make_spec()
    other["serving"]["image"] = "other/tfserving:9"
    assert spec_hash(serving_service(Model("resnet50", NAMESPACE, "u", other))) == spec_hash(
        serving_service(make_model())
    )


def is_plain_json(value: Any) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, str) and is_plain_json(v) for k, v in value.items())
    if isinstance(value, list):
        return all(is_plain_json(v) for v in value)
    return value is None or isinstance(value, (str, int, float, bool))


def test_every_builder_output_is_plain_json() -> None:
    spec = make_spec(
        source={"s3": {"uri": "s3://models/resnet50/", "region": "eu-west-1"}},
        nodeSelector={"node.kubernetes.io/instance-type": "inf2.xlarge"},
    )
    spec["serving"]["batching"] = {"enabled": True}
    model = Model("resnet50", NAMESPACE, "uid", spec)
    outputs = [
        rewrite_job(model, CONFIG),
        deployment(model),
        serving_service(model),
        batching_config_map(model),
    ]
    for obj in outputs:
        assert isinstance(obj, dict) and is_plain_json(obj), obj["kind"]
        assert json.loads(json.dumps(obj)) == obj
        assert obj["metadata"]["namespace"] == NAMESPACE
        assert DNS1123_LABEL.match(obj["metadata"]["name"])
        assert all(len(v) <= 63 for v in obj["metadata"]["labels"].values())


def test_batching_parameters_have_a_hash_that_rolls_the_pods() -> None:
    """TF Serving reads the batching file once: new parameters must update the ConfigMap and restart the pods."""

    def built(size: int) -> tuple[dict[str, Any], dict[str, Any]]:
        model = make_model(serving={**make_spec()["serving"], "batching": {"enabled": True, "maxBatchSize": size}})
        return batching_config_map(model) or {}, serving_deployment(model, CONFIG, "r1")

    (cm8, dep8), (cm16, dep16) = built(8), built(16)
    assert cm8["metadata"]["annotations"][SPEC_HASH_ANNOTATION] != cm16["metadata"]["annotations"][SPEC_HASH_ANNOTATION]
    template8 = dep8["spec"]["template"]["metadata"]["annotations"]
    template16 = dep16["spec"]["template"]["metadata"]["annotations"]
    assert template8 != template16
    assert (
        dep8["metadata"]["annotations"][SPEC_HASH_ANNOTATION] != dep16["metadata"]["annotations"][SPEC_HASH_ANNOTATION]
    )


def test_the_operator_default_serving_image_applies_when_the_spec_names_none() -> None:
    spec = make_spec()
    del spec["serving"]
    model = Model.from_body({"metadata": {"name": "m", "namespace": NAMESPACE}, "spec": spec})
    config = OperatorConfig(rewrite_image="r:1", serving_image="registry.example.com/tfserving-neuronx:1")
    container = serving_deployment(model, config, "r1")["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "registry.example.com/tfserving-neuronx:1"
    assert container["command"] == ["tensorflow_model_server_neuronx"]
    assert serving_service(model)["spec"]["ports"][0]["port"] == 8500


# The data path: one version published once, where TF Serving loads it


def test_the_job_publishes_one_version_once_and_reports_on_its_termination_message() -> None:
    model = make_model(numCores=4, model={"name": "resnet50", "version": 3})
    command = container(rewrite_job(model, CONFIG), "rewrite")["command"]
    flags = dict(zip(command[2::2], command[3::2], strict=False))
    assert flags["--select_version"] == "latest"  # a base path serves its newest version
    assert flags["--rewrite_id"] == model.rewrite_id()  # re-used, never rewritten, when already published
    assert flags["--report_file"] == "/dev/termination-log"
    assert "--force" not in command and command[-1] == "--fsync"

    pinned = make_model(source={"pvc": {"claimName": "compiled-models", "path": "resnet50"}, "version": 7})
    command = container(rewrite_job(pinned, CONFIG), "rewrite")["command"]
    assert command[command.index("--select_version") + 1] == "7"


def test_the_rewrite_pod_takes_the_specs_security_context_resources_and_placement() -> None:
    toleration = {"key": "dedicated", "operator": "Exists", "effect": "NoSchedule"}
    rewrite = {
        "podSecurityContext": {"runAsUser": 1000, "runAsGroup": 1000, "supplementalGroups": [4242]},
        "resources": {"limits": {"memory": "1Gi"}},
        "nodeSelector": {"kubernetes.io/arch": "arm64"},
        "tolerations": [toleration],
        "affinity": {"nodeAffinity": {}},
    }
    spec = pod_spec(rewrite_job(make_model(rewrite=rewrite), CONFIG))
    assert spec["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 1000,
        "runAsGroup": 1000,
        "fsGroup": 65532,
        "supplementalGroups": [4242],
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert container(rewrite_job(make_model(rewrite=rewrite), CONFIG), "rewrite")["resources"] == {
        "requests": {"cpu": "250m", "memory": "128Mi", "ephemeral-storage": "16Mi"},
        "limits": {"memory": "1Gi", "ephemeral-storage": "64Mi"},
    }
    assert spec["nodeSelector"] == {"kubernetes.io/arch": "arm64"}
    assert spec["tolerations"] == [toleration]
    assert spec["affinity"] == {"nodeAffinity": {}}
    # The serving pods' placement is their own.
    assert "nodeSelector" not in pod_spec(deployment(make_model(rewrite=rewrite)))


def test_the_serving_pods_take_the_specs_security_contexts() -> None:
    serving = {
        "image": SERVING_IMAGE,
        "podSecurityContext": {"runAsUser": 0, "runAsNonRoot": False, "supplementalGroups": [990]},
        "securityContext": {"readOnlyRootFilesystem": False, "capabilities": {"add": ["IPC_LOCK"]}},
    }
    obj = deployment(make_model(serving=serving))
    pod = pod_spec(obj)["securityContext"]
    assert (pod["runAsUser"], pod["runAsNonRoot"], pod["supplementalGroups"]) == (0, False, [990])
    assert pod["seccompProfile"] == {"type": "RuntimeDefault"}  # what the spec does not set keeps its default
    server = container(obj, "tfserving")["securityContext"]
    assert server["readOnlyRootFilesystem"] is False and server["allowPrivilegeEscalation"] is False
    assert server["capabilities"] == {"drop": ["ALL"], "add": ["IPC_LOCK"]}
    # The spec is not modified by the merge.
    assert serving["securityContext"] == {"readOnlyRootFilesystem": False, "capabilities": {"add": ["IPC_LOCK"]}}


def test_store_cleanup_job_keeps_what_it_is_told_as_the_rewrites_user() -> None:
    model = make_model(rewrite={"image": REWRITE_IMAGE, "podSecurityContext": {"runAsUser": 1000}})
    job = builders.store_cleanup_job(model, CONFIG, ["a1b2c3d4e5", "0f0f0f0f0f"], "a1b2c3d4e5")
    assert job["metadata"]["name"] == "resnet50-clean-a1b2c3d4e5"
    assert job["metadata"]["labels"]["app.kubernetes.io/component"] == "store-cleanup"
    (clean,) = pod_spec(job)["containers"]
    assert clean["image"] == REWRITE_IMAGE
    assert clean["command"] == [
        "neuron-store-clean",
        f"/store/{NAMESPACE}/resnet50",
        "--keep",
        "a1b2c3d4e5",
        "--keep",
        "0f0f0f0f0f",
        "--report_file",
        "/dev/termination-log",
    ]
    assert pod_spec(job)["securityContext"]["runAsUser"] == 1000  # the store's owner, as for the rewrite
    assert "ttlSecondsAfterFinished" not in job["spec"]  # its model owns it and deletes it once read
    gone = builders.store_cleanup_job(model, CONFIG, [], None)
    assert gone["metadata"]["name"] == "resnet50-clean-deleted"
    assert "--keep" not in pod_spec(gone)["containers"][0]["command"]
    assert gone["spec"]["ttlSecondsAfterFinished"] == 3600  # nothing owns it: it must go by itself
