"""The operator's dependency ranges are the tested ones: the installed versions are inside them, nothing older that
lacks what the code imports is allowed, and Kopf, whose private modules the operator imports, has an upper bound."""

from __future__ import annotations

import re
import sys
from importlib.metadata import version
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[2]


def operator_requirements() -> dict[str, Requirement]:
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    return {req.name: req for req in map(Requirement, extras["operator"])}


def test_the_installed_versions_are_inside_the_pinned_ranges() -> None:
    for name, req in operator_requirements().items():
        assert req.specifier.contains(version(name)), f"{name} {version(name)} is outside {req.specifier}"


def test_the_kubernetes_client_is_one_with_pydantic_models() -> None:
    """reconcile.py catches pydantic's ValidationError, which only the Pydantic-generated clients (37 on) raise;
    36.1.0 was the last of the older generator's clients."""
    spec = operator_requirements()["kubernetes"].specifier
    assert not spec.contains("36.1.0") and spec.contains("37.0.0")
    assert "pydantic" in operator_requirements()


def test_kopf_has_an_upper_bound_while_its_private_modules_are_imported() -> None:
    private = [
        f"{path.relative_to(REPO)}: {line.strip()}"
        for path in (REPO / "operator" / "neuronmodel_operator").glob("*.py")
        for line in path.read_text().splitlines()
        if re.match(r"\s*(from|import) kopf\._", line)
    ]
    assert private, "no private Kopf import left: the upper bound may go"
    spec = operator_requirements()["kopf"].specifier
    installed = Version(version("kopf"))
    next_minor = Version(f"{installed.major}.{installed.minor + 1}")
    assert not spec.contains(next_minor), f"kopf {spec} admits the untested {next_minor}; imports: {private}"
