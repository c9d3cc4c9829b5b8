"""Real TensorFlow SavedModels, saved by TensorFlow, then shaped like Neuron-compiled ones."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2

from neuron_rewrite import neff

from .neuronize import deneuronize, neuron_ops, neuronize

FEATURES, HIDDEN, CLASSES = 8, 16, 4
SAVED_MODEL = "saved_model.pb"


@dataclass(frozen=True)
class Options:
    """What the generated model looks like. Sizes in bytes."""

    kind: str = "tf2"  # "tf2": nested tf.functions; "tf1": a graph-mode model
    executable_bytes: int = 4096  # stands for the NEFF each NeuronOp carries
    variable_bytes: int = 0  # an extra variable of this size, for realistic variables/ sizes
    pipeline: int = 1  # model_config's pipeline size; above 1 the rewrite must refuse the model
    tag: int | None = None  # an existing _automatic_multicore value, as a previous rewrite leaves
    neuron: bool = True  # False: a plain model with no NeuronOp (not compiled for Neuron)
    # The NeuronCore generation (neff.V1/V2/V3) the model is compiled for: the executable gets a NEFF header shaped
    # as that generation's compiler writes it (_NEFF_SHAPES). None: a placeholder executable without a header, whose
    # target is unknown. The header alone tells V1 (NEFF 0.6) and V3 (lnc_size 2) but not V2: a V2 header (NEFF 2.0,
    # lnc_size 1) classifies as unknown, as a real tensorflow-neuronx model does. A model known to be V2 needs
    # instance_type too (e.g. "inf2.xlarge"), which tensorflow-neuronx writes only with --extract-weights.
    target: str | None = None
    compiler: str | None = None  # the header's neff_build_version, e.g. "2.12.68.0+4480452af" (needs a target)
    # An _instance_type attribute on every NeuronOp, e.g. "inf1.xlarge", as tensorflow-neuron's --extract-weights
    # writes it (see neff.py). Not added by target: a compiler writes it only when told to.
    instance_type: str | None = None
    # The last NeuronOp's target instead: a model of mixed targets. Its NEFF header only (instance_type, when given,
    # is on every NeuronOp), so V1 with V3 mixes known targets; V2 there is unknown unless instance_type says so.
    last_op_target: str | None = None


# The NEFF header (version, lnc_size) each target's compiler writes (neff.py cites the sources): neuron-cc's NEFF 0.6
# (classified V1), neuronx-cc's NEFF 2.0 with lnc_size 1 (Trn1, Inf2: classified unknown without _instance_type) or
# 2 (Trn2: classified V3).
_NEFF_SHAPES = {neff.V1: ((0, 6), 0), neff.V2: ((2, 0), 1), neff.V3: ((2, 0), 2)}


def _executable(size: int, target: str | None, compiler: str | None, pipeline: int) -> bytes:
    """``size`` bytes standing for a NEFF: a header for ``target`` followed by filler (not a real tarball: nothing
    reads it), or only filler when ``target`` is None."""
    pattern = b"NEFF"
    filler = (pattern * (size // len(pattern) + 1))[:size]
    if target is None:
        if compiler is not None:
            raise ValueError("a compiler is recorded in a NEFF header: give a target too")
        return filler
    if size < neff.HEADER_SIZE:
        raise ValueError(f"an executable of {size} bytes cannot hold the {neff.HEADER_SIZE}-byte NEFF header")
    version, lnc_size = _NEFF_SHAPES[target]
    data_size = size - neff.HEADER_SIZE
    header = neff.build_header(
        version=version, data_size=data_size, build_version=compiler, num_tpb=pipeline, lnc_size=lnc_size
    )
    return header + filler[:data_size]


class _Classifier(tf.Module):
    """Two dense layers behind nested tf.functions, a vocabulary asset and two signatures."""

    def __init__(self, vocab: Path, variable_bytes: int) -> None:
        super().__init__()
        rng = np.random.default_rng(7)
        self.w1 = tf.Variable(rng.standard_normal((FEATURES, HIDDEN), dtype=np.float32))
        self.b1 = tf.Variable(rng.standard_normal((HIDDEN,), dtype=np.float32))
        self.w2 = tf.Variable(rng.standard_normal((HIDDEN, CLASSES), dtype=np.float32))
        self.b2 = tf.Variable(rng.standard_normal((CLASSES,), dtype=np.float32))
        self.padding = tf.Variable(tf.zeros([variable_bytes // 4], tf.float32)) if variable_bytes else None
        self.vocab = tf.saved_model.Asset(str(vocab))

    @tf.function
    def hidden(self, x: tf.Tensor) -> tf.Tensor:
        return tf.nn.relu(tf.matmul(x, self.w1) + self.b1)

    @tf.function
    def logits(self, x: tf.Tensor) -> tf.Tensor:
        return tf.matmul(self.hidden(x), self.w2) + self.b2  # calls a function: NeuronOps sit two calls deep

    @tf.function(input_signature=[tf.TensorSpec([None, FEATURES], tf.float32)])
    def serve(self, x: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"logits": self.logits(x)}

    @tf.function(input_signature=[tf.TensorSpec([None, FEATURES], tf.float32)])
    def embed(self, x: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"hidden": self.hidden(x)}


def _save_tf2(out: Path, variable_bytes: int) -> None:
    vocab = out.parent / f".{out.name}-vocab.txt"
    vocab.write_text("cat\ndog\n")
    module = _Classifier(vocab, variable_bytes)
    tf.saved_model.save(module, str(out), signatures={"serving_default": module.serve, "embed": module.embed})
    vocab.unlink()


def _save_tf1(out: Path, variable_bytes: int) -> None:
    graph = tf.Graph()
    with graph.as_default(), tf.compat.v1.Session(graph=graph) as session:
        rng = np.random.default_rng(7)
        x = tf.compat.v1.placeholder(tf.float32, [None, FEATURES], name="x")
        w = tf.compat.v1.get_variable("w", initializer=rng.standard_normal((FEATURES, CLASSES), dtype=np.float32))
        b = tf.compat.v1.get_variable("b", initializer=rng.standard_normal((CLASSES,), dtype=np.float32))
        if variable_bytes:
            tf.compat.v1.get_variable("padding", initializer=tf.zeros([variable_bytes // 4], tf.float32))
        y = tf.nn.relu(tf.matmul(x, w) + b, name="y")
        session.run(tf.compat.v1.global_variables_initializer())
        builder = tf.compat.v1.saved_model.Builder(str(out))
        signature = tf.compat.v1.saved_model.predict_signature_def({"x": x}, {"y": y})
        builder.add_meta_graph_and_variables(session, ["serve"], signature_def_map={"serving_default": signature})
        builder.save()


def read_saved_model(model_dir: Path) -> saved_model_pb2.SavedModel:
    return saved_model_pb2.SavedModel.FromString((model_dir / SAVED_MODEL).read_bytes())


def write_saved_model(model_dir: Path, model: saved_model_pb2.SavedModel) -> None:
    (model_dir / SAVED_MODEL).write_bytes(model.SerializeToString())


def build_model(out: str | os.PathLike[str], options: Options = Options()) -> Path:
    """Save a real model at ``out`` and, unless ``options.neuron`` is False, swap its compute for NeuronOps."""
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists")
    (_save_tf2 if options.kind == "tf2" else _save_tf1)(out, options.variable_bytes)
    if options.neuron:
        model = read_saved_model(out)

        def executable(target: str | None) -> bytes:
            return _executable(options.executable_bytes, target, options.compiler, options.pipeline)

        if not neuronize(model, executable(options.target), options.pipeline):
            raise RuntimeError(f"{out}: no compute subgraph to compile")
        ops = neuron_ops(model)
        for node in ops:
            if options.tag is not None:
                node.attr["_automatic_multicore"].i = options.tag
            if options.instance_type is not None:
                node.attr["_instance_type"].s = options.instance_type.encode()
        if options.last_op_target is not None:
            ops[-1].attr["executable"].s = executable(options.last_op_target)
        write_saved_model(out, model)  # TensorFlow's fingerprint.pb is left as written: stale, as after any edit
    return out


def build_base_path(out: str | os.PathLike[str], versions: list[int], options: Options = Options()) -> Path:
    """A TF Serving base path: ``out/<version>/`` for each version."""
    out = Path(out)
    out.mkdir(parents=True)
    for version in versions:
        build_model(out / str(version), options)
    return out


def deneuronized_copy(model_dir: str | os.PathLike[str], out: str | os.PathLike[str]) -> Path:
    """A copy of ``model_dir`` whose NeuronOps are replaced by the graphs they embed: loadable on any CPU."""
    model_dir, out = Path(model_dir), Path(out)
    shutil.copytree(model_dir, out)
    (out / "fingerprint.pb").unlink(missing_ok=True)
    model = read_saved_model(model_dir)
    deneuronize(model)
    write_saved_model(out, model)
    return out


def sample_input(batch: int = 3) -> np.ndarray:
    return np.random.default_rng(11).standard_normal((batch, FEATURES), dtype=np.float32)


def run_serving_default(model_dir: str | os.PathLike[str], x: np.ndarray) -> dict[str, np.ndarray]:
    """Load a SavedModel (TF1 or TF2) and run its serving_default signature."""
    loaded = tf.saved_model.load(str(model_dir))
    fn = loaded.signatures["serving_default"]
    name = next(iter(fn.structured_input_signature[1]))
    return {k: v.numpy() for k, v in fn(**{name: tf.constant(x)}).items()}
