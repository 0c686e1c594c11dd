"""JSON <-> tensors, by TF Serving's rules (``util/json_tensor.cc``), with its error texts.

Requests come in the row (``{"instances": [...]}``) or columnar (``{"inputs": ...}``)
format, strings as text or ``{"b64": ...}``; answers go back in the same format. Values
are checked against the signature's dtypes the way TF Serving checks them (no silent
number-to-string or lossy conversions), so a request that works here works there.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from google.protobuf import json_format
from tensorflow.core.framework import types_pb2
from tensorflow.core.protobuf import meta_graph_pb2
from tensorflow_serving.apis import get_model_metadata_pb2

from tfrs_coldstart.serving.devserver.errors import RpcError, invalid
from tfrs_coldstart.serving.devserver.limits import MAX_RANK, RequestLimits
from tfrs_coldstart.serving.devserver.signature import dtype_name, np_dtype
from tfrs_coldstart.serving.status import Code

__all__ = ["json_str", "json_to_inputs", "metadata_to_json", "outputs_to_json"]


def _json_type(val: Any) -> str:
    """The JSON type name TF Serving's errors use (RapidJSON's)."""
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


def json_str(val: Any) -> str:
    """A value as compact JSON for an error message, cut at 200 characters."""
    text = json.dumps(val, separators=(",", ":"))
    return text if len(text) <= 200 else text[:200] + "..."


def _is_b64(val: Any) -> bool:
    """``{"b64": "..."}``: binary data in a string tensor."""
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
    return invalid(
        f"JSON Value: {json_str(val)} Type: {_json_type(val)} is not of expected "
        f"type: {dtype_name(dtype)}"
    )


def _leaf(val: Any, dtype: int) -> Any:
    """One scalar checked against the tensor's dtype (no lossy or cross-kind conversion)."""
    if dtype == types_pb2.DT_STRING:
        if isinstance(val, str):
            return val.encode("utf-8")
        if isinstance(val, dict):
            if not _is_b64(val):
                raise invalid(
                    f"JSON Value: {json_str(val)} not formatted correctly for base64 data"
                )
            try:
                return base64.b64decode(val["b64"], validate=True)
            except (ValueError, TypeError) as exc:
                raise invalid("Unable to base64 decode") from exc
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
            raise invalid(
                f"Cannot convert JSON value: {json_str(val)} to "
                f"{dtype_name(dtype)} without loss of precision."
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
        f"Conversion of JSON Value: {json_str(val)} to type: {dtype_name(dtype)}",
    )


def _dense_shape(val: Any) -> list[int]:
    """The shape implied by the first element at every level of nested lists."""
    shape = []
    while isinstance(val, list):
        shape.append(len(val))
        if not val:
            break
        val = val[0]
    return shape


def _fill(val: Any, level: int, shape: list[int], dtype: int, out: list) -> None:
    """Flatten ``val`` into ``out``, checking that it is dense with ``shape``."""
    rank = len(shape)
    if not isinstance(val, list):
        if level != rank:
            raise invalid(
                f"JSON Value: {json_str(val)} found at incorrect level: {level + 1} "
                f"in the JSON DOM. Expected at level: {rank}"
            )
        out.append(_leaf(val, dtype))
        return
    if level >= rank:
        raise invalid(f"Encountered list at unexpected level: {level} expected < {rank}")
    if len(val) != shape[level]:
        raise invalid(
            f"Encountered list at unexpected size: {len(val)} at level: {level} "
            f"expected size: {shape[level]}"
        )
    for item in val:
        _fill(item, level + 1, shape, dtype, out)


def _json_to_flat(
    val: Any, dtype: int, limits: RequestLimits | None = None, name: str = ""
) -> tuple[list, list[int]]:
    """A JSON tensor as (flat checked values, shape); its declared size is checked first."""
    shape = _dense_shape(val)
    if len(shape) > MAX_RANK:
        raise invalid(
            f"JSON value is nested {len(shape)} levels deep; a tensor has at most "
            f"{MAX_RANK} dimensions"
        )
    if limits is not None:
        limits.check_elements(name, math.prod(shape))
    flat: list = []
    _fill(val, 0, shape, dtype, flat)
    return flat, shape


def _flat_to_array(flat: list, shape: list[int], dtype: int) -> np.ndarray:
    """Flat values as an array of the signature's dtype (strings as bytes objects)."""
    target = np_dtype(dtype)
    if target.kind == "O":
        arr = np.empty(len(flat), dtype=object)
        arr[:] = flat
        return arr.reshape(shape)
    return np.asarray(flat, dtype=target).reshape(shape)


def json_to_inputs(
    doc: Mapping[str, Any],
    sig_inputs: Mapping[str, meta_graph_pb2.TensorInfo],
    limits: RequestLimits | None = None,
) -> tuple[dict[str, np.ndarray], str]:
    """Turn a parsed predict body into named arrays; returns (inputs, 'row' | 'columnar').

    With ``limits``, the instance count and each tensor's element count are checked before
    the values are converted.
    """
    if not sig_inputs:
        raise invalid("Failed to get input map for signature")
    has_instances, has_inputs = "instances" in doc, "inputs" in doc
    if has_instances and has_inputs:
        raise invalid(
            f"JSON Value: {json_str(doc)} Not formatted correctly expecting only one "
            "of 'inputs' or 'instances' keys to exist "
        )
    if has_instances:
        return _instances_to_inputs(doc, sig_inputs, limits), "row"
    if has_inputs:
        return _columnar_to_inputs(doc["inputs"], sig_inputs, limits), "columnar"
    raise invalid("Missing 'inputs' or 'instances' key")


def _instances_to_inputs(
    doc: Mapping[str, Any],
    sig_inputs: Mapping[str, meta_graph_pb2.TensorInfo],
    limits: RequestLimits | None,
) -> dict[str, np.ndarray]:
    """The row format: one object (or value, for one input) per example."""
    instances = doc["instances"]
    if not isinstance(instances, list):
        raise invalid(f"JSON Value: {json_str(doc)} Excepting 'instances' to be an list/array")
    if not instances:
        raise invalid(f"JSON Value: {json_str(doc)} No values in 'instances' array")
    if limits is not None:
        limits.check_instances(len(instances))

    def is_object(v: Any) -> bool:
        return isinstance(v, dict) and not _is_b64(v)

    objects = is_object(instances[0])
    if not objects and len(sig_inputs) > 1:
        raise invalid(
            "instances is a plain list, but expecting list of objects as multiple "
            "input tensors required as per tensorinfo_map"
        )
    names = sorted(sig_inputs)
    flats: dict[str, list] = {n: [] for n in names}
    shapes: dict[str, list[int]] = {}

    def add(i: int, name: str, value: Any, key_note: str) -> None:
        if name not in sig_inputs:
            raise invalid(
                f"Failed to process element: {i}{key_note} of 'instances' list. "
                f"Error: INVALID_ARGUMENT: JSON object: does not have named input: "
                f"{name}"
            )
        try:
            flat, shape = _json_to_flat(value, sig_inputs[name].dtype, limits, name)
        except RpcError as exc:
            raise RpcError(
                exc.code,
                f"Failed to process element: {i}{key_note} of 'instances' "
                f"list. Error: {exc.code.name}: {exc.message}",
                http=exc.http_status,
            ) from exc
        if limits is not None:
            limits.check_elements(name, len(flats[name]) + len(flat))
        if name in shapes and shapes[name] != shape:
            raise invalid(
                f"Failed to process element: {i}{key_note} of 'instances' list. "
                f"Error: INVALID_ARGUMENT: Expecting shape {shapes[name]} but got: "
                f"{shape}"
            )
        shapes[name] = shape
        flats[name].extend(flat)

    for i, elem in enumerate(instances):
        if objects:
            if not is_object(elem):
                raise invalid(f"Expecting object but got list at item {i} of input list")
            for key, value in elem.items():
                add(i, key, value, f" key: {key}")
            if set(elem) != set(names):
                raise invalid(
                    f"Failed to process element: {i} of 'instances' list. JSON object: "
                    f"{json_str(elem)} keys must be equal to: {','.join(names)}"
                )
        else:
            if is_object(elem):
                raise invalid(f"Expecting value/list but got object at item {i} of input list")
            add(i, names[0], elem, "")
    n = len(instances)
    return {
        name: _flat_to_array(flats[name], [n, *shapes[name]], sig_inputs[name].dtype)
        for name in names
    }


def _columnar_to_inputs(
    val: Any,
    sig_inputs: Mapping[str, meta_graph_pb2.TensorInfo],
    limits: RequestLimits | None,
) -> dict[str, np.ndarray]:
    """The columnar format: one batch-first tensor per input name (or one bare tensor)."""
    if not isinstance(val, dict) or _is_b64(val):
        if len(sig_inputs) > 1:
            raise invalid(
                "inputs is a plain value/list, but expecting an object as multiple "
                "input tensors required as per tensorinfo_map"
            )
        name = next(iter(sig_inputs))
        flat, shape = _json_to_flat(val, sig_inputs[name].dtype, limits, name)
        return {name: _flat_to_array(flat, shape, sig_inputs[name].dtype)}
    unknown = sorted(set(val) - set(sig_inputs))
    if unknown:
        raise invalid(
            f"JSON object: does not have named input: {unknown[0]} (the signature's "
            f"inputs are {','.join(sorted(sig_inputs))})"
        )
    out = {}
    for name in sorted(sig_inputs):
        if name not in val:
            raise invalid(f"Missing named input: {name} in 'inputs' object.")
        try:
            flat, shape = _json_to_flat(val[name], sig_inputs[name].dtype, limits, name)
        except RpcError as exc:
            raise RpcError(
                exc.code, f"input '{name}': {exc.message}", http=exc.http_status
            ) from exc
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
        raise invalid("Cannot convert empty tensor map to JSON")
    names = sorted(outputs)
    if fmt == "columnar":
        if len(names) == 1:
            return {"outputs": _array_to_json(outputs[names[0]], names[0])}
        return {"outputs": {n: _array_to_json(outputs[n], n) for n in names}}
    batch = -1
    for n in names:
        if np.ndim(outputs[n]) == 0:
            raise invalid(f"Tensor name: {n} has no shape information ")
        size = int(np.shape(outputs[n])[0])
        if batch >= 0 and size != batch:
            raise invalid(
                f"Tensor name: {n} has inconsistent batch size: {size} expecting: {batch}"
            )
        batch = size
    lists = {n: _array_to_json(outputs[n], n) for n in names}
    if len(names) == 1:
        return {"predictions": lists[names[0]]}
    return {"predictions": [{n: lists[n][i] for n in names} for i in range(batch)]}


def metadata_to_json(
    response: get_model_metadata_pb2.GetModelMetadataResponse,
) -> dict[str, Any]:
    """TF Serving's REST metadata body (model_servers/http_rest_api_util.cc ToJsonString)."""
    sig_map = get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(sig_map)
    opts = {"always_print_fields_with_no_presence": True, "preserving_proto_field_name": True}
    return {
        "model_spec": json_format.MessageToDict(response.model_spec, **opts),
        "metadata": {"signature_def": json_format.MessageToDict(sig_map, **opts)},
    }
