"""Operator-wide settings, from the environment the Helm chart sets."""

from __future__ import annotations

import os
from dataclasses import dataclass, field


def _list(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


@dataclass(frozen=True)
class OperatorConfig:
    rewrite_image: str = ""  # image of the rewrite Job when a NeuronModel names none
    serving_image: str = ""  # TF Serving image when a NeuronModel names none (no built-in default: see neuron.md)
    scheduler_name: str = ""  # default schedulerName of serving pods (the Neuron scheduler extension)
    default_tolerations: list[dict] = field(default_factory=list)

    @classmethod
    def from_env(cls) -> OperatorConfig:
        tolerate = _list(os.environ.get("NEURONMODEL_TOLERATE_TAINTS", ""))
        return cls(
            rewrite_image=os.environ.get("NEURONMODEL_REWRITE_IMAGE", ""),
            serving_image=os.environ.get("NEURONMODEL_SERVING_IMAGE", ""),
            scheduler_name=os.environ.get("NEURONMODEL_SCHEDULER_NAME", ""),
            default_tolerations=[{"key": key, "operator": "Exists", "effect": "NoSchedule"} for key in tolerate],
        )
