"""What the operator's rewrite Job relies on: one selected version (--select_version), publication once with a
completion marker (--rewrite_id), and a short summary for the termination message (--report_file)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import neuron_rewrite.rewrite
from neuron_modelgen import Options, build_model, read_saved_model
from neuron_rewrite import FORMAT_VERSION, MARKER_FILE, RewriteError, inspect_model, rewrite_model
from synthetic_models import TAG, all_nodes, saved_model, tree_digest, without_tags, write_model

CLI = [sys.executable, "-m", "neuron_rewrite"]
PREFIX = "tf-neuron-auto-multicore: error: "
SUMMARY_KEYS = {
    "formatVersion",
    "rewriteId",
    "numCores",
    "sourceVersion",
    "neuronOps",
    "bytesWritten",
    "seconds",
    "reused",
    "output",
    "target",
    "targetEvidence",
    "compiler",
}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Built once; tests copy what they change. Version 1 (TF1) has 1 NeuronOp, version 3 (TF2) has 4."""
    root = tmp_path_factory.mktemp("models")
    build_model(root / "base" / "1", Options(kind="tf1"))
    build_model(root / "base" / "3", Options(kind="tf2"))
    build_model(root / "pipelined", Options(pipeline=4))
    return {"base": root / "base", "saved_model": root / "base" / "3", "pipelined": root / "pipelined"}


def cli(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True)


def rewrite(src: Path, out: Path, *args: object) -> subprocess.CompletedProcess[str]:
    return cli(src, "--num_cores", 2, "--new_model_dir", out, *args)


def assert_refused(result: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    assert result.returncode == code, (result.returncode, result.stderr)
    assert result.stderr.startswith(PREFIX) and result.stderr.count("\n") == 1, result.stderr
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr)
    assert result.stdout == ""


def tagged_ops(model_dir: Path) -> list[int]:
    return [n.attr[TAG].i for n in all_nodes(read_saved_model(model_dir)) if n.op == "NeuronOp"]


def marker(out: Path) -> dict:
    return json.loads((out / MARKER_FILE).read_text())


def snapshot(root: Path) -> dict[str, tuple[int, int, str]]:
    """Every path's inode, modification time and content: equal snapshots mean nothing was replaced or rewritten."""
    entries = {".": "dir", **tree_digest(root)}
    return {rel: (os.lstat(root / rel).st_ino, os.lstat(root / rel).st_mtime_ns, d) for rel, d in entries.items()}


def file_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


# --select_version -------------------------------------------------------------------------------------------------


def test_latest_version_of_a_base_path_becomes_the_output_itself(models: dict[str, Path], tmp_path: Path) -> None:
    base, out = models["base"], tmp_path / "out"
    before = tree_digest(base)
    result = rewrite(base, out, "--select_version", "latest", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["source_version"] == 3 and [m["version"] for m in report["models"]] == ["3"]
    assert report["neuron_op_count"] == 4 and report["models"][0]["path"] == str(out)
    assert tagged_ops(out) == [2] * 4  # version 3 (4 NeuronOps), not version 1 (1 NeuronOp)
    expected = {rel: d for rel, d in tree_digest(base / "3").items() if rel not in ("saved_model.pb", "fingerprint.pb")}
    written = tree_digest(out)
    assert {rel: written[rel] for rel in expected} == expected, "the version's other files, byte for byte"
    assert set(written) == {*expected, "saved_model.pb"}, "no version folder, no marker without --rewrite_id"
    assert report["bytes_written"] == file_bytes(out) and report["seconds"] >= 0
    assert tree_digest(base) == before, "the input is never modified"


def test_an_explicit_version_is_selected(models: dict[str, Path], tmp_path: Path) -> None:
    result = rewrite(models["base"], tmp_path / "out", "--select_version", "1")
    assert result.returncode == 0, result.stderr
    assert f"wrote {tmp_path / 'out'} from version 1 of {models['base']}: 1 NeuronOp" in result.stdout
    assert without_tags(read_saved_model(tmp_path / "out")) == without_tags(read_saved_model(models["base"] / "1"))
    report = rewrite_model(models["base"], tmp_path / "api", 4, select_version=3)
    assert report.source_version == 3 and tagged_ops(tmp_path / "api") == [4] * 4


def test_a_missing_version_is_refused_naming_those_present(models: dict[str, Path], tmp_path: Path) -> None:
    result = rewrite(models["base"], tmp_path / "out", "--select_version", "2")
    assert_refused(result, 3, str(models["base"]), "no version 2", "versions present: 1, 3")
    assert list(tmp_path.iterdir()) == []


def test_a_newest_child_that_is_a_file_is_refused(models: dict[str, Path], tmp_path: Path) -> None:
    """TF Serving counts every integer-named child as a version, a file too: 'latest' is then no SavedModel."""
    base = shutil.copytree(models["base"], tmp_path / "base")
    (base / "7").write_text("release notes")
    before = tree_digest(tmp_path)
    result = rewrite(base, tmp_path / "out", "--select_version", "latest")
    assert_refused(result, 3, f"{base / '7'}: version 7", "expected a directory with saved_model.pb directly inside")
    assert tree_digest(tmp_path) == before
    assert rewrite(base, tmp_path / "out", "--select_version", "3").returncode == 0


def test_a_broken_older_version_is_not_read(models: dict[str, Path], tmp_path: Path) -> None:
    base = shutil.copytree(models["base"], tmp_path / "base")
    (base / "1" / "saved_model.pb").write_bytes(b"\xff" * 20)
    os.symlink("/etc/passwd", base / "1" / "variables" / "outside")
    (base / "2" / "variables").mkdir(parents=True)  # an upload that never finished
    result = rewrite(base, tmp_path / "out", "--select_version", "latest", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["source_version"] == 3
    assert rewrite(base, tmp_path / "all", "--json").returncode == 3, "every version is read without the flag"


def test_a_saved_model_is_its_own_latest_and_has_no_numbered_version(models: dict[str, Path], tmp_path: Path) -> None:
    src = models["saved_model"]
    result = rewrite(src, tmp_path / "out", "--select_version", "3")
    assert_refused(result, 3, str(src), "a SavedModel", "not a TF Serving base path", "no version 3")
    assert list(tmp_path.iterdir()) == []
    report = rewrite_model(src, tmp_path / "latest", 2, select_version="latest")
    assert report.source_version is None and report.models[0].version is None
    rewrite_model(src, tmp_path / "plain", 2)
    assert tree_digest(tmp_path / "latest") == tree_digest(tmp_path / "plain")


@pytest.mark.parametrize("value", ["0", "-1", "newest", "1.5", "", "LATEST"])
def test_a_bad_version_value_is_a_usage_error(models: dict[str, Path], tmp_path: Path, value: str) -> None:
    result = rewrite(models["base"], tmp_path / "out", "--select_version", value)
    assert_refused(result, 2, "select_version must be 'latest' or a positive integer")
    assert list(tmp_path.iterdir()) == []


def test_two_names_of_one_version_are_refused(models: dict[str, Path], tmp_path: Path) -> None:
    base = shutil.copytree(models["base"], tmp_path / "base")
    shutil.copytree(base / "3", base / "03")
    assert_refused(rewrite(base, tmp_path / "out", "--select_version", "latest"), 3, "03 and 3 name the same version 3")


def test_a_selected_version_linked_from_elsewhere_is_refused(models: dict[str, Path], tmp_path: Path) -> None:
    base = shutil.copytree(models["base"], tmp_path / "base")
    shutil.copytree(models["saved_model"], tmp_path / "elsewhere")
    os.symlink(tmp_path / "elsewhere", base / "5")
    result = rewrite(base, tmp_path / "out", "--select_version", "latest")
    assert_refused(result, 3, str(base / "5"), "points outside the model")


def test_inspect_shows_the_selected_version(models: dict[str, Path]) -> None:
    report = inspect_model(models["base"], select_version="latest")
    assert report.source_version == 3 and [m.path for m in report.models] == [str(models["base"] / "3")]
    assert "selected version 1 of" in cli(models["base"], "--inspect", "--select_version", "1").stdout


# --rewrite_id -----------------------------------------------------------------------------------------------------


def test_the_marker_is_published_with_the_model(models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = rewrite(models["base"], out, "--select_version", "latest", "--rewrite_id", "abc123")
    assert result.returncode == 0, result.stderr
    facts = marker(out)
    assert facts == {
        "formatVersion": FORMAT_VERSION,
        "rewriteId": "abc123",
        "numCores": 2,
        "sourceVersion": 3,
        "neuronOps": 4,
        "bytesWritten": file_bytes(out) - (out / MARKER_FILE).stat().st_size,
        "seconds": facts["seconds"],
        "target": None,  # placeholder executables: no NEFF header
        "targetEvidence": facts["targetEvidence"],
        "compiler": None,
        "source": str(models["base"]),
    }
    assert facts["targetEvidence"].startswith("unknown for all 4 NeuronOp(s): no NEFF header")
    assert isinstance(facts["seconds"], float) and facts["seconds"] == round(facts["seconds"], 3)
    assert list(tmp_path.iterdir()) == [out], "no staging directory left beside it"


def test_the_marker_is_the_last_file_synced_before_the_publishing_rename(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[Path] = []
    fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    out = tmp_path / "out"
    rewrite_model(models["base"], out, 2, select_version="latest", rewrite_id="abc", fsync=True)
    at = next(i for i, path in enumerate(synced) if path.name == MARKER_FILE)
    staging = synced[at].parent
    contents = tree_digest(out)
    files = {rel for rel, digest in contents.items() if digest != "dir" and rel != MARKER_FILE}
    assert {str(p.relative_to(staging)) for p in synced[:at]} == files, "every other file synced before the marker"
    dirs = {str(p.relative_to(staging)) for p in synced[at + 1 : -1]}
    assert dirs == {".", *(rel for rel, digest in contents.items() if digest == "dir")}, "then its directories"
    assert synced[-1] == out.parent.resolve(), "then the parent, which makes the rename durable"
    assert staging.parent == out.parent.resolve() and not staging.exists()


def test_a_refused_model_publishes_nothing(models: dict[str, Path], tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    result = rewrite(models["pipelined"], tmp_path / "out", "--rewrite_id", "abc", "--report_file", report)
    assert_refused(result, 4, "--neuroncore-pipeline-cores=4")
    assert list(tmp_path.iterdir()) == [], "no output, no staging directory, no report"


def test_a_failure_before_the_marker_is_written_publishes_nothing(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(directory: Path, *_: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory / MARKER_FILE))

    monkeypatch.setattr(neuron_rewrite.rewrite, "write_marker", disk_full)
    with pytest.raises(RewriteError, match="No space left on device"):
        rewrite_model(models["saved_model"], tmp_path / "out", 2, rewrite_id="abc")
    assert list(tmp_path.iterdir()) == [], "a model without its marker is never published"


@pytest.mark.parametrize("force", [False, True])
def test_the_same_rewrite_reuses_the_output_untouched(models: dict[str, Path], tmp_path: Path, force: bool) -> None:
    out = tmp_path / "out"
    assert rewrite(models["base"], out, "--select_version", "latest", "--rewrite_id", "abc").returncode == 0
    before, source = snapshot(out), tree_digest(models["base"])
    flags = ["--select_version", "latest", "--rewrite_id", "abc", *(["--force"] if force else [])]
    again = rewrite(models["base"], out, *flags)
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith(
        f"reused {out}: published earlier by rewrite abc from version 3, 4 NeuronOp node(s) tagged for 2 core(s); "
        "target unknown: unknown for all 4 NeuronOp(s): no NEFF header"
    )
    assert snapshot(out) == before, "byte for byte and inode for inode"
    assert list(tmp_path.iterdir()) == [out]
    assert tree_digest(models["base"]) == source


def test_reuse_needs_no_source(models: dict[str, Path], tmp_path: Path) -> None:
    src, out = shutil.copytree(models["base"], tmp_path / "src"), tmp_path / "store" / "out"
    rewrite_model(src, out, 2, select_version="latest", rewrite_id="abc", fsync=True)
    published, before = marker(out), snapshot(out)
    shutil.rmtree(src)
    result = rewrite(src, out, "--select_version", "latest", "--rewrite_id", "abc", "--force", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["reused"] is True and report["models"] == []
    facts = {key: report[key] for key in ("source_version", "neuron_op_count", "bytes_written")}
    assert facts == {"source_version": 3, "neuron_op_count": 4, "bytes_written": published["bytesWritten"]}
    assert snapshot(out) == before


@pytest.mark.parametrize("existing", ["other id", "other cores", "no marker", "unreadable marker"])
def test_another_output_is_refused_without_force(models: dict[str, Path], tmp_path: Path, existing: str) -> None:
    src, out = models["saved_model"], tmp_path / "out"
    earlier_id = {"other id": "other", "no marker": None}.get(existing, "x")
    rewrite_model(src, out, 4 if existing == "other cores" else 2, rewrite_id=earlier_id)
    if existing == "unreadable marker":
        (out / MARKER_FILE).write_text('{"rewriteId": "x", "numCores": 2')
    before = snapshot(out)
    assert_refused(rewrite(src, out, "--rewrite_id", "x"), 5, f"{out}: already exists (use --force")
    assert snapshot(out) == before
    result = rewrite(src, out, "--rewrite_id", "x", "--force", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["reused"] is False
    assert (marker(out)["rewriteId"], marker(out)["numCores"]) == ("x", 2) and tagged_ops(out) == [2] * 4


def test_a_twin_run_that_published_first_is_kept(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two pods of one Job can overlap: the one that finishes second keeps what the first published."""
    src, out = models["saved_model"], tmp_path / "out"
    write_model_file = neuron_rewrite.rewrite._write_model
    twin_started = False
    published: dict[str, tuple[int, int, str]] = {}

    def write_while_a_twin_publishes(*args: object) -> None:
        nonlocal twin_started
        write_model_file(*args)
        if not twin_started:
            twin_started = True
            rewrite_model(src, out, 2, rewrite_id="abc")
            published.update(snapshot(out))

    monkeypatch.setattr(neuron_rewrite.rewrite, "_write_model", write_while_a_twin_publishes)
    report = rewrite_model(src, out, 2, rewrite_id="abc", force=True)
    assert published and report.reused and report.neuron_op_count == 4
    assert snapshot(out) == published
    assert list(tmp_path.iterdir()) == [out], "the second run's staging directory is gone"


def test_a_marker_in_the_input_is_not_copied(models: dict[str, Path], tmp_path: Path) -> None:
    """An earlier output used as input: its marker vouches for it, not for a copy (that may differ in cores)."""
    rewrite_model(models["saved_model"], tmp_path / "first", 2, rewrite_id="abc")
    rewrite_model(tmp_path / "first", tmp_path / "plain", 4)
    assert not (tmp_path / "plain" / MARKER_FILE).exists()
    rewrite_model(tmp_path / "first", tmp_path / "marked", 4, rewrite_id="def")
    assert (marker(tmp_path / "marked")["rewriteId"], marker(tmp_path / "marked")["numCores"]) == ("def", 4)


@pytest.mark.parametrize("flag", ["--rewrite_id", "--report_file"])
def test_inspect_refuses_the_flags_of_a_rewrite(models: dict[str, Path], tmp_path: Path, flag: str) -> None:
    assert_refused(cli(models["saved_model"], "--inspect", flag, tmp_path / "x"), 2, flag, "--inspect")
    assert list(tmp_path.iterdir()) == []


# --report_file ----------------------------------------------------------------------------------------------------


def test_the_report_file_is_one_short_line_whatever_the_model(tmp_path: Path) -> None:
    src = write_model(tmp_path / "m", saved_model(meta_graphs=4, functions=250))  # 1004 NeuronOps
    out, report_file = tmp_path / "store" / "out", tmp_path / "termination-log"
    result = rewrite(src, out, "--rewrite_id", "abc", "--report_file", report_file, "--json")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout) > 100_000, "the full report lists every op"
    data = report_file.read_bytes()
    assert len(data) < 4096 and data.endswith(b"\n") and data.count(b"\n") == 1
    summary = json.loads(data)
    assert set(summary) == SUMMARY_KEYS and (summary["reused"], summary["output"]) == (False, str(out))
    published = {key: value for key, value in marker(out).items() if key != "source"}
    assert {key: summary[key] for key in published} == published, "the marker's facts, the same values"
    assert (summary["neuronOps"], summary["rewriteId"], summary["sourceVersion"]) == (1004, "abc", None)

    again = rewrite(src, out, "--rewrite_id", "abc", "--report_file", report_file)
    assert again.returncode == 0, again.stderr
    reused = json.loads(report_file.read_bytes())
    assert reused["reused"] is True and reused["output"] == str(out)
    assert [reused[k] for k in ("neuronOps", "bytesWritten")] == [summary[k] for k in ("neuronOps", "bytesWritten")]


def test_an_unwritable_report_file_fails_after_publishing(models: dict[str, Path], tmp_path: Path) -> None:
    out, report_file = tmp_path / "out", tmp_path / "no-such-dir" / "termination-log"
    result = rewrite(models["saved_model"], out, "--rewrite_id", "abc", "--report_file", report_file)
    assert_refused(result, 1, str(report_file), "cannot write the report", f"published at {out}")
    assert marker(out)["rewriteId"] == "abc"
    report_file.parent.mkdir()
    retry = rewrite(models["saved_model"], out, "--rewrite_id", "abc", "--report_file", report_file)
    assert retry.returncode == 0 and json.loads(report_file.read_text())["reused"] is True
