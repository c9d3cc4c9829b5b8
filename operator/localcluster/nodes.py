"""Simulated Neuron nodes: Node objects with the capacity, labels and taints of real inf/trn instances."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from neuronmodel_operator.instances import NEURONCORES_PER_NODE

from .cluster import kubernetes_version

NEURONCORE = "aws.amazon.com/neuroncore"
NEURON_DEVICE = "aws.amazon.com/neuron"
NEURON_TAINT = {"key": "aws.amazon.com/neuron", "value": "true", "effect": "NoSchedule"}
INSTANCE_TYPE_LABEL = "node.kubernetes.io/instance-type"
SIMULATED_LABEL = "localcluster.neuron.dev/simulated"
ROOT_VOLUME_GIB = 100  # each simulated node's root volume (EKS's managed node groups default to 20 GiB; set per group)


@dataclass(frozen=True)
class InstanceType:
    neuroncores: int
    devices: int
    vcpus: int
    memory_gib: int


# Devices, vCPUs and memory (GiB) from the AWS instance pages; NeuronCores from the operator's own table.
_HARDWARE: dict[str, tuple[int, int, int]] = {
    "inf1.xlarge": (1, 4, 8),
    "inf1.2xlarge": (1, 8, 16),
    "inf1.6xlarge": (4, 24, 48),
    "inf1.24xlarge": (16, 96, 192),
    "inf2.xlarge": (1, 4, 16),
    "inf2.8xlarge": (1, 32, 128),
    "inf2.24xlarge": (6, 96, 384),
    "inf2.48xlarge": (12, 192, 768),
    "trn1.2xlarge": (1, 8, 32),
    "trn1.32xlarge": (16, 128, 512),
    "trn1n.32xlarge": (16, 128, 512),
    "trn2.48xlarge": (16, 192, 2048),
}
INSTANCE_TYPES: dict[str, InstanceType] = {
    name: InstanceType(NEURONCORES_PER_NODE[name], *hardware) for name, hardware in _HARDWARE.items()
}
# A general-purpose node, as the node group that runs system pods (and the rewrite Jobs) on a real EKS cluster.
INSTANCE_TYPES["m5.xlarge"] = InstanceType(0, 0, 4, 16)


def node_manifest(
    name: str, instance_type: str, *, taints: list[dict[str, str]] | None = None, labels: dict[str, str] | None = None
) -> dict[str, Any]:
    """A Node as EKS registers it for ``instance_type`` (status is set separately, through /status)."""
    if instance_type not in INSTANCE_TYPES:
        raise ValueError(f"unknown instance type {instance_type!r}; known: {', '.join(INSTANCE_TYPES)}")
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {
                INSTANCE_TYPE_LABEL: instance_type,
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                SIMULATED_LABEL: "true",
                **(labels or {}),
            },
        },
        "spec": {"taints": taints} if taints else {},
    }


def node_status(instance_type: str, now: str) -> dict[str, Any]:
    """Capacity, allocatable and a Ready condition, as a kubelet with the Neuron device plugin reports them."""
    spec = INSTANCE_TYPES[instance_type]
    capacity = {
        "cpu": str(spec.vcpus),
        "memory": f"{spec.memory_gib}Gi",
        "ephemeral-storage": f"{ROOT_VOLUME_GIB}Gi",  # the kubelet's root filesystem, where emptyDirs and logs live
        "pods": "110",
        NEURONCORE: str(spec.neuroncores),
        NEURON_DEVICE: str(spec.devices),
    }
    # The kubelet's default hard eviction threshold (nodefs.available<10%) is not allocatable.
    allocatable = capacity | {"ephemeral-storage": f"{ROOT_VOLUME_GIB * 9 // 10}Gi"}
    return {
        "status": {
            "capacity": capacity,
            "allocatable": allocatable,
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "KubeletReady",
                    "message": "simulated node agent is posting ready status",
                    "lastHeartbeatTime": now,
                    "lastTransitionTime": now,
                }
            ],
            "nodeInfo": {
                "architecture": "amd64",
                "operatingSystem": "linux",
                "kubeletVersion": f"{kubernetes_version()}-simulated",
                "containerRuntimeVersion": "localcluster://agent",
                "kernelVersion": "",
                "osImage": "simulated",
                "bootID": "",
                "machineID": "",
                "systemUUID": "",
                "kubeProxyVersion": "",
            },
        }
    }


def node_names(counts: dict[str, int], prefix: str = "") -> list[tuple[str, str]]:
    """(node name, instance type) for ``{"inf2.xlarge": 2}`` -> inf2-xlarge-0, inf2-xlarge-1."""
    return [(f"{prefix}{t.replace('.', '-')}-{i}", t) for t, n in counts.items() for i in range(n)]
