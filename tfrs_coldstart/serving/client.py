"""Clients for TF Serving's REST and gRPC APIs (and the local dev server, which speaks both).

``RestClient`` and ``GrpcClient`` share one interface::

    client = GrpcClient("localhost:8500", "student")
    recs = client.recommend({"age": "25-34", "gender": "F", "occupation": "writer"})
    recs[0].item_ids, recs[0].scores

``predict`` returns numpy arrays (strings as ``bytes`` objects, as ``tf.make_ndarray`` does),
``status`` and ``metadata`` return TF Serving's answers in one form for both transports.
Calls retry with exponential backoff on UNAVAILABLE (HTTP 503, connection refused) only;
every other failure raises ``ServingError`` with TF Serving's canonical code and message.
Both error classes are :class:`tfrs_coldstart.errors.UserError`, so ``tfrs-coldstart
recommend`` reports them in one line and exits 2, like every command.

The REST client needs only ``requests``, numpy and the status codes (``grpcio``); the gRPC
client imports TensorFlow (for ``tf.make_tensor_proto``) and ``tensorflow-serving-api``
when it is first created.
"""

from __future__ import annotations

import argparse
import base64
import json
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Self, TypeVar
from urllib.parse import quote

import grpc
import numpy as np
import requests
from google.protobuf import json_format

from tfrs_coldstart.errors import UserError
from tfrs_coldstart.serving.status import code_for_http, code_name

#: The request-time history input of a ``recommend`` model (features.columns.HISTORY; not
#: imported from there so this client needs no TensorFlow).
HISTORY = "history"

__all__ = [
    "ClientInputError",
    "GrpcClient",
    "ModelVersionStatus",
    "Recommendation",
    "RestClient",
    "ServingError",
    "add_arguments",
    "run",
]

T = TypeVar("T")

# DataType enum names to numpy dtypes (DT_STRING -> bytes objects).
_NP_DTYPES = {
    "DT_FLOAT": np.float32,
    "DT_DOUBLE": np.float64,
    "DT_HALF": np.float16,
    "DT_INT8": np.int8,
    "DT_INT16": np.int16,
    "DT_INT32": np.int32,
    "DT_INT64": np.int64,
    "DT_UINT8": np.uint8,
    "DT_UINT16": np.uint16,
    "DT_UINT32": np.uint32,
    "DT_UINT64": np.uint64,
    "DT_BOOL": np.bool_,
    "DT_STRING": object,
}


class ServingError(UserError):
    """The server answered with an error, or could not be reached.

    ``code`` is the canonical status name (``INVALID_ARGUMENT``, ``NOT_FOUND``,
    ``UNAVAILABLE``, ``DEADLINE_EXCEEDED``, ...); ``http_status`` is set for REST.
    """

    def __init__(self, code: str, message: str, http_status: int | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.http_status = http_status


class ClientInputError(UserError, ValueError):
    """The caller's input cannot be turned into a request (nothing was sent)."""


@dataclass(frozen=True)
class Recommendation:
    """Top-K items for one user, best first."""

    item_ids: list[str]
    scores: list[float]


@dataclass(frozen=True)
class ModelVersionStatus:
    """One version's state as TF Serving reports it (AVAILABLE, LOADING, END, ...)."""

    version: int
    state: str
    error_code: str = "OK"
    error_message: str = ""


@dataclass(frozen=True)
class _TensorSpec:
    dtype: str  # DataType enum name, e.g. DT_FLOAT
    shape: tuple[int, ...] | None  # None = unknown rank; -1 = any size


@dataclass(frozen=True)
class _SignatureSpec:
    inputs: Mapping[str, _TensorSpec]
    outputs: Mapping[str, _TensorSpec]


def _parse_signatures(metadata: Mapping[str, Any]) -> dict[str, _SignatureSpec]:
    """Signature specs out of TF Serving's metadata JSON."""
    try:
        defs = metadata["metadata"]["signature_def"]["signature_def"]
    except (KeyError, TypeError) as exc:
        raise ServingError("INTERNAL", f"metadata response has no signature_def: {exc}") from exc

    def spec(info: Mapping[str, Any]) -> _TensorSpec:
        shape_info = info.get("tensor_shape", {})
        if shape_info.get("unknown_rank"):
            shape = None
        else:
            shape = tuple(int(d.get("size", -1)) for d in shape_info.get("dim", []))
        return _TensorSpec(info.get("dtype", "DT_INVALID"), shape)

    return {
        name: _SignatureSpec(
            {k: spec(v) for k, v in sig.get("inputs", {}).items()},
            {k: spec(v) for k, v in sig.get("outputs", {}).items()},
        )
        for name, sig in defs.items()
    }


def _to_array(value: Any, dtype: str | None) -> np.ndarray:
    """A caller's value as an array, cast only between numeric kinds to the signature's dtype.

    Nothing else is converted: a number sent for a string input reaches the server as a
    number and gets the server's error, as it would from any other client.
    """
    try:
        if isinstance(value, np.ndarray) and value.dtype.kind in "US":
            return value.astype(object)
        if isinstance(value, np.ndarray) and value.dtype.kind == "O":
            return value
        if _first_leaf(value, (str, bytes)):
            return np.array(value, dtype=object)
        arr = np.asarray(value)
    except ValueError as exc:
        raise ClientInputError(
            f"cannot make a dense tensor from {str(value)[:100]}: {exc}"
        ) from exc
    target = np.dtype(_NP_DTYPES[dtype]) if dtype in _NP_DTYPES else None
    if (
        target is not None
        and target.kind in "fiu"
        and arr.dtype.kind in "fiu"
        and not (target.kind in "iu" and arr.dtype.kind == "f")
    ):
        arr = arr.astype(target)
    return arr


def _first_leaf(value: Any, types: tuple[type, ...]) -> bool:
    while isinstance(value, (list, tuple)) and value:
        value = value[0]
    return isinstance(value, types)


def _jsonable(arr: np.ndarray) -> Any:
    """An array as TF Serving's JSON: strings as text, or {"b64": ...} when not UTF-8."""
    if arr.dtype.kind in "OSU":

        def conv(x: Any) -> Any:
            if isinstance(x, str):
                return x
            if isinstance(x, bytes):
                try:
                    return x.decode("utf-8")
                except UnicodeDecodeError:
                    return {"b64": base64.b64encode(x).decode("ascii")}
            if isinstance(x, np.generic):
                return x.item()
            return x

        flat = np.empty(arr.size, dtype=object)
        flat[:] = [conv(x) for x in arr.ravel().tolist()]
        return flat.reshape(arr.shape).tolist()
    return arr.tolist()


def _from_json(value: Any, spec: _TensorSpec | None) -> np.ndarray:
    """A JSON output back to an array with the signature's dtype (strings as bytes)."""
    target = _NP_DTYPES.get(spec.dtype) if spec else None
    if target is object or (target is None and _first_leaf(value, (str, dict))):

        def conv(x: Any) -> Any:
            if isinstance(x, list):
                return [conv(v) for v in x]
            if isinstance(x, dict) and "b64" in x:
                return base64.b64decode(x["b64"])
            if isinstance(x, str):
                return x.encode("utf-8")
            return x

        return np.array(conv(value), dtype=object)
    return np.asarray(value, dtype=target)


def _user_columns(users: Sequence[Mapping[str, Any]]) -> dict[str, list[Any]]:
    if not users:
        raise ClientInputError("no users given: pass one feature dict or a non-empty list of them")
    for i, user in enumerate(users):
        if not isinstance(user, Mapping):
            raise ClientInputError(
                f"user #{i} is a {type(user).__name__}, not a dict of feature values"
            )
    names = set(users[0])
    for i, user in enumerate(users[1:], start=1):
        if set(user) != names:
            missing = sorted(names - set(user))
            extra = sorted(set(user) - names)
            raise ClientInputError(
                f"user #{i} has different features from user #0 (missing {missing}, extra "
                f"{extra}); give every user the same feature names"
            )
    return {name: [u[name] for u in users] for name in sorted(names)}


class _BaseClient:
    """Retry, signature cache and ``recommend`` shared by both transports."""

    def __init__(
        self,
        model: str,
        version: int | None,
        label: str | None,
        timeout: float,
        retries: int,
        backoff: float,
        max_backoff: float = 5.0,
    ) -> None:
        if version is not None and label is not None:
            raise ClientInputError("pin a version or a label, not both")
        if retries < 0:
            raise ClientInputError(f"retries must be >= 0, got {retries}")
        self.model = model
        self.version = version
        self.label = label
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._signatures: dict[str, _SignatureSpec] | None = None
        self._sig_lock = threading.Lock()

    def _with_retries(self, call: Callable[[], T]) -> T:
        for attempt in range(self.retries + 1):
            try:
                return call()
            except ServingError as exc:
                if exc.code != "UNAVAILABLE" or attempt == self.retries:
                    raise
                time.sleep(min(self.backoff * (2**attempt), self.max_backoff))
        raise AssertionError("unreachable")  # pragma: no cover

    def metadata(self) -> dict[str, Any]:  # pragma: no cover - overridden
        raise NotImplementedError

    def _signature(self, name: str) -> _SignatureSpec:
        with self._sig_lock:
            if self._signatures is None:
                self._signatures = _parse_signatures(self.metadata())
            sigs = self._signatures
        if name not in sigs:
            raise ServingError(
                "INVALID_ARGUMENT",
                f'Serving signature name: "{name}" not found in signature def; model '
                f"{self.model} has {sorted(sigs)}",
            )
        return sigs[name]

    def refresh(self) -> None:
        """Forget the cached signatures (after the served version changed its interface)."""
        with self._sig_lock:
            self._signatures = None

    def predict(
        self, inputs: Mapping[str, Any], signature: str = "serving_default"
    ) -> dict[str, np.ndarray]:  # pragma: no cover - overridden
        raise NotImplementedError

    def close(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def recommend(
        self,
        users: Mapping[str, Any] | Sequence[Mapping[str, Any]],
        k: int | None = None,
        signature: str = "serving_default",
    ) -> list[Recommendation]:
        """Top-K item ids and scores for each user, from their feature values.

        A model that reads a request-time ``history`` (item IDs joined by ``|``, issue 17)
        gets the users' ``history`` values when given, else ``""`` (no history) for each.
        """
        if isinstance(users, Mapping):
            users = [users]
        if k is not None and k < 1:
            raise ClientInputError(f"k must be >= 1, got {k}")
        columns = _user_columns(list(users))
        if HISTORY not in columns and HISTORY in self._signature(signature).inputs:
            columns[HISTORY] = [""] * len(users)
        outputs = self.predict(columns, signature=signature)
        if "item_ids" not in outputs or "scores" not in outputs:
            raise ServingError(
                "FAILED_PRECONDITION",
                f"signature {signature!r} of model {self.model} returns {sorted(outputs)}, not "
                "item_ids and scores: is this a recommend model?",
            )
        ids, scores = outputs["item_ids"], outputs["scores"]
        recs = []
        for row_ids, row_scores in zip(ids, scores, strict=True):
            item_ids = [x.decode("utf-8") if isinstance(x, bytes) else str(x) for x in row_ids]
            # float32 scores as their shortest decimal text, as TF Serving's JSON writes them,
            # so both transports give equal Recommendations
            row = [float(str(s)) for s in np.asarray(row_scores, dtype=np.float32)]
            recs.append(Recommendation(item_ids[:k], row[:k]))
        return recs


class RestClient(_BaseClient):
    """TF Serving REST client (``http://host:8501``)."""

    def __init__(
        self,
        base_url: str,
        model: str,
        version: int | None = None,
        label: str | None = None,
        timeout: float = 10.0,
        retries: int = 3,
        backoff: float = 0.1,
        session: requests.Session | None = None,
    ) -> None:
        super().__init__(model, version, label, timeout, retries, backoff)
        if "://" not in base_url:
            base_url = f"http://{base_url}"
        self.base_url = base_url.rstrip("/")
        self._session = session or requests.Session()

    @property
    def model_url(self) -> str:
        url = f"{self.base_url}/v1/models/{quote(self.model, safe='')}"
        if self.version is not None:
            url += f"/versions/{int(self.version)}"
        elif self.label is not None:
            url += f"/labels/{quote(self.label, safe='')}"
        return url

    def _request(self, method: str, url: str, body: Any = None) -> Any:
        def once() -> Any:
            try:
                resp = self._session.request(
                    method,
                    url,
                    data=None if body is None else json.dumps(body),
                    headers={"Content-Type": "application/json"},
                    timeout=self.timeout,
                )
            except requests.exceptions.ConnectTimeout as exc:
                raise ServingError("UNAVAILABLE", f"cannot connect to {url}: {exc}") from exc
            except requests.exceptions.Timeout as exc:
                raise ServingError(
                    "DEADLINE_EXCEEDED", f"no answer from {url} in {self.timeout}s"
                ) from exc
            except requests.exceptions.ConnectionError as exc:
                raise ServingError("UNAVAILABLE", f"cannot connect to {url}: {exc}") from exc
            try:
                payload = resp.json()
            except ValueError:
                payload = None
            if resp.status_code != 200:
                code = code_for_http(resp.status_code)
                message = (
                    payload.get("error")
                    if isinstance(payload, dict) and "error" in payload
                    else resp.text[:500]
                )
                raise ServingError(code, str(message), resp.status_code)
            if payload is None:
                raise ServingError("INTERNAL", f"{url} answered 200 with a non-JSON body")
            return payload

        return self._with_retries(once)

    def predict(
        self, inputs: Mapping[str, Any], signature: str = "serving_default"
    ) -> dict[str, np.ndarray]:
        """Run a signature on columnar inputs ({name: batch-first values})."""
        spec = self._signature(signature)
        body = {
            "signature_name": signature,
            "inputs": {
                name: _jsonable(
                    _to_array(value, spec.inputs[name].dtype if name in spec.inputs else None)
                )
                for name, value in inputs.items()
            },
        }
        payload = self._request("POST", f"{self.model_url}:predict", body)
        outputs = payload.get("outputs") if isinstance(payload, dict) else None
        if outputs is None:
            raise ServingError("INTERNAL", f"predict answer has no 'outputs': {str(payload)[:200]}")
        if len(spec.outputs) == 1:
            (name,) = spec.outputs
            return {name: _from_json(outputs, spec.outputs[name])}
        return {k: _from_json(v, spec.outputs.get(k)) for k, v in outputs.items()}

    def status(self) -> list[ModelVersionStatus]:
        payload = self._request("GET", self.model_url)
        return [
            ModelVersionStatus(
                version=int(v.get("version", 0)),
                state=v.get("state", "UNKNOWN"),
                error_code=v.get("status", {}).get("error_code", "OK"),
                error_message=v.get("status", {}).get("error_message", ""),
            )
            for v in payload.get("model_version_status", [])
        ]

    def metadata(self) -> dict[str, Any]:
        """TF Serving's metadata JSON: {"model_spec": ..., "metadata": {"signature_def": ...}}."""
        return self._request("GET", f"{self.model_url}/metadata")

    def close(self) -> None:
        self._session.close()


class GrpcClient(_BaseClient):
    """TF Serving gRPC client (``host:8500``), via PredictionService and ModelService stubs."""

    def __init__(
        self,
        address: str,
        model: str,
        version: int | None = None,
        label: str | None = None,
        timeout: float = 10.0,
        retries: int = 3,
        backoff: float = 0.1,
        credentials: Any = None,
        max_message_bytes: int = 256 * 1024 * 1024,
    ) -> None:
        super().__init__(model, version, label, timeout, retries, backoff)
        # Imported here, not at the top: TensorFlow takes seconds to import, and a process
        # that only uses the REST client never needs it.
        import tensorflow as tf
        from tensorflow_serving.apis import (
            get_model_metadata_pb2,
            get_model_status_pb2,
            model_service_pb2_grpc,
            predict_pb2,
            prediction_service_pb2_grpc,
        )

        self._tf = tf
        self._predict_pb2 = predict_pb2
        self._metadata_pb2 = get_model_metadata_pb2
        self._status_pb2 = get_model_status_pb2
        self.address = address
        options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
        ]
        if credentials is not None:
            self._channel = grpc.secure_channel(address, credentials, options=options)
        else:
            self._channel = grpc.insecure_channel(address, options=options)
        self._prediction = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)
        self._models = model_service_pb2_grpc.ModelServiceStub(self._channel)

    def _fill_spec(self, spec: Any, signature: str | None = None) -> None:
        spec.name = self.model
        if self.version is not None:
            spec.version.value = int(self.version)
        elif self.label is not None:
            spec.version_label = self.label
        if signature is not None:
            spec.signature_name = signature

    def _rpc(self, method: Callable[..., T], request: Any) -> T:
        def once() -> T:
            try:
                return method(request, timeout=self.timeout)
            except grpc.RpcError as exc:
                code = exc.code() if hasattr(exc, "code") else None
                name = code.name if code is not None else "UNKNOWN"
                details = exc.details() if hasattr(exc, "details") else str(exc)
                raise ServingError(name, details or name) from exc

        return self._with_retries(once)

    def predict(
        self, inputs: Mapping[str, Any], signature: str = "serving_default"
    ) -> dict[str, np.ndarray]:
        """Run a signature on named, batch-first inputs; returns arrays (strings as bytes)."""
        spec = self._signature(signature)
        request = self._predict_pb2.PredictRequest()
        self._fill_spec(request.model_spec, signature)
        for name, value in inputs.items():
            arr = _to_array(value, spec.inputs[name].dtype if name in spec.inputs else None)
            request.inputs[name].CopyFrom(self._tf.make_tensor_proto(arr))
        response = self._rpc(self._prediction.Predict, request)
        return {k: self._tf.make_ndarray(v) for k, v in response.outputs.items()}

    def status(self) -> list[ModelVersionStatus]:
        request = self._status_pb2.GetModelStatusRequest()
        self._fill_spec(request.model_spec)
        response = self._rpc(self._models.GetModelStatus, request)
        state_name = self._status_pb2.ModelVersionStatus.State.Name
        return [
            ModelVersionStatus(
                version=int(v.version),
                state=state_name(v.state),
                error_code=code_name(v.status.error_code),
                error_message=v.status.error_message,
            )
            for v in response.model_version_status
        ]

    def metadata(self) -> dict[str, Any]:
        """Same form as the REST answer: {"model_spec": ..., "metadata": {"signature_def": ...}}."""
        request = self._metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        self._fill_spec(request.model_spec)
        response = self._rpc(self._prediction.GetModelMetadata, request)
        sig_map = self._metadata_pb2.SignatureDefMap()
        if "signature_def" not in response.metadata or not response.metadata[
            "signature_def"
        ].Unpack(sig_map):
            raise ServingError("INTERNAL", "GetModelMetadata answer has no signature_def")
        opts = {"always_print_fields_with_no_presence": True, "preserving_proto_field_name": True}
        return {
            "model_spec": json_format.MessageToDict(response.model_spec, **opts),
            "metadata": {"signature_def": json_format.MessageToDict(sig_map, **opts)},
        }

    def close(self) -> None:
        self._channel.close()


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def _split_server(server: str, grpc_transport: bool) -> str:
    """HOST[:PORT] (or a URL for REST) with TF Serving's default ports."""
    if "://" in server:
        if grpc_transport:
            raise ClientInputError(f"--server {server!r} is a URL; give HOST[:PORT] with --grpc")
        return server
    host, sep, port = server.rpartition(":")
    if not sep or "]" in port:
        host, port = server, ""
    if port and not port.isdigit():
        raise ClientInputError(f"--server {server!r}: port {port!r} is not a number")
    port = port or ("8500" if grpc_transport else "8501")
    return f"{host}:{port}" if grpc_transport else f"http://{host}:{port}"


def _parse_users(texts: Sequence[str]) -> list[dict[str, Any]]:
    users: list[dict[str, Any]] = []
    for text in texts:
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ClientInputError(
                f"--user {text!r} is not valid JSON ({exc.msg} at character {exc.pos}); write "
                'it like --user \'{"age": "25-34", "gender": "F"}\''
            ) from exc
        items = value if isinstance(value, list) else [value]
        for item in items:
            if not isinstance(item, dict):
                raise ClientInputError(f"--user {text!r} must be a JSON object (or a list of them)")
            users.append(item)
    return users


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``tfrs-coldstart recommend``."""
    p.add_argument(
        "--server",
        default="localhost",
        help="HOST[:PORT] (default localhost, port 8501 for REST / 8500 with --grpc)",
    )
    p.add_argument("--model", default="student", help="served model name (default: student)")
    p.add_argument(
        "--user",
        action="append",
        required=True,
        help='user features as JSON, e.g. \'{"age": "25-34"}\'; repeat or pass a JSON list',
    )
    p.add_argument("--grpc", action="store_true", help="use gRPC instead of REST")
    p.add_argument("--k", type=int, default=None, help="keep the top K (default: all returned)")
    pin = p.add_mutually_exclusive_group()
    pin.add_argument("--version", type=int, default=None, help="pin a model version")
    pin.add_argument("--label", default=None, help="pin a version label (e.g. stable)")
    p.add_argument("--signature", default="serving_default")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per call")
    p.add_argument("--retries", type=int, default=3, help="retries on UNAVAILABLE")


def run(args: argparse.Namespace) -> int:
    """``tfrs-coldstart recommend``: prints one JSON line per user.

    Raises :class:`ClientInputError` (bad flags or user JSON, nothing sent) or
    :class:`ServingError` (the server's answer or no answer), both ``UserError``.
    """
    users = _parse_users(args.user)
    target = _split_server(args.server, args.grpc)
    kwargs = dict(
        version=args.version, label=args.label, timeout=args.timeout, retries=args.retries
    )
    client: RestClient | GrpcClient
    if args.grpc:
        client = GrpcClient(target, args.model, **kwargs)
    else:
        client = RestClient(target, args.model, **kwargs)
    with client:
        recs = client.recommend(users, k=args.k, signature=args.signature)
    for rec in recs:
        print(json.dumps({"item_ids": rec.item_ids, "scores": rec.scores}))
    return 0
