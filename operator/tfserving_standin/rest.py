"""The REST port: what http_server.cc and http_rest_api_handler.cc answer, on a threaded http.server.

Paths matching ``(?i)/v1/.*`` go to the API; the Prometheus path (when configured) to the metrics page; anything
else gets an empty 404, as the real server's dispatcher ignores it. Errors are ``{"error": "<message>"}`` with the
HTTP status the real server maps the error code to. ``--rest_api_timeout_in_ms`` is not enforced.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

import tensorflow as tf
from google.protobuf import json_format

from . import json_tensor, log
from .core import DEFAULT_SIGNATURE, SIGNATURE_DEF, Core, ModelSpec
from .metrics import Metrics
from .status import StatusError, invalid_argument

_API = re.compile(r"/v1/.*", re.IGNORECASE | re.DOTALL)
_PREDICT = re.compile(
    r"/v1/models/([^/:]+)(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?:(classify|regress|predict)",
    re.IGNORECASE | re.ASCII,
)
_STATUS = re.compile(
    r"/v1/models(?:/([^/:]+))?(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?(?:/(metadata))?",
    re.IGNORECASE | re.ASCII,
)


class Api:
    """The request processing, apart from the HTTP plumbing; the model-facing part is core.py's, shared with gRPC."""

    def __init__(self, core: Core) -> None:
        self.core = core

    def process(self, method: str, path: str, body: bytes) -> str:
        """The JSON output, or raises StatusError."""
        match = _PREDICT.fullmatch(path) if method == "POST" else _STATUS.fullmatch(path) if method == "GET" else None
        if match is None:
            raise invalid_argument(f"Malformed request: {method} {path}")
        name = unquote(match[1]) if match[1] else ""
        version = None
        if match[2]:
            version = int(match[2])
            if version >= 2**63:
                raise invalid_argument(f"Failed to convert version: {match[2]} to numeric.")
        spec = ModelSpec(name, version, unquote(match[3]) if match[3] else None)
        if method == "POST":
            if match[4] != "predict":
                if match[4] in ("classify", "regress"):
                    raise StatusError("UNIMPLEMENTED", f":{match[4]} is not implemented by the TF Serving stand-in")
                raise invalid_argument(f"Malformed request: {method} {path}")
            return self._predict(spec, body)
        if not name:
            raise invalid_argument("Missing model name in request.")
        if match[4] and match[4] == "metadata":
            return self._metadata(spec)
        return self._status(spec)

    def _status(self, spec: ModelSpec) -> str:
        statuses = [
            {
                "version": str(version),
                "state": state.state,
                "status": {
                    "error_code": state.error.code if state.error else "OK",
                    "error_message": state.error.message if state.error else "",
                },
            }
            for version, state in self.core.statuses(spec)
        ]
        return json.dumps({"model_version_status": statuses}, indent=1)

    def _metadata(self, spec: ModelSpec) -> str:
        model = self.core.metadata(spec, [SIGNATURE_DEF])
        model_spec = {"name": spec.name, "signature_name": "", "version": str(model.version)}
        signatures = {
            key: json_format.MessageToDict(
                signature, always_print_fields_with_no_presence=True, preserving_proto_field_name=True
            )
            for key, signature in model.signature_defs.items()
        }
        return (
            "{\n"
            f'"model_spec":{json.dumps(model_spec, indent=1)},\n'
            f'"metadata": {{"signature_def": {json.dumps({"signature_def": signatures}, indent=1)}}}\n'
            "}\n"
        )

    def _predict(self, spec: ModelSpec, body: bytes) -> str:
        doc = json_tensor.parse(body)
        spec = replace(spec, signature_name=json_tensor.signature_name(doc))
        inputs = {key: info.dtype for key, info in self.core.input_map(spec).items()}
        if not inputs:
            raise invalid_argument(f"Failed to get input map for signature: {spec.signature_name or DEFAULT_SIGNATURE}")
        format, tensors = json_tensor.request_tensors(doc, inputs)
        result = self.core.predict(spec, tensors, tf.constant)
        return json_tensor.response({key: value.numpy() for key, value in result.outputs.items()}, format)


def _handler(api: Api, metrics: Metrics, metrics_path: str | None, cors: bool) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "tfserving-standin"

        def log_message(self, format: str, *args: Any) -> None:
            """The real server logs requests only at high verbosity."""

        def _reply(self, status: int, body: str, headers: dict[str, str]) -> None:
            data = body.encode()
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def _handle(self) -> None:
            path = urlsplit(self.path).path
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if metrics_path is not None and path == metrics_path:
                self._reply(200, metrics.page(), {"Content-Type": "text/plain"})
                return
            if not _API.fullmatch(path):
                self._reply(404, "", {})
                return
            headers = {}
            status, output = 200, ""
            if self.command == "OPTIONS":
                if not re.search(r"https?://", self.headers.get("Origin", "")):
                    error = StatusError("FAILED_PRECONDITION", "Origin header is missing in CORS preflight")
                    status, code = error.http_status, error.code
                else:
                    code = "OK"
            else:
                headers["Content-Type"] = "application/json"
                try:
                    output = api.process(self.command, path, body)
                    code = "OK"
                except StatusError as error:
                    status, code = error.http_status, error.code
                    output = json.dumps({"error": error.message}, indent=4)
            if cors:
                headers |= {
                    "Access-Control-Allow-Origin": "*",
                    "Access-Control-Allow-Methods": "POST, GET",
                    "Access-Control-Allow-Headers": "Content-Type",
                }
            metrics.request(_name_of(path), code)
            self._reply(status, output, headers)

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = _handle

    return Handler


def _name_of(path: str) -> str:
    """The model name as the real server parses it, for the request counter's label."""
    match = _PREDICT.fullmatch(path) or _STATUS.fullmatch(path)
    return unquote(match[1]) if match and match[1] else ""


class RestServer:
    def __init__(self, port: int, api: Api, metrics: Metrics, metrics_path: str | None, cors: bool) -> None:
        self.httpd = ThreadingHTTPServer(("0.0.0.0", port), _handler(api, metrics, metrics_path, cors))
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, name="rest", daemon=True).start()
        if metrics_path is not None:
            log.info("tensorflow_serving/model_servers/http_server.cc", f"Prometheus metrics at {metrics_path}")
