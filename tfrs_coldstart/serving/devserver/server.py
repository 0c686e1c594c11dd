"""The server: one model manager behind the REST and gRPC APIs, a version poller, shutdown.

:class:`Server` runs in-process (tests, benchmarks, notebooks); :func:`serve` runs one until
Ctrl-C or SIGTERM, as ``tfrs-coldstart serve`` does. Stopping drains: both APIs stop taking
new connections/calls at once, requests already received finish (up to a grace period), and
only then are the models unloaded, so a SIGTERM costs no accepted request.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from typing import Any

from tfrs_coldstart.serving.devserver.config import BatchingParameters
from tfrs_coldstart.serving.devserver.grpc_api import GrpcApi
from tfrs_coldstart.serving.devserver.limits import RequestLimits
from tfrs_coldstart.serving.devserver.manager import ModelManager
from tfrs_coldstart.serving.devserver.metrics import Metrics
from tfrs_coldstart.serving.devserver.rest_api import RestApi

__all__ = ["DEFAULT_DRAIN_SECONDS", "DEFAULT_IDLE_TIMEOUT", "Server", "serve"]

log = logging.getLogger(__name__)

#: How long a stop (SIGTERM, Ctrl-C) lets requests already received finish.
DEFAULT_DRAIN_SECONDS = 10.0
#: Seconds a connection may sit idle (or stall mid-request) before it is closed.
DEFAULT_IDLE_TIMEOUT = 30.0


class Server:
    """The dev server, startable in-process: ``Server(...).start()`` ... ``stop()``.

    Ports given as 0 are chosen by the OS; read them back from ``rest_port`` / ``grpc_port``
    after ``start()``.

    Example::

        with Server("export", "export/models.config", rest_port=0, grpc_port=0) as server:
            print(server.rest_url, server.grpc_address)
    """

    def __init__(
        self,
        model_base: Path | str | None = "export",
        models_config: Path | str | None = None,
        *,
        rest_port: int = 8501,
        grpc_port: int = 8500,
        host: str = "127.0.0.1",
        poll_seconds: float = 1.0,
        batching: BatchingParameters | None = None,
        max_workers: int = 64,
        limits: RequestLimits | None = None,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
    ) -> None:
        self.host = host
        self.limits = limits or RequestLimits()
        self.idle_timeout = idle_timeout
        self.rest_port = rest_port
        self.grpc_port = grpc_port
        self.poll_seconds = poll_seconds
        self.metrics = Metrics()
        self.manager = ModelManager(
            Path(model_base) if model_base is not None else None,
            Path(models_config) if models_config is not None else None,
            batching,
            on_batch=lambda m, n: self.metrics.batch_size.labels(m).observe(n),
            on_versions=lambda m, n: self.metrics.versions.labels(m).set(n),
        )
        self._max_workers = max_workers
        self._executor: futures.ThreadPoolExecutor | None = None
        self._grpc: GrpcApi | None = None
        self._rest: RestApi | None = None
        self._poll_thread: threading.Thread | None = None
        # Set once stop() has drained both APIs: late requests answer UNAVAILABLE, the poller
        # ends. (While draining, the APIs themselves refuse new connections and calls.)
        self._stopping = threading.Event()

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> Server:
        """Load the models, then open gRPC and REST; returns self once both listen."""
        self.manager.poll()
        self._executor = futures.ThreadPoolExecutor(self._max_workers, thread_name_prefix="rest")
        try:
            self._grpc = GrpcApi(
                self.manager, self.metrics, self._stopping, self.limits, self.idle_timeout
            )
            self.grpc_port = self._grpc.start(self.host, self.grpc_port, self._max_workers)
            self._rest = RestApi(
                self.manager,
                self.metrics,
                self._stopping,
                self._executor,
                self.limits,
                self.idle_timeout,
            )
            self.rest_port = self._rest.start(self.host, self.rest_port)
        except BaseException:
            self.stop(grace=0)
            raise
        if self.poll_seconds > 0:
            self._poll_thread = threading.Thread(
                target=self._poll_loop, name="version-poller", daemon=True
            )
            self._poll_thread.start()
        return self

    def stop(self, grace: float = 2.0) -> None:
        """Stop accepting, finish in-flight requests (up to ``grace`` s), unload everything.

        gRPC and REST drain at the same time, so the whole stop takes at most ``grace`` s
        plus the unload.
        """
        grpc_stopped = threading.Event()
        grpc_stopped.set()
        if self._grpc is not None:
            grpc_stopped = self._grpc.stop(grace)  # returns at once; drains in the background
            self._grpc = None
        if self._rest is not None:
            self._rest.stop(grace)
            self._rest = None
        grpc_stopped.wait(grace + 5)
        self._stopping.set()
        if self._poll_thread is not None:
            self._poll_thread.join(timeout=grace + 30)
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
        self.manager.close()

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def rest_url(self) -> str:
        """``http://host:port`` of the REST API (the bound port after ``start()``)."""
        return f"http://{self.host}:{self.rest_port}"

    @property
    def grpc_address(self) -> str:
        """``host:port`` of the gRPC API (the bound port after ``start()``)."""
        return f"{self.host}:{self.grpc_port}"

    def poll_now(self) -> None:
        """Scan the base paths immediately (the poll thread does this every poll_seconds)."""
        self.manager.poll()

    def _poll_loop(self) -> None:
        while not self._stopping.wait(self.poll_seconds):
            try:
                self.manager.poll()
            except Exception:  # noqa: BLE001 - keep polling; the error is logged
                log.exception("polling the model base paths failed")


def serve(
    model_base: Path | str | None = "export",
    models_config: Path | str | None = None,
    rest_port: int = 8501,
    grpc_port: int = 8500,
    host: str = "127.0.0.1",
    poll_seconds: float = 1.0,
    batching: BatchingParameters | None = None,
    *,
    ready: Callable[[Server], None] | None = None,
    limits: RequestLimits | None = None,
    drain_seconds: float = DEFAULT_DRAIN_SECONDS,
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
) -> None:
    """Run the server until Ctrl-C or SIGTERM, then drain for up to ``drain_seconds``."""
    server = Server(
        model_base,
        models_config,
        rest_port=rest_port,
        grpc_port=grpc_port,
        host=host,
        poll_seconds=poll_seconds,
        batching=batching,
        limits=limits,
        idle_timeout=idle_timeout,
    )
    done = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        done.set()

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, on_signal)
    try:
        server.start()
        if ready is not None:
            ready(server)
        while not done.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        log.info("stopping: finishing requests already received (up to %g s)", drain_seconds)
        server.stop(grace=drain_seconds)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
