"""What a TensorFlow Serving container on Neuron needs before it can report the model loaded.

The real server loads the newest numbered version under ``--model_base_path`` (``saved_model.pb`` directly inside
it; the messages below are the server's own) and the Neuron runtime places each
NeuronOp on the cores the pod was given. A NeuronOp tagged for another core count than the pod's
``aws.amazon.com/neuroncore`` would fail to load or waste cores, so the simulated server refuses it. So does the
runtime a NEFF compiled for another NeuronCore generation than the node's: "The NEFF was compiled for a different
target architecture than the current instance" (aws-neuron-sdk neuron-runtime/nrtpy/nrtpy-troubleshooting.rst,
``NRT_FAILURE(6)``); the simulated server refuses it where the NEFF tells its generation (neuron_rewrite.neff).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

from neuron_rewrite import RewriteError, inspect_model
from neuron_rewrite.neff import FAMILY_TARGETS, family
from tfserving_standin.config import check_batching_parameters, monitoring_path
from tfserving_standin.status import StatusError

SERVER_PREFIX = "tensorflow_model_server"


def is_serving_container(container: Any) -> bool:
    argv = [*(container.command or []), *(container.args or [])]
    return bool(argv) and Path(argv[0]).name.startswith(SERVER_PREFIX)


def _flag(argv: list[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
        if arg == f"--{name}" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def check_serving_container(
    container: Any,
    env: dict[str, str],
    cores: int | None,
    to_host: Callable[[str], str],
    instance_type: str | None = None,
) -> str | None:
    """None when the server would load its model on a node of ``instance_type``, else why not (one line, as the
    server's log would say)."""
    argv = [*(container.command or []), *(container.args or [])]
    name = _flag(argv, "model_name") or env.get("MODEL_NAME")
    base = _flag(argv, "model_base_path") or env.get("MODEL_BASE_PATH")
    if not name or not base:
        return "tensorflow_model_server needs --model_name and --model_base_path"
    if cores is None:
        return "the container requests no aws.amazon.com/neuroncore: the Neuron runtime has no core to load on"
    host = Path(to_host(base))
    if not host.exists():
        return (
            f"Could not find base path {base} for servable {name} with error NOT_FOUND: {base}; "
            "No such file or directory"
        )
    # Any child named as an integer is a version, file or folder; the newest one is loaded, and only it.
    versions = sorted((p for p in host.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    if not versions:
        return (
            f"No versions of servable {name} found under base path {base}. Did you forget to name your leaf "
            "directory as a number (eg. '/1/')?"
        )
    latest = versions[-1]
    if not (latest / "saved_model.pb").is_file():  # directly inside: a base path nested in a version does not load
        where = f"{base.rstrip('/')}/{latest.name}"
        return (
            f"failed to load servable {name} version {latest.name}: SavedModel file does not exist at: "
            f"{where}/{{saved_model.pbtxt|saved_model.pb}}"
        )
    # The server parses its config files at start-up and exits on one it cannot read (the stand-in's words).
    for flag, parse in (
        ("batching_parameters_file", check_batching_parameters),
        ("monitoring_config_file", monitoring_path),
    ):
        given = _flag(argv, flag)
        if given:
            try:
                parse(to_host(given))
            except StatusError as exc:
                return f"Failed to start server. Error: {str(exc).replace(to_host(given), given)}"
    ops = _neuron_ops(latest, _identity(latest))
    if isinstance(ops, str):
        return f"failed to load servable {name} version {latest.name}: {ops}"
    if not ops:
        return f"servable {name} version {latest.name} has no NeuronOp: it is not compiled for Neuron"
    wrong = [(node, tagged) for node, tagged, _ in ops if tagged != cores]
    if wrong:
        node, tagged = wrong[0]
        return (
            f"servable {name} version {latest.name}: NeuronOp {node} is tagged _automatic_multicore="
            f"{tagged} but the pod has {cores} aws.amazon.com/neuroncore"
        )
    generation = FAMILY_TARGETS.get(family(instance_type or ""))
    foreign = [(node, target) for node, _, target in ops if None not in (target, generation) and target != generation]
    if foreign:
        node, target = foreign[0]
        return (
            f"failed to load servable {name} version {latest.name}: NeuronOp {node}: NRT_FAILURE(6): The NEFF was "
            f"compiled for a different target architecture than the current instance ({target} NEFF, "
            f"{instance_type} has {generation})"
        )
    return None


def _identity(version: Path) -> tuple:
    """What changes when the graph is replaced or edited: a few stats, not a parse (pods re-check every 2 s)."""
    files = []
    for path in sorted(version.glob("saved_model.pb*")):
        try:
            stat = path.stat()
        except OSError:
            continue
        files.append((path.name, stat.st_ino, stat.st_mtime_ns, stat.st_size))
    return tuple(files)


@functools.lru_cache(maxsize=512)
def _neuron_ops(version: Path, identity: tuple) -> list[tuple[str, int | None, str | None]] | str:
    """Each NeuronOp's node, core tag and target, or why the graph cannot load; ``identity`` is only the cache
    key."""
    try:
        report = inspect_model(version)
    except RewriteError as exc:
        return str(exc)
    return [(op.node, op.automatic_multicore, op.target) for model in report.models for op in model.neuron_ops]
