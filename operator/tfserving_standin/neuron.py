"""What the Neuron runtime checks when TF Serving loads a compiled model onto the pod's NeuronCores.

Decisions (stricter than the runtime where it would silently do something else):
- ``NEURON_RT_VISIBLE_CORES`` (set by the device plugin's Allocate: "3", "0-1", "0,1,2") must be present and
  well formed: without it the real runtime would grab every core of the node, which a pod must never do.
- The model must hold at least one NeuronOp: a plain model is not compiled for Neuron.
- Every NeuronOp of the loaded meta graph must carry ``_automatic_multicore`` equal to the number of visible
  cores. An untagged NeuronOp is refused too: the runtime would replicate it on up to 4 cores whatever the pod
  was given, so serving depends on the node, and the operator always tags. A larger tag would fail to place,
  a smaller one would leave paid cores idle.
- A NeuronOp compiled with a pipeline (``model_config[1]`` above 1) is refused: it cannot be replicated, and a
  pipeline spread over the pod's cores is not what the operator deploys. One without ``model_config`` is refused
  as damaged (the runtime needs it).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from neuron_rewrite import RewriteError, inspect_model

from .status import StatusError

VISIBLE_CORES = "NEURON_RT_VISIBLE_CORES"
_ITEM = re.compile(r"(\d+)(?:-(\d+))?")


def _runtime_error(message: str) -> StatusError:
    return StatusError("FAILED_PRECONDITION", f"Neuron runtime: nrt_init failed: {message}")


def visible_cores(env: dict[str, str] | os._Environ = os.environ) -> list[int]:
    """The NeuronCore indices this process may use, from the device plugin's environment variable."""
    value = env.get(VISIBLE_CORES)
    if value is None:
        raise _runtime_error(
            f"{VISIBLE_CORES} is not set: no NeuronCore was allocated to this container "
            "(request aws.amazon.com/neuroncore so the Neuron device plugin sets it)"
        )
    cores: list[int] = []
    for item in value.split(","):
        match = _ITEM.fullmatch(item.strip())
        if not match or (match[2] is not None and int(match[2]) < int(match[1])):
            raise _runtime_error(f'invalid {VISIBLE_CORES}="{value}": expected "N", "N-M" or "N,M,..."')
        cores.extend(range(int(match[1]), int(match[2] or match[1]) + 1))
    if len(set(cores)) != len(cores):
        raise _runtime_error(f'invalid {VISIBLE_CORES}="{value}": a NeuronCore is listed twice')
    return cores


def check_neuron_ops(version_dir: Path, meta_graph: int, cores: list[int]) -> int:
    """Refuse the model unless its NeuronOps fit the visible cores; return how many NeuronOps it has."""
    try:
        report = inspect_model(version_dir)
    except RewriteError as exc:
        raise StatusError("DATA_LOSS", f"Can't parse {version_dir / 'saved_model.pb'} as binary proto: {exc}") from None
    ops = [op for model in report.models for op in model.neuron_ops if op.meta_graph == meta_graph]
    if not ops:
        raise StatusError(
            "INVALID_ARGUMENT",
            f"No NeuronOp found in SavedModel {version_dir}: the model is not compiled for Neuron "
            "(compile it with tensorflow-neuron / tensorflow-neuronx first)",
        )
    visible = ",".join(map(str, cores))
    for op in ops:
        where = f"NeuronOp {op.node}" + (f" in function {op.function}" if op.function else "")
        if op.pipeline_size is None:
            raise StatusError("INVALID_ARGUMENT", f"{where} has no model_config attribute: the model is damaged")
        if op.pipeline_size > 1:
            raise StatusError(
                "INVALID_ARGUMENT",
                f"{where} was compiled with a NeuronCore pipeline of {op.pipeline_size} cores "
                f"(--neuroncore-pipeline-cores={op.pipeline_size}); the stand-in serves pipeline size 1 only",
            )
        if op.automatic_multicore != len(cores):
            tag = (
                "is not tagged _automatic_multicore"
                if op.automatic_multicore is None
                else (f"is tagged _automatic_multicore={op.automatic_multicore}")
            )
            raise _runtime_error(
                f"{where} {tag} but {len(cores)} NeuronCore(s) are visible ({VISIBLE_CORES}={visible}): "
                f"rewrite the model with tf-neuron-auto-multicore --num_cores {len(cores)}"
            )
    return len(ops)
