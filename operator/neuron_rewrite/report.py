"""What the rewrite found and did, as plain data for the CLI, the API and the operator's Job."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from .neff import OpTarget, combine, join_compilers

# Bounds of the summary's free-text fields: with the rest, it stays far under the 4096 bytes Kubernetes keeps of a
# termination message, whatever the model (evidence names nodes; many NeuronOps can name many compilers).
_MAX_EVIDENCE = 600
_MAX_COMPILER = 300


@dataclass(frozen=True)
class NeuronOpInfo:
    """One NeuronOp node. ``function`` is None for nodes of the top-level graph (TF1 models)."""

    meta_graph: int
    function: str | None
    node: str
    automatic_multicore: int | None
    pipeline_size: int | None
    executable_bytes: int
    target: str | None  # the NeuronCore generation it was compiled for (neff.TARGETS), None when unknown
    target_evidence: str  # why, or why it is unknown
    compiler: str | None  # the NEFF header's build version, when the compiler wrote one


@dataclass
class ModelReport:
    """One SavedModel: the input itself, or one numbered version of a TF Serving base path."""

    path: str
    version: str | None
    neuron_ops: list[NeuronOpInfo] = field(default_factory=list)
    # "absent": the input had none; "present": inspect only; "dropped": stale after the rewrite, so not copied;
    # "recomputed": written fresh by TensorFlow.
    fingerprint: str = "absent"
    # Of all its NeuronOps (neff.combine): None when unknown, or when they disagree (the evidence names two).
    target: str | None = None
    target_evidence: str = "no NeuronOp"
    compiler: str | None = None


@dataclass
class RewriteReport:
    source: str
    output: str | None
    num_cores: int | None
    models: list[ModelReport] = field(default_factory=list)
    # The version --select_version chose from a base path; None: the input is a SavedModel, or every version.
    source_version: int | None = None
    rewrite_id: str | None = None
    # True: ``output`` was published earlier by ``rewrite_id`` and left as it was. The version above, the format,
    # the bytes and the op count are then those its marker recorded; ``seconds`` is this run's.
    reused: bool = False
    format_version: int | None = None  # of the output; None when nothing is written (inspect)
    bytes_written: int = 0  # the output's files, the marker excluded
    seconds: float = 0.0  # wall time of the run, until the output was complete
    # Counted from ``models`` unless given: a reuse reads no model, so it takes the count from the marker.
    neuron_op_count: int | None = None
    # Of all ``models``, computed from them unless ``target_evidence`` is given (a reuse: as its marker recorded,
    # None there when an older marker recorded none).
    target: str | None = None
    target_evidence: str | None = None
    compiler: str | None = None

    def __post_init__(self) -> None:
        if self.neuron_op_count is None:
            self.neuron_op_count = sum(len(m.neuron_ops) for m in self.models)
        if self.target_evidence is None and self.models:
            self._combine_models()

    def _combine_models(self) -> None:
        """One SavedModel: its target. A base path's versions: their common target, None when they differ."""
        if len(self.models) == 1:
            self.target, self.target_evidence = self.models[0].target, self.models[0].target_evidence
        else:
            versions = [OpTarget(str(m.version), m.target, m.target_evidence, m.compiler) for m in self.models]
            combined = combine(versions, "version")
            self.target, self.target_evidence = combined.target, combined.evidence
        self.compiler = join_compilers(op.compiler for m in self.models for op in m.neuron_ops)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> dict[str, Any]:
        """The report without the per-op list: a few hundred bytes whatever the model, as a Kubernetes
        termination message (at most 4096 bytes) must be."""
        return {
            "formatVersion": self.format_version,
            "rewriteId": self.rewrite_id,
            "numCores": self.num_cores,
            "sourceVersion": self.source_version,
            "neuronOps": self.neuron_op_count,
            "bytesWritten": self.bytes_written,
            "seconds": self.seconds,
            "reused": self.reused,
            "output": self.output,
            "target": self.target,
            "targetEvidence": _bounded(self.target_evidence, _MAX_EVIDENCE),
            "compiler": _bounded(self.compiler, _MAX_COMPILER),
        }


def _bounded(text: str | None, limit: int) -> str | None:
    """``text`` cut (ending in "...") to at most ``limit`` bytes as JSON, where a non-ASCII character takes up to 12."""
    if text is None or len(json.dumps(text)) <= limit:
        return text
    cut = text[:limit]
    while len(json.dumps(cut + "...")) > limit:
        cut = cut[:-1]
    return cut + "..."
