"""The operator's own Prometheus metrics: reconciles and their failures, models per phase, rewrite durations.

Served on NEURONMODEL_METRICS_PORT (the chart sets it; unset, nothing listens), in the Prometheus text format.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Histogram, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

from .listen import IPV6_ANY, dual_stack_host
from .own_writes import ModelKey

PHASES = ("Pending", "Rewriting", "Deploying", "Ready", "Idle", "Degraded", "Failed")
REGISTRY = CollectorRegistry()  # only ours: no process or platform collectors to surprise a dashboard
RECONCILES = Counter(
    "neuronmodel_reconciles", "Reconciles of a NeuronModel the operator ran to the end.", registry=REGISTRY
)
RECONCILE_ERRORS = Counter(
    "neuronmodel_reconcile_errors",
    "Reconciles that failed and are retried with back-off, by reason (ChildRejected, ChildConflict, ApiError, "
    "Unreachable).",
    ["reason"],
    registry=REGISTRY,
)
REWRITE_SECONDS = Histogram(
    "neuronmodel_rewrite_duration_seconds",
    "How long each published rewrite took, from the rewrite's own report (a rewrite found already published is not "
    "counted).",
    buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600),
    registry=REGISTRY,
)


class _Phases(Collector):
    """Models per phase, as this operator last computed each one's status."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._phases: dict[ModelKey, str] = {}

    def set(self, key: ModelKey, phase: str) -> None:
        with self._lock:
            self._phases[key] = phase

    def forget(self, key: ModelKey) -> None:
        with self._lock:
            self._phases.pop(key, None)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("neuronmodel_models", "NeuronModels by status.phase.", labels=["phase"])
        with self._lock:
            counts = {phase: 0 for phase in PHASES}
            for phase in self._phases.values():
                counts[phase] = counts.get(phase, 0) + 1
        for phase, count in counts.items():
            family.add_metric([phase], count)
        yield family


MODEL_PHASES = _Phases()
REGISTRY.register(MODEL_PHASES)


class _DualStackServer(ThreadingWSGIServer):
    """On ``::``, IPv4 too: prometheus_client's own server takes one family, and IPv6-only is the kernel's choice
    (net.ipv6.bindv6only), not ours."""

    address_family = socket.AF_INET6

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


class _QuietHandler(WSGIRequestHandler):
    """No log line for every scrape."""

    def log_message(self, *args: Any) -> None:
        pass


def serve(port: int) -> WSGIServer:
    """Expose the metrics on ``port`` of every address, IPv6 and IPv4 where the host has both, in a daemon thread.
    Returns the server, to stop it."""
    host = dual_stack_host()
    server_class = _DualStackServer if host == IPV6_ANY else ThreadingWSGIServer
    server = make_server(host, port, make_wsgi_app(REGISTRY), server_class, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, daemon=True, name="metrics").start()
    return server
