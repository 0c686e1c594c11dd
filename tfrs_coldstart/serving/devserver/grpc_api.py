"""TF Serving's gRPC API (port 8500): ``PredictionService`` and ``ModelService``.

``Predict``, ``GetModelMetadata`` and ``GetModelStatus`` with the protos of
``tensorflow-serving-api``; a failure aborts the call with TF Serving's canonical code and
message. Classify, Regress, MultiInference and the reload RPCs are not implemented.

A message larger than ``max_request_bytes`` is refused by gRPC itself; the shapes a request
declares are checked against :class:`RequestLimits` before ``tf.make_ndarray`` expands them.
Connections idle for ``idle_timeout`` seconds are closed (clients reconnect transparently).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent import futures
from typing import Any

import grpc
import tensorflow as tf
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from tfrs_coldstart.serving.devserver.config import MAX_MESSAGE_BYTES
from tfrs_coldstart.serving.devserver.errors import ListenError, RpcError, invalid, to_rpc_error
from tfrs_coldstart.serving.devserver.limits import RequestLimits
from tfrs_coldstart.serving.devserver.manager import ModelManager
from tfrs_coldstart.serving.devserver.metrics import Metrics
from tfrs_coldstart.serving.devserver.servable import metadata_response
from tfrs_coldstart.serving.devserver.signature import dtype_name
from tfrs_coldstart.serving.status import Code

__all__ = ["GrpcApi"]

log = logging.getLogger(__name__)


class GrpcApi:
    """The gRPC services over a :class:`ModelManager`; ``start`` listens, ``stop`` closes.

    ``stopping`` is the server's shutdown flag: once set, calls answer UNAVAILABLE.
    """

    def __init__(
        self,
        manager: ModelManager,
        metrics: Metrics,
        stopping: threading.Event,
        limits: RequestLimits | None = None,
        idle_timeout: float = 30.0,
    ) -> None:
        self.manager = manager
        self.metrics = metrics
        self._stopping = stopping
        self.limits = limits or RequestLimits()
        self.idle_timeout = idle_timeout
        self._server: grpc.Server | None = None

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self, host: str, port: int, max_workers: int) -> int:
        """Listen on ``host:port`` (0 = a free port); returns the port once it listens."""
        options = [
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", self.limits.max_request_bytes),
            ("grpc.max_connection_idle_ms", max(1, int(self.idle_timeout * 1000))),
            ("grpc.so_reuseport", 0),
        ]
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers, thread_name_prefix="grpc"),
            options=options,
        )
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
            _PredictionServicer(self), server
        )
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(_ModelServicer(self), server)
        try:
            bound = server.add_insecure_port(f"{host}:{port}")
        except RuntimeError as exc:  # newer grpcio raises here; older ones return 0
            raise ListenError(f"cannot listen for gRPC on {host}:{port}: {exc}") from None
        if bound == 0:
            raise ListenError(f"cannot listen for gRPC on {host}:{port}")
        server.start()
        self._server = server
        return bound

    def stop(self, grace: float) -> threading.Event:
        """Refuse new calls, let running ones finish for up to ``grace`` seconds.

        Returns at once; the event is set once the server has stopped (``wait`` on it).
        """
        done = threading.Event()
        if self._server is None:
            done.set()
            return done
        server, self._server = self._server, None
        return server.stop(grace)

    # -- calls ---------------------------------------------------------------------------------
    def call(
        self, api: str, model: str, context: grpc.ServicerContext, fn: Callable[[], Any]
    ) -> Any:
        """Run one RPC: its errors abort the call with their code; every call is counted."""
        t0 = time.perf_counter()
        status = "OK"
        try:
            if self._stopping.is_set():
                raise RpcError(Code.UNAVAILABLE, "Server is shutting down")
            return fn()
        except RpcError as exc:
            status = exc.code.name
            context.abort(exc.code, exc.message)
        except Exception as exc:  # noqa: BLE001
            err = to_rpc_error(exc)
            status = err.code.name
            log.exception("gRPC %s failed", api)
            context.abort(err.code, err.message)
        finally:
            self.metrics.observe(model, api, "GRPC", status, time.perf_counter() - t0)

    @staticmethod
    def _spec_version(spec: Any) -> tuple[int | None, str | None]:
        version = spec.version.value if spec.HasField("version") else None
        label = spec.version_label if spec.HasField("version_label") else None
        return version, label

    def predict(self, request: predict_pb2.PredictRequest) -> predict_pb2.PredictResponse:
        """PredictionService.Predict."""
        spec = request.model_spec
        lv = self.manager.resolve(spec.name, *self._spec_version(spec))
        sig = lv.signature(spec.signature_name, grpc_api=True)
        # Declared sizes first: make_ndarray pads one float_val out to the declared shape.
        self.limits.check_tensor_protos(sorted(request.inputs.items()))
        inputs = {}
        for name, proto in request.inputs.items():
            expected = sig.inputs.get(name)
            if expected is not None and proto.dtype != expected.dtype:
                raise invalid(
                    f"Expects arg[{name}] to be {dtype_name(expected.dtype)} but "
                    f"{dtype_name(proto.dtype)} is provided"
                )
            try:
                inputs[name] = tf.make_ndarray(proto)
            except Exception as exc:  # noqa: BLE001
                raise invalid(f"input '{name}' is not a valid TensorProto: {exc}") from exc
        outputs = lv.predict_future(sig, inputs).result()
        wanted = list(request.output_filter) or sorted(outputs)
        response = predict_pb2.PredictResponse()
        for alias in wanted:
            if alias not in outputs:
                raise invalid(
                    f"output tensor alias not found in signature: {alias} Outputs "
                    f"expected to be in the set {{{','.join(sorted(outputs))}}}."
                )
            response.outputs[alias].CopyFrom(tf.make_tensor_proto(outputs[alias]))
        response.model_spec.name = lv.name
        response.model_spec.version.value = lv.version
        response.model_spec.signature_name = sig.name
        return response

    def metadata(
        self, request: get_model_metadata_pb2.GetModelMetadataRequest
    ) -> get_model_metadata_pb2.GetModelMetadataResponse:
        """PredictionService.GetModelMetadata (``signature_def`` only, as TF Serving)."""
        if not request.metadata_field:
            raise invalid("GetModelMetadataRequest must specify at least one metadata_field")
        for f in request.metadata_field:
            if f != "signature_def":
                raise invalid(f"Metadata field {f} is not supported")
        spec = request.model_spec
        lv = self.manager.resolve(spec.name, *self._spec_version(spec))
        return metadata_response(lv)

    def status(
        self, request: get_model_status_pb2.GetModelStatusRequest
    ) -> get_model_status_pb2.GetModelStatusResponse:
        """ModelService.GetModelStatus."""
        if not request.HasField("model_spec"):
            raise invalid("Missing ModelSpec")
        spec = request.model_spec
        return self.manager.status(spec.name, *self._spec_version(spec))


class _PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, api: GrpcApi) -> None:
        self._api = api

    def Predict(self, request, context):  # noqa: N802 - gRPC method name
        return self._api.call(
            "predict", request.model_spec.name, context, lambda: self._api.predict(request)
        )

    def GetModelMetadata(self, request, context):  # noqa: N802
        return self._api.call(
            "metadata", request.model_spec.name, context, lambda: self._api.metadata(request)
        )


class _ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, api: GrpcApi) -> None:
        self._api = api

    def GetModelStatus(self, request, context):  # noqa: N802
        return self._api.call(
            "status", request.model_spec.name, context, lambda: self._api.status(request)
        )
