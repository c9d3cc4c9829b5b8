"""neuron-store-clean: what goes from a model's store directory (rewrites not kept, leftovers of interrupted
rewrites and clean-ups) and what never does (kept rewrites, anything that is not the rewrite's)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from neuron_rewrite import rewrite_model
from neuron_rewrite.files import tree_bytes
from neuron_rewrite.store import clean_store
from synthetic_models import saved_model, write_model

CLI = [sys.executable, "-m", "neuron_rewrite.store"]
SERVED, PREVIOUS, OLD = "a1b2c3d4e5", "0f0f0f0f0f", "123456789a"


@pytest.fixture
def store(tmp_path: Path) -> Path:
    """A model's store directory with three published rewrites, as the rewrite Job leaves them."""
    compiled = write_model(tmp_path / "compiled", saved_model())
    directory = tmp_path / "store" / "ml" / "resnet50"
    for rewrite_id, cores in ((SERVED, 2), (PREVIOUS, 1), (OLD, 4)):
        rewrite_model(compiled, directory / rewrite_id / "1", cores, rewrite_id=rewrite_id)
    return directory


def test_rewrites_not_kept_go_and_their_bytes_are_counted(store: Path) -> None:
    old_bytes = tree_bytes(store / OLD)
    report = clean_store(store, {SERVED, PREVIOUS})
    assert sorted(p.name for p in store.iterdir()) == sorted([SERVED, PREVIOUS])
    assert (report.removed, report.bytes_freed, report.kept) == ([OLD], old_bytes, sorted([SERVED, PREVIOUS]))
    assert (store / SERVED / "1" / "saved_model.pb").is_file()


def test_leftovers_of_interrupted_rewrites_and_clean_ups_go_too(store: Path) -> None:
    staging = store / SERVED / ".2.tmp-0badc0de"  # a rewrite killed before its rename
    staging.mkdir()
    (staging / "saved_model.pb").write_bytes(b"x" * 100)
    half_deleted = store / f".{OLD}.deleting"  # a clean-up killed between its rename and its delete
    (store / OLD).rename(half_deleted)
    report = clean_store(store, {SERVED, PREVIOUS})
    assert not staging.exists() and not half_deleted.exists()
    assert report.staging_removed == 1 and report.removed == []
    assert (store / SERVED / "1").is_dir()


def test_what_is_not_the_rewrites_is_never_touched(store: Path) -> None:
    (store / "README").write_text("notes of the team")
    (store / "warmup").mkdir()
    (store / "ABCDEF0123").mkdir()  # not an ID the operator makes (upper case)
    clean_store(store, {SERVED})
    assert sorted(p.name for p in store.iterdir()) == sorted(["README", "warmup", "ABCDEF0123", SERVED])


def test_a_deleted_models_directory_is_removed_whole_unless_others_files_remain(store: Path, tmp_path: Path) -> None:
    report = clean_store(store, set())
    assert sorted(report.removed) == sorted([SERVED, PREVIOUS, OLD]) and not store.exists()
    assert clean_store(tmp_path / "never-made", set()).removed == []
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x")
    clean_store(tmp_path / "other", set())
    assert (tmp_path / "other" / "keep.txt").exists()


def test_the_cli_reports_json_and_refuses_what_is_not_an_id(store: Path, tmp_path: Path) -> None:
    report_file = tmp_path / "termination-log"
    done = subprocess.run(
        [*CLI, str(store), "--keep", SERVED, "--report_file", str(report_file)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(report_file.read_text())
    assert report == json.loads(done.stdout)
    assert sorted(report["removed"]) == sorted([PREVIOUS, OLD]) and report["bytesFreed"] > 0
    refused = subprocess.run([*CLI, str(store), "--keep", "../etc"], capture_output=True, text=True)
    assert refused.returncode == 2
    assert "--keep '../etc' is not a rewrite ID (10 hexadecimal digits)" in refused.stderr
