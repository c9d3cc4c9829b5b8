"""What the rewrite found and did, as plain data for the CLI, the API and the operator's Job."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


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

    @property
    def neuron_op_count(self) -> int:
        return sum(len(m.neuron_ops) for m in self.models)

    def to_dict(self) -> dict:
        return asdict(self) | {"neuron_op_count": self.neuron_op_count}
