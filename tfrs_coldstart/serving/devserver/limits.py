"""Request size limits: what one request may declare, checked before anything is allocated.

A 142-byte gRPC request can declare a tensor of 2^28 floats that ``tf.make_ndarray`` would
expand to 1 GiB, and a REST body can carry 100,000 instances. Every request is therefore
measured by what it *declares* (body bytes, instances, elements x dtype size) against
:class:`RequestLimits` first, with batching on or off. A request over a limit answers
RESOURCE_EXHAUSTED (gRPC) or 413 (REST) naming the limit and the ``serve`` flag that raises it.

A REST body is counted before ``json.loads`` sees it (:func:`count_json`): ``json.loads``
makes a Python object of every value (``[]`` is 3 bytes of body and 64 bytes of memory), so
a body under the byte limit could still take ~25x its size to parse. The count bounds that:
at most ``max_json_values`` values (~80 bytes each at worst, measured: 320 MiB at the
default), at most ``max_instances`` rows, no deeper nesting than a tensor of rank
:data:`MAX_RANK` needs.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, fields

import numpy as np
from tensorflow.core.framework import tensor_pb2

from tfrs_coldstart.errors import ConfigError
from tfrs_coldstart.serving.devserver.errors import RpcError, invalid
from tfrs_coldstart.serving.devserver.signature import dtype_name, np_dtype
from tfrs_coldstart.serving.status import Code

__all__ = ["FLAGS", "JsonCounts", "RequestLimits", "count_json", "too_large"]

#: The ``tfrs-coldstart serve`` flag of each limit (named in every refusal).
FLAGS = {
    "max_request_bytes": "--max-request-bytes",
    "max_instances": "--max-instances",
    "max_tensor_elements": "--max-tensor-elements",
    "max_json_values": "--max-json-values",
}

#: TF's largest tensor rank (TensorShape::MaxDimensions); deeper JSON is not a tensor.
MAX_RANK = 254


@dataclass(frozen=True)
class RequestLimits:
    """The most one request may declare; defaults fit any sane recommender request.

    ``max_request_bytes`` bounds the REST body, the gRPC message and the decoded tensors of
    one request (elements x dtype size, summed over its inputs); ``max_instances`` the rows
    of a REST ``instances`` list; ``max_tensor_elements`` the elements of any one tensor;
    ``max_json_values`` the JSON values (numbers, strings, arrays, objects, keys) of one REST
    body, counted before it is parsed, which bounds the memory parsing takes (10,000
    instances of 400 values each fit the default).
    """

    max_request_bytes: int = 64 * 1024 * 1024
    max_instances: int = 10_000
    max_tensor_elements: int = 2**24
    max_json_values: int = 2**22

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{FLAGS[f.name]} must be a positive integer, got {value!r}")

    def check_body_bytes(self, n: int) -> None:
        """A REST body (declared by Content-Length, or read so far) of ``n`` bytes."""
        if n > self.max_request_bytes:
            raise too_large(
                f"request body of {n} bytes (or more) is larger than the limit of "
                f"{self.max_request_bytes} bytes",
                "max_request_bytes",
            )

    def check_instances(self, n: int) -> None:
        """A REST ``instances`` list of ``n`` rows."""
        if n > self.max_instances:
            raise too_large(
                f"request has {n} instances, more than the limit of {self.max_instances}",
                "max_instances",
            )

    def check_elements(self, name: str, n: int) -> None:
        """A tensor ``name`` of ``n`` elements (declared or counted so far)."""
        if n > self.max_tensor_elements:
            raise too_large(
                f"input '{name}' declares {n} elements, more than the limit of "
                f"{self.max_tensor_elements} per tensor",
                "max_tensor_elements",
            )

    def check_decoded_bytes(self, n: int) -> None:
        """The decoded tensors of one request, ``n`` bytes in all."""
        if n > self.max_request_bytes:
            raise too_large(
                f"request tensors would take {n} bytes, more than the limit of "
                f"{self.max_request_bytes} bytes",
                "max_request_bytes",
            )

    def check_json(self, body: bytes) -> JsonCounts:
        """A REST body, before ``json.loads``: its values, instances and nesting
        (:func:`count_json`). An instances list is recognised by its key; its rows are the
        elements of the containers directly under the root object."""
        rows = _INSTANCES_KEY.search(body) is not None
        counts = count_json(body, stop_above=self.max_json_values, items=rows)
        if counts.depth > MAX_RANK + 2:  # root object + "inputs"/"instances" + a tensor's rank
            raise invalid(
                f"JSON Parse error: The document is nested {counts.depth} levels deep (TF "
                f"tensors have at most {MAX_RANK} dimensions)"
            )
        if counts.values > self.max_json_values:
            raise too_large(
                f"request body holds {counts.values} JSON values (or more), more than the "
                f"limit of {self.max_json_values}",
                "max_json_values",
            )
        if rows:
            self.check_instances(counts.top_items)
        return counts

    def check_tensor_protos(self, protos: Iterable[tuple[str, tensor_pb2.TensorProto]]) -> None:
        """gRPC inputs: the shapes they declare, before ``tf.make_ndarray`` expands them.

        ``make_ndarray`` pads a short ``*_val`` list to the declared shape, so the declared
        shape, not the message size, is what a tensor costs.
        """
        total = 0
        for name, proto in protos:
            if proto.tensor_shape.unknown_rank:
                raise invalid(f"input '{name}' has an unknown rank; send its full shape")
            dims = [int(d.size) for d in proto.tensor_shape.dim]
            if len(dims) > MAX_RANK:
                raise invalid(f"input '{name}' has rank {len(dims)}, more than {MAX_RANK}")
            if any(d < 0 for d in dims):
                raise invalid(f"input '{name}' has a negative dimension in shape {dims}")
            elements = math.prod(dims)
            self.check_elements(name, elements)
            try:
                itemsize = np_dtype(proto.dtype).itemsize
            except (TypeError, ValueError) as exc:
                raise invalid(
                    f"input '{name}' has an unsupported dtype {dtype_name(proto.dtype)}"
                ) from exc
            total += elements * itemsize
            self.check_decoded_bytes(total)


def too_large(what: str, limit: str) -> RpcError:
    """RESOURCE_EXHAUSTED (HTTP 413) naming the limit and the flag that raises it."""
    return RpcError(
        Code.RESOURCE_EXHAUSTED,
        f"{what} ({limit}; raise it with tfrs-coldstart serve {FLAGS[limit]})",
        http=413,
    )


# ---- counting a JSON body before parsing it ---------------------------------------------------

#: Bytes of a body scanned at a time: the scan's working memory is a few copies of this size.
_SCAN_CHUNK = 1024 * 1024
_INSTANCES_KEY = re.compile(rb'"instances"\s*:')
# Byte classes of the scan: 0 = anything else (numbers, letters, a string's text).
_QUOTE, _OPEN, _CLOSE, _COMMA, _COLON = 1, 2, 3, 4, 5
_CLASSES = bytes(
    {ord('"'): _QUOTE, ord("["): _OPEN, ord("{"): _OPEN, ord("]"): _CLOSE, ord("}"): _CLOSE,
     ord(","): _COMMA, ord(":"): _COLON}.get(b, 0)
    for b in range(256)
)


@dataclass(frozen=True)
class JsonCounts:
    """What :func:`count_json` found outside the strings of a JSON text.

    ``values``: 1 + the ``[``, ``{``, ``,`` and ``:`` outside strings, an upper bound on the
    Python objects ``json.loads`` creates (each value or key follows one of them, or is the
    root), also when the text is invalid (it stops at the first error, having created only
    what came before). ``depth``: the deepest nesting. ``top_items``: the most elements of
    one container directly under the root (commas + 1; the instances of a row-format body).
    """

    values: int
    depth: int
    top_items: int


def count_json(body: bytes, stop_above: int | None = None, items: bool = True) -> JsonCounts:
    """Count a JSON text's structure without parsing it: bounded memory, linear time, C speed.

    Chunk by chunk (:data:`_SCAN_CHUNK` bytes): escaped backslashes (``\\\\``) then escaped
    quotes (``\\"``) are dropped with ``bytes.replace``, so every quote left opens or closes
    a string (a chunk's trailing odd backslash is carried to the next); ``bytes.translate``
    classes the bytes and numpy keeps the structural ones, marks those inside strings by the
    parity of the quotes before them, and sums the rest (depth = running sum of opens minus
    closes). All C loops, no regex to backtrack and no Python loop per byte; between chunks
    only five integers are carried, so memory stays O(chunk) for any body. With
    ``stop_above`` the scan ends once ``values`` exceeds it (the body is refused anyway);
    ``items=False`` skips ``top_items`` (0).
    """
    values, max_depth, top_items = 1, 0, 0
    carry = b""  # an odd backslash ending the previous chunk: it escapes this one's first byte
    in_string = 0  # parity of the unescaped quotes so far
    depth = 0
    seg, seg_commas = 0, 0  # containers opened at depth 2 so far; commas of the last one
    for start in range(0, len(body), _SCAN_CHUNK):
        text = (carry + body[start:start + _SCAN_CHUNK]).replace(b"\\\\", b"")
        carry = b""
        if text.endswith(b"\\"):
            text, carry = text[:-1], b"\\"
        codes = np.frombuffer(text.replace(b'\\"', b"").translate(_CLASSES), dtype=np.uint8)
        cls = codes[codes != 0]
        if not len(cls):
            continue
        quote = cls == _QUOTE
        parity = (np.cumsum(quote, dtype=np.uint8) + in_string) & 1  # uint8 wraps: parity kept
        in_string = int(parity[-1])
        s = cls[~quote & (parity == 0)]  # structural bytes outside strings
        if not len(s):
            continue
        opens, closes = s == _OPEN, s == _CLOSE
        values += len(s) - int(closes.sum())
        level = np.cumsum(opens.view(np.int8) - closes.view(np.int8), dtype=np.int32) + depth
        max_depth = max(max_depth, int(level.max()))
        depth = int(level[-1])
        if stop_above is not None and values > stop_above:
            break
        if not items:
            continue
        at2 = level == 2
        segs = np.cumsum(opens & at2, dtype=np.int32) + seg
        per = np.bincount(segs[(s == _COMMA) & at2] - seg, minlength=int(segs[-1] - seg) + 1)
        per[0] += seg_commas
        if segs[-1] > 0:
            top_items = max(top_items, int(per.max()) + 1)
        seg, seg_commas = int(segs[-1]), int(per[-1])
    return JsonCounts(values, max_depth, top_items)
