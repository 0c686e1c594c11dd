"""A local model server that speaks TF Serving's REST and gRPC APIs.

Production serves the exported models with TF Serving itself (the project's
Dockerfile image, ``serving/k8s/``). This server exists for laptops and CI
machines that have neither Docker nor the ``tensorflow_model_server`` binary:
it answers the same URLs, protos, JSON shapes, status codes and error texts as
TF Serving, so code written against it runs unchanged against production.

What it does, as TF Serving does:

* reads ``serving/models.config`` (a ``ModelServerConfig`` text proto) or, when
  there is none, serves every folder under the model base path as a model;
  honours ``model_version_policy`` (``latest``, ``specific``, ``all``) and
  ``version_labels``;
* REST on 8501: ``POST /v1/models/<name>[/versions/N|/labels/L]:predict`` with
  the ``instances`` (row) and ``inputs`` (columnar) formats and ``{"b64": ...}``
  strings, ``GET /v1/models/<name>[...]`` (status) and ``.../metadata``,
  errors as ``{"error": "..."}`` with TF Serving's HTTP codes, Prometheus
  metrics at ``/monitoring/prometheus/metrics``;
* gRPC on 8500: ``PredictionService.Predict``/``GetModelMetadata`` and
  ``ModelService.GetModelStatus`` with matching status codes;
* polls the base paths for new versions, loads and warms a new version fully
  (``assets.extra/tf_serving_warmup_requests``) before publishing it, never
  drops an in-flight request, and unloads versions the policy no longer wants;
* batches concurrent requests for one model/version/signature
  (``batching.config``: ``max_batch_size``, ``batch_timeout_micros``,
  ``max_enqueued_batches``).

Where it is stricter than TF Serving (unknown keys in a columnar ``inputs``
object, ragged batches, input shapes) it is stricter on purpose: a request that
works here works there. It does not implement Classify/Regress/MultiInference,
request padding (``allowed_batch_sizes``) or model reload RPCs.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import logging
import math
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import grpc
import numpy as np
import prometheus_client
import tensorflow as tf
from aiohttp import web
from google.protobuf import (
    descriptor_pb2,
    descriptor_pool,
    json_format,
    message_factory,
    text_format,
    wrappers_pb2,
)
from tensorflow.core.framework import types_pb2
from tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_log_pb2,
    prediction_service_pb2_grpc,
)
from tensorflow_serving.config import model_server_config_pb2

__all__ = [
    "BatchingParameters",
    "ConfigError",
    "ModelConfig",
    "ModelManager",
    "Server",
    "discover_models",
    "main",
    "parse_batching_config",
    "parse_models_config",
    "serve",
]

log = logging.getLogger(__name__)

SIGNATURE_DEFAULT = "serving_default"
PROMETHEUS_PATH = "/monitoring/prometheus/metrics"
WARMUP_FILE = Path("assets.extra") / "tf_serving_warmup_requests"
_MAX_WARMUP_RECORDS = 1000  # TF Serving's limit
_MAX_MESSAGE_BYTES = 256 * 1024 * 1024

Code = grpc.StatusCode

# TF Serving's ToHTTPStatusCode (model_servers/http_server.cc).
HTTP_STATUS: dict[grpc.StatusCode, int] = {
    Code.OK: 200,
    Code.CANCELLED: 499,
    Code.UNKNOWN: 500,
    Code.INVALID_ARGUMENT: 400,
    Code.DEADLINE_EXCEEDED: 504,
    Code.NOT_FOUND: 404,
    Code.ALREADY_EXISTS: 409,
    Code.PERMISSION_DENIED: 403,
    Code.RESOURCE_EXHAUSTED: 429,
    Code.FAILED_PRECONDITION: 400,
    Code.ABORTED: 409,
    Code.OUT_OF_RANGE: 400,
    Code.UNIMPLEMENTED: 501,
    Code.INTERNAL: 500,
    Code.UNAVAILABLE: 503,
    Code.DATA_LOSS: 500,
    Code.UNAUTHENTICATED: 401,
}
_CODE_BY_NUMBER = {c.value[0]: c for c in Code}

# TF Serving's REST URL grammar (model_servers/http_rest_api_util.cc).
_PREDICT_RE = re.compile(
    r"/v1/models/([^/:]+)(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?:(classify|regress|predict)",
    re.IGNORECASE,
)
_STATUS_RE = re.compile(
    r"/v1/models(?:/([^/:]+))?(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?(?:/(metadata))?",
    re.IGNORECASE,
)


class ConfigError(ValueError):
    """A models.config, batching.config or model base path that cannot be served."""


class RpcError(Exception):
    """A request failure carrying a canonical status code, like TF Serving's Status."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def http_status(self) -> int:
        return HTTP_STATUS.get(self.code, 500)


def _invalid(message: str) -> RpcError:
    return RpcError(Code.INVALID_ARGUMENT, message)


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelConfig:
    """One model to serve: where its versions live and which of them to keep loaded."""

    name: str
    base_path: Path
    policy: str = "latest"  # latest | all | specific
    num_versions: int = 1  # for latest
    versions: tuple[int, ...] = ()  # for specific
    labels: Mapping[str, int] = field(default_factory=dict)

    def wanted(self, on_disk: Sequence[int]) -> set[int]:
        """The versions the policy aspires to, out of those on disk."""
        if self.policy == "all":
            return set(on_disk)
        if self.policy == "specific":
            return set(on_disk) & set(self.versions)
        return set(sorted(on_disk)[-self.num_versions :]) if on_disk else set()


@dataclass(frozen=True)
class BatchingParameters:
    """The subset of TF Serving's BatchingParameters this server acts on.

    Defaults are TF Serving's (SharedBatchScheduler::QueueOptions).
    """

    max_batch_size: int = 1000
    batch_timeout_micros: int = 0
    max_enqueued_batches: int = 10
    num_batch_threads: int = 1


def _resolve_base_path(base_path: str, name: str, model_base: Path | None) -> Path:
    """Use base_path if it exists, else look for it under the local model base.

    The committed models.config names Docker paths (``/models/student``); on a
    laptop the same config then serves ``<model-base>/student``.
    """
    path = Path(base_path)
    if path.exists() or model_base is None:
        return path
    for candidate in (model_base / path.name, model_base / name):
        if candidate.exists():
            return candidate
    return model_base / name


def parse_models_config(path: Path, model_base: Path | None = None) -> list[ModelConfig]:
    """Parse TF Serving's ModelServerConfig text proto into ModelConfigs."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the models config: {exc}") from exc
    cfg = model_server_config_pb2.ModelServerConfig()
    try:
        text_format.Parse(text, cfg)
    except text_format.ParseError as exc:
        raise ConfigError(
            f"{path}: not a valid ModelServerConfig text proto: {exc}. Fix the file; it must "
            "look like: model_config_list { config { name: 'student' base_path: '/models/student' "
            "model_platform: 'tensorflow' } }"
        ) from exc
    if cfg.WhichOneof("config") != "model_config_list":
        raise ConfigError(f"{path}: only model_config_list is supported (no custom_model_config)")
    models: list[ModelConfig] = []
    seen: set[str] = set()
    for i, c in enumerate(cfg.model_config_list.config):
        where = f"{path}: config #{i + 1}"
        if not c.name:
            raise ConfigError(f"{where}: missing 'name'")
        if c.name in seen:
            raise ConfigError(f"{where}: model name {c.name!r} appears twice")
        seen.add(c.name)
        if not c.base_path:
            raise ConfigError(f"{where} ({c.name}): missing 'base_path'")
        if c.model_platform not in ("", "tensorflow"):
            raise ConfigError(
                f"{where} ({c.name}): model_platform {c.model_platform!r} is not supported; "
                "use 'tensorflow'"
            )
        choice = c.model_version_policy.WhichOneof("policy_choice") or "latest"
        num_versions, versions = 1, ()
        if choice == "latest":
            num_versions = c.model_version_policy.latest.num_versions or 1
        elif choice == "specific":
            versions = tuple(int(v) for v in c.model_version_policy.specific.versions)
            if not versions:
                raise ConfigError(f"{where} ({c.name}): 'specific' policy lists no versions")
        labels = {str(k): int(v) for k, v in c.version_labels.items()}
        models.append(
            ModelConfig(
                name=c.name,
                base_path=_resolve_base_path(c.base_path, c.name, model_base),
                policy=choice,
                num_versions=num_versions,
                versions=versions,
                labels=labels,
            )
        )
    if not models:
        raise ConfigError(f"{path}: model_config_list has no config entries")
    return models


def discover_models(model_base: Path) -> list[ModelConfig]:
    """Every folder under model_base is a model, served with the latest-1 policy."""
    model_base = Path(model_base)
    if not model_base.is_dir():
        raise ConfigError(
            f"model base path {model_base} does not exist or is not a folder; export a model "
            "first (tfrs-coldstart export) or pass --model-base / --models-config"
        )
    return [
        ModelConfig(name=p.name, base_path=p)
        for p in sorted(model_base.iterdir())
        if p.is_dir() and not p.name.startswith(".")
    ]


def _batching_message_class() -> type:
    """Build TF Serving's BatchingParameters proto (not shipped in tensorflow-serving-api)."""
    fdp = descriptor_pb2.FileDescriptorProto(
        name="tfrs_coldstart/batching_parameters.proto",
        package="tensorflow.serving",
        syntax="proto3",
        dependency=["google/protobuf/wrappers.proto"],
    )
    msg = fdp.message_type.add(name="BatchingParameters")
    f = descriptor_pb2.FieldDescriptorProto
    wrapped = [
        ("max_batch_size", 1, ".google.protobuf.Int64Value"),
        ("batch_timeout_micros", 2, ".google.protobuf.Int64Value"),
        ("max_enqueued_batches", 3, ".google.protobuf.Int64Value"),
        ("num_batch_threads", 4, ".google.protobuf.Int64Value"),
        ("thread_pool_name", 5, ".google.protobuf.StringValue"),
        ("enable_large_batch_splitting", 8, ".google.protobuf.BoolValue"),
        ("max_execution_batch_size", 9, ".google.protobuf.Int64Value"),
    ]
    for name, number, type_name in wrapped:
        msg.field.add(
            name=name,
            number=number,
            type=f.TYPE_MESSAGE,
            type_name=type_name,
            label=f.LABEL_OPTIONAL,
        )
    msg.field.add(name="allowed_batch_sizes", number=6, type=f.TYPE_INT64, label=f.LABEL_REPEATED)
    msg.field.add(
        name="pad_variable_length_inputs", number=7, type=f.TYPE_BOOL, label=f.LABEL_OPTIONAL
    )
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(wrappers_pb2.DESCRIPTOR.serialized_pb)
    pool.Add(fdp)
    return message_factory.GetMessageClass(
        pool.FindMessageTypeByName("tensorflow.serving.BatchingParameters")
    )


def parse_batching_config(path: Path) -> BatchingParameters:
    """Parse TF Serving's batching.config (BatchingParameters text proto)."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the batching config: {exc}") from exc
    msg = _batching_message_class()()
    try:
        text_format.Parse(text, msg)
    except text_format.ParseError as exc:
        raise ConfigError(
            f"{path}: not a valid BatchingParameters text proto: {exc}. Expected fields like "
            "max_batch_size { value: 128 } batch_timeout_micros { value: 1000 }"
        ) from exc
    defaults = BatchingParameters()
    values: dict[str, int] = {}
    for name in (
        "max_batch_size",
        "batch_timeout_micros",
        "max_enqueued_batches",
        "num_batch_threads",
    ):
        if msg.HasField(name):
            values[name] = int(getattr(msg, name).value)
        else:
            values[name] = getattr(defaults, name)
    for name in ("max_batch_size", "max_enqueued_batches", "num_batch_threads"):
        if values[name] < 1:
            raise ConfigError(f"{path}: {name} must be >= 1, got {values[name]}")
    if values["batch_timeout_micros"] < 0:
        raise ConfigError(f"{path}: batch_timeout_micros must be >= 0")
    if msg.allowed_batch_sizes or msg.pad_variable_length_inputs:
        log.warning(
            "%s: allowed_batch_sizes / pad_variable_length_inputs are ignored by the "
            "dev server (TF Serving honours them)",
            path,
        )
    return BatchingParameters(**values)


# ----------------------------------------------------------------------------------------------
# Signatures and tensors
# ----------------------------------------------------------------------------------------------


def _dtype_name(enum: int) -> str:
    """TF's DataTypeString: DT_FLOAT -> 'float'."""
    try:
        return types_pb2.DataType.Name(enum)[3:].lower()
    except ValueError:
        return f"dtype({enum})"


def _shape_of(info: meta_graph_pb2.TensorInfo) -> list[int] | None:
    if info.tensor_shape.unknown_rank:
        return None
    return [int(d.size) for d in info.tensor_shape.dim]


def _np_dtype(enum: int) -> np.dtype:
    if enum == types_pb2.DT_STRING:
        return np.dtype(object)
    return np.dtype(tf.dtypes.as_dtype(enum).as_numpy_dtype)


@dataclass
class _Signature:
    """A callable signature plus what requests are checked against."""

    name: str
    fn: Callable[..., Mapping[str, tf.Tensor]] | None
    inputs: Mapping[str, meta_graph_pb2.TensorInfo]
    outputs: Mapping[str, meta_graph_pb2.TensorInfo]

    @property
    def batchable(self) -> bool:
        """Every input and output is batch-major with a free batch dimension."""
        infos = list(self.inputs.values()) + list(self.outputs.values())
        if not self.inputs:
            return False
        for info in infos:
            shape = _shape_of(info)
            if not shape or shape[0] != -1:
                return False
        return True


def _signature_from_proto(name: str, sig: meta_graph_pb2.SignatureDef, fn: Any) -> _Signature:
    return _Signature(name=name, fn=fn, inputs=dict(sig.inputs), outputs=dict(sig.outputs))


def _to_tf_error(exc: BaseException) -> RpcError:
    if isinstance(exc, RpcError):
        return exc
    if isinstance(exc, tf.errors.OpError):
        code = _CODE_BY_NUMBER.get(int(exc.error_code), Code.UNKNOWN)
        return RpcError(code, exc.message)
    if isinstance(exc, (TypeError, ValueError)):
        return _invalid(str(exc))
    return RpcError(Code.INTERNAL, f"{type(exc).__name__}: {exc}")


# ----------------------------------------------------------------------------------------------
# Batching
# ----------------------------------------------------------------------------------------------


@dataclass
class _Task:
    inputs: dict[str, np.ndarray]
    size: int
    key: tuple
    future: futures.Future
    enqueued: float


class _Batcher:
    """Concatenates concurrent requests of one version/signature along the batch dimension.

    Each of ``num_batch_threads`` workers waits up to ``batch_timeout_micros`` after the oldest
    task for the batch to fill to ``max_batch_size``, runs it once and splits the outputs back.
    Tasks only share a batch when their non-batch dimensions and dtypes agree.
    """

    def __init__(
        self,
        run: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
        params: BatchingParameters,
        on_batch: Callable[[int], None],
        name: str,
    ) -> None:
        self._run = run
        self._params = params
        self._on_batch = on_batch
        self._cond = threading.Condition()
        self._queue: list[_Task] = []
        self._closed = False
        for i in range(max(1, params.num_batch_threads)):
            threading.Thread(target=self._loop, name=f"batcher-{name}-{i}", daemon=True).start()

    def submit(self, inputs: dict[str, np.ndarray], size: int) -> futures.Future | None:
        """Queue a task; None when the batcher is closed (the caller then runs it itself)."""
        key = tuple(sorted((k, v.dtype.str, v.shape[1:]) for k, v in inputs.items()))
        fut: futures.Future = futures.Future()
        with self._cond:
            if self._closed:
                return None
            queued = sum(t.size for t in self._queue)
            limit = self._params.max_enqueued_batches * self._params.max_batch_size
            if queued + size > limit:
                raise RpcError(
                    Code.UNAVAILABLE,
                    "The batch scheduling queue to which this task was submitted is full",
                )
            self._queue.append(_Task(inputs, size, key, fut, time.monotonic()))
            self._cond.notify_all()
        return fut

    def close(self) -> None:
        """Stop taking tasks; queued ones still run."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _take(self) -> list[_Task]:
        first = self._queue[0]
        batch, total = [], 0
        for task in list(self._queue):
            if task.key != first.key:
                continue
            if total + task.size > self._params.max_batch_size:
                break
            batch.append(task)
            total += task.size
        for task in batch:
            self._queue.remove(task)
        return batch

    def _ready_size(self) -> int:
        first = self._queue[0]
        return sum(t.size for t in self._queue if t.key == first.key)

    def _loop(self) -> None:
        timeout = self._params.batch_timeout_micros / 1e6
        while True:
            with self._cond:
                while True:  # other workers may take tasks while this one waits: re-check
                    if not self._queue:
                        if self._closed:
                            return
                        self._cond.wait()
                        continue
                    remaining = self._queue[0].enqueued + timeout - time.monotonic()
                    full = self._ready_size() >= self._params.max_batch_size
                    if self._closed or full or remaining <= 0:
                        break
                    self._cond.wait(remaining)
                batch = self._take()
            try:
                self._execute(batch)
            except BaseException as exc:  # noqa: BLE001 - never leave a request waiting
                log.exception("batch failed")
                for task in batch:
                    if not task.future.done():
                        task.future.set_exception(_to_tf_error(exc))

    def _execute(self, batch: list[_Task]) -> None:
        live = [t for t in batch if t.future.set_running_or_notify_cancel()]
        if not live:
            return
        total = sum(t.size for t in live)
        self._on_batch(total)
        if len(live) == 1:
            self._run_one(live[0])
            return
        try:
            merged = {
                name: np.concatenate([t.inputs[name] for t in live], axis=0)
                for name in live[0].inputs
            }
            outputs = self._run(merged)
        except BaseException as exc:  # noqa: BLE001 - every task must get an answer
            for task in live:
                task.future.set_exception(_to_tf_error(exc))
            return
        if any(np.ndim(v) == 0 or np.shape(v)[0] != total for v in outputs.values()):
            for task in live:  # outputs are not batch-major after all: run one by one
                self._run_one(task)
            return
        offset = 0
        for task in live:
            end = offset + task.size
            task.future.set_result({k: v[offset:end] for k, v in outputs.items()})
            offset = end

    def _run_one(self, task: _Task) -> None:
        try:
            task.future.set_result(self._run(task.inputs))
        except BaseException as exc:  # noqa: BLE001
            task.future.set_exception(_to_tf_error(exc))


# ----------------------------------------------------------------------------------------------
# Loaded versions
# ----------------------------------------------------------------------------------------------


def _import_scann() -> None:
    """Register ScaNN's custom ops so SavedModels with a ScaNN index load."""
    with contextlib.suppress(ImportError):  # scann is optional for brute-force exports
        import scann  # noqa: F401


def _read_meta_graph(path: Path) -> meta_graph_pb2.MetaGraphDef:
    sm = saved_model_pb2.SavedModel()
    pb, pbtxt = path / "saved_model.pb", path / "saved_model.pbtxt"
    if pb.exists():
        sm.ParseFromString(pb.read_bytes())
    else:
        text_format.Parse(pbtxt.read_text(), sm)
    for mg in sm.meta_graphs:
        if "serve" in mg.meta_info_def.tags:
            return mg
    raise ConfigError(f"{path}: SavedModel has no MetaGraph tagged 'serve'")


class LoadedVersion:
    """One loaded SavedModel version. Requests hold a reference, so unloading never cuts them."""

    def __init__(
        self,
        name: str,
        version: int,
        path: Path,
        batching: BatchingParameters | None,
        on_batch: Callable[[str, int], None] | None = None,
    ) -> None:
        self.name = name
        self.version = version
        self.path = path
        self._batching = batching
        self._on_batch = on_batch
        self._batchers: dict[str, _Batcher] = {}
        self._lock = threading.Lock()
        self._closed = False
        _import_scann()
        meta_graph = _read_meta_graph(path)
        self.signature_defs: dict[str, meta_graph_pb2.SignatureDef] = dict(meta_graph.signature_def)
        self._module = tf.saved_model.load(str(path), tags=["serve"])
        fns = dict(self._module.signatures)
        self.signatures = {
            k: _signature_from_proto(k, s, fns.get(k)) for k, s in self.signature_defs.items()
        }

    # -- running -------------------------------------------------------------------------------
    def _call(self, sig: _Signature, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        assert sig.fn is not None
        tensors = {
            k: tf.constant(v, dtype=tf.dtypes.as_dtype(sig.inputs[k].dtype))
            for k, v in inputs.items()
        }
        result = sig.fn(**tensors)
        return {k: v.numpy() for k, v in result.items()}

    def _batcher(self, sig: _Signature) -> _Batcher | None:
        if self._batching is None or not sig.batchable:
            return None
        with self._lock:
            if self._closed:
                return None
            batcher = self._batchers.get(sig.name)
            if batcher is None:
                batcher = _Batcher(
                    lambda x, s=sig: self._call(s, x),
                    self._batching,
                    lambda n: self._on_batch(self.name, n) if self._on_batch else None,
                    f"{self.name}-{self.version}-{sig.name}",
                )
                self._batchers[sig.name] = batcher
            return batcher

    def signature(self, name: str, *, grpc_api: bool) -> _Signature:
        name = name or SIGNATURE_DEFAULT
        sig = self.signatures.get(name)
        if sig is None:
            if grpc_api:
                raise RpcError(
                    Code.FAILED_PRECONDITION, f'Serving signature key "{name}" not found.'
                )
            raise _invalid(f'Serving signature name: "{name}" not found in signature def')
        return sig

    def validate(self, sig: _Signature, inputs: Mapping[str, np.ndarray]) -> int | None:
        """Check names, dtypes, shapes and the batch dimension; return the batch size."""
        sent, wanted = set(inputs), set(sig.inputs)
        if sent != wanted:
            raise _invalid(
                f"input size does not match signature: {len(sent)}!={len(wanted)} "
                f"len({{{','.join(sorted(sent))}}}) != len({{{','.join(sorted(wanted))}}}). "
                f"Sent extra: {{{','.join(sorted(sent - wanted))}}}. "
                f"Missing but required: {{{','.join(sorted(wanted - sent))}}}."
            )
        for name in sorted(inputs):
            arr, info = inputs[name], sig.inputs[name]
            expected = _np_dtype(info.dtype)
            if arr.dtype != expected:
                try:
                    got = (
                        "string"
                        if arr.dtype == object
                        else _dtype_name(tf.dtypes.as_dtype(arr.dtype).as_datatype_enum)
                    )
                except TypeError:
                    got = str(arr.dtype)
                raise _invalid(
                    f"Expects arg[{name}] to be {_dtype_name(info.dtype)} but {got} is provided"
                )
            shape = _shape_of(info)
            if shape is not None and (
                len(shape) != arr.ndim
                or any(s not in (-1, a) for s, a in zip(shape, arr.shape, strict=True))
            ):
                raise _invalid(
                    f"input '{name}' of signature '{sig.name}' has shape {list(arr.shape)} but the "
                    f"signature expects {shape} (-1 is any size)"
                )
        if not sig.batchable:
            return None
        sizes = {name: int(arr.shape[0]) for name, arr in inputs.items()}
        if len(set(sizes.values())) > 1:
            detail = ", ".join(f"{k}={v}" for k, v in sorted(sizes.items()))
            raise _invalid(
                "Batching Run() input tensors must have equal 0th-dimension size; got "
                f"{detail}. Send one row per example in every input."
            )
        size = next(iter(sizes.values()))
        if self._batching is not None and size > self._batching.max_batch_size:
            raise _invalid(
                f"Task size {size} is larger than maximum input batch size "
                f"{self._batching.max_batch_size}"
            )
        return size

    def predict_future(self, sig: _Signature, inputs: dict[str, np.ndarray]) -> futures.Future:
        """Validate, then run through the batcher (or directly); returns a Future of outputs."""
        if sig.fn is None:
            raise _invalid(
                f"signature '{sig.name}' of model {self.name} cannot be run for prediction"
            )
        size = self.validate(sig, inputs)
        batcher = self._batcher(sig) if size else None
        if batcher is not None:
            fut = batcher.submit(inputs, size or 0)
            if fut is not None:
                return fut
        fut = futures.Future()
        fut.set_running_or_notify_cancel()
        try:
            fut.set_result(self._call(sig, inputs))
        except BaseException as exc:  # noqa: BLE001
            fut.set_exception(_to_tf_error(exc))
        return fut

    def predict(
        self, signature_name: str, inputs: dict[str, np.ndarray], *, grpc_api: bool = True
    ) -> dict[str, np.ndarray]:
        sig = self.signature(signature_name, grpc_api=grpc_api)
        return self.predict_future(sig, inputs).result()

    def warm_up(self) -> int:
        """Replay the warm-up requests like TF Serving; a failing one fails the load."""
        path = self.path / WARMUP_FILE
        if not path.exists():
            return 0
        count = 0
        for record in tf.data.TFRecordDataset(str(path)).take(_MAX_WARMUP_RECORDS):
            log_entry = prediction_log_pb2.PredictionLog.FromString(record.numpy())
            kind = log_entry.WhichOneof("log_type")
            if kind != "predict_log":
                raise ConfigError(
                    f"{path}: warm-up record #{count + 1} is {kind}; only predict_log is supported"
                )
            req = log_entry.predict_log.request
            inputs = {k: tf.make_ndarray(v) for k, v in req.inputs.items()}
            try:
                self.predict(req.model_spec.signature_name, inputs)
            except RpcError as exc:
                raise ConfigError(
                    f"{path}: warm-up request #{count + 1} failed: {exc.code.name}: {exc.message}"
                ) from exc
            count += 1
        return count

    def close(self) -> None:
        with self._lock:
            self._closed = True
            batchers = list(self._batchers.values())
        for b in batchers:
            b.close()


# ----------------------------------------------------------------------------------------------
# Model manager: versions, policies, labels, polling
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _VersionState:
    state: int  # get_model_status_pb2.ModelVersionStatus.State
    error_code: int = 0
    error_message: str = ""


@dataclass(frozen=True)
class _ModelState:
    config: ModelConfig
    available: Mapping[int, LoadedVersion]
    states: Mapping[int, _VersionState]


_STATE = get_model_status_pb2.ModelVersionStatus


def _versions_on_disk(base: Path) -> dict[int, Path]:
    """Integer-named folders that hold a complete SavedModel (others are ignored, as TF Serving)."""
    if not base.is_dir():
        return {}
    found: dict[int, Path] = {}
    for p in base.iterdir():
        complete = (p / "saved_model.pb").exists() or (p / "saved_model.pbtxt").exists()
        if p.is_dir() and p.name.isdigit() and complete:
            found[int(p.name)] = p
    return found


class ModelManager:
    """Owns every loaded version. State is swapped whole, so readers never see a half update."""

    def __init__(
        self,
        model_base: Path | None,
        models_config: Path | None,
        batching: BatchingParameters | None = None,
        on_batch: Callable[[str, int], None] | None = None,
        on_versions: Callable[[str, int], None] | None = None,
    ) -> None:
        self.model_base = Path(model_base) if model_base is not None else None
        self.models_config = Path(models_config) if models_config is not None else None
        self.batching = batching
        self._on_batch = on_batch
        self._on_versions = on_versions
        self._models: dict[str, _ModelState] = {}
        self._failed: dict[tuple[str, int], float] = {}
        self._warned_empty: set[str] = set()
        self._poll_lock = threading.Lock()
        self._config_mtime: float | None = None
        self._configs = self._read_configs()

    def _read_configs(self) -> list[ModelConfig]:
        if self.models_config is not None:
            self._config_mtime = self.models_config.stat().st_mtime
            return parse_models_config(self.models_config, self.model_base)
        if self.model_base is None:
            raise ConfigError("give a model base path or a models config")
        return discover_models(self.model_base)

    def _refresh_configs(self) -> None:
        try:
            if self.models_config is not None:
                mtime = self.models_config.stat().st_mtime
                if mtime != self._config_mtime:
                    self._configs = self._read_configs()
                    log.info("reloaded %s", self.models_config)
            elif self.model_base is not None:
                self._configs = discover_models(self.model_base)
        except (ConfigError, OSError) as exc:
            log.error("keeping the previous model config: %s", exc)

    @property
    def model_names(self) -> list[str]:
        return sorted(self._models)

    def poll(self) -> None:
        """Scan every base path once: load wanted versions, publish, unload the rest."""
        with self._poll_lock:
            self._refresh_configs()
            configs = {c.name: c for c in self._configs}
            for name in list(self._models):
                if name not in configs:
                    self._unload_model(name)
            for cfg in configs.values():
                self._poll_model(cfg)

    def _publish(self, name: str, state: _ModelState | None) -> None:
        models = dict(self._models)
        if state is None:
            models.pop(name, None)
        else:
            models[name] = state
        self._models = models  # one reference swap: requests see old or new, never a mix
        if self._on_versions:
            self._on_versions(name, len(state.available) if state else 0)

    def _unload_model(self, name: str) -> None:
        old = self._models.get(name)
        self._publish(name, None)
        if old:
            for lv in old.available.values():
                lv.close()

    def _poll_model(self, cfg: ModelConfig) -> None:
        old = self._models.get(cfg.name) or _ModelState(cfg, {}, {})
        on_disk = _versions_on_disk(cfg.base_path)
        if not on_disk and cfg.name not in self._warned_empty:
            self._warned_empty.add(cfg.name)
            log.warning("no versions of model %s found under %s", cfg.name, cfg.base_path)
        wanted = cfg.wanted(sorted(on_disk))
        available = dict(old.available)
        states = dict(old.states)
        to_load = []
        for v in sorted(wanted - set(available)):
            stamp = self._stamp(on_disk[v])
            if self._failed.get((cfg.name, v)) == stamp:
                continue
            to_load.append(v)
        if to_load:
            for v in to_load:
                states[v] = _VersionState(_STATE.LOADING)
            self._publish(cfg.name, _ModelState(cfg, dict(available), dict(states)))
        for v in to_load:
            lv = self._load(cfg.name, v, on_disk[v])
            if isinstance(lv, LoadedVersion):
                available[v] = lv
                states[v] = _VersionState(_STATE.AVAILABLE)
                self._failed.pop((cfg.name, v), None)
            else:
                self._failed[(cfg.name, v)] = self._stamp(on_disk[v])
                states[v] = _VersionState(_STATE.END, Code.UNKNOWN.value[0], lv)
        unwanted = [v for v in available if v not in wanted]
        # Availability first: never unload the last serving versions for ones that failed.
        if unwanted and not any(v in available for v in wanted):
            unwanted = []
        dropped = [available.pop(v) for v in unwanted]
        for v in unwanted:
            states[v] = _VersionState(_STATE.END)
        if to_load or dropped or cfg != old.config or cfg.name not in self._models:
            self._publish(cfg.name, _ModelState(cfg, available, states))
        for lv in dropped:
            log.info("unloaded %s version %d", cfg.name, lv.version)
            lv.close()

    @staticmethod
    def _stamp(path: Path) -> float:
        try:
            return max(path.stat().st_mtime, (path / "saved_model.pb").stat().st_mtime)
        except OSError:
            return path.stat().st_mtime

    def _load(self, name: str, version: int, path: Path) -> LoadedVersion | str:
        t0 = time.perf_counter()
        try:
            lv = LoadedVersion(name, version, path, self.batching, self._on_batch)
            warmed = lv.warm_up()
        except Exception as exc:  # noqa: BLE001 - a bad version must not stop the server
            msg = f"Loading servable: {{name: {name} version: {version}}} failed: {exc}"
            log.error(msg)
            return msg
        log.info(
            "loaded %s version %d from %s in %.2fs (%d warm-up requests)",
            name,
            version,
            path,
            time.perf_counter() - t0,
            warmed,
        )
        return lv

    # -- lookups -------------------------------------------------------------------------------
    def resolve(
        self, name: str, version: int | None = None, label: str | None = None
    ) -> LoadedVersion:
        """The servable for a request, with TF Serving's errors for unknown name/version/label."""
        if version is not None and label is not None:
            raise _invalid(
                f"Both model version ({version}) and model version label ({label}) "
                "cannot be supplied."
            )
        state = self._models.get(name)
        if label is not None:
            if state is None or label not in state.config.labels:
                raise _invalid(f"Unrecognized servable version label: {label}")
            version = state.config.labels[label]
        if state is None or not state.available:
            which = f"Latest({name})" if version is None else f"Specific({name}, {version})"
            raise RpcError(Code.NOT_FOUND, f"Servable not found for request: {which}")
        if version is None:
            return state.available[max(state.available)]
        lv = state.available.get(version)
        if lv is None:
            raise RpcError(
                Code.NOT_FOUND, f"Servable not found for request: Specific({name}, {version})"
            )
        return lv

    def status(
        self, name: str, version: int | None = None, label: str | None = None
    ) -> get_model_status_pb2.GetModelStatusResponse:
        state = self._models.get(name)
        if label is not None:
            if state is None or label not in state.config.labels:
                raise _invalid(f"Unrecognized servable version label: {label}")
            version = state.config.labels[label]
        response = get_model_status_pb2.GetModelStatusResponse()
        states = dict(state.states) if state else {}
        if version is not None:
            if version not in states:
                raise RpcError(Code.NOT_FOUND, f"Could not find version {version} of model {name}")
            states = {version: states[version]}
        if not states:
            raise RpcError(Code.NOT_FOUND, f"Could not find any versions of model {name}")
        for v in sorted(states, reverse=True):
            st = states[v]
            item = response.model_version_status.add(version=v, state=st.state)
            item.status.error_code = st.error_code
            item.status.error_message = st.error_message
        return response

    def close(self) -> None:
        models, self._models = self._models, {}
        for st in models.values():
            for lv in st.available.values():
                lv.close()


# ----------------------------------------------------------------------------------------------
# JSON <-> tensors (TF Serving's util/json_tensor.cc rules)
# ----------------------------------------------------------------------------------------------


def _json_type(val: Any) -> str:
    if val is None:
        return "Null"
    if val is True:
        return "True"
    if val is False:
        return "False"
    if isinstance(val, dict):
        return "Object"
    if isinstance(val, list):
        return "Array"
    if isinstance(val, str):
        return "String"
    return "Number"


def _json_str(val: Any) -> str:
    text = json.dumps(val, separators=(",", ":"))
    return text if len(text) <= 200 else text[:200] + "..."


def _is_b64(val: Any) -> bool:
    return isinstance(val, dict) and len(val) == 1 and isinstance(val.get("b64"), str)


_INT_RANGES = {
    types_pb2.DT_INT8: (-(2**7), 2**7 - 1),
    types_pb2.DT_UINT8: (0, 2**8 - 1),
    types_pb2.DT_INT16: (-(2**15), 2**15 - 1),
    types_pb2.DT_INT32: (-(2**31), 2**31 - 1),
    types_pb2.DT_INT64: (-(2**63), 2**63 - 1),
    types_pb2.DT_UINT32: (0, 2**32 - 1),
    types_pb2.DT_UINT64: (0, 2**64 - 1),
}
_FLOAT_LIMITS = {
    types_pb2.DT_FLOAT: (2**24 - 1, float(np.finfo(np.float32).max)),
    types_pb2.DT_DOUBLE: (2**53 - 1, float(np.finfo(np.float64).max)),
    types_pb2.DT_HALF: (2**11 - 1, float(np.finfo(np.float16).max)),
}


def _type_error(val: Any, dtype: int) -> RpcError:
    return _invalid(
        f"JSON Value: {_json_str(val)} Type: {_json_type(val)} is not of expected "
        f"type: {_dtype_name(dtype)}"
    )


def _leaf(val: Any, dtype: int) -> Any:
    if dtype == types_pb2.DT_STRING:
        if isinstance(val, str):
            return val.encode("utf-8")
        if isinstance(val, dict):
            if not _is_b64(val):
                raise _invalid(
                    f"JSON Value: {_json_str(val)} not formatted correctly for base64 data"
                )
            try:
                return base64.b64decode(val["b64"], validate=True)
            except (ValueError, TypeError) as exc:
                raise _invalid("Unable to base64 decode") from exc
        raise _type_error(val, dtype)
    is_number = isinstance(val, (int, float)) and not isinstance(val, bool)
    if dtype in _FLOAT_LIMITS:
        if not is_number:
            raise _type_error(val, dtype)
        max_int, max_float = _FLOAT_LIMITS[dtype]
        lossy = (
            (abs(val) > max_int)
            if isinstance(val, int)
            else (math.isfinite(val) and abs(val) > max_float)
        )
        if lossy:
            raise _invalid(
                f"Cannot convert JSON value: {_json_str(val)} to "
                f"{_dtype_name(dtype)} without loss of precision."
            )
        return val
    if dtype in _INT_RANGES:
        lo, hi = _INT_RANGES[dtype]
        if not isinstance(val, int) or isinstance(val, bool) or not lo <= val <= hi:
            raise _type_error(val, dtype)
        return val
    if dtype == types_pb2.DT_BOOL:
        if not isinstance(val, bool):
            raise _type_error(val, dtype)
        return val
    raise RpcError(
        Code.UNIMPLEMENTED,
        f"Conversion of JSON Value: {_json_str(val)} to type: {_dtype_name(dtype)}",
    )


def _dense_shape(val: Any) -> list[int]:
    shape = []
    while isinstance(val, list):
        shape.append(len(val))
        if not val:
            break
        val = val[0]
    return shape


def _fill(val: Any, level: int, shape: list[int], dtype: int, out: list) -> None:
    rank = len(shape)
    if not isinstance(val, list):
        if level != rank:
            raise _invalid(
                f"JSON Value: {_json_str(val)} found at incorrect level: {level + 1} "
                f"in the JSON DOM. Expected at level: {rank}"
            )
        out.append(_leaf(val, dtype))
        return
    if level >= rank:
        raise _invalid(f"Encountered list at unexpected level: {level} expected < {rank}")
    if len(val) != shape[level]:
        raise _invalid(
            f"Encountered list at unexpected size: {len(val)} at level: {level} "
            f"expected size: {shape[level]}"
        )
    for item in val:
        _fill(item, level + 1, shape, dtype, out)


def _json_to_flat(val: Any, dtype: int) -> tuple[list, list[int]]:
    shape = _dense_shape(val)
    flat: list = []
    _fill(val, 0, shape, dtype, flat)
    return flat, shape


def _flat_to_array(flat: list, shape: list[int], dtype: int) -> np.ndarray:
    np_dtype = _np_dtype(dtype)
    if np_dtype.kind == "O":
        arr = np.empty(len(flat), dtype=object)
        arr[:] = flat
        return arr.reshape(shape)
    return np.asarray(flat, dtype=np_dtype).reshape(shape)


def json_to_inputs(
    doc: Mapping[str, Any], sig_inputs: Mapping[str, meta_graph_pb2.TensorInfo]
) -> tuple[dict[str, np.ndarray], str]:
    """Turn a parsed predict body into named arrays; returns (inputs, 'row' | 'columnar')."""
    if not sig_inputs:
        raise _invalid("Failed to get input map for signature")
    has_instances, has_inputs = "instances" in doc, "inputs" in doc
    if has_instances and has_inputs:
        raise _invalid(
            f"JSON Value: {_json_str(doc)} Not formatted correctly expecting only one "
            "of 'inputs' or 'instances' keys to exist "
        )
    if has_instances:
        return _instances_to_inputs(doc, sig_inputs), "row"
    if has_inputs:
        return _columnar_to_inputs(doc["inputs"], sig_inputs), "columnar"
    raise _invalid("Missing 'inputs' or 'instances' key")


def _instances_to_inputs(
    doc: Mapping[str, Any], sig_inputs: Mapping[str, meta_graph_pb2.TensorInfo]
) -> dict[str, np.ndarray]:
    instances = doc["instances"]
    if not isinstance(instances, list):
        raise _invalid(f"JSON Value: {_json_str(doc)} Excepting 'instances' to be an list/array")
    if not instances:
        raise _invalid(f"JSON Value: {_json_str(doc)} No values in 'instances' array")

    def is_object(v: Any) -> bool:
        return isinstance(v, dict) and not _is_b64(v)

    objects = is_object(instances[0])
    if not objects and len(sig_inputs) > 1:
        raise _invalid(
            "instances is a plain list, but expecting list of objects as multiple "
            "input tensors required as per tensorinfo_map"
        )
    names = sorted(sig_inputs)
    flats: dict[str, list] = {n: [] for n in names}
    shapes: dict[str, list[int]] = {}

    def add(i: int, name: str, value: Any, key_note: str) -> None:
        if name not in sig_inputs:
            raise _invalid(
                f"Failed to process element: {i}{key_note} of 'instances' list. "
                f"Error: INVALID_ARGUMENT: JSON object: does not have named input: "
                f"{name}"
            )
        try:
            flat, shape = _json_to_flat(value, sig_inputs[name].dtype)
        except RpcError as exc:
            raise RpcError(
                exc.code,
                f"Failed to process element: {i}{key_note} of 'instances' "
                f"list. Error: {exc.code.name}: {exc.message}",
            ) from exc
        if name in shapes and shapes[name] != shape:
            raise _invalid(
                f"Failed to process element: {i}{key_note} of 'instances' list. "
                f"Error: INVALID_ARGUMENT: Expecting shape {shapes[name]} but got: "
                f"{shape}"
            )
        shapes[name] = shape
        flats[name].extend(flat)

    for i, elem in enumerate(instances):
        if objects:
            if not is_object(elem):
                raise _invalid(f"Expecting object but got list at item {i} of input list")
            for key, value in elem.items():
                add(i, key, value, f" key: {key}")
            if set(elem) != set(names):
                raise _invalid(
                    f"Failed to process element: {i} of 'instances' list. JSON object: "
                    f"{_json_str(elem)} keys must be equal to: {','.join(names)}"
                )
        else:
            if is_object(elem):
                raise _invalid(f"Expecting value/list but got object at item {i} of input list")
            add(i, names[0], elem, "")
    n = len(instances)
    return {
        name: _flat_to_array(flats[name], [n, *shapes[name]], sig_inputs[name].dtype)
        for name in names
    }


def _columnar_to_inputs(
    val: Any, sig_inputs: Mapping[str, meta_graph_pb2.TensorInfo]
) -> dict[str, np.ndarray]:
    if not isinstance(val, dict) or _is_b64(val):
        if len(sig_inputs) > 1:
            raise _invalid(
                "inputs is a plain value/list, but expecting an object as multiple "
                "input tensors required as per tensorinfo_map"
            )
        name = next(iter(sig_inputs))
        flat, shape = _json_to_flat(val, sig_inputs[name].dtype)
        return {name: _flat_to_array(flat, shape, sig_inputs[name].dtype)}
    unknown = sorted(set(val) - set(sig_inputs))
    if unknown:
        raise _invalid(
            f"JSON object: does not have named input: {unknown[0]} (the signature's "
            f"inputs are {','.join(sorted(sig_inputs))})"
        )
    out = {}
    for name in sorted(sig_inputs):
        if name not in val:
            raise _invalid(f"Missing named input: {name} in 'inputs' object.")
        try:
            flat, shape = _json_to_flat(val[name], sig_inputs[name].dtype)
        except RpcError as exc:
            raise RpcError(exc.code, f"input '{name}': {exc.message}") from exc
        out[name] = _flat_to_array(flat, shape, sig_inputs[name].dtype)
    return out


def _array_to_json(arr: np.ndarray, name: str) -> Any:
    """A tensor as nested JSON lists; strings as text, or {"b64"} for *_bytes / non-UTF-8."""
    arr = np.asarray(arr)
    if arr.dtype == object or arr.dtype.kind in "SU":
        as_bytes = name.endswith("_bytes")

        def conv(b: Any) -> Any:
            if isinstance(b, str):
                b = b.encode("utf-8")
            if not as_bytes:
                try:
                    return b.decode("utf-8")
                except UnicodeDecodeError:
                    pass
            return {"b64": base64.b64encode(b).decode("ascii")}

        flat = np.empty(arr.size, dtype=object)
        flat[:] = [conv(b) for b in arr.ravel().tolist()]
        return flat.reshape(arr.shape).tolist()
    if arr.dtype in (np.float32, np.float16):
        # Shortest round-trip text of the float32 value, as TF Serving writes it.
        return arr.astype(str).astype(np.float64).tolist()
    return arr.tolist()


def outputs_to_json(outputs: Mapping[str, np.ndarray], fmt: str) -> dict[str, Any]:
    """TF Serving's response body: {"predictions": [...]} (row) or {"outputs": ...} (columnar)."""
    if not outputs:
        raise _invalid("Cannot convert empty tensor map to JSON")
    names = sorted(outputs)
    if fmt == "columnar":
        if len(names) == 1:
            return {"outputs": _array_to_json(outputs[names[0]], names[0])}
        return {"outputs": {n: _array_to_json(outputs[n], n) for n in names}}
    batch = -1
    for n in names:
        if np.ndim(outputs[n]) == 0:
            raise _invalid(f"Tensor name: {n} has no shape information ")
        size = int(np.shape(outputs[n])[0])
        if batch >= 0 and size != batch:
            raise _invalid(
                f"Tensor name: {n} has inconsistent batch size: {size} expecting: {batch}"
            )
        batch = size
    lists = {n: _array_to_json(outputs[n], n) for n in names}
    if len(names) == 1:
        return {"predictions": lists[names[0]]}
    return {"predictions": [{n: lists[n][i] for n in names} for i in range(batch)]}


def _metadata_response(lv: LoadedVersion) -> get_model_metadata_pb2.GetModelMetadataResponse:
    response = get_model_metadata_pb2.GetModelMetadataResponse()
    response.model_spec.name = lv.name
    response.model_spec.version.value = lv.version
    sig_map = get_model_metadata_pb2.SignatureDefMap()
    for k, v in lv.signature_defs.items():
        sig_map.signature_def[k].CopyFrom(v)
    response.metadata["signature_def"].Pack(sig_map)
    return response


def _metadata_json(lv: LoadedVersion) -> dict[str, Any]:
    """TF Serving's REST metadata body (model_servers/http_rest_api_util.cc ToJsonString)."""
    response = _metadata_response(lv)
    sig_map = get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(sig_map)
    opts = {"always_print_fields_with_no_presence": True, "preserving_proto_field_name": True}
    return {
        "model_spec": json_format.MessageToDict(response.model_spec, **opts),
        "metadata": {"signature_def": json_format.MessageToDict(sig_map, **opts)},
    }


# ----------------------------------------------------------------------------------------------
# The server
# ----------------------------------------------------------------------------------------------


class _Metrics:
    def __init__(self) -> None:
        self.registry = prometheus_client.CollectorRegistry(auto_describe=True)
        self.requests = prometheus_client.Counter(
            ":tensorflow:serving:request_count",
            "Requests by model, API, entry point and final status (as TF Serving).",
            ["model_name", "API", "entrypoint", "status"],
            registry=self.registry,
        )
        self.latency = prometheus_client.Histogram(
            ":tensorflow:serving:request_latency",
            "Request latency in microseconds (as TF Serving), by model, API and entry point.",
            ["model_name", "API", "entrypoint"],
            buckets=(
                100,
                250,
                500,
                1000,
                2500,
                5000,
                10000,
                25000,
                50000,
                100000,
                250000,
                500000,
                1000000,
                2500000,
                5000000,
            ),
            registry=self.registry,
        )
        self.batch_size = prometheus_client.Histogram(
            "tfrs_devserver_processed_batch_size",
            "Rows per batch run by the batching queue.",
            ["model_name"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
            registry=self.registry,
        )
        self.versions = prometheus_client.Gauge(
            "tfrs_devserver_loaded_versions",
            "Versions currently available per model.",
            ["model_name"],
            registry=self.registry,
        )

    def observe(self, model: str, api: str, entry: str, status: str, seconds: float) -> None:
        self.requests.labels(model, api, entry, status).inc()
        self.latency.labels(model, api, entry).observe(seconds * 1e6)


class Server:
    """The dev server, startable in-process: ``Server(...).start()`` ... ``stop()``.

    Ports given as 0 are chosen by the OS; read them back from ``rest_port`` / ``grpc_port``
    after ``start()``.
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
    ) -> None:
        self.host = host
        self.rest_port = rest_port
        self.grpc_port = grpc_port
        self.poll_seconds = poll_seconds
        self.metrics = _Metrics()
        self.manager = ModelManager(
            Path(model_base) if model_base is not None else None,
            Path(models_config) if models_config is not None else None,
            batching,
            on_batch=lambda m, n: self.metrics.batch_size.labels(m).observe(n),
            on_versions=lambda m, n: self.metrics.versions.labels(m).set(n),
        )
        self._max_workers = max_workers
        self._executor: futures.ThreadPoolExecutor | None = None
        self._grpc: grpc.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._rest_thread: threading.Thread | None = None
        self._poll_thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._stopping = False

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> Server:
        """Load the models, then open gRPC and REST; returns self once both listen."""
        self.manager.poll()
        self._executor = futures.ThreadPoolExecutor(self._max_workers, thread_name_prefix="rest")
        try:
            self._start_grpc()
            self._start_rest()
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
        """Stop accepting, finish in-flight requests (up to ``grace`` s), unload everything."""
        self._stopping = True
        self._stop.set()
        if self._grpc is not None:
            self._grpc.stop(grace).wait()
            self._grpc = None
        if self._loop is not None and self._rest_thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._rest_thread.join(timeout=grace + 5)
            self._loop = None
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
        return f"http://{self.host}:{self.rest_port}"

    @property
    def grpc_address(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    def poll_now(self) -> None:
        """Scan the base paths immediately (the poll thread does this every poll_seconds)."""
        self.manager.poll()

    def _poll_loop(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.manager.poll()
            except Exception:  # noqa: BLE001 - keep polling; the error is logged
                log.exception("polling the model base paths failed")

    # -- gRPC ----------------------------------------------------------------------------------
    def _start_grpc(self) -> None:
        options = [
            ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
        ]
        server = grpc.server(
            futures.ThreadPoolExecutor(self._max_workers, thread_name_prefix="grpc"),
            options=options,
        )
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
            _PredictionServicer(self), server
        )
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(_ModelServicer(self), server)
        port = server.add_insecure_port(f"{self.host}:{self.grpc_port}")
        if port == 0:
            raise OSError(f"cannot listen for gRPC on {self.host}:{self.grpc_port}")
        self.grpc_port = port
        server.start()
        self._grpc = server

    def grpc_call(
        self, api: str, model: str, context: grpc.ServicerContext, fn: Callable[[], Any]
    ) -> Any:
        t0 = time.perf_counter()
        status = "OK"
        try:
            if self._stopping:
                raise RpcError(Code.UNAVAILABLE, "Server is shutting down")
            return fn()
        except RpcError as exc:
            status = exc.code.name
            context.abort(exc.code, exc.message)
        except Exception as exc:  # noqa: BLE001
            err = _to_tf_error(exc)
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

    def grpc_predict(self, request: predict_pb2.PredictRequest) -> predict_pb2.PredictResponse:
        spec = request.model_spec
        lv = self.manager.resolve(spec.name, *self._spec_version(spec))
        sig = lv.signature(spec.signature_name, grpc_api=True)
        inputs = {}
        for name, proto in request.inputs.items():
            expected = sig.inputs.get(name)
            if expected is not None and proto.dtype != expected.dtype:
                raise _invalid(
                    f"Expects arg[{name}] to be {_dtype_name(expected.dtype)} but "
                    f"{_dtype_name(proto.dtype)} is provided"
                )
            try:
                inputs[name] = tf.make_ndarray(proto)
            except Exception as exc:  # noqa: BLE001
                raise _invalid(f"input '{name}' is not a valid TensorProto: {exc}") from exc
        outputs = lv.predict_future(sig, inputs).result()
        wanted = list(request.output_filter) or sorted(outputs)
        response = predict_pb2.PredictResponse()
        for alias in wanted:
            if alias not in outputs:
                raise _invalid(
                    f"output tensor alias not found in signature: {alias} Outputs "
                    f"expected to be in the set {{{','.join(sorted(outputs))}}}."
                )
            response.outputs[alias].CopyFrom(tf.make_tensor_proto(outputs[alias]))
        response.model_spec.name = lv.name
        response.model_spec.version.value = lv.version
        response.model_spec.signature_name = sig.name
        return response

    def grpc_metadata(
        self, request: get_model_metadata_pb2.GetModelMetadataRequest
    ) -> get_model_metadata_pb2.GetModelMetadataResponse:
        if not request.metadata_field:
            raise _invalid("GetModelMetadataRequest must specify at least one metadata_field")
        for f in request.metadata_field:
            if f != "signature_def":
                raise _invalid(f"Metadata field {f} is not supported")
        spec = request.model_spec
        lv = self.manager.resolve(spec.name, *self._spec_version(spec))
        return _metadata_response(lv)

    def grpc_status(
        self, request: get_model_status_pb2.GetModelStatusRequest
    ) -> get_model_status_pb2.GetModelStatusResponse:
        if not request.HasField("model_spec"):
            raise _invalid("Missing ModelSpec")
        spec = request.model_spec
        return self.manager.status(spec.name, *self._spec_version(spec))

    # -- REST ----------------------------------------------------------------------------------
    def _start_rest(self) -> None:
        started = threading.Event()
        error: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            app = web.Application(client_max_size=_MAX_MESSAGE_BYTES)
            app.router.add_route("GET", PROMETHEUS_PATH, self._rest_metrics)
            app.router.add_route("*", "/v1/{tail:.*}", self._rest_v1)
            runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
            try:
                loop.run_until_complete(runner.setup())
                site = web.TCPSite(runner, self.host, self.rest_port, reuse_address=True)
                loop.run_until_complete(site.start())
                self.rest_port = int(runner.addresses[0][1])
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

        self._rest_thread = threading.Thread(target=run, name="rest-server", daemon=True)
        self._rest_thread.start()
        started.wait()
        if error:
            raise OSError(f"cannot listen for REST on {self.host}:{self.rest_port}: {error[0]}")

    async def _rest_metrics(self, request: web.Request) -> web.Response:
        body = prometheus_client.generate_latest(self.metrics.registry)
        return web.Response(
            body=body, headers={"Content-Type": prometheus_client.CONTENT_TYPE_LATEST}
        )

    async def _rest_v1(self, request: web.Request) -> web.Response:
        t0 = time.perf_counter()
        path = request.rel_url.raw_path
        body = await request.read() if request.method == "POST" else b""
        model, api = "", "unknown"
        status_code, payload = 200, None
        try:
            if self._stopping:
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
                    self._executor, self._rest_predict, model, version, label, body
                )
            elif s:
                if not s.group(1):
                    raise _invalid("Missing model name in request.")
                model = unquote(s.group(1))
                version = int(s.group(2)) if s.group(2) else None
                label = unquote(s.group(3)) if s.group(3) else None
                if s.group(4):
                    api = "metadata"
                    payload = _metadata_json(self.manager.resolve(model, version, label))
                else:
                    api = "status"
                    payload = json_format.MessageToDict(
                        self.manager.status(model, version, label),
                        always_print_fields_with_no_presence=True,
                    )
            else:
                raise _invalid(f"Malformed request: {request.method} {path}")
            status = "OK"
        except RpcError as exc:
            status, status_code, payload = exc.code.name, exc.http_status, {"error": exc.message}
        except Exception as exc:  # noqa: BLE001
            log.exception("REST %s %s failed", request.method, path)
            err = _to_tf_error(exc)
            status, status_code, payload = err.code.name, err.http_status, {"error": err.message}
        self.metrics.observe(model, api, "REST", status, time.perf_counter() - t0)
        return web.Response(
            text=json.dumps(payload), status=status_code, content_type="application/json"
        )

    def _rest_predict(
        self, model: str, version: int | None, label: str | None, body: bytes
    ) -> dict[str, Any]:
        if not body.strip():
            raise _invalid("JSON Parse error: The document is empty")
        try:
            doc = json.loads(body)
        except UnicodeDecodeError as exc:
            raise _invalid(
                f"JSON Parse error: Invalid encoding in string. at offset: {exc.start}"
            ) from exc
        except json.JSONDecodeError as exc:
            raise _invalid(f"JSON Parse error: {exc.msg} at offset: {exc.pos}") from exc
        if not isinstance(doc, dict):
            raise _invalid(f"JSON Value: {_json_str(doc)} Is not object")
        signature_name = doc.get("signature_name", "")
        if not isinstance(signature_name, str):
            raise _invalid(
                f"JSON Value: {_json_str(doc)} not formatted correctly. "
                "'signature_name' key must be a string value."
            )
        lv = self.manager.resolve(model, version, label)
        sig = lv.signature(signature_name, grpc_api=False)
        if not sig.inputs:
            raise _invalid(f"Failed to get input map for signature: {sig.name}")
        inputs, fmt = json_to_inputs(doc, sig.inputs)
        outputs = lv.predict_future(sig, inputs).result()
        return outputs_to_json(outputs, fmt)


class _PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, server: Server) -> None:
        self._s = server

    def Predict(self, request, context):  # noqa: N802 - gRPC method name
        return self._s.grpc_call(
            "predict", request.model_spec.name, context, lambda: self._s.grpc_predict(request)
        )

    def GetModelMetadata(self, request, context):  # noqa: N802
        return self._s.grpc_call(
            "metadata", request.model_spec.name, context, lambda: self._s.grpc_metadata(request)
        )


class _ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, server: Server) -> None:
        self._s = server

    def GetModelStatus(self, request, context):  # noqa: N802
        return self._s.grpc_call(
            "status", request.model_spec.name, context, lambda: self._s.grpc_status(request)
        )


# ----------------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------------


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
) -> None:
    """Run the server until Ctrl-C or SIGTERM, then stop cleanly."""
    server = Server(
        model_base,
        models_config,
        rest_port=rest_port,
        grpc_port=grpc_port,
        host=host,
        poll_seconds=poll_seconds,
        batching=batching,
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
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Arguments of ``tfrs-coldstart serve`` (TF Serving's flags, in this project's spelling)."""
    p = parser or argparse.ArgumentParser(
        prog="tfrs-coldstart serve",
        description="Serve exported models with TF Serving's REST and gRPC APIs (for machines "
        "without TF Serving; production uses TF Serving itself).",
    )
    p.add_argument(
        "--model-base",
        default="export",
        help="folder holding <model>/<version>/ SavedModels (default: export)",
    )
    p.add_argument(
        "--models-config",
        default=None,
        help="TF Serving ModelServerConfig text proto (default: serving/models.config "
        "if it exists, else every folder under --model-base)",
    )
    p.add_argument("--rest-port", type=int, default=8501, help="REST port; 0 picks a free one")
    p.add_argument("--grpc-port", type=int, default=8500, help="gRPC port; 0 picks a free one")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 for all)")
    p.add_argument(
        "--poll-seconds",
        type=float,
        default=1.0,
        help="how often to look for new versions (0 = never)",
    )
    p.add_argument(
        "--batching-config",
        default=None,
        help="TF Serving batching.config (default: serving/batching.config if it exists)",
    )
    p.add_argument(
        "--enable-batching",
        action="store_true",
        help="batch with TF Serving's default parameters when there is no batching config",
    )
    p.add_argument("--no-batching", action="store_true", help="never batch requests")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``tfrs-coldstart serve``: run until Ctrl-C; returns the exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    models_config = args.models_config
    if models_config is None and Path("serving/models.config").exists():
        models_config = "serving/models.config"
    try:
        batching = None
        default_batching = Path("serving/batching.config")
        if args.no_batching:
            batching = None
        elif args.batching_config:
            batching = parse_batching_config(Path(args.batching_config))
        elif default_batching.exists():
            batching = parse_batching_config(default_batching)
        elif args.enable_batching:
            batching = BatchingParameters()

        def ready(server: Server) -> None:
            names = ", ".join(server.manager.model_names) or "none yet"
            print(f"serving models: {names}", flush=True)
            print(
                f"REST on {server.rest_url} (e.g. GET {server.rest_url}/v1/models/<name>)",
                flush=True,
            )
            print(f"gRPC on {server.grpc_address}", flush=True)
            print(f"metrics on {server.rest_url}{PROMETHEUS_PATH}", flush=True)
            b = server.manager.batching
            print(
                "batching: off"
                if b is None
                else f"batching: max_batch_size={b.max_batch_size} "
                f"batch_timeout_micros={b.batch_timeout_micros}",
                flush=True,
            )
            print("press Ctrl-C to stop", flush=True)

        serve(
            args.model_base,
            models_config,
            args.rest_port,
            args.grpc_port,
            args.host,
            args.poll_seconds,
            batching,
            ready=ready,
        )
    except (ConfigError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("stopped", flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
