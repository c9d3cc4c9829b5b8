"""Neuron-shaped TensorFlow SavedModels for tests, benchmarks and the demo (needs the ``tf`` extra).

No tensorflow-neuron exists here, so models are saved by real TensorFlow and then shaped like compiled ones.
"""

from .models import (
    Options,
    build_base_path,
    build_model,
    deneuronized_copy,
    read_saved_model,
    run_serving_default,
    sample_input,
)

__all__ = [
    "Options",
    "build_base_path",
    "build_model",
    "deneuronized_copy",
    "read_saved_model",
    "run_serving_default",
    "sample_input",
]
