"""Plain-dict fixtures for the operator's pure functions: NeuronModels and the children Kubernetes reports back."""

from __future__ import annotations

import copy
import re
from typing import Any

from neuronmodel_operator.builders import Model

DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
SERVING_IMAGE = "public.ecr.aws/neuron/tensorflow-inference-neuronx:2.20.2-neuronx-py310-sdk2.21.0"
REWRITE_IMAGE = "registry.example.com/neuron/rewrite:0.1.0"
NAMESPACE = "ml-serving"


def make_spec(**overrides: Any) -> dict[str, Any]:
    """A NeuronModel spec as the apiserver stores it (CRD defaults applied), with top-level fields replaced."""
    spec: dict[str, Any] = {
        "source": {"pvc": {"claimName": "compiled-models", "path": "resnet50/neuron"}},
        "model": {"name": "resnet50", "version": 1},
        "numCores": 2,
        "replicas": 1,
        "store": {"claimName": "model-store"},
        "serving": {
            "image": SERVING_IMAGE,
            "command": ["tensorflow_model_server_neuronx"],
            "grpcPort": 8500,
            "restPort": 8501,
            "startupTimeoutSeconds": 600,
            "resources": {"requests": {"cpu": "2", "memory": "4Gi"}, "limits": {"memory": "8Gi"}},
        },
        "rewrite": {"image": REWRITE_IMAGE, "backoffLimit": 2, "activeDeadlineSeconds": 1800},
    }
    spec.update(copy.deepcopy(overrides))
    return spec


def make_body(spec: dict[str, Any], name: str = "resnet50", generation: int = 1) -> dict[str, Any]:
    return {
        "apiVersion": "serving.neuron.dev/v1alpha1",
        "kind": "NeuronModel",
        "metadata": {
            "name": name,
            "namespace": NAMESPACE,
            "uid": "0b6c3f52-9d5e-4c1a-8f43-2f7d9a1e6b10",
            "generation": generation,
            "creationTimestamp": "2025-05-01T10:00:00Z",
        },
        "spec": spec,
    }


def make_model(name: str = "resnet50", **overrides: Any) -> Model:
    return Model.from_body(make_body(make_spec(**overrides), name=name))


def job_body(name: str, condition: str | None = None, reason: str = "", message: str = "") -> dict[str, Any]:
    """A Job as read back; ``condition`` is "Complete", "Failed" or None (still running)."""
    status: dict[str, Any] = {"startTime": "2025-05-01T10:00:05Z", "active": 1}
    if condition == "Complete":
        status = {
            "startTime": "2025-05-01T10:00:05Z",
            "completionTime": "2025-05-01T10:01:10Z",
            "succeeded": 1,
            "conditions": [
                {"type": "SuccessCriteriaMet", "status": "True", "lastTransitionTime": "2025-05-01T10:01:10Z"},
                {"type": "Complete", "status": "True", "lastTransitionTime": "2025-05-01T10:01:10Z"},
            ],
        }
    elif condition == "Failed":
        status = {
            "startTime": "2025-05-01T10:00:05Z",
            "failed": 3,
            "conditions": [
                {
                    "type": "Failed",
                    "status": "True",
                    "reason": reason or "BackoffLimitExceeded",
                    "message": message or "Job has reached the specified backoff limit",
                    "lastTransitionTime": "2025-05-01T10:03:00Z",
                }
            ],
        }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": NAMESPACE, "generation": 1},
        "spec": {"backoffLimit": 2},
        "status": status,
    }


def job_pod(
    job: str,
    suffix: str,
    created: str,
    termination_message: str,
    exit_code: int = 1,
) -> dict[str, Any]:
    """A failed pod of a rewrite Job whose rewrite container terminated with ``termination_message``."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"{job}-{suffix}",
            "namespace": NAMESPACE,
            "labels": {"job-name": job, "batch.kubernetes.io/job-name": job},
            "creationTimestamp": created,
        },
        "status": {
            "phase": "Failed",
            "containerStatuses": [
                {
                    "name": "rewrite",
                    "ready": False,
                    "restartCount": 0,
                    "state": {
                        "terminated": {
                            "exitCode": exit_code,
                            "reason": "Error",
                            "message": termination_message,
                            "finishedAt": created,
                        }
                    },
                }
            ],
        },
    }


def deployment_body(
    rewrite_id: str,
    *,
    desired: int = 1,
    generation: int = 1,
    observed_generation: int = 1,
    replicas: int = 1,
    ready: int = 1,
    updated: int = 1,
    available: int = 1,
    version: int = 1,
    cores: int = 2,
    extra_conditions: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The serving Deployment as read back, with the operator's annotations and the controller's status."""
    conditions = [
        {
            "type": "Available",
            "status": "True" if available else "False",
            "reason": "MinimumReplicasAvailable" if available else "MinimumReplicasUnavailable",
        },
        *(extra_conditions or []),
    ]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": "resnet50",
            "namespace": NAMESPACE,
            "generation": generation,
            "annotations": {
                "serving.neuron.dev/rewrite": rewrite_id,
                "serving.neuron.dev/version": str(version),
                "serving.neuron.dev/cores": str(cores),
                "serving.neuron.dev/spec-hash": "0123456789",
            },
        },
        "spec": {"replicas": desired},
        "status": {
            "observedGeneration": observed_generation,
            "replicas": replicas,
            "readyReplicas": ready,
            "updatedReplicas": updated,
            "availableReplicas": available,
            "conditions": conditions,
        },
    }


def serving_pod(
    name: str,
    *,
    scheduled: dict[str, Any] | None = None,
    waiting: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A serving pod: unscheduled when ``scheduled`` is a PodScheduled=False condition, or with a waiting container."""
    status: dict[str, Any] = {"phase": "Pending", "conditions": []}
    if scheduled is not None:
        status["conditions"].append({"type": "PodScheduled", **scheduled})
    else:
        status["conditions"].append({"type": "PodScheduled", "status": "True"})
    if waiting is not None:
        status["phase"] = "Running"
        status["containerStatuses"] = [
            {"name": "tfserving", "ready": False, "restartCount": 4, "state": {"waiting": waiting}}
        ]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": NAMESPACE,
            "labels": {"serving.neuron.dev/model": "resnet50", "app.kubernetes.io/component": "serving"},
            "creationTimestamp": "2025-05-01T10:02:00Z",
        },
        "status": status,
    }
