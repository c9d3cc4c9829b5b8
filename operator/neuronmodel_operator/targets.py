"""Which nodes can run what a model was compiled for, and which serving images can load it.

The rewrite reads each NeuronOp's target (the NeuronCore generation its NEFF was compiled for) and, where the NEFF
records it, the compiler's version. Facts used, from AWS's Neuron documentation (aws-neuron/aws-neuron-sdk):

- Inf1 has NeuronCore-v1; Inf2, Trn1 and Trn1n have NeuronCore-v2; Trn2 has NeuronCore-v3 ("Neuron hardware"
  pages: inferentia.rst, inferentia2.rst, trainium.rst, trainium2.rst). A NEFF runs on the generation it was
  compiled for: on a load failure "The NEFF was compiled for a different target architecture than the current
  instance" (neuron-runtime/nrtpy/nrtpy-troubleshooting.rst, ``NRT_FAILURE(6)``). Only NEURON_RT_ALLOW_LEGACY_NEFF,
  off by default, lets an older one run on a newer generation: "Allow a NEFF compiled for an older arch to execute
  on a newer one", where an incompatible one may "fail with a data mismatch error or stall out"
  (neuron-runtime/guides/configuration-guide.rst).
- TensorFlow Serving for Neuron is the package tensorflow-model-server-neuronx, for Inf1 as for Inf2/Trn1 since
  Neuron 2.5, whose package changes list Inf1's tensorflow-model-server-neuron as its deprecated old name
  (about-neuron/announcements/neuron2.x/neuron250-packages-changes.rst; src/helperscripts/n2-manifest.json).
  TensorFlow never supported Trn2. Neuron 2.29 (released April 9, 2026) no longer supports TensorFlow on Inf2
  (announce-no-longer-support-tensorflow-inf2.rst); Neuron 2.28 is the last release whose manifest lists TensorFlow
  packages for Inf2 and tensorflow-model-server-neuronx at all (tensorflow-neuronx for Trn1 stays listed up to 2.30).
- The runtime refuses a NEFF from a newer compiler than it knows: "NEFF version mismatch supported: 1.1 received:
  2.0" (neuron-runtime/nrt-troubleshoot.rst). AWS's TF Serving images pin one compiler and runtime per Neuron SDK
  release (aws/deep-learning-containers, tensorflow/inference/docker/2.10/py3/sdk*/Dockerfile.neuronx), so an image
  is known-good for models compiled by that release's compiler or an older one (our inference from that advice, not
  AWS's words). Public evidence for the other side: aws-neuron/aws-neuron-sdk issue #1061, where the sdk2.17.0 image
  refuses a NEFF using a feature its runtime does not know, as a newer compiler's ("NEFF version: 2.0, features:
  0x100 are not supported").
"""

from __future__ import annotations

import re
from typing import Any

from neuron_rewrite.neff import FAMILY_TARGETS, V1, V2, family

from .instances import pinned_instance_types

# Families with a TensorFlow Serving for Neuron: a model compiled for another generation is served nowhere.
SERVED_FAMILIES = ("inf1", "inf2", "trn1", "trn1n")

# AWS's TensorFlow Serving images for Inf2/Trn1 (763104351884.dkr.ecr.<region>.amazonaws.com/
# tensorflow-inference-neuronx:2.10.1-neuronx-py310-sdk<release>-ubuntu20.04), by Neuron SDK release: the
# neuronx-cc and aws-neuronx-runtime-lib (major, minor) their Dockerfiles pin. sdk2.17.0 is the last with TensorFlow.
NEURONX_IMAGE_RELEASES: dict[str, tuple[tuple[int, int], tuple[int, int]]] = {
    "2.13.2": ((2, 9), (2, 16)),
    "2.14.1": ((2, 10), (2, 17)),
    "2.15.1": ((2, 11), (2, 18)),
    "2.17.0": ((2, 12), (2, 20)),
}
# AWS's TF Serving image repositories, by the generation they run (Inf1's image installs tensorflow-model-server-neuronx
# too: aws/deep-learning-containers tensorflow/inference/docker/2.10/py3/sdk2.17.0/Dockerfile.neuron).
IMAGE_TARGETS = {"tensorflow-inference-neuron": V1, "tensorflow-inference-neuronx": V2}
_SDK_TAG = re.compile(r"-neuronx-py\d+-sdk(\d+\.\d+\.\d+)")
_VERSION = re.compile(r"^(\d+)\.(\d+)")


def families_running(target: str) -> list[str]:
    """The instance families whose NeuronCores run a NEFF compiled for ``target`` and have a TF Serving."""
    return [f for f in SERVED_FAMILIES if FAMILY_TARGETS[f] == target]


def incompatible_target(spec: dict[str, Any], target: str | None) -> str | None:
    """Why the pods, pinned as ``spec`` pins them, cannot run a model compiled for ``target``; None when they can,
    or when the target or the pinned instance types are unknown."""
    if target is None:
        return None
    pinned = sorted(pinned_instance_types(spec))
    wrong = [t for t in pinned if family(t) in FAMILY_TARGETS and FAMILY_TARGETS[family(t)] != target]
    if not wrong:
        return None
    running = families_running(target)
    generations = " or ".join(sorted({FAMILY_TARGETS[family(t)] for t in wrong}))
    where = (
        f"recompile it for {generations} or pin the pods to {' or '.join(running)} instances"
        if running
        else f"no TensorFlow Serving for Neuron runs {target}: recompile the model for {generations}"
    )
    listed = ", ".join(f"{t} ({FAMILY_TARGETS[family(t)]})" for t in wrong)
    return (
        f"the model was compiled for {target} but its pods are pinned to {listed}, whose Neuron runtime refuses a "
        f"NEFF compiled for another NeuronCore generation: {where}"
    )


def unpinned_warning(spec: dict[str, Any], target: str | None) -> str | None:
    """What to tell about a model whose pods may land on any node: which families can run it. None when pinned or
    the target is unknown."""
    if target is None or pinned_instance_types(spec):
        return None
    running = families_running(target)
    runs = f"only {', '.join(running)} instances can run it" if running else "no TensorFlow Serving for Neuron runs it"
    return (
        f"the model was compiled for {target}: {runs}, but its pods are not pinned to an instance type; set "
        "spec.nodeSelector node.kubernetes.io/instance-type so that they never land on another Neuron node"
    )


def image_warning(image: str, target: str | None, compiler: str | None) -> str | None:
    """Why ``image`` may not load a model compiled for ``target`` by ``compiler``, where the image is one of AWS's TF
    Serving images for Neuron and what it runs is known from its name; None when it fits or nothing is known."""
    repository = image.rsplit("/", 1)[-1].split(":", 1)[0].split("@", 1)[0]
    image_target = IMAGE_TARGETS.get(repository)
    if target is not None and image_target is not None and image_target != target:
        return (
            f"the serving image {image} runs {image_target} models (AWS's TF Serving for "
            f"{' and '.join(families_running(image_target))}) but the model was compiled for {target}"
        )
    sdk, version = _SDK_TAG.search(image), _VERSION.match(compiler or "")
    if sdk is None or version is None or sdk.group(1) not in NEURONX_IMAGE_RELEASES:
        return None
    compiled = (int(version.group(1)), int(version.group(2)))
    known, runtime = NEURONX_IMAGE_RELEASES[sdk.group(1)]
    if compiled[0] != 2 or compiled <= known:  # neuron-cc (Inf1) is 1.x: not this table's
        return None
    newer = ", ".join(f"sdk{r}" for r, (cc, _) in NEURONX_IMAGE_RELEASES.items() if cc >= compiled)
    choice = f"use an image of {newer}" if newer else "no TensorFlow Serving image has a runtime that new"
    return (
        f"the model was compiled by neuronx-cc {compiler}, newer than neuronx-cc {known[0]}.{known[1]} of the serving "
        f"image's Neuron SDK {sdk.group(1)} (runtime {runtime[0]}.{runtime[1]}), whose runtime may refuse its NEFF "
        f"(NEFF version mismatch): {choice}, or recompile with that release's compiler"
    )
