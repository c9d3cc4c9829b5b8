"""Every failure in the status, against the real control plane: what the API refuses, objects the model does not
own, containers that cannot start, zero replicas, and the batching ConfigMap's life."""

from __future__ import annotations

import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException
from webhooks import admission_webhook, json_patch

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


# The ReplicaSet controller retries a refused pod with its queue's per-item back-off (5 ms doubling to 1000 s), so
# a refusal that lasted a minute is retried about a minute later: the recovery deadline the tests allow.
RECOVERY_SECONDS = 120
HOLD_SECONDS = 45  # how long the tests that check recovery after a lasting refusal keep it
QUOTA = "requests.aws.amazon.com/neuroncore"


def recovered(env: Env, name: str, since: float) -> dict[str, Any]:
    """Ready again, with nothing changed in the spec, in bounded time; the status no longer names the refusal."""
    status = env.wait_phase(name, "Ready", timeout=RECOVERY_SECONDS)
    print(f"{name}: Ready {time.monotonic() - since:.1f} s after the cause went")  # the controller's back-off
    assert env.condition(name, "Ready")["reason"] == "ModelServing", status
    return status


def lasting(env: Env, seconds: float = HOLD_SECONDS) -> None:
    """The refusal lasts while the controller retries: the status told it once, so the operator writes nothing."""
    offset = env.audit_offset()
    time.sleep(seconds)
    assert env.operator_writes(offset) == []


def set_quota(env: Env, cores: int) -> None:
    """A ResourceQuota of ``cores`` NeuronCores, in force (the apiserver enforces a quota once it has a status)."""
    spec = {"hard": {QUOTA: str(cores)}}
    try:
        env.core.patch_namespaced_resource_quota("neuron-cores", env.namespace, {"spec": spec})
    except ApiException as exc:
        if exc.status != 404:
            raise
        env.core.create_namespaced_resource_quota(env.namespace, {"metadata": {"name": "neuron-cores"}, "spec": spec})

    def in_force() -> bool:
        quota = env.core.read_namespaced_resource_quota("neuron-cores", env.namespace)
        return ((quota.status and quota.status.hard) or {}).get(QUOTA) == str(cores)

    wait_for(in_force, what=f"the quota of {cores} cores in force")


def test_a_neuroncore_quota_refusing_serving_pods_is_told_in_its_words_then_recovers_when_raised(
    env: Env, models: dict[str, Path]
) -> None:
    env.hostpath_claim("compiled", models["resnet50"])
    set_quota(env, 1)
    assert env.apply(neuron_model("quota", "compiled", cores=2)).returncode == 0
    condition = ready(env, "quota", "PodsRefused")
    words = f"exceeded quota: neuron-cores, requested: {QUOTA}=2, used: {QUOTA}=0, limited: {QUOTA}=1"
    assert condition["message"].startswith("the serving pods cannot be created: pods "), condition
    assert words in condition["message"], condition
    assert env.status("quota")["phase"] == "Failed"  # 0 of 1 admitted: nothing serves, and none is coming

    raised = time.monotonic()
    set_quota(env, 2)
    recovered(env, "quota", raised)

    # Room for one of two pods: the admitted one serves, the other is refused and named.
    env.patch_spec("quota", {"replicas": 2})
    condition = ready(env, "quota", "PodsRefused")
    assert f"used: {QUOTA}=2, limited: {QUOTA}=2" in condition["message"], condition
    status = env.status("quota")
    assert status["phase"] == "Degraded" and status["readyReplicas"] == 1, status
    assert status["endpoints"] is not None and env.condition("quota", "Available")["status"] == "True"

    raised = time.monotonic()
    set_quota(env, 4)
    assert recovered(env, "quota", raised)["readyReplicas"] == 2


def test_a_limit_range_refusing_serving_pods_is_told_in_its_words_then_recovers_when_deleted(
    env: Env, models: dict[str, Path]
) -> None:
    """A LimitRange's maximum below what the serving container asks for; the rewrite's container is within it."""
    env.hostpath_claim("compiled", models["resnet50"])
    limits = {
        "metadata": {"name": "small-containers"},
        "spec": {"limits": [{"type": "Container", "max": {"memory": "768Mi"}}]},
    }
    env.core.create_namespaced_limit_range(env.namespace, limits)
    serving = {
        "image": "public.ecr.aws/neuron/tensorflow-inference-neuronx:test",
        "resources": {"requests": {"memory": "256Mi"}, "limits": {"memory": "1Gi"}},
    }
    assert env.apply(neuron_model("limited", "compiled", serving=serving)).returncode == 0
    condition = ready(env, "limited", "PodsRefused")
    assert "maximum memory usage per Container is 768Mi, but limit is 1Gi" in condition["message"], condition
    assert env.status("limited")["phase"] == "Failed"

    deleted = time.monotonic()
    env.core.delete_namespaced_limit_range("small-containers", env.namespace)
    recovered(env, "limited", deleted)


DENIAL = "serving pods are frozen in this namespace until the change freeze ends"


def denying_webhook(env: Env) -> AbstractContextManager[str]:
    """A validating webhook refusing every serving pod of the test's namespace, with DENIAL."""
    return admission_webhook(
        env,
        "deny-serving.neuron.test",
        mutating=False,
        rule={"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"]},
        object_selector={"app.kubernetes.io/component": "serving"},
        answer=lambda request: {"allowed": False, "status": {"code": 403, "message": DENIAL}},
    )


def test_a_validating_webhook_refusing_serving_pods_is_told_in_its_words_then_recovers_when_removed(
    env: Env, models: dict[str, Path]
) -> None:
    env.hostpath_claim("compiled", models["resnet50"])
    with denying_webhook(env) as configuration:
        assert env.apply(neuron_model("frozen", "compiled")).returncode == 0
        condition = ready(env, "frozen", "PodsRefused")
        assert f'admission webhook "deny-serving.neuron.test" denied the request: {DENIAL}' in condition["message"]
        assert env.status("frozen")["phase"] == "Failed"
        lasting(env)

        removed = time.monotonic()
        client.AdmissionregistrationV1Api(env.cluster.api).delete_validating_webhook_configuration(configuration)
        recovered(env, "frozen", removed)


def test_a_refused_rewrite_pod_is_told_in_the_quotas_words_then_recovers_when_lifted(
    env: Env, models: dict[str, Path]
) -> None:
    """The Job controller tells a pod it could not create only as a FailedCreate Event on the Job, which does not
    change again: the operator must still tell it, soon, and not as a rewrite making progress."""
    env.hostpath_claim("compiled", models["resnet50"])
    env.core.create_namespaced_resource_quota(
        env.namespace, {"metadata": {"name": "no-pods"}, "spec": {"hard": {"pods": "0"}}}
    )
    wait_for(
        lambda: (
            (
                env.core.read_namespaced_resource_quota("no-pods", env.namespace).status
                or client.V1ResourceQuotaStatus()
            ).hard
        ),
        what="the quota in force",
    )
    created = time.monotonic()
    assert env.apply(neuron_model("starved", "compiled")).returncode == 0
    condition = ready(env, "starved", "RewritePodsRefused")
    print(f"starved: told {time.monotonic() - created:.1f} s after its creation")
    (job,) = env.jobs()
    assert condition["message"].startswith(f'rewrite Job {job.metadata.name}: its pod cannot be created: pods "'), (
        condition
    )
    assert "exceeded quota: no-pods, requested: pods=1, used: pods=0, limited: pods=0" in condition["message"], (
        condition
    )
    assert env.condition("starved", "RewriteSucceeded")["reason"] == "RewritePodsRefused"
    assert env.status("starved")["phase"] == "Failed"
    lasting(env)

    lifted = time.monotonic()
    env.core.delete_namespaced_resource_quota("no-pods", env.namespace)
    recovered(env, "starved", lifted)


def test_a_refused_store_clean_up_pod_is_told_and_the_clean_up_runs_once_admitted(
    env: Env, models: dict[str, Path]
) -> None:
    """A LimitRange's minimum above the clean-up container's request (the rewrite's and the serving container's are
    above it): the model serves, and status.store tells why its clean-up does not run."""
    env.hostpath_claim("compiled", models["resnet50"])
    limits = {"type": "Container", "min": {"memory": "100Mi"}}
    env.core.create_namespaced_limit_range(env.namespace, {"metadata": {"name": "big"}, "spec": {"limits": [limits]}})
    serving = {
        "image": "public.ecr.aws/neuron/tensorflow-inference-neuronx:test",
        "resources": {"requests": {"memory": "256Mi"}},
    }
    store = {"claimName": "model-store", "retainRewrites": 0}
    assert env.apply(neuron_model("tidy", "compiled", serving=serving, store=store)).returncode == 0
    first = env.wait_phase("tidy", "Ready")["rewrite"]["id"]
    env.patch_spec("tidy", {"numCores": 1})  # a second rewrite: the first is the clean-up's to remove
    wait_for(lambda: env.status("tidy")["rewrite"]["id"] != first, what="the second rewrite")
    second = env.wait_phase("tidy", "Ready")["rewrite"]["id"]
    store = wait_for(lambda: (s := env.status("tidy")["store"]).get("error") and s, what="the refusal told")
    assert store["error"].startswith("store clean-up Job "), store
    assert ": its pod cannot be created: pods " in store["error"], store
    assert "minimum memory usage per Container is 100Mi, but request is 64Mi" in store["error"], store
    assert env.status("tidy")["phase"] == "Ready"  # a store not cleaned yet holds nothing up

    env.core.delete_namespaced_limit_range("big", env.namespace)
    store = wait_for(
        lambda: (s := env.status("tidy")["store"]).get("cleanedFor") == second and s,
        RECOVERY_SECONDS,
        what="the clean-up run",
    )
    assert store.get("error") is None and store["removed"] == 1, store


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


MESH_INIT = {
    "name": "mesh-init",
    "image": "registry.example/mesh/proxy-init:1.0",
    # What a mesh's init container does when the node lacks what it needs: it fails before the rewrite starts.
    "command": ["sh", "-c", "echo 'iptables: permission denied (you must be root)' >&2; exit 2"],
    "securityContext": {
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
    },
}


def inject_mesh_init(request: dict[str, Any]) -> dict[str, Any]:
    """A service mesh's injector: every pod of the namespace gets its init container first."""
    if request["object"]["spec"].get("initContainers"):
        return json_patch([{"op": "add", "path": "/spec/initContainers/0", "value": MESH_INIT}])
    return json_patch([{"op": "add", "path": "/spec/initContainers", "value": [MESH_INIT]}])


def test_an_injected_init_container_that_fails_is_named_with_its_exit_code_in_the_rewrites_failure(
    env: Env, models: dict[str, Path]
) -> None:
    env.hostpath_claim("compiled", models["resnet50"])
    rule = {"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"]}
    with admission_webhook(
        env, "inject.mesh.test", True, rule, {"app.kubernetes.io/component": "rewrite"}, inject_mesh_init
    ):
        assert env.apply(neuron_model("meshed", "compiled", cores=1)).returncode == 0
        env.wait_phase("meshed", "Failed", timeout=180)  # the Job's back-off: three pods, each refused by mesh-init
    (job,) = env.jobs()
    condition = env.condition("meshed", "RewriteSucceeded")
    assert condition["reason"] == "RewriteFailed", condition
    failed = f"rewrite Job {job.metadata.name} failed (BackoffLimitExceeded): "
    assert condition["message"].startswith(failed), condition
    assert "init container mesh-init exited 2 (Error)" in condition["message"], condition
    assert not env.apps.list_namespaced_deployment(env.namespace).items  # nothing served a rewrite that never ran
