"""What the rewrite found and did, as plain data for the CLI, the API and the operator's Job."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class NeuronOpInfo:
    """One NeuronOp node. ``function`` is None for nodes of the top-level graph (TF1 models)."""

    meta_graph: int
    function: str | None
    node: str
    automatic_multicore: int | None
    pipeline_size: int | None
    executable_bytes: int


@dataclass
class ModelReport:
    """One SavedModel: the input itself, or one numbered version of a TF Serving base path."""

    path: str
    version: str | None
    neuron_ops: list[NeuronOpInfo] = field(default_factory=list)
    # "absent": the input had none; "present": inspect only; "dropped": stale after the rewrite, so not copied;
    # "recomputed": written fresh by TensorFlow.
    fingerprint: str = "absent"


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

    def __post_init__(self) -> None:
        if self.neuron_op_count is None:
            self.neuron_op_count = sum(len(m.neuron_ops) for m in self.models)

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
        }
