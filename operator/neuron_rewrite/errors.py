"""Errors of the rewrite, each with the CLI exit code that reports it."""

from __future__ import annotations


class RewriteError(Exception):
    """A refusal with a one-line message that names the file or field and what is expected."""

    exit_code = 1


class UsageError(RewriteError):
    """Bad arguments, such as ``num_cores`` below 1."""

    exit_code = 2


class InvalidModelError(RewriteError):
    """The input is missing, is not a SavedModel (nor holds the selected version), its ``saved_model.pb`` is
    corrupt or truncated, or what its NeuronOps were compiled for cannot be (see neff.py)."""

    exit_code = 3


class NotReplicableError(RewriteError):
    """The model cannot be replicated: a pipelined NeuronOp, or no NeuronOp at all."""

    exit_code = 4


class OutputError(RewriteError):
    """The output location conflicts with an existing directory or with the input."""

    exit_code = 5


EXIT_CODES = {
    0: "success",
    1: "unexpected I/O failure, or --report_file not writable after publishing (message names the file)",
    UsageError.exit_code: "bad arguments (e.g. --num_cores below 1, --select_version neither 'latest' nor >= 1)",
    InvalidModelError.exit_code: (
        "input missing, not a SavedModel, selected version missing or not a SavedModel, "
        "saved_model.pb corrupt/truncated, a NeuronOp whose NEFF header and _instance_type contradict each other, "
        "or (rewrite only) NeuronOps of one SavedModel compiled for different NeuronCore generations"
    ),
    NotReplicableError.exit_code: "NeuronOp compiled with pipeline size > 1, or no NeuronOp (not compiled for Neuron)",
    OutputError.exit_code: "output exists (use --force), or output equals, contains or is inside the input",
}
