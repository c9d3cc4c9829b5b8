"""validate(): every SpecError names the field at fault; instance types too small for numCores are refused."""

from __future__ import annotations

from typing import Any

import pytest
from unit_helpers import make_spec

from neuronmodel_operator.config import OperatorConfig
from neuronmodel_operator.validation import SpecError, validate

CONFIG = OperatorConfig(rewrite_image="registry.example.com/neuron/rewrite:default")
INSTANCE_TYPE = "node.kubernetes.io/instance-type"


def spec_error(spec: dict[str, Any], config: OperatorConfig = CONFIG) -> SpecError:
    with pytest.raises(SpecError) as info:
        validate(spec, config)
    return info.value


def affinity(*instance_types: str) -> dict[str, Any]:
    return {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": INSTANCE_TYPE, "operator": "In", "values": list(instance_types)}]}
                ]
            }
        }
    }


def test_a_complete_spec_is_valid() -> None:
    validate(make_spec(), CONFIG)
    validate(make_spec(source={"s3": {"uri": "s3://models/resnet50/"}}), CONFIG)
    validate(make_spec(source={"http": {"url": "https://models.example.com/resnet50.tar.gz"}}), CONFIG)


def test_no_source_is_refused() -> None:
    for source in ({}, None):
        error = spec_error(make_spec(source=source))
        assert error.reason == "InvalidSpec"
        assert "spec.source" in str(error) and "none" in str(error)


def test_two_sources_are_refused() -> None:
    source = {"pvc": {"claimName": "compiled-models"}, "s3": {"uri": "s3://models/resnet50/"}}
    error = spec_error(make_spec(source=source))
    assert error.reason == "InvalidSpec"
    assert "spec.source" in str(error)
    assert "pvc" in str(error) and "s3" in str(error)


@pytest.mark.parametrize("path", ["/abs/resnet50", "../other-team/model", "models/../../etc", ".."])
def test_source_pvc_path_must_be_relative_without_dotdot(path: str) -> None:
    error = spec_error(make_spec(source={"pvc": {"claimName": "compiled-models", "path": path}}))
    assert error.reason == "InvalidSpec"
    assert "spec.source.pvc.path" in str(error) and repr(path) in str(error)


@pytest.mark.parametrize("path", ["/mnt/store", "team/../../escape"])
def test_store_path_must_be_relative_without_dotdot(path: str) -> None:
    error = spec_error(make_spec(store={"claimName": "model-store", "path": path}))
    assert error.reason == "InvalidSpec"
    assert "spec.store.path" in str(error) and repr(path) in str(error)


def test_dots_inside_a_path_segment_are_allowed() -> None:
    validate(make_spec(source={"pvc": {"claimName": "c", "path": "models/resnet..v2"}}), CONFIG)
    validate(make_spec(store={"claimName": "model-store", "path": "team.a/store"}), CONFIG)


@pytest.mark.parametrize("cores", [0, -1, True, False, "4", 2.0, None])
def test_num_cores_must_be_a_positive_integer(cores: Any) -> None:
    error = spec_error(make_spec(numCores=cores))
    assert error.reason == "InvalidSpec"
    assert "spec.numCores" in str(error) and repr(cores) in str(error)


def test_serving_image_is_required_without_an_operator_default() -> None:
    spec = make_spec()
    del spec["serving"]["image"]
    error = spec_error(spec)
    assert error.reason == "InvalidSpec"
    assert "spec.serving.image" in str(error)
    assert "spec.serving.image" in str(spec_error(make_spec(serving={"image": ""})))
    validate(spec, OperatorConfig(rewrite_image="r:1", serving_image="registry.example.com/tfserving-neuronx:1"))
    # No serving section at all: everything defaults.
    bare = make_spec()
    del bare["serving"]
    validate(bare, OperatorConfig(rewrite_image="r:1", serving_image="registry.example.com/tfserving-neuronx:1"))


def test_rewrite_image_is_required_without_an_operator_default() -> None:
    spec = make_spec(rewrite={"backoffLimit": 2})
    error = spec_error(spec, OperatorConfig())
    assert error.reason == "InvalidSpec"
    assert "spec.rewrite.image" in str(error)
    # The operator's configured image stands in for a missing one.
    validate(spec, OperatorConfig(rewrite_image="registry.example.com/neuron/rewrite:default"))
    # And a spec naming its own image needs no default.
    validate(make_spec(), OperatorConfig())


def test_numcores_beyond_a_pinned_instance_type_is_refused() -> None:
    spec = make_spec(numCores=4, nodeSelector={INSTANCE_TYPE: "inf2.xlarge"})
    error = spec_error(spec)
    assert error.reason == "InsufficientInstanceCores"
    message = str(error)
    assert "spec.numCores" in message and "inf2.xlarge" in message and "2 NeuronCores" in message


def test_numcores_within_a_pinned_instance_type_is_accepted() -> None:
    validate(make_spec(numCores=2, nodeSelector={INSTANCE_TYPE: "inf2.xlarge"}), CONFIG)


def test_the_beta_instance_type_label_is_checked_too() -> None:
    spec = make_spec(numCores=8, nodeSelector={"beta.kubernetes.io/instance-type": "inf1.xlarge"})
    error = spec_error(spec)
    assert error.reason == "InsufficientInstanceCores" and "inf1.xlarge (4 NeuronCores per node)" in str(error)


def test_affinity_with_one_large_enough_type_is_accepted() -> None:
    validate(make_spec(numCores=8, affinity=affinity("inf2.xlarge", "trn1.32xlarge")), CONFIG)


def test_affinity_where_every_type_is_too_small_is_refused() -> None:
    error = spec_error(make_spec(numCores=8, affinity=affinity("inf2.xlarge", "trn1.2xlarge")))
    assert error.reason == "InsufficientInstanceCores"
    assert "inf2.xlarge" in str(error) and "trn1.2xlarge" in str(error)


def test_affinity_term_that_pins_nothing_admits_any_node() -> None:
    spec_affinity = affinity("inf2.xlarge")
    terms = spec_affinity["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    terms.append({"matchExpressions": [{"key": "karpenter.sh/capacity-type", "operator": "In", "values": ["spot"]}]})
    validate(make_spec(numCores=8, affinity=spec_affinity), CONFIG)


def test_an_unknown_instance_type_is_not_refused() -> None:
    validate(make_spec(numCores=64, nodeSelector={INSTANCE_TYPE: "inf3.future"}), CONFIG)
    validate(make_spec(numCores=64, affinity=affinity("inf2.xlarge", "inf3.future")), CONFIG)


def with_security(**sections: dict[str, Any]) -> dict[str, Any]:
    """The default spec with fields added to its serving and rewrite sections."""
    spec = make_spec()
    for section, fields in sections.items():
        spec[section].update(fields)
    return spec


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        (with_security(serving={"podSecurityContext": {"runAsUser": 0}}), "spec.serving.podSecurityContext.runAsUser"),
        (with_security(serving={"securityContext": {"runAsUser": 0}}), "spec.serving.securityContext.runAsUser"),
        (with_security(rewrite={"podSecurityContext": {"runAsUser": 0}}), "spec.rewrite.podSecurityContext.runAsUser"),
        (
            with_security(
                serving={
                    "podSecurityContext": {"runAsUser": 0, "runAsNonRoot": False},
                    "securityContext": {"runAsNonRoot": True},
                }
            ),
            "spec.serving.podSecurityContext.runAsUser",
        ),
    ],
)
def test_root_under_the_default_non_root_policy_is_refused_naming_the_field(spec: dict, field: str) -> None:
    assert str(spec_error(spec)).startswith(f"{field} is 0 (root) but runAsNonRoot is true")


def test_root_is_accepted_once_run_as_non_root_is_turned_off() -> None:
    root = {"podSecurityContext": {"runAsUser": 0, "runAsNonRoot": False}}
    validate(with_security(serving=root, rewrite=root), CONFIG)
