"""Benchmark of a rewrite from a remote source (S3, or an http archive) against a plain download of the same bytes,
measured in the same run.

The model (half `executable` in saved_model.pb, half variables, as bench/rewrite_bench.py builds it) is uploaded to
the project's local S3 (moto behind `localcluster.s3server`, which answers ranged GETs from the stored object, so a
download in parts costs what it costs against S3, not moto's whole-object read per part), and packed as a .tar.gz
(gzip level 1) and a .zip (deflated) served by `localcluster.httpserver` (ranges, ETags). Each contender runs as a
fresh process, three times; we keep the median wall time and the peak RSS of the process (GNU time's %M), and the
bytes it left in scratch space.

Contenders, per source:
  floor      s3: boto3's transfer manager (`download_file`, parallel ranged GETs) of every object into a directory;
             tar.gz: `curl | tar -xzf -` (GNU tar, gzip in its own process); zip: `curl -o` then `unzip`: the least
             it costs to have the model's files on disk from an archive
  download   tar.gz, zip: `curl -o` of the archive alone, for reference (its bytes are compressed; nothing unpacked)
  two-pass   the rewrite Job before sources were streamed: its init container's download into a scratch directory
             (for an archive, then extracted there), then `tf-neuron-auto-multicore` from there into the store
  streamed   `tf-neuron-auto-multicore s3://... | http://...`: read in place (S3) or unpacked beside the output as it
             downloads (archives), written into the store in one pass
  streamed+fsync  the same with `--fsync`, as the operator's Job runs it (each file durable before publication)

Usage: .venv/bin/python bench/s3_source.py [--sizes 256,1024,2048] [--sources s3,tar.gz,zip] [--out FILE]
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
DOWNLOAD = """
import shutil, sys, tarfile, urllib.request, zipfile
from pathlib import Path
Path(sys.argv[2]).parent.mkdir(parents=True, exist_ok=True)
with urllib.request.urlopen(sys.argv[1]) as response, open(sys.argv[2], "wb") as out:
    shutil.copyfileobj(response, out, 1 << 20)
if len(sys.argv) > 3:  # and extract, as the Job's init container did before archives were streamed
    archive, dest = Path(sys.argv[2]), Path(sys.argv[3])
    unpacked = dest.with_name("unpacked")
    if zipfile.is_zipfile(archive):
        zipfile.ZipFile(archive).extractall(unpacked)
    else:
        tarfile.open(archive).extractall(unpacked, filter="data")
    entries = list(unpacked.iterdir())  # an archive's one top folder is the model
    (entries[0] if len(entries) == 1 and entries[0].is_dir() else unpacked).rename(dest)
"""
SOURCES = ("s3", "tar.gz", "zip")


def upload(endpoint: str, model: Path, prefix: str) -> None:
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint, region_name=REGION)
    if not any(b["Name"] == BUCKET for b in s3.list_buckets().get("Buckets", [])):
        s3.create_bucket(Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": REGION})
    for path in sorted(p for p in model.rglob("*") if p.is_file()):
        s3.upload_file(str(path), BUCKET, prefix + str(path.relative_to(model)))


def tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def contenders(source: str, where: str, work: Path) -> dict[str, list[list[str]]]:
    """Each contender's commands, run one after the other; their outputs all go under ``work``. ``where``: the S3
    prefix, or the archive's URL."""
    rewrite = [str(BIN / "tf-neuron-auto-multicore")]
    into_store = ["--num_cores", "4", "--new_model_dir", str(work / "store" / "1")]
    scratch = work / "scratch" / "model"
    if source == "s3":
        uri = f"s3://{BUCKET}/{where}"
        floor = [PY, "-c", FLOOR, BUCKET, where, str(work / "download")]
        fetch = [PY, "-c", FLOOR, BUCKET, where, str(scratch)]
    else:
        uri = where
        out = work / "download"
        unpack = f"tar -xzf - -C {out}" if source == "tar.gz" else f"cat > {out}.zip && unzip -q {out}.zip -d {out}"
        floor = ["sh", "-c", f"mkdir -p {out} && curl -sSf {uri} | {unpack}"]
        fetch = [PY, "-c", DOWNLOAD, uri, str(work / "scratch" / "archive"), str(scratch)]
    archive = {} if source == "s3" else {"download": [["curl", "-sSf", "-o", str(work / "archive"), uri]]}
    return {
        "floor": [floor],
        **archive,
        "two-pass": [fetch, [*rewrite, str(scratch), *into_store]],
        "streamed": [[*rewrite, uri, *into_store]],
        "streamed+fsync": [[*rewrite, uri, *into_store, "--fsync"]],
    }


def pack(model: Path, www: Path, size: int) -> dict[str, str]:
    """The model as a .tar.gz and a .zip in ``www``: file names by source."""
    import tarfile
    import zipfile

    names = {"tar.gz": f"model-{size}.tar.gz", "zip": f"model-{size}.zip"}
    with tarfile.open(www / names["tar.gz"], "w:gz", compresslevel=1) as tar:
        tar.add(model, arcname="model")
    with zipfile.ZipFile(www / names["zip"], "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for path in sorted(p for p in model.rglob("*") if p.is_file()):
            zf.write(path, str(path.relative_to(model)))
    return names


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


def use_endpoint(endpoint: str) -> None:
    """Point boto3 in this process and in the contenders it starts at the local S3, with credentials it accepts."""
    os.environ |= {
        "AWS_ENDPOINT_URL_S3": endpoint,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
    }


def run(sizes: list[int], sources: list[str], tmp: Path) -> list[dict]:
    from localcluster import httpserver, s3server

    rows = []
    (tmp / "www").mkdir()
    with s3server.running(tmp / "s3.log") as endpoint, httpserver.serving(tmp / "www") as www:
        use_endpoint(endpoint)
        for size in sizes:
            model = build_neuron_model(tmp / f"model-{size}", size)
            prefix = f"model-{size}/"
            if "s3" in sources:
                upload(endpoint, model, prefix)
            archives = pack(model, www.root, size)
            shutil.rmtree(model)
            for source in sources:
                where = prefix if source == "s3" else f"{www.url}/{archives[source]}"
                row: dict = {"size_mib": size, "source": source}
                for name, commands in contenders(source, where, tmp / "work").items():
                    row[name] = measure_contender(commands, tmp / "work")
                rows.append(row)
                print(json.dumps(row), flush=True)
            for name in archives.values():
                (www.root / name).unlink()
    return rows


def table(rows: list[dict]) -> str:
    """One line per model size and contender: time, its ratio to the floor, peak RSS, scratch bytes."""
    lines = ["| model | source | contender | time | / floor | peak RSS | scratch |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        floor = row["floor"]["seconds"]
        for name in ("floor", "download", "two-pass", "streamed", "streamed+fsync"):
            if name not in row:
                continue
            r = row[name]
            lines.append(
                f"| {row['size_mib']} MiB | {row['source']} | {name} | {r['seconds']:.2f} s | "
                f"{r['seconds'] / floor:.2f}x | {r['peak_mib']:.0f} MiB | {r['scratch_mib']:.0f} MiB |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="256,1024,2048", help="model sizes in MiB")
    parser.add_argument("--sources", default=",".join(SOURCES), help=f"some of {', '.join(SOURCES)}")
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="s3-source-bench-", dir=os.environ.get("BENCH_TMP")) as tmp:
        rows = run([int(s) for s in args.sizes.split(",")], args.sources.split(","), Path(tmp))
    print(table(rows))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
