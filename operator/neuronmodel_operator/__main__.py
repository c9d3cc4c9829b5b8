"""``python -m neuronmodel_operator`` (console script ``neuronmodel-operator``): run the operator."""

from __future__ import annotations

import argparse
import logging
import random
import sys

import kopf


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="neuronmodel-operator", description="Run the NeuronModel operator.")
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("--namespace", "-n", action="append", default=[], help="watch this namespace (repeatable)")
    scope.add_argument("--all-namespaces", "-A", action="store_true", help="watch every namespace (default)")
    parser.add_argument("--peering", default=None, help="Kopf peering object name, for several operator replicas")
    parser.add_argument("--standalone", action="store_true", help="no peering: the only replica")
    parser.add_argument(
        "--priority",
        type=int,
        default=random.randint(1, 1_000_000),
        help="peering priority; the highest live replica works, the others wait (default: random, so that replicas "
        "differ: Kopf pauses every replica when the highest priority is shared)",
    )
    parser.add_argument("--liveness", default="http://0.0.0.0:8080/healthz", help="liveness endpoint ('' for none)")
    parser.add_argument("--log-format", choices=("plain", "json"), default="plain")
    parser.add_argument("--verbose", "-v", action="store_true")
    args = parser.parse_args(argv)
    kopf.configure(
        verbose=args.verbose,
        log_format=kopf.LogFormat.JSON if args.log_format == "json" else kopf.LogFormat.PLAIN,
        log_refkey="object",
    )
    logging.getLogger("kubernetes").setLevel(logging.WARNING)
    if not args.verbose:  # one line per event: ours, not Kopf's "Handler ... succeeded" for every watch event
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    from . import handlers  # noqa: F401  (registers the handlers)

    kopf.run(
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        standalone=args.standalone,
        peering_name=args.peering,
        priority=args.priority,
        liveness_endpoint=args.liveness or None,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
