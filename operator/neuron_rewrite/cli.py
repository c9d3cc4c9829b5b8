"""``tf-neuron-auto-multicore``: the command line of AWS's tool, plus inspection and a JSON report."""

from __future__ import annotations

import argparse
import json
import sys
from typing import NoReturn

from .errors import EXIT_CODES, RewriteError, UsageError
from .marker import MARKER_FILE
from .report import RewriteReport
from .rewrite import inspect_model, rewrite_model

PROG = "tf-neuron-auto-multicore"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, like every other refusal of this tool (argparse would print the usage block first).
        self.exit(UsageError.exit_code, f"{self.prog}: error: {message} (see --help)\n")


def _parser() -> argparse.ArgumentParser:
    codes = "\n".join(f"  {code}  {meaning}" for code, meaning in sorted(EXIT_CODES.items()))
    parser = _Parser(
        prog=PROG,
        description=(
            "Tag every NeuronOp of a Neuron-compiled TensorFlow SavedModel with _automatic_multicore=NUM_CORES, so "
            "the Neuron runtime replicates the model on that many NeuronCores. MODEL_DIR is a SavedModel directory "
            "or a TF Serving base path with numbered version folders (each version is rewritten into the same "
            "numbered folder of NEW_MODEL_DIR, unless --select_version picks one). The input is never modified; the "
            "output appears atomically or not at all."
        ),
        epilog=(
            f"With --rewrite_id, the output holds a completion marker, {MARKER_FILE}, published in the same rename "
            "as the model; a later run with the same ID and NUM_CORES finds it, writes nothing and succeeds, even "
            "with --force and without MODEL_DIR. --report_file is written after a success only; if it cannot be "
            f"written the exit code is 1, though the model is published.\n\nexit codes:\n{codes}"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "model_dir",
        metavar="MODEL_DIR",
        help="compiled SavedModel directory or TF Serving base path: on disk, at s3://bucket/prefix (read in place, "
        "with the environment's AWS credentials and region), or in an http(s):// .tar.gz, .tgz, .tar or .zip archive "
        "(unpacked beside NEW_MODEL_DIR as it downloads)",
    )
    parser.add_argument("--num_cores", type=int, metavar="NUM_CORES", help="NeuronCores to replicate on (>= 1)")
    parser.add_argument("--new_model_dir", metavar="NEW_MODEL_DIR", help="where to write the rewritten model")
    parser.add_argument("--inspect", action="store_true", help="list the NeuronOps and write nothing (dry run)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON on standard output")
    parser.add_argument("--force", action="store_true", help="replace NEW_MODEL_DIR if it exists")
    parser.add_argument(
        "--allow-no-neuron-ops",
        action="store_true",
        help="copy a model without any NeuronOp instead of refusing it",
    )
    parser.add_argument(
        "--recompute-fingerprint",
        action="store_true",
        help="write a fresh fingerprint.pb with TensorFlow (slow; by default the stale one is dropped)",
    )
    parser.add_argument("--fsync", action="store_true", help="make the output durable on disk before publishing it")
    parser.add_argument(
        "--select_version",
        metavar="VERSION",
        help="from a base path, rewrite only VERSION ('latest': the highest number, as TF Serving picks) into "
        "NEW_MODEL_DIR itself, without reading the other versions; a SavedModel MODEL_DIR is its own 'latest'",
    )
    parser.add_argument(
        "--rewrite_id",
        metavar="ID",
        help="mark the output as published by rewrite ID; if NEW_MODEL_DIR already holds that mark for NUM_CORES, "
        "keep it as it is and succeed",
    )
    parser.add_argument(
        "--report_file",
        metavar="PATH",
        help="after success, write a one-line JSON summary (no per-op list) to PATH, e.g. /dev/termination-log",
    )
    return parser


def _size(size: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def _target(target: str | None, evidence: str | None, compiler: str | None) -> str:
    if target is None:
        return f"target unknown: {evidence or 'not recorded'}"
    return f"target {target}" + (f", compiler {compiler}" if compiler else "")


def _format(report: RewriteReport) -> str:
    lines = []
    for model in report.models:
        where = model.path + (f" (version {model.version})" if model.version else "")
        found = f"{len(model.neuron_ops)} NeuronOp node(s), fingerprint.pb {model.fingerprint}"
        lines.append(f"{where}: {found}; {_target(model.target, model.target_evidence, model.compiler)}")
        rows = [("META", "FUNCTION", "NODE", "TAG", "PIPELINE", "EXECUTABLE", "TARGET")]
        rows += [
            (
                str(op.meta_graph),
                op.function or "-",
                op.node,
                "-" if op.automatic_multicore is None else str(op.automatic_multicore),
                "-" if op.pipeline_size is None else str(op.pipeline_size),
                _size(op.executable_bytes),
                op.target or "unknown",
            )
            for op in model.neuron_ops
        ]
        if len(rows) > 1:
            widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
            lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    tagged = f"{report.neuron_op_count} NeuronOp node(s) tagged for {report.num_cores} core(s)"
    from_version = "" if report.source_version is None else f" from version {report.source_version}"
    if report.reused:
        earlier = f"published earlier by rewrite {report.rewrite_id}{from_version}"
        target = _target(report.target, report.target_evidence, report.compiler)
        lines.append(f"reused {report.output}: {earlier}, {tagged}; {target}")
    elif report.output:
        origin = f"{from_version} of {report.source}" if from_version else ""
        written = f"{_size(report.bytes_written)} in {report.seconds:.1f} s"
        lines.append(f"wrote {report.output}{origin}: {tagged}, {written}")
    elif from_version:
        lines.append(f"selected version {report.source_version} of {report.source}")
    return "\n".join(lines)


def _write_report_file(path: str, report: RewriteReport) -> None:
    """Kubernetes keeps at most 4096 bytes of a termination message: the summary is one short line."""
    try:
        with open(path, "w", encoding="utf-8") as file:
            file.write(json.dumps(report.summary(), separators=(",", ":")) + "\n")
    except OSError as exc:
        raise RewriteError(
            f"{path}: cannot write the report ({exc.strerror or exc}); the model is published at {report.output} "
            "all the same"
        ) from None


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.inspect and (args.rewrite_id is not None or args.report_file is not None):
        parser.error("--rewrite_id and --report_file apply to a rewrite, not to --inspect")
    try:
        if args.inspect:
            report = inspect_model(args.model_dir, select_version=args.select_version)
        else:
            if args.num_cores is None or args.new_model_dir is None:
                parser.error("--num_cores and --new_model_dir are required unless --inspect is given")
            report = rewrite_model(
                args.model_dir,
                args.new_model_dir,
                args.num_cores,
                force=args.force,
                allow_no_neuron_ops=args.allow_no_neuron_ops,
                recompute_fingerprint=args.recompute_fingerprint,
                fsync=args.fsync,
                select_version=args.select_version,
                rewrite_id=args.rewrite_id,
            )
            if args.report_file is not None:
                # Before anything is printed: a failure here ends as one error line, like any other.
                _write_report_file(args.report_file, report)
    except RewriteError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(json.dumps(report.to_dict(), indent=2) if args.json else _format(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
