"""Benchmark of the auto multicore rewrite against references measured in the same run.

Each contender runs as a fresh process, three times; we keep the median wall time and the peak RSS of that process
(GNU time's %M). Page cache is warmed by one unmeasured `cp -r` first, so every contender reads from memory.

Contenders, on the same model (half `executable` in saved_model.pb, half variables):
  cp        `cp -r` of the model: the floor for "read it all, write it all"
  ours      tf-neuron-auto-multicore: one streaming pass over field headers, zero-copy ranges
  parse     parse the whole proto with protobuf, tag, serialise, copy the other files
  tf        the AWS tool's way: tf.saved_model.load + tf.saved_model.save of a CPU model of the same size

Usage: .venv/bin/python bench/rewrite_bench.py [--sizes 16,64,256,512,1024] [--tf-sizes 512] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PY = sys.executable
MIB = 1 << 20
RUNS = 3


def measure(argv: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one fresh process, as GNU time reports them.

    GNU time forks from its own small image, so the peak is the contender's alone (a child forked from this
    process would count our TensorFlow-sized image until its exec).
    """
    with tempfile.NamedTemporaryFile("r") as report:
        start = time.perf_counter()
        proc = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", report.name, *argv], capture_output=True, text=True)
        seconds = time.perf_counter() - start  # GNU time's own %e has 10 ms steps: too coarse for small models
        if proc.returncode != 0:
            raise RuntimeError(f"{argv[:3]} failed: {proc.stderr[-2000:]}")
        peak_kib = report.read().split()[-1]
    return seconds, int(peak_kib) / 1024


def median_of(argv: list[str], out: Path) -> dict[str, float]:
    times, peaks = [], []
    for _ in range(RUNS):
        shutil.rmtree(out, ignore_errors=True)
        seconds, peak = measure(argv)
        times.append(seconds)
        peaks.append(peak)
    shutil.rmtree(out, ignore_errors=True)
    return {"seconds": statistics.median(times), "peak_mib": statistics.median(peaks)}


def build_neuron_model(path: Path, total_mib: int) -> Path:
    """A Neuron-shaped model: one NeuronOp carrying total/2 MiB of NEFF, and total/2 MiB of variables."""
    from neuron_modelgen import Options, build_model

    half = total_mib * MIB // 2
    build_model(path, Options(kind="tf1", executable_bytes=half))  # TF1: one NeuronOp, in the graph
    data = path / "variables" / "variables.data-00000-of-00001"
    with data.open("wb") as f:  # bytes of variables: the rewrite copies them without looking inside
        chunk = os.urandom(MIB)
        for _ in range(half // MIB):
            f.write(chunk)
    return path


def build_cpu_model(path: Path, total_mib: int) -> Path:
    """A model TensorFlow can load on CPU, of the same size: total/2 MiB of real variables, a total/2 MiB constant."""
    from tensorflow.core.framework import node_def_pb2, tensor_pb2, types_pb2

    from neuron_modelgen import Options, build_model, read_saved_model
    from neuron_modelgen.models import write_saved_model

    half = total_mib * MIB // 2
    build_model(path, Options(neuron=False, variable_bytes=half))
    model = read_saved_model(path)
    function = next(f for f in model.meta_graphs[0].graph_def.library.function if "logits" in f.signature.name)
    const = node_def_pb2.NodeDef(name="weights_blob", op="Const")
    const.attr["dtype"].type = types_pb2.DT_UINT8
    tensor = tensor_pb2.TensorProto(dtype=types_pb2.DT_UINT8, tensor_content=os.urandom(half))
    tensor.tensor_shape.dim.add(size=half)
    const.attr["value"].tensor.CopyFrom(tensor)
    function.node_def.append(const)
    write_saved_model(path, model)
    return path


def run(sizes: list[int], tf_sizes: list[int], work: Path) -> list[dict]:
    rows = []
    for size in sizes:
        src = build_neuron_model(work / f"neuron-{size}", size)
        out = work / "out"
        measure(["cp", "-r", str(src), str(out)])  # warm the page cache
        shutil.rmtree(out)
        row: dict = {"size_mib": size}
        row["cp"] = median_of(["cp", "-r", str(src), str(out)], out)
        row["ours"] = median_of(
            [str(Path(PY).parent / "tf-neuron-auto-multicore"), str(src), "--num_cores", "4", "--new_model_dir",
             str(out)], out)  # fmt: skip
        row["parse"] = median_of([PY, str(HERE / "full_parse_rewrite.py"), str(src), str(out), "4"], out)
        shutil.rmtree(src)
        if size in tf_sizes:
            cpu = build_cpu_model(work / f"cpu-{size}", size)
            measure(["cp", "-r", str(cpu), str(out)])
            shutil.rmtree(out)
            row["tf"] = median_of([PY, str(HERE / "tf_load_save.py"), str(cpu), str(out)], out)
            shutil.rmtree(cpu)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| model | cp -r | ours | ours/cp | full parse | parse/cp | TF load+save | tf/cp |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        cp = row["cp"]["seconds"]

        def cell(key: str, row: dict = row, cp: float = cp) -> tuple[str, str]:
            if key not in row:
                return "-", "-"
            r = row[key]
            return f"{r['seconds']:.2f} s, {r['peak_mib']:.0f} MiB", f"{r['seconds'] / cp:.1f}x"

        ours, parse, tf = cell("ours"), cell("parse"), cell("tf")
        lines.append(
            f"| {row['size_mib']} MiB | {cp:.2f} s, {row['cp']['peak_mib']:.0f} MiB | {ours[0]} | {ours[1]} | "
            f"{parse[0]} | {parse[1]} | {tf[0]} | {tf[1]} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="16,64,256,512,1024", help="model sizes in MiB")
    parser.add_argument("--tf-sizes", default="512", help="sizes at which TF load+save is measured too")
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    tf_sizes = [int(s) for s in args.tf_sizes.split(",") if s]
    with tempfile.TemporaryDirectory(prefix="rewrite-bench-") as tmp:
        rows = run(sizes, tf_sizes, Path(tmp))
    print(table(rows))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
