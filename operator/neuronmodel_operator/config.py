"""Operator-wide settings, from the environment the Helm chart sets."""

from __future__ import annotations

import os
from dataclasses import dataclass, field


def _list(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


@dataclass(frozen=True)
class OperatorConfig:
    rewrite_image: str = ""  # image of the rewrite Job when a NeuronModel names none
    # TF Serving image when a NeuronModel names none. No built-in default: no one image loads every compiler's
    # models (the README's known-good pairs).
    serving_image: str = ""
    scheduler_name: str = ""  # default schedulerName of serving pods (the Neuron scheduler extension)
    default_tolerations: list[dict] = field(default_factory=list)
    # A PodDisruptionBudget for models of more than one replica, unless their spec says otherwise.
    disruption_budget: bool = True
    max_unavailable: int | str = 1
    service_monitors: bool = False  # the Prometheus operator's CRD is installed (read from discovery at start)
    metrics_port: int = 0  # where the operator's own metrics are served; 0: not served

    @classmethod
    def from_env(cls) -> OperatorConfig:
        tolerate = _list(os.environ.get("NEURONMODEL_TOLERATE_TAINTS", ""))
        return cls(
            rewrite_image=os.environ.get("NEURONMODEL_REWRITE_IMAGE", ""),
            serving_image=os.environ.get("NEURONMODEL_SERVING_IMAGE", ""),
            scheduler_name=os.environ.get("NEURONMODEL_SCHEDULER_NAME", ""),
            default_tolerations=[{"key": key, "operator": "Exists", "effect": "NoSchedule"} for key in tolerate],
            disruption_budget=os.environ.get("NEURONMODEL_DISRUPTION_BUDGET", "true").lower() != "false",
            max_unavailable=_int_or_percent(os.environ.get("NEURONMODEL_MAX_UNAVAILABLE", "1")),
            metrics_port=int(os.environ.get("NEURONMODEL_METRICS_PORT") or 0),
        )


def _int_or_percent(value: str) -> int | str:
    """A Kubernetes IntOrString as an environment variable holds it: "1" is a count, "25%" a percentage."""
    return value.strip() if value.strip().endswith("%") else int(value)
