"""Benchmark of an S3-sourced rewrite against a plain download of the same objects, measured in the same run.

The model (half `executable` in saved_model.pb, half variables, as bench/rewrite_bench.py builds it) is uploaded to
the project's local S3 (moto behind `localcluster.s3server`, which answers ranged GETs from the stored object, so a
download in parts costs what it costs against S3, not moto's whole-object read per part). Each contender runs as a
fresh process, three times; we keep the median wall time and the peak RSS of the process (GNU time's %M), and the
bytes it left in scratch space.

Contenders:
  floor      boto3's transfer manager (`download_file`, parallel ranged GETs) of every object into a directory
  two-pass   the rewrite Job before S3 sources were streamed: the same download into a scratch directory (what
             its init container did), then `tf-neuron-auto-multicore` from there into the store; the sum of both
  streamed   `tf-neuron-auto-multicore s3://...`: the S3 objects read in place, written into the store in one pass
  streamed+fsync  the same with `--fsync`, as the operator's Job runs it (each file durable before publication)

Usage: .venv/bin/python bench/s3_source.py [--sizes 256,1024,2048] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from rewrite_bench import build_neuron_model, measure  # noqa: E402

PY = sys.executable
BIN = Path(PY).parent
BUCKET, REGION = "bench-models", "us-west-2"
RUNS = 3
FLOOR = """
import sys, boto3
from pathlib import Path
bucket, prefix, dest = sys.argv[1], sys.argv[2], Path(sys.argv[3])
s3 = boto3.client("s3")
for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
    for item in page.get("Contents", []):
        target = dest / item["Key"][len(prefix):]
        target.parent.mkdir(parents=True, exist_ok=True)
        s3.download_file(bucket, item["Key"], str(target))
"""


def upload(endpoint: str, model: Path, prefix: str) -> None:
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint, region_name=REGION)
    if not any(b["Name"] == BUCKET for b in s3.list_buckets().get("Buckets", [])):
        s3.create_bucket(Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": REGION})
    for path in sorted(p for p in model.rglob("*") if p.is_file()):
        s3.upload_file(str(path), BUCKET, prefix + str(path.relative_to(model)))


def tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def contenders(prefix: str, work: Path) -> dict[str, list[list[str]]]:
    """Each contender's commands, run one after the other; their outputs all go under ``work``."""
    uri = f"s3://{BUCKET}/{prefix}"
    rewrite = [str(BIN / "tf-neuron-auto-multicore")]
    into_store = ["--num_cores", "4", "--new_model_dir", str(work / "store" / "1")]
    return {
        "floor": [[PY, "-c", FLOOR, BUCKET, prefix, str(work / "download")]],
        "two-pass": [
            [PY, "-c", FLOOR, BUCKET, prefix, str(work / "scratch" / "model")],
            [*rewrite, str(work / "scratch" / "model"), *into_store],
        ],
        "streamed": [[*rewrite, uri, *into_store]],
        "streamed+fsync": [[*rewrite, uri, *into_store, "--fsync"]],
    }


def measure_contender(commands: list[list[str]], work: Path) -> dict[str, float]:
    times, peaks, scratch = [], [], []
    for _ in range(RUNS):
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        runs = [measure(argv) for argv in commands]
        times.append(sum(seconds for seconds, _ in runs))
        peaks.append(max(peak for _, peak in runs))
        scratch.append(tree_bytes(work / "scratch") if (work / "scratch").exists() else 0)
    shutil.rmtree(work, ignore_errors=True)
    return {
        "seconds": statistics.median(times),
        "peak_mib": statistics.median(peaks),
        "scratch_mib": statistics.median(scratch) / (1 << 20),
    }


def run(sizes: list[int], tmp: Path) -> list[dict]:
    from localcluster import s3server

    rows = []
    with s3server.running(tmp / "s3.log") as endpoint:
        os.environ |= {
            "AWS_ENDPOINT_URL_S3": endpoint,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench",
        }
        for size in sizes:
            model = build_neuron_model(tmp / f"model-{size}", size)
            prefix = f"model-{size}/"
            upload(endpoint, model, prefix)
            shutil.rmtree(model)
            row: dict = {"size_mib": size}
            for name, commands in contenders(prefix, tmp / "work").items():
                row[name] = measure_contender(commands, tmp / "work")
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    """One line per model size and contender: time, its ratio to the floor, peak RSS, scratch bytes."""
    lines = ["| model | contender | time | / floor | peak RSS | scratch |", "|---|---|---|---|---|---|"]
    for row in rows:
        floor = row["floor"]["seconds"]
        for name in ("floor", "two-pass", "streamed", "streamed+fsync"):
            r = row[name]
            lines.append(
                f"| {row['size_mib']} MiB | {name} | {r['seconds']:.2f} s | {r['seconds'] / floor:.2f}x | "
                f"{r['peak_mib']:.0f} MiB | {r['scratch_mib']:.0f} MiB |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="256,1024,2048", help="model sizes in MiB")
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="s3-source-bench-", dir=os.environ.get("BENCH_TMP")) as tmp:
        rows = run([int(s) for s in args.sizes.split(",")], Path(tmp))
    print(table(rows))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
