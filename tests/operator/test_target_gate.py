"""What the model was compiled for decides where it may be served: a model its pinned nodes cannot run is refused
before any serving pod is created, in words that say what to do; what is only likely to fail is warned."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from conftest import Env, neuron_model, serving_pods, wait_for
from neuron_modelgen import Options, build_model
from neuron_rewrite.neff import V1, V2, V3

pytestmark = pytest.mark.cluster

INSTANCE_TYPE = "node.kubernetes.io/instance-type"
NEURONX_COMPILER = "2.12.68.0+4480452af"  # the neuronx-cc of Neuron SDK 2.17.0
AWS_IMAGE = (
    "763104351884.dkr.ecr.us-west-2.amazonaws.com/tensorflow-inference-neuronx:2.10.1-neuronx-py310-sdk{}-ubuntu20.04"
)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Models as each compiler writes them (neff.py cites what each records)."""
    root = tmp_path_factory.mktemp("compiled")
    return {
        "inf1": build_model(root / "inf1", Options(target=V1, instance_type="inf1.xlarge")),
        # NEFF 2.0 decides nothing: only _instance_type (--extract-weights) tells NeuronCore-v2.
        "neuronx": build_model(
            root / "neuronx", Options(target=V2, compiler=NEURONX_COMPILER, instance_type="inf2.xlarge")
        ),
        "trn2": build_model(root / "trn2", Options(target=V3, compiler="2.21.18209.0")),
        "mixed": build_model(root / "mixed", Options(target=V1, last_op_target=V3)),
    }


def pinned_to(*types: str) -> dict[str, Any]:
    """A required node affinity to these instance types, as Karpenter NodePools and EKS docs write it."""
    term = {"matchExpressions": [{"key": INSTANCE_TYPE, "operator": "In", "values": list(types)}]}
    return {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [term]}}}


def warnings(env: Env, name: str, reason: str) -> list[Any]:
    selector = f"involvedObject.name={name},reason={reason}"
    return env.core.list_namespaced_event(env.namespace, field_selector=selector).items


def refused_before_serving(env: Env, name: str) -> dict[str, Any]:
    """The model Failed with IncompatibleTarget and nothing created to serve it; returns the Ready condition."""
    env.wait_phase(name, "Failed", timeout=180)
    ready = env.condition(name, "Ready")
    assert ready["reason"] == "IncompatibleTarget", ready
    assert env.condition(name, "RewriteSucceeded")["reason"] == "RewriteSucceeded"
    assert not env.apps.list_namespaced_deployment(env.namespace).items
    assert not serving_pods(env, name)
    return ready


def test_an_inf1_model_pinned_to_inf2_nodes_is_refused_before_any_serving_pod(
    env: Env, compiled: dict[str, Path]
) -> None:
    env.hostpath_claim("compiled", compiled["inf1"])
    manifest = neuron_model("legacy", "compiled", cores=1, nodeSelector={INSTANCE_TYPE: "inf2.xlarge"})
    assert env.apply(manifest).returncode == 0
    ready = refused_before_serving(env, "legacy")
    assert ready["message"] == (
        "the model was compiled for NeuronCore-v1 but its pods are pinned to inf2.xlarge (NeuronCore-v2), whose "
        "Neuron runtime refuses a NEFF compiled for another NeuronCore generation: recompile it for NeuronCore-v2 or "
        "pin the pods to inf1 instances"
    )
    rewrite = env.status("legacy")["rewrite"]
    assert rewrite["target"] == V1, rewrite
    assert "_instance_type 'inf1.xlarge'" in rewrite["targetEvidence"], rewrite
    assert "NEFF 0.6" in rewrite["targetEvidence"], rewrite
    wide = env.cluster.cluster.kubectl("get", "nm", "legacy", "-n", env.namespace, "-o", "wide").stdout
    header, row = wide.splitlines()
    assert header.split()[-2:] == ["TARGET", "AGE"] and row.split()[-2] == V1, wide


def test_a_neuronx_model_pinned_to_inf1_by_affinity_is_refused_then_serves_once_pinned_to_inf2(
    env: Env, compiled: dict[str, Path]
) -> None:
    env.hostpath_claim("compiled", compiled["neuronx"])
    manifest = neuron_model("moved", "compiled", cores=1, affinity=pinned_to("inf1.xlarge", "inf1.6xlarge"))
    assert env.apply(manifest).returncode == 0
    message = refused_before_serving(env, "moved")["message"]
    assert message.startswith("the model was compiled for NeuronCore-v2 but its pods are pinned to inf1.6xlarge")
    assert message.endswith("pin the pods to inf2 or trn1 or trn1n instances"), message
    (job,) = env.jobs()

    # The user follows the message: the same rewrite serves, without running again.
    env.patch_spec("moved", {"affinity": pinned_to("inf2.xlarge")})
    env.wait_phase("moved", "Ready")
    assert [j.metadata.name for j in env.jobs()] == [job.metadata.name]
    assert env.status("moved")["rewrite"]["compiler"] == NEURONX_COMPILER
    rewritten = env.condition("moved", "RewriteSucceeded")["message"]
    assert rewritten.endswith(f"; compiled for {V2} by compiler {NEURONX_COMPILER}"), rewritten


def test_a_trn2_model_has_no_tensorflow_serving_to_run_on(env: Env, compiled: dict[str, Path]) -> None:
    env.hostpath_claim("compiled", compiled["trn2"])
    manifest = neuron_model("trn2", "compiled", cores=1, nodeSelector={INSTANCE_TYPE: "trn1.2xlarge"})
    assert env.apply(manifest).returncode == 0
    message = refused_before_serving(env, "trn2")["message"]
    assert "pinned to trn1.2xlarge (NeuronCore-v2)" in message, message
    assert message.endswith(
        "no TensorFlow Serving for Neuron runs NeuronCore-v3: recompile the model for NeuronCore-v2"
    )


def test_a_model_of_mixed_targets_is_refused_by_the_rewrite_naming_two_neuron_ops(
    env: Env, compiled: dict[str, Path]
) -> None:
    env.hostpath_claim("compiled", compiled["mixed"])
    manifest = neuron_model("mixed", "compiled", cores=1, rewrite={"backoffLimit": 0})
    assert env.apply(manifest).returncode == 0
    env.wait_phase("mixed", "Failed", timeout=180)
    condition = env.condition("mixed", "RewriteSucceeded")
    assert condition["reason"] == "RewriteFailed", condition
    assert "was compiled for NeuronCore-v1" in condition["message"], condition
    assert "for NeuronCore-v3" in condition["message"], condition
    assert "recompile all of it for one generation" in condition["message"], condition
    assert not env.apps.list_namespaced_deployment(env.namespace).items


def test_an_unpinned_model_and_an_older_serving_image_are_warned_once_and_served(
    env: Env, compiled: dict[str, Path]
) -> None:
    env.hostpath_claim("compiled", compiled["neuronx"])
    manifest = neuron_model("loose", "compiled", cores=1)
    manifest["spec"]["serving"]["image"] = AWS_IMAGE.format("2.13.2")  # its neuronx-cc is 2.9, older than 2.12
    assert env.apply(manifest).returncode == 0
    env.wait_phase("loose", "Ready")
    (unpinned,) = wait_for(lambda: warnings(env, "loose", "TargetNotPinned"), what="a TargetNotPinned Warning")
    assert unpinned.type == "Warning" and "only inf2, trn1, trn1n instances can run it" in unpinned.message
    (image,) = wait_for(lambda: warnings(env, "loose", "ServingImageMismatch"), what="a ServingImageMismatch Warning")
    assert image.type == "Warning", image
    assert f"compiled by neuronx-cc {NEURONX_COMPILER}, newer than neuronx-cc 2.9" in image.message, image.message
    assert "use an image of sdk2.17.0" in image.message, image.message

    # Told once per rewrite and spec: a reconcile that changes neither tells nothing again.
    env.patch_spec("loose", {"serving": {"image": AWS_IMAGE.format("2.17.0")}})
    observed = env.model("loose")["metadata"]["generation"]
    wait_for(lambda: env.status("loose").get("observedGeneration") == observed, what="the new image seen")
    env.wait_phase("loose", "Ready")
    assert len(warnings(env, "loose", "ServingImageMismatch")) == 1  # the 2.17.0 image fits
    assert len(warnings(env, "loose", "TargetNotPinned")) == 2  # the spec changed, the pods are still unpinned
