"""The rewrite CLI on hostile inputs that test_rewrite_wire.py does not already cover.

Every refusal must be one line on stderr naming the offending file, the documented exit code, nothing written (no
output directory, no staging directory beside it) and the source byte for byte as it was.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from neuron_rewrite.wire import encode_varint
from synthetic_models import all_nodes, read_model, saved_model, tree_digest, write_model

CLI = [sys.executable, "-m", "neuron_rewrite"]
PREFIX = "tf-neuron-auto-multicore: error: "


def run_cli(src: Path, out: Path, command: list[str] = CLI) -> subprocess.CompletedProcess[str]:
    argv = [*command, str(src), "--num_cores", "2", "--new_model_dir", str(out)]
    return subprocess.run(argv, capture_output=True, text=True)


def assert_refused(root: Path, src: Path, code: int, *needles: str) -> None:
    """The CLI refuses ``src`` with ``code`` and one line containing every needle; nothing under ``root`` changes."""
    before = tree_digest(root)
    result = run_cli(src, root / "out")
    assert result.returncode == code, (result.returncode, result.stderr)
    assert result.stderr.startswith(PREFIX) and result.stderr.count("\n") == 1, result.stderr
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr)
    assert result.stdout == ""
    assert tree_digest(root) == before, "nothing written, no staging directory left, the source unchanged"


# Inputs: each returns (model directory, exit code, what the message must name) -----------------------------------


def _without_model_config(tmp_path: Path) -> tuple[Path, int, list[str]]:
    """One NeuronOp lost its model_config: the runtime requires the attribute and pipelining cannot be ruled out."""
    model = saved_model(functions=2)
    victim = next(n for n in all_nodes(model) if n.name == "fn_op_1")
    del victim.attr["model_config"]
    src = write_model(tmp_path / "m", model)
    return src, 3, [str(src / "saved_model.pb"), "fn_op_1", "model_config"]


def _length_beyond_the_file(tmp_path: Path) -> tuple[Path, int, list[str]]:
    """A meta graph whose length prefix claims 2**62 bytes (an attribute "bigger than the disk")."""
    data = saved_model().SerializeToString() + b"\x12" + encode_varint(2**62) + b"\x00" * 16
    src = write_model(tmp_path / "m", data)
    return src, 3, [str(src / "saved_model.pb"), "corrupt or truncated", "runs past the end"]


def _eleven_byte_varint(tmp_path: Path) -> tuple[Path, int, list[str]]:
    data = saved_model().SerializeToString() + b"\x12" + b"\xff" * 11 + b"\x01"
    src = write_model(tmp_path / "m", data)
    return src, 3, [str(src / "saved_model.pb"), "corrupt or truncated", "varint"]


def _huge_pipeline_size(tmp_path: Path) -> tuple[Path, int, list[str]]:
    src = write_model(tmp_path / "m", saved_model(pipeline=2**62))
    return src, 4, [str(src / "saved_model.pb"), f"pipeline size {2**62}", "--neuroncore-pipeline-cores=1"]


def _directory_link_out(tmp_path: Path) -> tuple[Path, int, list[str]]:
    src = write_model(tmp_path / "m", saved_model())
    shutil.move(src / "variables", tmp_path / "elsewhere")
    os.symlink(tmp_path / "elsewhere", src / "variables")
    return src, 3, [str(src / "variables"), "points outside the model"]


def _relative_link_out(tmp_path: Path) -> tuple[Path, int, list[str]]:
    src = write_model(tmp_path / "m", saved_model())
    (tmp_path / "secret.txt").write_text("not part of the model")
    os.symlink("../../secret.txt", src / "assets" / "escape")
    return src, 3, [str(src / "assets" / "escape"), "points outside the model"]


def _version_link_out(tmp_path: Path) -> tuple[Path, int, list[str]]:
    """A TF Serving base path whose version folder is a link to a model elsewhere."""
    write_model(tmp_path / "elsewhere", saved_model())
    (tmp_path / "base").mkdir()
    write_model(tmp_path / "base" / "1", saved_model())
    os.symlink(tmp_path / "elsewhere", tmp_path / "base" / "2")
    return tmp_path / "base", 3, [str(tmp_path / "base" / "2"), "points outside the model"]


def _saved_model_pb_link_out(tmp_path: Path) -> tuple[Path, int, list[str]]:
    """saved_model.pb itself is a link to a file outside the model: reading it would carry that file in."""
    src = write_model(tmp_path / "m", saved_model())
    (src / "saved_model.pb").rename(tmp_path / "outside.pb")
    os.symlink(tmp_path / "outside.pb", src / "saved_model.pb")
    return src, 3, [str(src / "saved_model.pb"), "points outside the model"]


def _link_loop(tmp_path: Path) -> tuple[Path, int, list[str]]:
    src = write_model(tmp_path / "m", saved_model())
    os.symlink("loop-b", src / "assets" / "loop-a")
    os.symlink("loop-a", src / "assets" / "loop-b")
    return src, 3, [str(src / "assets" / "loop-")]


@pytest.mark.parametrize(
    "make_input",
    [
        pytest.param(
            _without_model_config,
            id="neuron-op-without-model-config",
        ),
        pytest.param(_length_beyond_the_file, id="length-prefix-2**62"),
        pytest.param(_eleven_byte_varint, id="eleven-byte-varint"),
        pytest.param(_huge_pipeline_size, id="pipeline-size-2**62"),
        pytest.param(_directory_link_out, id="directory-link-outside"),
        pytest.param(_relative_link_out, id="relative-link-outside"),
        pytest.param(_version_link_out, id="version-folder-link-outside"),
        pytest.param(
            _saved_model_pb_link_out,
            id="saved-model-pb-link-outside",
        ),
        pytest.param(
            _link_loop,
            id="symlink-loop",
        ),
    ],
)
def test_adversarial_input_is_refused_and_nothing_is_written(
    tmp_path: Path, make_input: Callable[[Path], tuple[Path, int, list[str]]]
) -> None:
    src, code, needles = make_input(tmp_path)
    assert_refused(tmp_path, src, code, *needles)


# The CLI in a wrapper that reports its own high-water RSS: VmHWM counts only the process image after exec, while
# ru_maxrss also counts the forking test process (which holds the whole model while building it).
MEASURED_CLI = [
    sys.executable,
    "-c",
    "import sys\n"
    "from neuron_rewrite.cli import main\n"
    "code = main(sys.argv[1:])\n"
    "hwm = next(line for line in open('/proc/self/status') if line.startswith('VmHWM:'))\n"
    "print(hwm.split()[1], file=sys.stderr)\n"
    "sys.exit(code)\n",
]
HUGE = 128 << 20


def test_a_huge_attribute_value_is_streamed_in_constant_memory(tmp_path: Path) -> None:
    """A 128 MiB NEFF in one attribute is rewritten with a peak memory far below the attribute's size."""
    src = write_model(tmp_path / "m", saved_model(functions=0, executable=b"\x5a" * HUGE))
    before = tree_digest(src)
    result = run_cli(src, tmp_path / "out", MEASURED_CLI)
    assert result.returncode == 0, result.stderr
    peak_kib = int(result.stderr.split()[-1])
    assert peak_kib < 64 * 1024, f"peak RSS {peak_kib} KiB for a {HUGE >> 20} MiB attribute"
    (op,) = [n for n in all_nodes(read_model(tmp_path / "out")) if n.op == "NeuronOp"]
    assert op.attr["_automatic_multicore"].i == 2 and op.attr["executable"].s == b"\x5a" * HUGE
    assert tree_digest(src) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "out"], "no staging directory left behind"


def test_missing_parents_of_the_output_are_created_and_a_file_in_the_way_is_named(tmp_path: Path) -> None:
    src = write_model(tmp_path / "m", saved_model())
    nested = tmp_path / "store" / "ns" / "model" / "id" / "1"
    result = run_cli(src, nested)
    assert result.returncode == 0, result.stderr
    assert (nested / "saved_model.pb").is_file()

    (tmp_path / "blocker").write_text("a file where a directory should be")
    result = run_cli(src, tmp_path / "blocker" / "id" / "1")
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert result.stderr.startswith(PREFIX) and "cannot create the directory" in result.stderr
    assert str(tmp_path / "blocker") in result.stderr
