"""NeuronCores per node of each Neuron instance type, and which instance types a spec pins its serving pods to.

The counts are chips per instance times NeuronCores per chip, from AWS's Neuron documentation
(aws-neuron/aws-neuron-sdk about-neuron/arch/neuron-hardware/): inf1-arch.rst with inferentia.rst (four
NeuronCore-v1 per chip), inf2-arch.rst with inferentia2.rst (two NeuronCore-v2), trn1-arch.rst with trainium.rst
(two NeuronCore-v2), trn2-arch.rst with trainium2.rst (eight NeuronCore-v3, 128 on trn2.48xlarge's 16 chips), and
for Trn2 about-neuron/arch/neuron-features/logical-neuroncore-config.rst: at the default LNC=2 "a Trn2.48xlarge
instance presents 64 available NeuronCores"."""

from __future__ import annotations

from typing import Any

NEURONCORES_PER_NODE: dict[str, int] = {
    "inf1.xlarge": 4,
    "inf1.2xlarge": 4,
    "inf1.6xlarge": 16,
    "inf1.24xlarge": 64,
    "inf2.xlarge": 2,
    "inf2.8xlarge": 2,
    "inf2.24xlarge": 12,
    "inf2.48xlarge": 24,
    "trn1.2xlarge": 2,
    "trn1.32xlarge": 32,
    "trn1n.32xlarge": 32,
    "trn2.48xlarge": 64,  # logical cores at the default LNC=2 (128 physical)
}
# Instance families whose NeuronCores are logical: the count above is at the default LNC=2 (two physical cores
# each), and the runtime's NEURON_LOGICAL_NC_CONFIG must match the LNC the model was compiled with (AWS Neuron
# documentation, "Logical NeuronCore configuration").
LOGICAL_CORE_FAMILIES = ("trn2",)
INSTANCE_TYPE_LABELS = ("node.kubernetes.io/instance-type", "beta.kubernetes.io/instance-type")
AUTO_CORES = "auto"


def pinned_instance_types(spec: dict[str, Any]) -> set[str]:
    """The instance types the serving pods can only run on (nodeSelector, or every required affinity term); empty
    when any node would do."""
    selector = spec.get("nodeSelector") or {}
    for label in INSTANCE_TYPE_LABELS:
        if label in selector:
            return {selector[label]}
    affinity = (spec.get("affinity") or {}).get("nodeAffinity") or {}
    terms = (affinity.get("requiredDuringSchedulingIgnoredDuringExecution") or {}).get("nodeSelectorTerms") or []
    types: set[str] = set()
    for term in terms:
        expressions = [e for e in term.get("matchExpressions") or [] if e.get("key") in INSTANCE_TYPE_LABELS]
        if not expressions or expressions[0].get("operator") != "In":
            return set()  # a term that does not pin an instance type admits any node
        types.update(expressions[0].get("values") or [])
    return types


def cores_per_pod(spec: dict[str, Any]) -> int:
    """spec.numCores, with "auto" as all NeuronCores of the pinned instance type. ValueError, naming the field and
    what it needs, when "auto" has no single known core count to stand for."""
    cores = spec.get("numCores")
    if cores != AUTO_CORES:
        return int(cores)
    pinned = pinned_instance_types(spec)
    if not pinned:
        raise ValueError(
            'spec.numCores is "auto" but the pods are not pinned to an instance type: set spec.nodeSelector '
            "node.kubernetes.io/instance-type (e.g. inf2.xlarge), or a number of NeuronCores"
        )
    unknown = sorted(pinned - NEURONCORES_PER_NODE.keys())
    if unknown:
        raise ValueError(
            f'spec.numCores is "auto" but the NeuronCores of {", ".join(unknown)} are not known to the operator '
            f"(it knows {', '.join(sorted(NEURONCORES_PER_NODE))}): set a number of NeuronCores"
        )
    counts = {NEURONCORES_PER_NODE[t] for t in pinned}
    if len(counts) > 1:
        listed = ", ".join(f"{t} ({NEURONCORES_PER_NODE[t]})" for t in sorted(pinned))
        raise ValueError(
            f'spec.numCores is "auto" but the pods may run on instance types with different NeuronCores ({listed}): '
            "pin one, or set a number of NeuronCores"
        )
    return counts.pop()


def auto_cores_note(spec: dict[str, Any]) -> str:
    """How ``numCores: auto`` was resolved, for the status; "" when numCores is a number."""
    if spec.get("numCores") != AUTO_CORES:
        return ""
    (instance_type,) = pinned_instance_types(spec) or {""}
    cores = NEURONCORES_PER_NODE.get(instance_type)
    if cores is None:
        return ""
    logical = (
        f" logical NeuronCores at its default LNC=2 ({2 * cores} at LNC=1)"
        if instance_type.split(".", 1)[0] in LOGICAL_CORE_FAMILIES
        else " NeuronCores"
    )
    return f" (numCores auto: the {cores}{logical} of {instance_type})"
