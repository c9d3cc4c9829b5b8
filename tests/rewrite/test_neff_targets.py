"""What each NeuronOp was compiled for: read from its NEFF header and attributes, reported, and refused when it
cannot be one thing (issue 25)."""

from __future__ import annotations

import json
import os
import re
import tracemalloc
from pathlib import Path

import pytest

from neuron_modelgen import Options, build_model
from neuron_rewrite import RewriteReport, inspect_model, neff, wire
from neuron_rewrite.cli import main
from neuron_rewrite.marker import MARKER_FILE
from neuron_rewrite.neff import V1, V2, V3
from neuron_rewrite.report import ModelReport, NeuronOpInfo
from synthetic_models import tree_digest

COMPILER = "2.12.68.0+4480452af"
# NEFF 2.0 decides nothing: the runtime release notes' NEFF Support Table has 2.0 NEFFs loadable on Inf1 already.
NEFF_2_WORDS = (
    "NEFF 2.0 is written by neuronx-cc, but the Neuron runtime has loaded 2.0 NEFFs since 1.6.5.0 (Neuron 1.14.1, "
    'Inf1 only: "Starting support for 2.0 NEFFs"), so says nothing'
)
MIB = 1 << 20


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each model built once per session; tests copy nothing, as the rewrite never writes its input."""
    root = tmp_path_factory.mktemp("target-models")
    options = {
        V1: Options(kind="tf1", target=V1, instance_type="inf1.xlarge"),
        # NEFF 2.0 decides nothing: only _instance_type (written by --extract-weights) tells NeuronCore-v2.
        V2: Options(target=V2, compiler=COMPILER, instance_type="inf2.xlarge"),
        V3: Options(kind="tf1", target=V3, compiler="2.21.0.0+abc"),
        "unknown": Options(kind="tf1"),
        "neuronx": Options(target=V2, compiler=COMPILER),  # tensorflow-neuronx without --extract-weights
        "mixed": Options(target=V1, last_op_target=V3),
        "contradiction": Options(kind="tf1", target=V1, instance_type="inf2.xlarge"),
    }
    built = {name: build_model(root / name.replace("NeuronCore-", ""), o) for name, o in options.items()}
    base = root / "base"
    base.mkdir()
    built["base"] = base
    build_model(base / "1", options[V1])
    build_model(base / "2", Options(kind="tf1", target=V2, compiler=COMPILER, instance_type="inf2.xlarge"))
    return built


def run(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def header(version: tuple[int, int], lnc_size: int = 0) -> neff.NeffHeader:
    parsed = neff.parse_header(neff.build_header(version=version, data_size=0, lnc_size=lnc_size))
    assert parsed is not None
    return parsed


def test_build_header_round_trips_through_parse_header() -> None:
    data = neff.build_header(
        version=(2, 0), data_size=12345, build_version=COMPILER, num_tpb=4, lnc_size=2, pkg_version=2
    )
    assert len(data) == neff.HEADER_SIZE
    parsed = neff.parse_header(data + b"payload")
    assert parsed == neff.NeffHeader(
        pkg_version=2,
        data_size=12345,
        version_major=2,
        version_minor=0,
        build_version=COMPILER,
        num_tpb=4,
        requested_tpb_count=0,
        max_tpb_per_node=0,
        feature_bits=0,
        lnc_size=2,
    )
    assert neff.parse_header(neff.build_header(version=(0, 6), data_size=0)).build_version is None  # none written
    assert neff.parse_header(data[:-1]) is None  # shorter than the header
    with pytest.raises(ValueError, match="128-byte"):
        neff.build_header(version=(2, 0), data_size=0, build_version="x" * 128)


@pytest.mark.parametrize(
    ("neff_header", "instance_type", "target", "evidence"),
    [
        (None, "inf1.xlarge", V1, "'inf1.xlarge' is an instance of family inf1"),
        (None, "inf2.24xlarge", V2, "family inf2"),
        (None, "trn1.32xlarge", V2, "family trn1"),
        (None, "trn1n.32xlarge", V2, "family trn1n"),
        (((0, 6), 0), None, V1, "NEFF 0.6 is only written by neuron-cc"),
        (((2, 0), 2), None, V3, "lnc_size 2 exists only on Trn2"),
        (((2, 0), 1), "inf2.xlarge", V2, "family inf2"),
        (((2, 0), 1), "trn1.32xlarge", V2, "NEFF 2.0 is written by neuronx-cc, but"),
        # NEFF 2.0 was loadable on Inf1 (runtime 1.6.5.0): with an inf1 _instance_type it is no contradiction.
        (((2, 0), 0), "inf1.xlarge", V1, "family inf1"),
        (((2, 0), 0), "inf1.32xlarge", V1, "family inf1"),  # the type tensorflow-neuron's own core counts name
        (((1, 0), 0), "trn1.2xlarge", V2, "NEFF 1.0 is written by neuron-cc (Inf1), but no public source"),
        # Undecided: each piece says nothing.
        (((2, 0), 1), None, None, NEFF_2_WORDS),
        (((2, 1), 1), None, None, "NEFF 2.1 is written by neuronx-cc, but the Neuron runtime has loaded 2.0 NEFFs"),
        (((1, 0), 0), None, None, "NEFF 1.0 is written by neuron-cc (Inf1), but no public source says only by it"),
        (((7, 1), 0), None, None, "NEFF 7.1 is a version no public source maps"),
        (None, None, None, "no NEFF header"),
        (None, "trn2.48xlarge", None, "no instance type tensorflow-neuron writes"),
    ],
)
def test_classify_concludes_only_from_decisive_evidence(
    neff_header: tuple[tuple[int, int], int] | None, instance_type: str | None, target: str | None, evidence: str
) -> None:
    found = neff.classify(None if neff_header is None else header(*neff_header), instance_type)
    assert found.target == target
    assert evidence in found.evidence


@pytest.mark.parametrize(
    ("neff_header", "instance_type", "first", "second"),
    [
        (((0, 6), 0), "inf2.xlarge", "'inf2.xlarge'", "NEFF 0.6"),
        (((2, 0), 2), "inf1.xlarge", "'inf1.xlarge'", "lnc_size 2"),
        (((0, 6), 2), None, "NEFF 0.6", "lnc_size 2"),
        (((2, 0), 2), "trn1.2xlarge", "'trn1.2xlarge'", "lnc_size 2"),
    ],
)
def test_classify_refuses_contradicting_evidence(
    neff_header: tuple[tuple[int, int], int], instance_type: str | None, first: str, second: str
) -> None:
    with pytest.raises(neff.ContradictoryEvidence) as raised:
        neff.classify(header(*neff_header), instance_type)
    assert first in raised.value.first and second in raised.value.second


@pytest.mark.parametrize("inspect", [True, False])
def test_op_contradicting_itself_is_refused_naming_node_and_both_pieces(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], inspect: bool
) -> None:
    args = ["--inspect"] if inspect else ["--num_cores", 2, "--new_model_dir", tmp_path / "out"]
    code, out, err = run(capsys, models["contradiction"], *args)
    assert code == 3 and out == ""
    assert "NeuronOp 'neuron_op_0' in meta graph 0 contradicts itself" in err
    assert "_instance_type 'inf2.xlarge' is an instance of family inf2 (NeuronCore-v2), but NEFF 0.6" in err
    assert list(tmp_path.iterdir()) == []


def test_mixed_model_is_refused_by_the_rewrite_naming_two_ops(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = tree_digest(models["mixed"])
    code, out, err = run(capsys, models["mixed"], "--num_cores", 2, "--new_model_dir", tmp_path / "out")
    assert code == 3 and out == ""
    first, second = r"NeuronOp 'neuron_op_0' in function __inference_\w+", r"NeuronOp 'neuron_op_3' in function \S+"
    assert re.search(rf"{first} was compiled for {V1} \(NEFF 0\.6.*but {second} for {V3} \(NEFF 2\.0", err), err
    assert "recompile all of it for one generation" in err
    assert list(tmp_path.iterdir()) == []
    assert tree_digest(models["mixed"]) == before


def test_mixed_model_is_reported_by_inspect(models: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, models["mixed"], "--inspect", "--json")
    assert code == 0, err
    model = json.loads(out)["models"][0]
    assert [op["target"] for op in model["neuron_ops"]] == [V1, V1, V1, V3]
    assert model["target"] is None and model["target_evidence"].startswith("mixed targets: NeuronOp 'neuron_op_0'")
    code, out, _ = run(capsys, models["mixed"], "--inspect")
    assert code == 0 and "target unknown: mixed targets" in out


EXPECTED = {
    V1: (V1, "1 of 1 NeuronOp(s): _instance_type 'inf1.xlarge' is an instance of family inf1", None, 1),
    V2: (
        V2,
        f"4 of 4 NeuronOp(s): _instance_type 'inf2.xlarge' is an instance of family inf2 ({V2}); {NEFF_2_WORDS}",
        COMPILER,
        4,
    ),
    V3: (V3, f"1 of 1 NeuronOp(s): {NEFF_2_WORDS}", "2.21.0.0+abc", 1),
    "neuronx": (None, f"unknown for all 4 NeuronOp(s): {NEFF_2_WORDS}", COMPILER, 4),
    "unknown": (None, "unknown for all 1 NeuronOp(s): no NEFF header (header_size", None, 1),
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_target_in_inspect_report_file_and_reuse(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    target, evidence, compiler, ops = EXPECTED[name]
    code, out, err = run(capsys, models[name], "--inspect", "--json")
    assert code == 0, err
    report = json.loads(out)
    model = report["models"][0]
    assert (model["target"], model["compiler"]) == (target, compiler)
    assert model["target_evidence"].startswith(evidence)
    assert [(op["target"], op["compiler"]) for op in model["neuron_ops"]] == [(target, compiler)] * ops
    assert all(op["target_evidence"] in model["target_evidence"] for op in model["neuron_ops"])
    assert (report["target"], report["target_evidence"], report["compiler"]) == (
        target,
        model["target_evidence"],
        compiler,
    )
    code, out, _ = run(capsys, models[name], "--inspect")
    assert code == 0
    assert out.splitlines()[1].split()[-1] == "TARGET"
    assert out.splitlines()[2].split()[-1] == (target or "unknown")
    assert (f"target {target}" if target else "target unknown: unknown for all") in out

    summaries = []
    for _ in range(2):  # the second run reuses the first's output, reading nothing of the source
        args = ["--num_cores", 2, "--new_model_dir", tmp_path / "out", "--rewrite_id", "r1"]
        code, out, err = run(capsys, models[name], *args, "--report_file", tmp_path / "report")
        assert code == 0, err
        summaries.append(json.loads((tmp_path / "report").read_text()))
    assert [s["reused"] for s in summaries] == [False, True]
    for summary in summaries:
        assert (summary["target"], summary["compiler"]) == (target, compiler)
        assert summary["targetEvidence"] == model["target_evidence"]
    assert (f"target {target}" if target else "target unknown: unknown for all") in out  # the reuse's own line


def test_old_marker_without_target_is_still_reused(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [models[V2], "--num_cores", 2, "--new_model_dir", tmp_path / "out", "--rewrite_id", "r1"]
    assert run(capsys, *args)[0] == 0
    marker_path = tmp_path / "out" / MARKER_FILE
    marker = json.loads(marker_path.read_text())
    assert (marker["target"], marker["compiler"]) == (V2, COMPILER)
    old = {k: v for k, v in marker.items() if k not in ("target", "targetEvidence", "compiler")}
    marker_path.write_text(json.dumps(old))
    code, out, err = run(capsys, *args, "--report_file", tmp_path / "report")
    assert code == 0, err
    summary = json.loads((tmp_path / "report").read_text())
    assert summary["reused"] is True and summary["neuronOps"] == 4
    assert (summary["target"], summary["targetEvidence"], summary["compiler"]) == (None, None, None)
    assert "target unknown: not recorded" in out
    assert json.loads(marker_path.read_text()) == old  # left as it was


def test_base_path_whose_versions_differ(models: dict[str, Path], tmp_path: Path) -> None:
    from neuron_rewrite import rewrite_model

    report = rewrite_model(models["base"], tmp_path / "all", 2)
    assert [m.target for m in report.models] == [V1, V2]
    summary = report.summary()
    assert summary["target"] is None and summary["compiler"] == COMPILER
    assert summary["targetEvidence"].startswith(f"mixed targets: version 1 was compiled for {V1}")
    assert f"but version 2 for {V2}" in report.target_evidence
    latest = rewrite_model(models["base"], tmp_path / "latest", 2, select_version="latest").summary()
    assert (latest["target"], latest["compiler"]) == (V2, COMPILER)


def test_summary_stays_small_with_long_compilers_and_many_ops() -> None:
    ops = [
        NeuronOpInfo(
            0, f"__inference_ƒunction_{i}" * 20, f"node_☃_{i}" * 30, None, 1, 4096, V2, "é" * 900, f"{i}" * 127
        )
        for i in range(2000)
    ]
    model = ModelReport("/m", None, ops, target=None, target_evidence="ü" * 5000 + "\U0001f600" * 100)
    report = RewriteReport("/m", "/out", 2, [model], rewrite_id="x" * 63, format_version=1)
    summary = report.summary()
    line = json.dumps(summary, separators=(",", ":")) + "\n"
    assert len(line.encode()) < 2048, len(line)
    assert summary["targetEvidence"].endswith("...") and summary["compiler"].endswith("...")
    assert summary["compiler"].startswith("0" * 127 + ", ")  # cut at the end: the first version stays readable


def test_summary_keeps_short_text_whole(models: dict[str, Path]) -> None:
    report = inspect_model(models[V2])
    assert report.summary()["targetEvidence"] == report.target_evidence
    assert report.summary()["compiler"] == COMPILER


def test_only_the_head_of_a_large_executable_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    size = 64 * MIB
    options = Options(kind="tf1", target=V2, compiler=COMPILER, instance_type="inf2.xlarge", executable_bytes=size)
    model = build_model(tmp_path / "large", options)
    assert (model / "saved_model.pb").stat().st_size > size
    read = []
    real_pread = os.pread

    def counting_pread(fd: int, length: int, offset: int) -> bytes:
        data = real_pread(fd, length, offset)
        read.append(len(data))
        return data

    monkeypatch.setattr(wire.os, "pread", counting_pread)
    tracemalloc.start()
    try:
        report = inspect_model(model)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    (op,) = report.models[0].neuron_ops
    assert (op.executable_bytes, op.target, op.compiler) == (size, V2, COMPILER)
    assert 0 < sum(read) < MIB, sum(read)
    assert peak < 2 * MIB, peak
