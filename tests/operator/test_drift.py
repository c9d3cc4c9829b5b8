"""Fields the operator sets on its children are put back when someone changes them (a `kubectl edit`), and told;
fields it does not set are left alone, and nothing is written while nothing differs. Fields the API itself does not
keep (a mutating webhook) are told once and never written again."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from webhooks import admission_webhook, json_patch

from conftest import Env, neuron_model, wait_for

pytestmark = pytest.mark.cluster
NEURONCORE = "aws.amazon.com/neuroncore"


def serving_container(env: Env, name: str) -> Any:
    deployment = env.apps.read_namespaced_deployment(name, env.namespace)
    return next(c for c in deployment.spec.template.spec.containers if c.name == "tfserving")


def test_hand_edits_of_owned_fields_are_restored_once_and_told(env: Env, models: dict[str, Path]) -> None:
    env.hostpath_claim("compiled", models["resnet50"])
    manifest = neuron_model("drifty", "compiled", cores=1)
    manifest["spec"]["serving"]["batching"] = {"enabled": True, "maxBatchSize": 4}
    assert env.apply(manifest).returncode == 0
    env.wait_phase("drifty", "Ready")
    image = serving_container(env, "drifty").image
    selector = env.core.read_namespaced_service("drifty", env.namespace).spec.selector
    batching = env.core.read_namespaced_config_map("drifty-batching", env.namespace).data
    offset = env.audit_offset()
    # A label of someone else's first: not the operator's to judge (and no concurrent write to race the repair,
    # which would be refused with 409 and retried: a second update in the count).
    env.core.patch_namespaced_service("drifty", env.namespace, {"metadata": {"labels": {"team": "search"}}})

    # What `kubectl edit` does: the image and the NeuronCore count of the pods, the Service's selector, the
    # batching file.
    index = next(
        i
        for i, c in enumerate(
            env.apps.read_namespaced_deployment("drifty", env.namespace).spec.template.spec.containers
        )
        if c.name == "tfserving"
    )
    container = f"/spec/template/spec/containers/{index}"
    env.apps.patch_namespaced_deployment(
        "drifty",
        env.namespace,
        [
            {"op": "replace", "path": f"{container}/image", "value": "registry.example/hand-edited:1"},
            {"op": "replace", "path": f"{container}/resources/limits/aws.amazon.com~1neuroncore", "value": "2"},
            {"op": "replace", "path": f"{container}/resources/requests/aws.amazon.com~1neuroncore", "value": "2"},
        ],
    )
    env.core.patch_namespaced_service("drifty", env.namespace, {"spec": {"selector": {"app": "someone-else"}}})
    env.core.patch_namespaced_config_map("drifty-batching", env.namespace, {"data": {"batching.config": "hacked"}})

    wait_for(lambda: serving_container(env, "drifty").image == image, what="the image restored")
    assert serving_container(env, "drifty").resources.limits[NEURONCORE] == "1"
    wait_for(
        lambda: env.core.read_namespaced_service("drifty", env.namespace).spec.selector == selector,
        what="the Service's selector restored",
    )
    wait_for(
        lambda: env.core.read_namespaced_config_map("drifty-batching", env.namespace).data == batching,
        what="the batching file restored",
    )
    assert env.core.read_namespaced_service("drifty", env.namespace).metadata.labels["team"] == "search"
    env.wait_phase("drifty", "Ready")  # the rollout back to the operator's pods is over

    events = env.core.list_namespaced_event(env.namespace, field_selector="involvedObject.name=drifty").items
    told = sorted(e.message for e in events if e.reason == "DriftRepaired")
    assert any(m.startswith("restored Deployment drifty: ") and "containers[tfserving].image" in m for m in told), told
    assert any(m.startswith("restored Service drifty: spec.selector") for m in told), told
    assert any(m.startswith("restored ConfigMap drifty-batching: data.batching.config") for m in told), told
    assert "changed outside the operator" in env.log.read_text()
    # One repair each, although the rollout back made the operator reconcile many times: no write while
    # nothing differs (the label it does not set included).
    writes = Counter(env.operator_writes(offset))
    assert writes[("update", "deployments", "")] == 1, writes
    assert writes[("update", "services", "")] == 1, writes
    assert writes[("update", "configmaps", "")] == 1, writes
    assert not writes[("create", "deployments", "")] and not writes[("delete", "deployments", "")], writes


OPT_OUT = "mesh.example.com/inject"  # an annotation a cluster's policy forbids on pods, as Kyverno rules strip one


def strip_opt_out(request: dict[str, Any]) -> dict[str, Any]:
    """A policy engine's mutating rule: Deployments may not carry OPT_OUT on their pods; it is removed."""
    annotations = request["object"]["spec"]["template"]["metadata"].get("annotations") or {}
    if OPT_OUT not in annotations:
        return {"allowed": True}
    escaped = OPT_OUT.replace("~", "~0").replace("/", "~1")
    return json_patch([{"op": "remove", "path": f"/spec/template/metadata/annotations/{escaped}"}])


def fields_not_kept_told(env: Env, name: str) -> list[Any]:
    selector = f"involvedObject.name={name},reason=FieldsNotKept"
    return env.core.list_namespaced_event(env.namespace, field_selector=selector).items


def a_reconcile(env: Env, name: str, retain: int) -> None:
    """Evidence that the operator reconciled the model again: a spec change that changes none of its children (how
    many rewrites the store keeps) observed in the status."""
    env.patch_spec(name, {"store": {"retainRewrites": retain}})
    generation = env.model(name)["metadata"]["generation"]
    wait_for(lambda: env.status(name).get("observedGeneration") == generation, what=f"generation {generation} seen")
    assert env.status(name)["phase"] == "Ready"


def test_a_field_a_mutating_webhook_strips_is_told_once_and_never_written_again(
    env: Env, models: dict[str, Path]
) -> None:
    env.hostpath_claim("compiled", models["resnet50"])
    rule = {"operations": ["CREATE", "UPDATE"], "apiGroups": ["apps"], "apiVersions": ["v1"]}
    rule["resources"] = ["deployments"]
    manifest = neuron_model("policed", "compiled", cores=1)
    manifest["spec"]["serving"]["podAnnotations"] = {OPT_OUT: "false", "team": "search"}
    with admission_webhook(
        env, "strip-opt-out.policy.test", True, rule, {"app.kubernetes.io/component": "serving"}, strip_opt_out
    ):
        offset = env.audit_offset()
        assert env.apply(manifest).returncode == 0
        env.wait_phase("policed", "Ready")
        template = env.apps.read_namespaced_deployment("policed", env.namespace).spec.template.metadata
        assert OPT_OUT not in template.annotations and template.annotations["team"] == "search"
        path = f"spec.template.metadata.annotations.{OPT_OUT}"
        assert env.status("policed")["fieldsNotKept"] == [{"kind": "Deployment", "name": "policed", "fields": [path]}]
        (told,) = wait_for(lambda: fields_not_kept_told(env, "policed"), what="a FieldsNotKept Warning")
        assert told.type == "Warning" and f"Deployment policed's {path}" in told.message, told.message

        # Reconciles, in this process and after a restart (which reads what was not kept from the status): no
        # write to the Deployment beyond its creation, and no second Warning.
        a_reconcile(env, "policed", retain=2)
        env.stop_operator()
        env.start_operator()
        a_reconcile(env, "policed", retain=3)
        writes = Counter(env.operator_writes(offset))
        assert writes[("create", "deployments", "")] == 1, writes
        assert not writes[("update", "deployments", "")], writes
        assert len(fields_not_kept_told(env, "policed")) == 1
        assert "DriftRepaired" not in {e.reason for e in env.core.list_namespaced_event(env.namespace).items}

    # Without the webhook, the next write (a spec change) keeps the field, and the status says so.
    env.patch_spec("policed", {"serving": {"podAnnotations": {OPT_OUT: "false", "team": "ranking"}}})
    wait_for(lambda: "fieldsNotKept" not in env.status("policed"), what="fieldsNotKept cleared")
    template = env.apps.read_namespaced_deployment("policed", env.namespace).spec.template.metadata
    assert template.annotations[OPT_OUT] == "false" and template.annotations["team"] == "ranking"
