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

from .neuronize import deneuronize, neuronize

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


def _executable(size: int) -> bytes:
    pattern = b"NEFF"
    return (pattern * (size // len(pattern) + 1))[:size]


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
        if not neuronize(model, _executable(options.executable_bytes), options.pipeline):
            raise RuntimeError(f"{out}: no compute subgraph to compile")
        if options.tag is not None:
            for meta in model.meta_graphs:
                nodes = [*meta.graph_def.node, *(n for f in meta.graph_def.library.function for n in f.node_def)]
                for node in nodes:
                    if node.op == "NeuronOp":
                        node.attr["_automatic_multicore"].i = options.tag
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
