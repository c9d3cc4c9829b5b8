"""Finding the versions under a base path and loading one, as TF Serving and the Neuron runtime would.

A version loads only after the real checks pass (SavedModel present, meta graph with the requested tags, NeuronOps
fit for the visible NeuronCores); it is then made runnable on CPU: ``deneuronized_copy`` inlines each NeuronOp's
embedded graph into a copy under TMPDIR, which TensorFlow loads.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tensorflow as tf
from google.protobuf.message import DecodeError
from tensorflow.core.protobuf import meta_graph_pb2

from neuron_modelgen import deneuronized_copy, read_saved_model

from . import log, neuron
from .status import StatusError, invalid_argument, not_found

SOURCE = "tensorflow_serving/sources/storage_path/file_system_storage_path_source.cc"
READER = "tensorflow/cc/saved_model/reader.cc"
LOADER = "tensorflow/cc/saved_model/loader.cc"
_VERSION = re.compile(r"\s*[+-]?\d+\s*")  # absl::SimpleAtoi, as ParseVersionNumber uses it


@dataclass
class LoadedModel:
    version: int
    path: str
    copy: Path
    signature_defs: dict[str, meta_graph_pb2.SignatureDef]
    signatures: Any  # the loaded object's signatures: name -> ConcreteFunction
    load_micros: int


def list_versions(name: str, base_path: str) -> dict[int, str]:
    """Version -> version path. Like the real source, any child named as an integer counts, file or folder."""
    if not os.path.exists(base_path):
        raise invalid_argument(
            f"Could not find base path {base_path} for servable {name} with error "
            f"NOT_FOUND: {base_path}; No such file or directory"
        )
    try:
        children = sorted({c.split("/")[0] for c in os.listdir(base_path)})
    except OSError as exc:
        raise StatusError("FAILED_PRECONDITION", f"{base_path}; {exc.strerror}") from None
    versions: dict[int, str] = {}
    for child in children:
        if not _VERSION.fullmatch(child) or not -(2**63) <= int(child) < 2**63:
            continue
        version = int(child)
        if version in versions:
            log.warning(
                SOURCE,
                f"Duplicate version directories detected. Version {version} will be loaded from {child}, "
                f"{Path(versions[version]).name} will be ignored.",
            )
        versions[version] = os.path.join(base_path, child)
    return versions


def _meta_graph(version_dir: Path, tags: set[str]) -> tuple[int, meta_graph_pb2.MetaGraphDef]:
    log.info(READER, f"Reading SavedModel from: {version_dir}")
    if (version_dir / "export.meta").exists():
        raise StatusError("UNIMPLEMENTED", "Session Bundle is deprecated and removed.")
    if not (version_dir / "saved_model.pb").exists():
        if (version_dir / "saved_model.pbtxt").exists():
            raise StatusError("UNIMPLEMENTED", f"{version_dir}: text-format SavedModels are not served by the stand-in")
        raise not_found(
            "Specified file path does not appear to contain a SavedModel bundle (should have a file called "
            f"`saved_model.pb`)\nSpecified file path: {version_dir}"
        )
    try:
        model = read_saved_model(version_dir)
    except (DecodeError, OSError):
        raise StatusError("DATA_LOSS", f"Can't parse {version_dir / 'saved_model.pb'} as binary proto") from None
    joined = " ".join(sorted(tags))
    log.info(READER, f"Reading meta graph with tags {{ {joined} }}")
    for index, meta in enumerate(model.meta_graphs):
        if set(meta.meta_info_def.tags) == tags:
            return index, meta
    raise not_found(
        f"Could not find meta graph def matching supplied tags: {{ {joined} }}. To inspect available tag-sets in "
        "the SavedModel, please use the SavedModel CLI: `saved_model_cli`"
    )


def load_version(name: str, version: int, path: str, tags: set[str], workdir: Path) -> LoadedModel:
    """One load attempt; raises StatusError with the real server's wording where it has one."""
    start = time.monotonic()
    version_dir = Path(path)
    index, meta = _meta_graph(version_dir, tags)
    cores = neuron.visible_cores()
    count = neuron.check_neuron_ops(version_dir, index, cores)
    log.info(
        "neuron/runtime",
        f"{count} NeuronOp(s) of {version_dir} replicated on NeuronCores {','.join(map(str, cores))} "
        f"(_automatic_multicore={len(cores)}); running on CPU in the stand-in",
    )
    copy = workdir / f"{name}-{version}"
    shutil.rmtree(copy, ignore_errors=True)
    try:
        deneuronized_copy(version_dir, copy)
        loaded = tf.saved_model.load(str(copy), tags=sorted(tags))
    except Exception as exc:  # TensorFlow's own load errors: report them as the load failure they are
        shutil.rmtree(copy, ignore_errors=True)
        raise StatusError("INTERNAL", f"{type(exc).__name__}: {str(exc).strip().splitlines()[0]}") from None
    micros = int((time.monotonic() - start) * 1e6)
    log.info(
        LOADER,
        f"SavedModel load for tags {{ {' '.join(sorted(tags))} }}; Status: success: OK. Took {micros} microseconds.",
    )
    return LoadedModel(version, path, copy, dict(meta.signature_def), loaded.signatures, micros)


def unload(model: LoadedModel) -> None:
    shutil.rmtree(model.copy, ignore_errors=True)
