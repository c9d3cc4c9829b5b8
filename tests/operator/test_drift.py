"""Fields the operator sets on its children are put back when someone changes them (a `kubectl edit`), and told;
fields it does not set are left alone, and nothing is written while nothing differs."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest

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
