"""Checks the apiserver cannot make (it enforces the CRD schema), each naming the field and what is expected."""

from __future__ import annotations

from typing import Any

from .config import OperatorConfig
from .instances import INSTANCE_TYPE_LABELS, NEURONCORES_PER_NODE

SOURCE_KINDS = ("pvc", "s3", "http")  # spec.source also holds ``version``, which applies to each


class SpecError(ValueError):
    """The spec cannot be served as written; ``reason`` is the condition reason, the message names the field."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def validate(spec: dict[str, Any], config: OperatorConfig) -> None:
    """Raise SpecError for a spec the operator must not act on (older apiservers skip some schema rules)."""
    source = spec.get("source") or {}
    kinds = [k for k in SOURCE_KINDS if k in source]
    if len(kinds) != 1:
        raise SpecError(
            "InvalidSpec", f"spec.source: set exactly one of {', '.join(SOURCE_KINDS)} (found {kinds or 'none'})"
        )
    for field in ("source.pvc.path", "store.path"):
        value = _get(spec, field)
        if value and (value.startswith("/") or ".." in value.split("/")):
            raise SpecError("InvalidSpec", f"spec.{field}: must be a relative path without '..', got {value!r}")
    cores = spec.get("numCores")
    if not isinstance(cores, int) or isinstance(cores, bool) or cores < 1:
        raise SpecError("InvalidSpec", f"spec.numCores: must be an integer of at least 1, got {cores!r}")
    if not (_get(spec, "serving.image") or config.serving_image):
        raise SpecError(
            "InvalidSpec",
            "spec.serving.image: required (a TensorFlow Serving image with the Neuron runtime), since the operator "
            "has no default serving image configured",
        )
    if not (_get(spec, "rewrite.image") or config.rewrite_image):
        raise SpecError(
            "InvalidSpec", "spec.rewrite.image: required, since the operator has no default rewrite image configured"
        )
    check_instance_capacity(spec)
    for pod_field, container_field in (
        ("serving.podSecurityContext", "serving.securityContext"),
        ("rewrite.podSecurityContext", None),
    ):
        check_non_root(spec, pod_field, container_field)


def check_non_root(spec: dict[str, Any], pod_field: str, container_field: str | None) -> None:
    """Refuse uid 0 under the default runAsNonRoot: the kubelet would refuse to start the container
    (CreateContainerConfigError), long after the apply succeeded."""
    pod = _get(spec, pod_field) or {}
    container = (_get(spec, container_field) if container_field else None) or {}
    user_field = container_field if "runAsUser" in container else pod_field
    user = container.get("runAsUser", pod.get("runAsUser"))
    non_root = container.get("runAsNonRoot", pod.get("runAsNonRoot", True))
    if user == 0 and non_root:
        raise SpecError(
            "InvalidSpec",
            f"spec.{user_field}.runAsUser is 0 (root) but runAsNonRoot is true (the default): set "
            f"spec.{pod_field}.runAsNonRoot to false to run as root, or choose a non-zero runAsUser",
        )


def check_instance_capacity(spec: dict[str, Any]) -> None:
    """Refuse pods that could never schedule: every instance type they are pinned to has too few NeuronCores."""
    cores = spec["numCores"]
    pinned = _pinned_instance_types(spec)
    known = {t: NEURONCORES_PER_NODE[t] for t in pinned if t in NEURONCORES_PER_NODE}
    if pinned and known and len(known) == len(pinned) and max(known.values()) < cores:
        listed = ", ".join(f"{t} ({c} NeuronCores per node)" for t, c in sorted(known.items()))
        raise SpecError(
            "InsufficientInstanceCores",
            f"spec.numCores is {cores} but the pods are pinned to {listed}: no such node can ever run them; "
            "lower numCores or choose a larger instance type",
        )


def _pinned_instance_types(spec: dict[str, Any]) -> set[str]:
    selector = spec.get("nodeSelector") or {}
    for label in INSTANCE_TYPE_LABELS:
        if label in selector:
            return {selector[label]}
    terms = _get(spec, "affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms") or []
    types: set[str] = set()
    for term in terms:
        expressions = [e for e in term.get("matchExpressions") or [] if e.get("key") in INSTANCE_TYPE_LABELS]
        if not expressions or expressions[0].get("operator") != "In":
            return set()  # a term that does not pin an instance type admits any node
        types.update(expressions[0].get("values") or [])
    return types


def _get(obj: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(obj, dict):
            return None
        obj = obj.get(part)
    return obj
