"""Where a model compiled for one NeuronCore generation can run, and which serving images can load it: pure."""

from __future__ import annotations

from typing import Any

import pytest

from neuron_rewrite.neff import V1, V2, V3
from neuronmodel_operator.instances import auto_cores_note
from neuronmodel_operator.targets import image_warning, incompatible_target, unpinned_warning

INSTANCE_TYPE = "node.kubernetes.io/instance-type"
REGISTRY = "763104351884.dkr.ecr.us-west-2.amazonaws.com"  # AWS's Deep Learning Containers
NEURONX_IMAGE = REGISTRY + "/tensorflow-inference-neuronx:2.10.1-neuronx-py310-sdk{}-ubuntu20.04"


def pinned(*types: str, cores: int | str = 2) -> dict[str, Any]:
    if len(types) == 1:
        return {"numCores": cores, "nodeSelector": {INSTANCE_TYPE: types[0]}}
    term = {"matchExpressions": [{"key": INSTANCE_TYPE, "operator": "In", "values": list(types)}]}
    affinity = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [term]}}}
    return {"numCores": cores, "affinity": affinity}


@pytest.mark.parametrize(
    ("target", "types"),
    [(V1, ["inf1.xlarge"]), (V2, ["inf2.xlarge"]), (V2, ["trn1.32xlarge", "trn1n.32xlarge", "inf2.48xlarge"])],
)
def test_pods_pinned_to_the_generation_the_model_was_compiled_for_pass(target: str, types: list[str]) -> None:
    assert incompatible_target(pinned(*types), target) is None


def test_an_inf1_model_pinned_to_inf2_is_refused_naming_both_and_what_to_do() -> None:
    message = incompatible_target(pinned("inf2.xlarge"), V1)
    assert message == (
        "the model was compiled for NeuronCore-v1 but its pods are pinned to inf2.xlarge (NeuronCore-v2), whose "
        "Neuron runtime refuses a NEFF compiled for another NeuronCore generation: recompile it for NeuronCore-v2 or "
        "pin the pods to inf1 instances"
    )


def test_a_neuronx_model_pinned_to_inf1_is_refused() -> None:
    message = incompatible_target(pinned("inf1.6xlarge"), V2)
    assert message is not None and "pinned to inf1.6xlarge (NeuronCore-v1)" in message
    assert message.endswith("pin the pods to inf2 or trn1 or trn1n instances")


def test_one_wrong_type_among_those_an_affinity_allows_is_enough_to_refuse() -> None:
    message = incompatible_target(pinned("inf2.xlarge", "inf1.xlarge"), V2)
    assert message is not None and "pinned to inf1.xlarge (NeuronCore-v1)" in message


def test_a_trn2_model_has_no_tensorflow_serving_anywhere() -> None:
    message = incompatible_target(pinned("trn1.2xlarge"), V3)
    assert message is not None
    assert message.endswith(
        "no TensorFlow Serving for Neuron runs NeuronCore-v3: recompile the model for NeuronCore-v2"
    )


def test_an_unknown_target_or_instance_type_is_not_refused() -> None:
    assert incompatible_target(pinned("inf2.xlarge"), None) is None
    assert incompatible_target(pinned("c7g.large"), V1) is None  # not a Neuron type the operator knows
    assert incompatible_target({"numCores": 1}, V1) is None  # unpinned: warned, not refused


def test_unpinned_pods_are_warned_with_the_families_that_can_run_the_model() -> None:
    assert unpinned_warning({"numCores": 1}, V2) == (
        "the model was compiled for NeuronCore-v2: only inf2, trn1, trn1n instances can run it, but its pods are not "
        "pinned to an instance type; set spec.nodeSelector node.kubernetes.io/instance-type so that they never land "
        "on another Neuron node"
    )
    assert unpinned_warning({"numCores": 1}, None) is None
    assert unpinned_warning(pinned("inf2.xlarge"), V2) is None


def test_a_compiler_newer_than_the_images_release_is_warned_with_the_images_that_fit() -> None:
    message = image_warning(NEURONX_IMAGE.format("2.13.2"), V2, "2.11.0.34+e7f5d9f0")
    assert message == (
        "the model was compiled by neuronx-cc 2.11.0.34+e7f5d9f0, newer than neuronx-cc 2.9 of the serving image's "
        "Neuron SDK 2.13.2 (runtime 2.16), whose runtime may refuse its NEFF (NEFF version mismatch): use an image "
        "of sdk2.15.1, sdk2.17.0, or recompile with that release's compiler"
    )
    assert image_warning(NEURONX_IMAGE.format("2.17.0"), V2, "2.12.68.0") is None  # the release's own compiler
    assert image_warning(NEURONX_IMAGE.format("2.13.2"), V2, "2.9.0.40") is None
    assert "no TensorFlow Serving image has a runtime that new" in (
        image_warning(NEURONX_IMAGE.format("2.17.0"), V2, "2.23.6484.0") or ""
    )


def test_an_image_for_the_other_generation_is_warned_and_unknown_images_or_compilers_are_not() -> None:
    inf1 = REGISTRY + "/tensorflow-inference-neuron:2.10.1-neuron-py310-sdk2.17.0-ubuntu20.04"
    message = image_warning(inf1, V2, None)
    assert message is not None and "runs NeuronCore-v1 models (AWS's TF Serving for inf1)" in message
    assert image_warning(inf1, V1, "1.21.0.0") is None
    assert image_warning("registry.example/tfs-neuron:custom", V2, "2.30.0.0") is None
    assert image_warning(NEURONX_IMAGE.format("2.17.0"), V2, None) is None


def test_numcores_auto_says_how_it_was_resolved_trn2_in_logical_cores() -> None:
    assert auto_cores_note(pinned("trn2.48xlarge", cores="auto")) == (
        " (numCores auto: the 64 logical NeuronCores at its default LNC=2 (128 at LNC=1) of trn2.48xlarge)"
    )
    assert (
        auto_cores_note(pinned("inf2.48xlarge", cores="auto"))
        == " (numCores auto: the 24 NeuronCores of inf2.48xlarge)"
    )
    assert auto_cores_note(pinned("inf2.48xlarge", cores=4)) == ""
