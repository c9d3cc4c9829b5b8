"""The seed's Python API, ``auto_multicore(model, example_inputs, num_cores)``, on SavedModel paths.

AWS's ``tfn.auto_multicore`` takes a loaded model and runs it on ``example_inputs``; compiled NeuronOps cannot run
without the Neuron runtime, so here ``model`` is the path of a compiled SavedModel, ``example_inputs`` is accepted
for compatibility and not used, and the result is the path of the rewritten SavedModel.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .rewrite import check_num_cores, rewrite_model


def auto_multicore(
    model: str | os.PathLike[str],
    example_inputs: Any = None,
    num_cores: int = 1,
    *,
    new_model_dir: str | os.PathLike[str] | None = None,
    force: bool = False,
) -> str:
    """Tag every NeuronOp of the SavedModel at ``model`` for ``num_cores`` cores; return the new model's path.

    ``new_model_dir`` defaults to ``<model>_multicore_<num_cores>`` beside the input.
    """
    del example_inputs  # only needed where the model runs, which a Neuron-compiled model cannot do here
    check_num_cores(num_cores)
    source = Path(model)
    if new_model_dir is None:
        new_model_dir = source.with_name(f"{source.name}_multicore_{num_cores}")
    rewrite_model(source, new_model_dir, num_cores, force=force)
    return str(new_model_dir)
