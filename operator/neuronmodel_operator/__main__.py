"""``python -m neuronmodel_operator`` (console script ``neuronmodel-operator``): run the operator."""

from __future__ import annotations

import argparse
import logging
import os
import random
import sys
import time

import kopf
from kopf._cogs.clients.errors import APIError  # what Kopf's watch streams raise; kopf does not re-export it

from .listen import liveness_endpoint

RESTARTS = "NEURONMODEL_OPERATOR_RESTARTS"  # carried across the re-exec below, for its back-off


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
    parser.add_argument(
        "--liveness",
        default="http://:8080/healthz",
        help="liveness endpoint ('' for none); without a host, every address of the family of the pod's IP ($POD_IP)",
    )
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
    from .peering import IDENTITY

    try:
        kopf.run(
            clusterwide=not args.namespace,
            namespaces=args.namespace,
            standalone=args.standalone,
            peering_name=args.peering,
            priority=args.priority,
            identity=IDENTITY,
            liveness_endpoint=liveness_endpoint(args.liveness, os.environ.get("POD_IP")) if args.liveness else None,
        )
    except APIError as exc:
        restart_after_api_failure(exc)
    return 0


def restart_after_api_failure(exc: APIError) -> None:
    """Start afresh in this process, as the kubelet would restart the container, with a growing pause.

    Kopf's watch streams retry a refused connection but not an error answer, and one failed stream stops the
    whole operator. A restarted apiserver answers 404 for a CRD's paths until it has installed them again, so an
    apiserver restart could end the operator. Everything it needs is rebuilt from the API at start.
    """
    restarts = int(os.environ.get(RESTARTS, "0"))
    delay = min(60, 2 ** min(restarts, 6))
    logging.getLogger("neuronmodel_operator").error(
        "the Kubernetes API failed a watch (%s); restarting in %d s (restart %d)", exc, delay, restarts + 1
    )
    time.sleep(delay)
    os.environ[RESTARTS] = str(restarts + 1)
    os.execv(sys.executable, sys.orig_argv)


if __name__ == "__main__":
    sys.exit(main())
