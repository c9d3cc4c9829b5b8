"""Kopf's own overhead: an operator that watches what the NeuronModel operator watches and does nothing else.

bench/operator_scale.py runs it against the same NeuronModels as the real operator, so the difference in memory,
CPU and API requests between the two is what the NeuronModel operator itself costs, not the framework.

It prints ``seen <count>`` each time a NeuronModel it had not seen arrives (counts printed in order), which is
how the benchmark knows it has caught up. With ``--children`` it also watches the operator's children (Jobs,
Deployments, Services, Pods, ConfigMaps with the operator's label, as the real operator's indexes do) with
handlers that do nothing.

Usage: python bench/minimal_kopf_operator.py -n NAMESPACE [--children]
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
from typing import Any

import kopf

GROUP, VERSION = "serving.neuron.dev", "v1alpha1"
OWNED = {"app.kubernetes.io/managed-by": "neuronmodel-operator"}
CHILDREN = (
    ("batch", "v1", "jobs"),
    ("apps", "v1", "deployments"),
    ("v1", "services"),
    ("v1", "pods"),
    ("v1", "configmaps"),
)
_seen: set[tuple[str, str]] = set()
_lock = threading.Lock()  # sync handlers run in a thread pool


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.watching.server_timeout = 300  # as the real operator, so both reconnect their watches alike


@kopf.on.event(GROUP, VERSION, "neuronmodels")
def model_seen(namespace: str, name: str, **_: Any) -> None:
    with _lock:
        if (namespace, name) not in _seen:
            _seen.add((namespace, name))
            print(f"seen {len(_seen)}", flush=True)


def _ignore(**_: Any) -> None:
    """An event handler that does nothing: Kopf still receives, parses and dispatches every event."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--namespace", "-n", action="append", required=True)
    parser.add_argument("--children", action="store_true", help="also watch the operator's children")
    args = parser.parse_args(argv)
    kopf.configure(verbose=False)
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    if args.children:
        for resource in CHILDREN:
            kopf.on.event(*resource, labels=OWNED, id=f"ignore-{resource[-1]}")(_ignore)
    kopf.run(standalone=True, namespaces=args.namespace, liveness_endpoint=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
