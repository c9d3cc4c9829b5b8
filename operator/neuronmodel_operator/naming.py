"""Names and labels of everything the operator creates: valid, unique and bounded, from one place."""

from __future__ import annotations

import hashlib
import json
from typing import Any

GROUP = "serving.neuron.dev"
MODEL_LABEL = f"{GROUP}/model"
REWRITE_LABEL = f"{GROUP}/rewrite"
COMPONENT_LABEL = "app.kubernetes.io/component"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
# The Job controller's label on a Job's pods since Kubernetes 1.27; the bare `job-name` is the legacy one.
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"
MANAGED_BY = "neuronmodel-operator"
SPEC_HASH_ANNOTATION = f"{GROUP}/spec-hash"
MAX_NAME = 63  # Services, and label values, allow no more


def digest(value: Any, length: int = 10) -> str:
    """A short stable hash of any JSON-able value."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:length]


def bounded(name: str, suffix: str = "", limit: int = MAX_NAME) -> str:
    """``name`` + ``suffix`` within ``limit`` chars, still unique: long names are cut and keep a hash of the whole."""
    full = f"{name}{suffix}"
    if len(full) <= limit:
        return full
    tag = "-" + digest(full, 8)
    return f"{name[: limit - len(suffix) - len(tag)].rstrip('-.')}{tag}{suffix}"


def serving_name(model: str) -> str:
    """Deployment and Service: the model's own name, so clients reach <name>.<namespace>.svc.

    A Service name is a DNS-1035 label (no dots, starts with a letter) while a NeuronModel may be named like
    ``bert.base`` or ``2-models``: such names are adjusted and keep a hash of the original, so they stay unique."""
    label = model.replace(".", "-")
    if not label[0].isalpha():
        label = "m-" + label
    if label == model:
        return bounded(model)
    tag = "-" + digest(model, 8)
    return f"{label[: MAX_NAME - len(tag)].rstrip('-')}{tag}"


def job_name(model: str, rewrite_id: str) -> str:
    return bounded(model, f"-rewrite-{rewrite_id}")


DELETED_CLEANUP_SUFFIX = "-clean-deleted"


def cleanup_job_name(model: str, rewrite_id: str | None) -> str:
    """The store clean-up Job once ``rewrite_id`` serves; None: the one that follows the model's deletion."""
    return bounded(model, f"-clean-{rewrite_id}" if rewrite_id else DELETED_CLEANUP_SUFFIX)


def model_label(model: str) -> str:
    """Label values are limited to 63 characters, object names are not."""
    return bounded(model)


def labels(model: str, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "neuronmodel",
        "app.kubernetes.io/instance": model_label(model),
        COMPONENT_LABEL: component,
        MANAGED_BY_LABEL: MANAGED_BY,
        MODEL_LABEL: model_label(model),
    }


def selector(model: str) -> dict[str, str]:
    return {MODEL_LABEL: model_label(model), COMPONENT_LABEL: "serving"}


def selector_string(model: str) -> str:
    return ",".join(f"{k}={v}" for k, v in selector(model).items())
