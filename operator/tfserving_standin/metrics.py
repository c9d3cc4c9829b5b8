"""The two metrics the stand-in exports, named and rendered as TF Serving's Prometheus exporter does.

``/tensorflow/serving/request_count`` (model_name, status) counts REST requests as http_server.cc records them and
gRPC Predict, Classify and Regress calls as prediction_service_impl.cc does (by the request's model_spec.name);
``/tensorflow/cc/saved_model/load_latency`` (model_path) adds each successful load's time in microseconds.
Names become ``:tensorflow:serving:request_count`` by the exporter's rule (every non-alphanumeric becomes ':').
"""

from __future__ import annotations

import threading
from collections import Counter


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


def _labels(**labels: str) -> str:
    return ",".join(f'{key}="{_escape(value)}"' for key, value in labels.items())


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: Counter[tuple[str, str]] = Counter()
        self._load_latency: Counter[str] = Counter()

    def request(self, model_name: str, status: str) -> None:
        with self._lock:
            self._requests[model_name, status] += 1

    def loaded(self, model_path: str, micros: int) -> None:
        with self._lock:
            self._load_latency[model_path] += micros

    def page(self) -> str:
        with self._lock:
            lines = ["# TYPE :tensorflow:cc:saved_model:load_latency counter"]
            lines += [
                f":tensorflow:cc:saved_model:load_latency{{{_labels(model_path=path)}}} {micros}"
                for path, micros in sorted(self._load_latency.items())
            ]
            lines.append("# TYPE :tensorflow:serving:request_count counter")
            lines += [
                f":tensorflow:serving:request_count{{{_labels(model_name=name, status=status)}}} {count}"
                for (name, status), count in sorted(self._requests.items())
            ]
        return "\n".join(lines) + "\n"
