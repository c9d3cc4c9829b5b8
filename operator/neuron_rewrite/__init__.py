"""Auto multicore rewrite of Neuron-compiled TensorFlow SavedModels, without Neuron hardware or TensorFlow.

Every ``NeuronOp`` node gets ``_automatic_multicore = num_cores`` so the Neuron runtime replicates the compiled
model on that many NeuronCores. The SavedModel is edited at the protobuf wire level in one streaming pass.
"""

from .api import auto_multicore
from .errors import InvalidModelError, NotReplicableError, OutputError, RewriteError, UsageError

# FORMAT_VERSION changes only when the rewrite's output bytes for the same input change; the operator puts it in a
# rewrite's identity, so an upgrade re-runs rewrites only when their output would differ.
from .marker import FORMAT_VERSION, MARKER_FILE
from .report import ModelReport, NeuronOpInfo, RewriteReport
from .rewrite import inspect_model, rewrite_model

__all__ = [
    "FORMAT_VERSION",
    "MARKER_FILE",
    "InvalidModelError",
    "ModelReport",
    "NeuronOpInfo",
    "NotReplicableError",
    "OutputError",
    "RewriteError",
    "RewriteReport",
    "UsageError",
    "auto_multicore",
    "inspect_model",
    "rewrite_model",
]
