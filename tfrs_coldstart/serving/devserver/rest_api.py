"""TF Serving's REST API (port 8501) on aiohttp, in a thread with its own event loop.

URLs as TF Serving's (``model_servers/http_rest_api_util.cc``):
``POST /v1/models/<name>[/versions/N|/labels/L]:predict``, ``GET /v1/models/<name>[...]``
(status) and ``.../metadata``; Prometheus text at :data:`PROMETHEUS_PATH`. Errors answer
``{"error": "..."}`` with TF Serving's HTTP status for the code, including the HTTP stack's
own 404/405/413. Predictions run on the server's thread pool, so the event loop only parses
URLs and moves bytes.

A body is measured before it is read (Content-Length, then the bytes as they arrive) and
counted before it is parsed (JSON values, instances, nesting) against :class:`RequestLimits`;
a client that stops sending mid-body, or a connection idle for
``idle_timeout`` seconds, is closed without a traceback. ``stop`` drains: it stops listening,
lets requests already received finish for up to ``grace`` seconds, then closes.
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
from tfrs_coldstart.serving.devserver.errors import ListenError, RpcError, invalid, to_rpc_error
from tfrs_coldstart.serving.devserver.limits import RequestLimits
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
#: Bytes read from the socket at a time while a body arrives.
_READ_CHUNK = 64 * 1024


class _ClientGone(Exception):
    """The client stopped sending its body (closed, or silent for the idle timeout)."""


_STATUS_RE = re.compile(
    r"/v1/models(?:/([^/:]+))?(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?(?:/(metadata))?",
    re.IGNORECASE,
)


class RestApi:
    """The REST endpoints over a :class:`ModelManager`; ``start`` listens, ``stop`` closes.

    ``stopping`` is the server's hard-stop flag: once set (after the drain), requests answer
    UNAVAILABLE.
    """

    def __init__(
        self,
        manager: ModelManager,
        metrics: Metrics,
        stopping: threading.Event,
        executor: futures.Executor,
        limits: RequestLimits | None = None,
        idle_timeout: float = 30.0,
    ) -> None:
        self.manager = manager
        self.metrics = metrics
        self._stopping = stopping
        self._executor = executor
        self.limits = limits or RequestLimits()
        self.idle_timeout = idle_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (0 = a free port); returns the port once it listens."""
        started = threading.Event()
        error: list[BaseException] = []
        bound: list[int] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            app = web.Application(
                client_max_size=self.limits.max_request_bytes, middlewares=[_json_errors]
            )
            app.router.add_route("GET", PROMETHEUS_PATH, self._metrics_page)
            app.router.add_route("*", "/v1/{tail:.*}", self._v1)
            # keepalive_timeout also closes a connection that never completes its headers;
            # lingering_time bounds how long the rest of a refused body is read and dropped.
            runner = web.AppRunner(
                app,
                access_log=None,
                keepalive_timeout=self.idle_timeout,
                lingering_time=min(2.0, self.idle_timeout),
            )
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
            self._runner = runner
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
        """Drain, then stop: no new connections; requests already received finish (up to
        ``grace`` s); idle keep-alive connections close; then the loop ends."""
        loop, runner = self._loop, self._runner
        if loop is None or self._thread is None:
            return
        if runner is not None:
            drained = asyncio.run_coroutine_threadsafe(self._drain(runner, grace), loop)
            try:
                drained.result(timeout=grace + 5)
            except Exception:  # noqa: BLE001 - stopping anyway; say why
                log.warning("REST drain did not finish cleanly", exc_info=True)
        loop.call_soon_threadsafe(loop.stop)
        self._thread.join(timeout=grace + 5)
        self._loop = None

    @staticmethod
    async def _drain(runner: web.AppRunner, grace: float) -> None:
        """aiohttp's graceful cleanup with the server's grace period."""
        for site in list(runner.sites):
            await site.stop()  # stop listening; open connections stay
        server = runner.server
        if server is not None:
            await asyncio.sleep(0)  # let requests already read reach their handlers
            server.pre_shutdown()  # close idle keep-alive connections after their request
            await server.shutdown(grace)  # wait for running handlers, then cancel

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
        model, api = "", "unknown"
        status_code, payload = 200, None
        close = False
        try:
            if self._stopping.is_set():
                raise RpcError(Code.UNAVAILABLE, "Server is shutting down")
            try:
                body = await self._read_body(request) if request.method == "POST" else b""
            except RpcError:
                close = True  # the rest of a refused body is not worth reading
                raise
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
        except _ClientGone as exc:
            # Answer 408 and close; if the client is gone, aiohttp drops the answer quietly.
            log.info("REST %s %s: client stopped sending its body (%s)", request.method, path, exc)
            status, status_code, close = "CANCELLED", 408, True
            payload = {"error": f"Request body incomplete: {exc}"}
        except Exception as exc:  # noqa: BLE001
            log.exception("REST %s %s failed", request.method, path)
            err = to_rpc_error(exc)
            status, status_code, payload = err.code.name, err.http_status, {"error": err.message}
        self.metrics.observe(model, api, "REST", status, time.perf_counter() - t0)
        response = web.Response(
            text=json.dumps(payload), status=status_code, content_type="application/json"
        )
        if close:
            response.force_close()
        return response

    async def _read_body(self, request: web.Request) -> bytes:
        """The body, refused by its declared length before reading and capped while read.

        A client silent for ``idle_timeout`` seconds mid-body, or gone, ends the connection
        quietly (:class:`_ClientGone` is answered by closing, not logged as a failure).
        """
        limit = self.limits.max_request_bytes
        declared = request.content_length
        if declared is not None:
            self.limits.check_body_bytes(declared)
        chunks: list[bytes] = []
        size = 0
        while True:
            try:
                chunk = await asyncio.wait_for(
                    request.content.read(_READ_CHUNK), timeout=self.idle_timeout
                )
            except TimeoutError as exc:
                raise _ClientGone("client sent no body bytes for the idle timeout") from exc
            except (ConnectionError, web.HTTPException) as exc:
                raise _ClientGone(str(exc)) from exc
            except Exception as exc:  # noqa: BLE001 - aiohttp's payload errors (client gone)
                raise _ClientGone(f"{type(exc).__name__}: {exc}") from exc
            if not chunk:
                return b"".join(chunks)
            size += len(chunk)
            if size > limit:
                self.limits.check_body_bytes(size)
            chunks.append(chunk)

    def _predict(
        self, model: str, version: int | None, label: str | None, body: bytes
    ) -> dict[str, Any]:
        """One predict body -> its JSON answer (runs on the thread pool, may wait for a batch)."""
        if not body.strip():
            raise invalid("JSON Parse error: The document is empty")
        # Counted before parsing: json.loads would spend up to ~25x the body on a body of
        # tiny values (limits.count_json); too many values, instances or levels stop here.
        self.limits.check_json(body)
        try:
            doc = json.loads(body)
        except RecursionError as exc:
            raise invalid(
                "JSON Parse error: The document is nested too deeply (TF tensors have at most "
                "254 dimensions)"
            ) from exc
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
        del body  # the parsed document is all that is needed from here on
        inputs, fmt = json_to_inputs(doc, sig.inputs, self.limits)
        outputs = lv.predict_future(sig, inputs).result()
        return outputs_to_json(outputs, fmt)


@web.middleware
async def _json_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """The HTTP stack's own errors (404 unknown URL, 405, 413) as ``{"error": "..."}`` too."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        text = exc.text if exc.text and exc.text != exc.reason else ""
        message = f"{exc.status} {exc.reason}" + (f": {text.strip()}" if text else "")
        if exc.status == 404:
            path = request.rel_url.raw_path
            message = f"Malformed request: {request.method} {path} (no such URL)"
        return web.Response(
            text=json.dumps({"error": message}),
            status=exc.status,
            content_type="application/json",
            headers={k: v for k, v in exc.headers.items() if k.lower() == "allow"},
        )
