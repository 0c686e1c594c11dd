"""One loaded SavedModel version (a servable): its signatures, checks, batching and warm-up.

A request holds a reference to its :class:`LoadedVersion`, so unloading a version never
cuts a request that is already running on it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from concurrent import futures
from pathlib import Path

import numpy as np
import tensorflow as tf
from google.protobuf import text_format
from tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2
from tensorflow_serving.apis import get_model_metadata_pb2, prediction_log_pb2

from tfrs_coldstart.errors import ConfigError
from tfrs_coldstart.serving.devserver.batching import Batcher
from tfrs_coldstart.serving.devserver.config import BatchingParameters
from tfrs_coldstart.serving.devserver.errors import RpcError, invalid, to_rpc_error
from tfrs_coldstart.serving.devserver.signature import (
    SIGNATURE_DEFAULT,
    Signature,
    dtype_name,
    np_dtype,
    shape_of,
    signature_from_proto,
)
from tfrs_coldstart.serving.saved_model import WARMUP_FILE, import_scann, row_groups
from tfrs_coldstart.serving.status import Code

__all__ = ["LoadedVersion", "metadata_response"]

_MAX_WARMUP_RECORDS = 1000  # TF Serving's limit


def _read_meta_graph(path: Path) -> meta_graph_pb2.MetaGraphDef:
    """The 'serve' MetaGraph, read from the file: its SignatureDefs are what metadata shows."""
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
        self._batchers: dict[str, Batcher] = {}
        self._lock = threading.Lock()
        self._closed = False
        import_scann()
        meta_graph = _read_meta_graph(path)
        self.signature_defs: dict[str, meta_graph_pb2.SignatureDef] = dict(meta_graph.signature_def)
        self._module = tf.saved_model.load(str(path), tags=["serve"])
        fns = dict(self._module.signatures)
        self.signatures = {
            k: signature_from_proto(k, s, fns.get(k)) for k, s in self.signature_defs.items()
        }

    # -- running -------------------------------------------------------------------------------
    def _call(self, sig: Signature, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the signature; a batch whose long string cells would be padded across all its
        rows (``saved_model.row_groups``: one 1 MB multi-hot cell among 64 rows took ~640
        MiB) runs in groups of rows and the outputs are joined, the same values."""
        groups = [slice(None)]
        if sig.batchable and inputs:
            rows = int(next(iter(inputs.values())).shape[0])
            groups = row_groups(inputs, rows)
        if len(groups) > 1:
            parts = [self._run_fn(sig, {k: v[g] for k, v in inputs.items()}) for g in groups]
            if all(np.ndim(v) > 0 and np.shape(v)[0] == g.stop - g.start
                   for part, g in zip(parts, groups, strict=True) for v in part.values()):
                return {k: np.concatenate([part[k] for part in parts]) for k in parts[0]}
        return self._run_fn(sig, inputs)  # one call (or outputs that are not batch-major)

    @staticmethod
    def _run_fn(sig: Signature, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        assert sig.fn is not None
        tensors = {
            k: tf.constant(v, dtype=tf.dtypes.as_dtype(sig.inputs[k].dtype))
            for k, v in inputs.items()
        }
        result = sig.fn(**tensors)
        return {k: v.numpy() for k, v in result.items()}

    def _batcher(self, sig: Signature) -> Batcher | None:
        if self._batching is None or not sig.batchable:
            return None
        with self._lock:
            if self._closed:
                return None
            batcher = self._batchers.get(sig.name)
            if batcher is None:
                batcher = Batcher(
                    lambda x, s=sig: self._call(s, x),
                    self._batching,
                    lambda n: self._on_batch(self.name, n) if self._on_batch else None,
                    f"{self.name}-{self.version}-{sig.name}",
                )
                self._batchers[sig.name] = batcher
            return batcher

    def signature(self, name: str, *, grpc_api: bool) -> Signature:
        """The named signature (default: serving_default), with the API's own error for none."""
        name = name or SIGNATURE_DEFAULT
        sig = self.signatures.get(name)
        if sig is None:
            if grpc_api:
                raise RpcError(
                    Code.FAILED_PRECONDITION, f'Serving signature key "{name}" not found.'
                )
            raise invalid(f'Serving signature name: "{name}" not found in signature def')
        return sig

    def validate(self, sig: Signature, inputs: Mapping[str, np.ndarray]) -> int | None:
        """Check names, dtypes, shapes and the batch dimension; return the batch size."""
        sent, wanted = set(inputs), set(sig.inputs)
        if sent != wanted:
            raise invalid(
                f"input size does not match signature: {len(sent)}!={len(wanted)} "
                f"len({{{','.join(sorted(sent))}}}) != len({{{','.join(sorted(wanted))}}}). "
                f"Sent extra: {{{','.join(sorted(sent - wanted))}}}. "
                f"Missing but required: {{{','.join(sorted(wanted - sent))}}}."
            )
        for name in sorted(inputs):
            arr, info = inputs[name], sig.inputs[name]
            expected = np_dtype(info.dtype)
            if arr.dtype != expected:
                try:
                    got = (
                        "string"
                        if arr.dtype == object
                        else dtype_name(tf.dtypes.as_dtype(arr.dtype).as_datatype_enum)
                    )
                except TypeError:
                    got = str(arr.dtype)
                raise invalid(
                    f"Expects arg[{name}] to be {dtype_name(info.dtype)} but {got} is provided"
                )
            shape = shape_of(info)
            if shape is not None and (
                len(shape) != arr.ndim
                or any(s not in (-1, a) for s, a in zip(shape, arr.shape, strict=True))
            ):
                raise invalid(
                    f"input '{name}' of signature '{sig.name}' has shape {list(arr.shape)} but the "
                    f"signature expects {shape} (-1 is any size)"
                )
        if not sig.batchable:
            return None
        sizes = {name: int(arr.shape[0]) for name, arr in inputs.items()}
        if len(set(sizes.values())) > 1:
            detail = ", ".join(f"{k}={v}" for k, v in sorted(sizes.items()))
            raise invalid(
                "Batching Run() input tensors must have equal 0th-dimension size; got "
                f"{detail}. Send one row per example in every input."
            )
        size = next(iter(sizes.values()))
        if self._batching is not None and size > self._batching.max_batch_size:
            raise invalid(
                f"Task size {size} is larger than maximum input batch size "
                f"{self._batching.max_batch_size}"
            )
        return size

    def predict_future(self, sig: Signature, inputs: dict[str, np.ndarray]) -> futures.Future:
        """Validate, then run through the batcher (or directly); returns a Future of outputs."""
        if sig.fn is None:
            raise invalid(
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
            fut.set_exception(to_rpc_error(exc))
        return fut

    def predict(
        self, signature_name: str, inputs: dict[str, np.ndarray], *, grpc_api: bool = True
    ) -> dict[str, np.ndarray]:
        """Run one request and wait for its outputs (warm-up replays requests this way)."""
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
        """Stop taking batched requests; those already queued still run."""
        with self._lock:
            self._closed = True
            batchers = list(self._batchers.values())
        for b in batchers:
            b.close()


def metadata_response(lv: LoadedVersion) -> get_model_metadata_pb2.GetModelMetadataResponse:
    """TF Serving's GetModelMetadata answer for a version (its SignatureDefMap)."""
    response = get_model_metadata_pb2.GetModelMetadataResponse()
    response.model_spec.name = lv.name
    response.model_spec.version.value = lv.version
    sig_map = get_model_metadata_pb2.SignatureDefMap()
    for k, v in lv.signature_defs.items():
        sig_map.signature_def[k].CopyFrom(v)
    response.metadata["signature_def"].Pack(sig_map)
    return response

