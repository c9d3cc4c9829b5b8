"""The CRD's CEL rules spell the operator's constants out as literals, since a CRD is static YAML: they must stay
equal, or the apiserver and the operator would refuse different specs."""

from __future__ import annotations

import ast
import re
from typing import Any

import pytest
import yaml

from conftest import CRD
from neuronmodel_operator.builders import S3_ENV, SERVER_CONTAINER, SERVING_MOUNT_PATHS, SERVING_VOLUMES
from neuronmodel_operator.instances import INSTANCE_TYPE_LABELS, NEURONCORES_PER_NODE
from neuronmodel_operator.naming import labels

OPERATOR_LABELS = sorted(labels("model", "serving"))


def rule_at(path: str) -> dict[str, str]:
    """The one x-kubernetes-validations rule of the schema node at ``path`` (``[]`` steps into a list's items)."""
    node = yaml.safe_load(CRD.read_text())["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for part in path.split("."):
        node = node["items"] if part == "[]" else node["properties"][part]
    (rule,) = node["x-kubernetes-validations"]
    return rule


def cel_literals(expression: str) -> list[Any]:
    """The map and string-list literals of a CEL expression, in order (for these, CEL's syntax is Python's)."""
    found = []
    for text in re.findall(r"\[[^\[\]{}]*\]|\{[^{}]*\}", expression):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            continue  # an index such as [l], or a regex class such as [^/]
        if isinstance(value, dict) or all(isinstance(item, str) for item in value):  # not an index such as [0]
            found.append(value)
    return found


@pytest.mark.parametrize(
    ("path", "constants"),
    [
        ("spec", [NEURONCORES_PER_NODE, list(INSTANCE_TYPE_LABELS)]),
        ("spec.serving.podLabels", [OPERATOR_LABELS]),
        ("spec.rewrite.podLabels", [OPERATOR_LABELS]),
        ("spec.serving.volumes.[]", [list(SERVING_VOLUMES)]),
        ("spec.serving.volumeMounts.[]", [list(SERVING_MOUNT_PATHS)]),
        ("spec.rewrite.env", [S3_ENV]),
    ],
)
def test_the_rules_literals_are_the_operators_constants(path: str, constants: list[Any]) -> None:
    rule = rule_at(path)
    # repr() of these constants is the CEL literal to paste into the CRD.
    assert cel_literals(rule["rule"]) == constants, f"{path}: the rule's literals must be {constants!r}"
    stray = [value for value in cel_literals(rule["messageExpression"]) if value not in constants]
    assert not stray, f"{path}: the messageExpression's literals {stray!r} must be among {constants!r}"


@pytest.mark.parametrize(
    ("path", "listed"),
    [("spec.serving.volumes.[]", SERVING_VOLUMES), ("spec.serving.volumeMounts.[]", SERVING_MOUNT_PATHS)],
)
def test_the_messages_list_the_operators_names(path: str, listed: tuple[str, ...]) -> None:
    assert f"({', '.join(listed)}" in rule_at(path)["messageExpression"]


def test_the_sidecar_rule_names_the_server_container() -> None:
    rule = rule_at("spec.serving.sidecars.[]")
    assert rule["rule"] == f"self.name != '{SERVER_CONTAINER}'"
    assert rule["message"].startswith(f"'{SERVER_CONTAINER}' is the server container's")
