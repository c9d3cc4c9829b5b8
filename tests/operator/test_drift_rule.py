"""What counts as drift of a child: a field the operator sets that no longer holds its value, nothing else."""

from __future__ import annotations

import copy

from neuronmodel_operator.drift import drifted

DESIRED = {
    "replicas": 2,
    "template": {
        "spec": {
            "containers": [
                {
                    "name": "tfs",
                    "image": "tfs:1",
                    "args": ["--port=8500", "--model_name=m"],
                    "resources": {"limits": {"aws.amazon.com/neuroncore": 2, "memory": "1024Mi", "cpu": "1000m"}},
                    "ports": [{"name": "grpc", "containerPort": 8500}],
                }
            ],
            "tolerations": [{"key": "aws.amazon.com/neuron", "operator": "Exists"}],
            "nodeSelector": {},
            "hostNetwork": False,
        }
    },
}


def stored() -> dict:
    """DESIRED as the API gives it back: defaults filled in, quantities rewritten, empties dropped."""
    observed = copy.deepcopy(DESIRED)
    spec = observed["template"]["spec"]
    del spec["nodeSelector"], spec["hostNetwork"]
    spec["dnsPolicy"] = "ClusterFirst"
    container = spec["containers"][0]
    container["resources"]["limits"] = {"aws.amazon.com/neuroncore": "2", "memory": "1Gi", "cpu": "1"}
    container["terminationMessagePath"] = "/dev/termination-log"
    container["ports"][0]["protocol"] = "TCP"
    spec["containers"].insert(0, {"name": "injected-sidecar", "image": "mesh:1"})  # another controller's
    return observed


def test_what_the_api_adds_or_rewrites_is_no_drift() -> None:
    assert drifted(DESIRED, stored()) == []


def test_each_changed_field_is_named_by_its_path() -> None:
    observed = stored()
    container = observed["template"]["spec"]["containers"][1]
    container["image"] = "tfs:hacked"
    container["resources"]["limits"]["aws.amazon.com/neuroncore"] = "1"
    container["args"].append("--enable_batching")
    observed["replicas"] = 5
    assert drifted(DESIRED, observed, "spec") == [
        "spec.replicas",
        "spec.template.spec.containers[tfs].image",
        "spec.template.spec.containers[tfs].args",
        "spec.template.spec.containers[tfs].resources.limits.aws.amazon.com/neuroncore",
    ]


def test_a_removed_item_or_field_is_drift_and_an_unset_one_is_not_the_operators() -> None:
    observed = stored()
    observed["template"]["spec"]["containers"].pop()  # our container gone
    observed["template"]["spec"]["tolerations"] = []
    assert drifted(DESIRED, observed) == ["template.spec.containers[tfs]", "template.spec.tolerations"]
    assert drifted({"selector": None, "labels": {"a": "1"}}, {"labels": {"a": "1", "b": "2"}}) == []


def test_quantities_compare_as_quantities_only_under_limits_and_requests() -> None:
    assert drifted({"limits": {"cpu": "500m"}}, {"limits": {"cpu": "0.5"}}) == []
    assert drifted({"limits": {"cpu": "500m"}}, {"limits": {"cpu": "1"}}) == ["limits.cpu"]
    assert drifted({"version": "1"}, {"version": "1.0"}) == ["version"]  # a label is a string, not a quantity


def test_items_sharing_a_name_are_compared_in_order() -> None:
    mounts = [{"name": "store", "mountPath": "/a"}, {"name": "store", "mountPath": "/b"}]
    assert drifted({"volumeMounts": mounts}, {"volumeMounts": copy.deepcopy(mounts)}) == []
    assert drifted({"volumeMounts": mounts}, {"volumeMounts": mounts[:1]}) == ["volumeMounts"]


def test_a_selector_with_one_more_label_is_drift() -> None:
    selector = {"app.kubernetes.io/instance": "m"}
    assert drifted({"selector": selector}, {"selector": {**selector, "app": "someone-else"}}, "spec") == [
        "spec.selector"
    ]
    assert drifted({"labels": selector}, {"labels": {**selector, "team": "search"}}) == []
