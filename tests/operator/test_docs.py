"""The README's NeuronModel reference lists exactly the CRD's spec fields, so the two cannot drift apart; the CRD's
schema digest is the one the operator expects."""

from __future__ import annotations

import re

import yaml

from conftest import CRD, REPO
from neuronmodel_operator.crd import DIGEST_ANNOTATION, SCHEMA_DIGEST
from neuronmodel_operator.naming import digest


def crd_spec_paths() -> set[str]:
    crd = yaml.safe_load(CRD.read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    paths: set[str] = set()

    def walk(node: dict, prefix: str) -> None:
        for name, child in (node.get("properties") or {}).items():
            paths.add(f"{prefix}.{name}")
            if not child.get("x-kubernetes-preserve-unknown-fields"):
                walk(child, f"{prefix}.{name}")

    walk(spec, "spec")
    return paths


def test_readme_reference_lists_every_spec_field_and_nothing_else() -> None:
    readme = (REPO / "README.md").read_text()
    documented = set(re.findall(r"^\| `(spec\.[A-Za-z0-9.]+)` \|", readme, flags=re.MULTILINE))
    crd = crd_spec_paths()
    assert not crd - documented, f"fields missing from the README: {sorted(crd - documented)}"
    assert not documented - crd, f"README documents fields the CRD lacks: {sorted(documented - crd)}"


def test_every_crd_field_has_a_description_for_kubectl_explain() -> None:
    crd = yaml.safe_load(CRD.read_text())
    missing: list[str] = []

    def walk(node: dict, path: str) -> None:
        for name, child in (node.get("properties") or {}).items():
            if name not in ("metadata",) and not child.get("description"):
                missing.append(f"{path}.{name}")
            walk(child, f"{path}.{name}")
        if isinstance(node.get("items"), dict):
            walk(node["items"], f"{path}[]")

    walk(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"], "")
    assert not missing, missing


def test_the_crd_carries_the_digest_of_its_spec_that_the_operator_expects() -> None:
    crd = yaml.safe_load(CRD.read_text())
    assert crd["metadata"]["annotations"][DIGEST_ANNOTATION] == digest(crd["spec"], 12) == SCHEMA_DIGEST, (
        "the CRD changed: set its schema-digest annotation and crd.SCHEMA_DIGEST to the digest of its new spec"
    )
