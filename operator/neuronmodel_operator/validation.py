"""Checks of a spec before the operator acts on it, each naming the field and what is expected.

The CRD's CEL rules refuse several of these at apply (source kinds, the operator's names and paths, a nodeSelector's
instance type too small); they stay here for models stored before those rules and for what CEL cannot read: numCores
"auto", instance types pinned by node affinity.
"""

from __future__ import annotations

from typing import Any

from .builders import SERVER_CONTAINER, SERVING_MOUNT_PATHS, SERVING_VOLUMES
from .config import OperatorConfig
from .instances import AUTO_CORES, NEURONCORES_PER_NODE, cores_per_pod, pinned_instance_types
from .naming import labels

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
    if cores != AUTO_CORES and (not isinstance(cores, int) or isinstance(cores, bool) or cores < 1):
        raise SpecError("InvalidSpec", f'spec.numCores: must be an integer of at least 1 or "auto", got {cores!r}')
    try:
        cores_per_pod(spec)
    except ValueError as exc:
        raise SpecError("InvalidSpec", str(exc)) from exc
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
    check_pod_overrides(spec)
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


def check_pod_overrides(spec: dict[str, Any]) -> None:
    """The pod templates' additions may add to what the operator sets, never replace it."""
    serving = spec.get("serving") or {}
    for field in ("serving", "rewrite"):
        ours = sorted(set((spec.get(field) or {}).get("podLabels") or {}) & set(labels("model", "serving")))
        if ours:
            raise SpecError(
                "InvalidSpec",
                f"spec.{field}.podLabels: {', '.join(ours)} is set by the operator (the Deployment's selector and the "
                "operator's watches rely on it); choose another key",
            )
    volumes = [v.get("name") for v in serving.get("volumes") or []]
    for name in volumes:
        if name in SERVING_VOLUMES:
            raise SpecError(
                "InvalidSpec",
                f"spec.serving.volumes: the name {name!r} is the operator's own "
                f"({', '.join(SERVING_VOLUMES)} are taken); choose another",
            )
    for index, mount in enumerate(serving.get("volumeMounts") or []):
        field = f"spec.serving.volumeMounts[{index}]"
        if mount.get("name") not in volumes:
            raise SpecError(
                "InvalidSpec",
                f"{field}.name: {mount.get('name')!r} is not one of spec.serving.volumes "
                f"({', '.join(map(repr, volumes)) or 'none'})",
            )
        path = str(mount.get("mountPath", "")).rstrip("/") or "/"
        clash = [r for r in SERVING_MOUNT_PATHS if path == r or path.startswith(r + "/") or r.startswith(path + "/")]
        if path == "/" or clash:
            raise SpecError(
                "InvalidSpec",
                f"{field}.mountPath: {path!r} would hide or overlap the operator's mounts "
                f"({', '.join(SERVING_MOUNT_PATHS)}); mount elsewhere",
            )
    for index, sidecar in enumerate(serving.get("sidecars") or []):
        if sidecar.get("name") == SERVER_CONTAINER:
            raise SpecError(
                "InvalidSpec",
                f"spec.serving.sidecars[{index}].name: {SERVER_CONTAINER!r} is the server container's; choose another",
            )


def check_instance_capacity(spec: dict[str, Any]) -> None:
    """Refuse pods that could never schedule: every instance type they are pinned to has too few NeuronCores."""
    cores = cores_per_pod(spec)
    pinned = pinned_instance_types(spec)
    known = {t: NEURONCORES_PER_NODE[t] for t in pinned if t in NEURONCORES_PER_NODE}
    if pinned and known and len(known) == len(pinned) and max(known.values()) < cores:
        listed = ", ".join(f"{t} ({c} NeuronCores per node)" for t, c in sorted(known.items()))
        raise SpecError(
            "InsufficientInstanceCores",
            f"spec.numCores is {cores} but the pods are pinned to {listed}: no such node can ever run them (a pod "
            "gets its NeuronCores from one node; counts per instance type from AWS Neuron documentation, trn2 in "
            "logical NeuronCores at its default LNC=2); lower numCores or choose a larger instance type",
        )


def _get(obj: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(obj, dict):
            return None
        obj = obj.get(part)
    return obj
