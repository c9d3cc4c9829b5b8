"""Admission webhooks served from the test process, as a cluster's policy engines and meshes register theirs: each
with a CA of its own, for the objects of one test's namespace only."""

from __future__ import annotations

import base64
import http.server
import json
import ssl
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from kubernetes import client
from kubernetes.client.rest import ApiException

from conftest import Env
from localcluster.identitywebhook import _serving_certificate

# The AdmissionReview's request -> the response's fields besides its uid: {"allowed": ..., "patch": ...}.
Answer = Callable[[dict[str, Any]], dict[str, Any]]


def json_patch(operations: list[dict[str, Any]]) -> dict[str, Any]:
    """An answer that admits the object changed by these JSONPatch operations, as a mutating webhook does."""
    patch = base64.b64encode(json.dumps(operations).encode()).decode()
    return {"allowed": True, "patchType": "JSONPatch", "patch": patch}


def _handler(answer: Answer) -> type[http.server.BaseHTTPRequestHandler]:
    class Review(http.server.BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_POST(self) -> None:
            request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["request"]
            response = {"uid": request["uid"], **answer(request)}
            body = json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response})
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body.encode())

    return Review


@contextmanager
def admission_webhook(
    env: Env,
    name: str,
    mutating: bool,
    rule: dict[str, Any],
    object_selector: dict[str, str],
    answer: Answer,
) -> Iterator[str]:
    """A validating or mutating webhook named ``name`` for the objects ``rule`` names (groups, versions, resources,
    operations) in the test's namespace that carry the labels ``object_selector``. Yields its configuration's name,
    which may be deleted before the end."""
    ca = _serving_certificate(env.tmp)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(env.tmp / "tls.crt", env.tmp / "tls.key")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(answer))
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    configuration = f"{name.split('.')[0]}-{env.namespace}"
    webhook = {
        "name": name,
        "clientConfig": {
            "url": f"https://127.0.0.1:{server.server_address[1]}/review",
            "caBundle": base64.b64encode(ca).decode(),
        },
        "rules": [rule],
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": env.namespace}},
        "objectSelector": {"matchLabels": object_selector},
        "failurePolicy": "Fail",
        "sideEffects": "None",
        "admissionReviewVersions": ["v1"],
        "timeoutSeconds": 5,
    }
    admission = client.AdmissionregistrationV1Api(env.cluster.api)
    body = {"metadata": {"name": configuration}, "webhooks": [webhook]}
    kind = "mutating" if mutating else "validating"
    getattr(admission, f"create_{kind}_webhook_configuration")(body)
    try:
        yield configuration
    finally:
        try:
            getattr(admission, f"delete_{kind}_webhook_configuration")(configuration)
        except ApiException as exc:
            if exc.status != 404:
                raise
        server.shutdown()
