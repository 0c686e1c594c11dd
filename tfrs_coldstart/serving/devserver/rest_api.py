"""TF Serving's REST API (port 8501) on aiohttp, in a thread with its own event loop.

URLs as TF Serving's (``model_servers/http_rest_api_util.cc``):
``POST /v1/models/<name>[/versions/N|/labels/L]:predict``, ``GET /v1/models/<name>[...]``
(status) and ``.../metadata``; Prometheus text at :data:`PROMETHEUS_PATH`. Errors answer
``{"error": "..."}`` with TF Serving's HTTP status for the code. Predictions run on the
server's thread pool, so the event loop only parses URLs and moves bytes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
import time
from concurrent import futures
from typing import Any
from urllib.parse import unquote

import prometheus_client
from aiohttp import web
from google.protobuf import json_format

from tfrs_coldstart.serving.devserver.codec import (
    json_str,
    json_to_inputs,
    metadata_to_json,
    outputs_to_json,
)
from tfrs_coldstart.serving.devserver.config import MAX_MESSAGE_BYTES
from tfrs_coldstart.serving.devserver.errors import ListenError, RpcError, invalid, to_rpc_error
from tfrs_coldstart.serving.devserver.manager import ModelManager
from tfrs_coldstart.serving.devserver.metrics import Metrics
from tfrs_coldstart.serving.devserver.servable import metadata_response
from tfrs_coldstart.serving.status import Code

__all__ = ["PROMETHEUS_PATH", "RestApi"]

log = logging.getLogger(__name__)

PROMETHEUS_PATH = "/monitoring/prometheus/metrics"

# TF Serving's REST URL grammar (model_servers/http_rest_api_util.cc).
_PREDICT_RE = re.compile(
    r"/v1/models/([^/:]+)(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?:(classify|regress|predict)",
    re.IGNORECASE,
)
_STATUS_RE = re.compile(
    r"/v1/models(?:/([^/:]+))?(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?(?:/(metadata))?",
    re.IGNORECASE,
)


class RestApi:
    """The REST endpoints over a :class:`ModelManager`; ``start`` listens, ``stop`` closes.

    ``stopping`` is the server's shutdown flag: once set, requests answer UNAVAILABLE.
    """

    def __init__(
        self,
        manager: ModelManager,
        metrics: Metrics,
        stopping: threading.Event,
        executor: futures.Executor,
    ) -> None:
        self.manager = manager
        self.metrics = metrics
        self._stopping = stopping
        self._executor = executor
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (0 = a free port); returns the port once it listens."""
        started = threading.Event()
        error: list[BaseException] = []
        bound: list[int] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            app = web.Application(client_max_size=MAX_MESSAGE_BYTES)
            app.router.add_route("GET", PROMETHEUS_PATH, self._metrics_page)
            app.router.add_route("*", "/v1/{tail:.*}", self._v1)
            runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
            try:
                loop.run_until_complete(runner.setup())
                site = web.TCPSite(runner, host, port, reuse_address=True)
                loop.run_until_complete(site.start())
                bound.append(int(runner.addresses[0][1]))
            except BaseException as exc:  # noqa: BLE001
                error.append(exc)
                started.set()
                loop.close()
                return
            self._loop = loop
            started.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(runner.cleanup())
                loop.close()

        self._thread = threading.Thread(target=run, name="rest-server", daemon=True)
        self._thread.start()
        started.wait()
        if error:
            raise ListenError(f"cannot listen for REST on {host}:{port}: {error[0]}")
        return bound[0]

    def stop(self, grace: float) -> None:
        """Stop the event loop (its runner finishes open requests) and wait for the thread."""
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=grace + 5)
            self._loop = None

    # -- handlers ------------------------------------------------------------------------------
    async def _metrics_page(self, request: web.Request) -> web.Response:
        body = prometheus_client.generate_latest(self.metrics.registry)
        return web.Response(
            body=body, headers={"Content-Type": prometheus_client.CONTENT_TYPE_LATEST}
        )

    async def _v1(self, request: web.Request) -> web.Response:
        """Every ``/v1/...`` URL: route, answer, count; any failure becomes ``{"error"}``."""
        t0 = time.perf_counter()
        path = request.rel_url.raw_path
        body = await request.read() if request.method == "POST" else b""
        model, api = "", "unknown"
        status_code, payload = 200, None
        try:
            if self._stopping.is_set():
                raise RpcError(Code.UNAVAILABLE, "Server is shutting down")
            m = _PREDICT_RE.fullmatch(path) if request.method == "POST" else None
            s = _STATUS_RE.fullmatch(path) if request.method == "GET" else None
            if m:
                model, api = unquote(m.group(1)), m.group(4).lower()
                version = int(m.group(2)) if m.group(2) else None
                label = unquote(m.group(3)) if m.group(3) else None
                if api != "predict":
                    raise RpcError(
                        Code.UNIMPLEMENTED,
                        f"{api} is not supported by the dev "
                        "server; use :predict (TF Serving supports it)",
                    )
                loop = asyncio.get_running_loop()
                payload = await loop.run_in_executor(
                    self._executor, self._predict, model, version, label, body
                )
            elif s:
                if not s.group(1):
                    raise invalid("Missing model name in request.")
                model = unquote(s.group(1))
                version = int(s.group(2)) if s.group(2) else None
                label = unquote(s.group(3)) if s.group(3) else None
                if s.group(4):
                    api = "metadata"
                    lv = self.manager.resolve(model, version, label)
                    payload = metadata_to_json(metadata_response(lv))
                else:
                    api = "status"
                    payload = json_format.MessageToDict(
                        self.manager.status(model, version, label),
                        always_print_fields_with_no_presence=True,
                    )
            else:
                raise invalid(f"Malformed request: {request.method} {path}")
            status = "OK"
        except RpcError as exc:
            status, status_code, payload = exc.code.name, exc.http_status, {"error": exc.message}
        except Exception as exc:  # noqa: BLE001
            log.exception("REST %s %s failed", request.method, path)
            err = to_rpc_error(exc)
            status, status_code, payload = err.code.name, err.http_status, {"error": err.message}
        self.metrics.observe(model, api, "REST", status, time.perf_counter() - t0)
        return web.Response(
            text=json.dumps(payload), status=status_code, content_type="application/json"
        )

    def _predict(
        self, model: str, version: int | None, label: str | None, body: bytes
    ) -> dict[str, Any]:
        """One predict body -> its JSON answer (runs on the thread pool, may wait for a batch)."""
        if not body.strip():
            raise invalid("JSON Parse error: The document is empty")
        try:
            doc = json.loads(body)
        except UnicodeDecodeError as exc:
            raise invalid(
                f"JSON Parse error: Invalid encoding in string. at offset: {exc.start}"
            ) from exc
        except json.JSONDecodeError as exc:
            raise invalid(f"JSON Parse error: {exc.msg} at offset: {exc.pos}") from exc
        if not isinstance(doc, dict):
            raise invalid(f"JSON Value: {json_str(doc)} Is not object")
        signature_name = doc.get("signature_name", "")
        if not isinstance(signature_name, str):
            raise invalid(
                f"JSON Value: {json_str(doc)} not formatted correctly. "
                "'signature_name' key must be a string value."
            )
        lv = self.manager.resolve(model, version, label)
        sig = lv.signature(signature_name, grpc_api=False)
        if not sig.inputs:
            raise invalid(f"Failed to get input map for signature: {sig.name}")
        inputs, fmt = json_to_inputs(doc, sig.inputs)
        outputs = lv.predict_future(sig, inputs).result()
        return outputs_to_json(outputs, fmt)
