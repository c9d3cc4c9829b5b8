"""Reference contender: the rewrite done by parsing the whole proto (what a straightforward tool does)."""

import shutil
import sys
from pathlib import Path

from tensorflow.core.protobuf import saved_model_pb2


def main(src: Path, dst: Path, num_cores: int) -> None:
    model = saved_model_pb2.SavedModel.FromString((src / "saved_model.pb").read_bytes())
    for meta in model.meta_graphs:
        nodes = [*meta.graph_def.node, *(n for f in meta.graph_def.library.function for n in f.node_def)]
        for node in nodes:
            if node.op == "NeuronOp":
                node.attr["_automatic_multicore"].i = num_cores
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("saved_model.pb", "fingerprint.pb"))
    (dst / "saved_model.pb").write_bytes(model.SerializeToString())


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]))
