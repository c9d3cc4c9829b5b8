"""Every failure in the status, against the real control plane: what the API refuses, objects the model does not
own, containers that cannot start, zero replicas, and the batching ConfigMap's life."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from kubernetes.client.rest import ApiException

from conftest import Env, neuron_model, wait_for

pytestmark = pytest.mark.cluster


def ready(env: Env, name: str, reason: str) -> dict[str, Any]:
    """The Ready condition once it has ``reason``; failing, the status and the operator's log say why not."""
    try:
        return wait_for(
            lambda: (c := env.condition(name, "Ready")).get("reason") == reason and c, what=f"{name}: Ready {reason}"
        )
    except AssertionError:
        tail = "\n".join(env.log.read_text(errors="replace").splitlines()[-30:])
        raise AssertionError(
            f"{name}: never Ready {reason}; status {env.status(name)}\noperator log:\n{tail}"
        ) from None


def warnings(env: Env, name: str, reason: str) -> list[Any]:
    events = env.core.list_namespaced_event(env.namespace, field_selector=f"involvedObject.name={name}").items
    return [e for e in events if e.type == "Warning" and e.reason == reason]


def test_a_deployment_the_api_refuses_is_told_with_its_words_then_recovers(env: Env, models: dict[str, Path]) -> None:
    env.hostpath_claim("compiled", models["resnet50"])
    toleration = {"key": "aws.amazon.com/neuron", "operator": "Equals", "value": "true"}  # "Equal"
    manifest = neuron_model("typo", "compiled", tolerations=[toleration])  # tolerations pass through as they are
    assert env.apply(manifest).returncode == 0
    condition = ready(env, "typo", "ChildRejected")
    assert condition["message"].startswith("the API refused to create Deployment typo: "), condition
    assert 'tolerations[0].operator: Unsupported value: "Equals"' in condition["message"], condition
    assert env.status("typo")["phase"] == "Failed"
    (event,) = wait_for(lambda: warnings(env, "typo", "ChildRejected"), what="a Warning Event")
    assert event.source.component == "neuronmodel-operator" and event.reporting_component == "neuronmodel-operator"

    manifest["spec"]["tolerations"] = [{**toleration, "operator": "Equal"}]
    assert env.apply(manifest).returncode == 0
    env.wait_phase("typo", "Ready")


def test_a_quota_that_refuses_the_service_is_told_and_retried_until_lifted(env: Env, models: dict[str, Path]) -> None:
    env.hostpath_claim("compiled", models["resnet50"])
    quota = {"metadata": {"name": "no-services"}, "spec": {"hard": {"services": "0"}}}
    env.core.create_namespaced_resource_quota(env.namespace, quota)
    wait_for(
        lambda: env.core.read_namespaced_resource_quota("no-services", env.namespace).status.hard,
        what="the quota in force",
    )
    assert env.apply(neuron_model("quota", "compiled")).returncode == 0
    condition = ready(env, "quota", "ChildRejected")
    assert "Service quota" in condition["message"] and "exceeded quota" in condition["message"], condition
    # The pods serve; only the Service is missing: degraded, and no endpoint is advertised.
    wait_for(lambda: env.status("quota").get("phase") == "Degraded", what="Degraded")
    assert env.status("quota").get("endpoints") is None

    env.core.delete_namespaced_resource_quota("no-services", env.namespace)
    status = env.wait_phase("quota", "Ready", timeout=150)  # retried with back-off, nothing changed in the spec
    assert status["endpoints"]["rest"].startswith(f"http://quota.{env.namespace}.svc:8501")


def test_serving_pods_pod_security_refuses_are_told_in_the_apiservers_words_then_recover(
    env: Env, models: dict[str, Path]
) -> None:
    """The test namespaces enforce Pod Security's restricted level: a spec asking to run as root passes the operator
    (runAsNonRoot is explicitly off) but its pods are refused by the apiserver, which the ReplicaSet reports."""
    env.hostpath_claim("compiled", models["resnet50"])
    image = "public.ecr.aws/neuron/tensorflow-inference-neuronx:test"
    as_root = {"image": image, "podSecurityContext": {"runAsNonRoot": False, "runAsUser": 0}}
    assert env.apply(neuron_model("rooted", "compiled", serving=as_root)).returncode == 0
    condition = ready(env, "rooted", "PodsRefused")
    assert condition["message"].startswith("the serving pods cannot be created: pods "), condition
    assert 'is forbidden: violates PodSecurity "restricted:latest"' in condition["message"], condition
    assert "runAsNonRoot != true" in condition["message"], condition
    assert env.status("rooted")["phase"] == "Failed"

    assert env.apply(neuron_model("rooted", "compiled", serving={"image": image})).returncode == 0
    env.wait_phase("rooted", "Ready")


def test_a_hand_made_service_with_the_models_name_is_never_adopted(env: Env, models: dict[str, Path]) -> None:
    env.hostpath_claim("compiled", models["resnet50"])
    legacy = {
        "metadata": {"name": "migrated", "labels": {"app": "legacy-tfserving"}},
        "spec": {"selector": {"app": "legacy-tfserving"}, "ports": [{"name": "http", "port": 8501}]},
    }
    env.core.create_namespaced_service(env.namespace, legacy)
    assert env.apply(neuron_model("migrated", "compiled")).returncode == 0
    condition = ready(env, "migrated", "ChildConflict")
    assert condition["message"].startswith("Service migrated already exists and does not belong to this NeuronModel")
    wait_for(lambda: env.status("migrated").get("phase") == "Degraded", what="Degraded: the pods serve")
    assert env.status("migrated").get("endpoints") is None  # never someone else's Service
    service = env.core.read_namespaced_service("migrated", env.namespace)
    assert service.spec.selector == {"app": "legacy-tfserving"} and not service.metadata.owner_references

    # The migration's last step (kubectl: the client's delete_namespaced_service cannot read the answer it gets).
    env.cluster.cluster.kubectl("delete", "service", "migrated", "-n", env.namespace)
    status = env.wait_phase("migrated", "Ready", timeout=150)
    assert status["endpoints"] is not None
    ours = env.core.read_namespaced_service("migrated", env.namespace)
    assert ours.metadata.owner_references[0].kind == "NeuronModel"


def test_a_serving_container_whose_secret_is_missing_is_told_until_it_exists(env: Env, models: dict[str, Path]) -> None:
    env.hostpath_claim("compiled", models["resnet50"])
    manifest = neuron_model("secretive", "compiled")
    token = {"secretKeyRef": {"name": "model-token", "key": "token"}}
    manifest["spec"]["serving"]["env"] = [{"name": "MODEL_TOKEN", "valueFrom": token}]
    assert env.apply(manifest).returncode == 0
    condition = ready(env, "secretive", "ContainerConfigInvalid")
    assert 'CreateContainerConfigError: secret "model-token" not found' in condition["message"], condition
    assert env.status("secretive")["phase"] == "Failed"

    env.core.create_namespaced_secret(
        env.namespace, {"metadata": {"name": "model-token"}, "stringData": {"token": "x"}}
    )
    env.wait_phase("secretive", "Ready")


def test_zero_replicas_is_idle_and_ready_is_false(env: Env, models: dict[str, Path]) -> None:
    env.hostpath_claim("compiled", models["resnet50"])
    assert env.apply(neuron_model("parked", "compiled", replicas=0)).returncode == 0
    status = env.wait_phase("parked", "Idle")
    assert env.condition("parked", "Ready")["reason"] == "ScaledToZero"
    assert status["rewrite"]["publishedAt"]  # the rewrite is ready to serve
    waited = env.cluster.cluster.kubectl(
        "wait", "-n", env.namespace, "nm/parked", "--for=condition=Ready", "--timeout=3s", check=False
    )
    assert waited.returncode != 0  # nothing serves: `kubectl wait` must not pass

    env.cluster.cluster.kubectl("scale", "-n", env.namespace, "nm/parked", "--replicas=1")
    env.wait_phase("parked", "Ready")


def test_the_batching_config_map_is_recreated_when_deleted_and_removed_when_batching_is_off(
    env: Env, models: dict[str, Path]
) -> None:
    env.hostpath_claim("compiled", models["resnet50"])
    manifest = neuron_model("batched", "compiled")
    manifest["spec"]["serving"]["batching"] = {"enabled": True, "maxBatchSize": 4}
    assert env.apply(manifest).returncode == 0
    env.wait_phase("batched", "Ready")
    first = env.core.read_namespaced_config_map("batched-batching", env.namespace)

    env.core.delete_namespaced_config_map("batched-batching", env.namespace)

    def recreated() -> bool:
        try:
            again = env.core.read_namespaced_config_map("batched-batching", env.namespace)
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return (
            again.metadata.uid != first.metadata.uid and "max_batch_size { value: 4 }" in again.data["batching.config"]
        )

    wait_for(recreated, what="the ConfigMap recreated")

    env.patch_spec("batched", {"serving": {"batching": {"enabled": False}}})
    wait_for(
        lambda: not env.core.list_namespaced_config_map(env.namespace, label_selector="serving.neuron.dev/model").items,
        what="the ConfigMap deleted once batching is off",
    )
    env.wait_phase("batched", "Ready")
