"""Request size limits: what one request may declare, checked before anything is allocated.

A 142-byte gRPC request can declare a tensor of 2^28 floats that ``tf.make_ndarray`` would
expand to 1 GiB, and a REST body can carry 100,000 instances. Every request is therefore
measured by what it *declares* (body bytes, instances, elements x dtype size) against
:class:`RequestLimits` first, with batching on or off. A request over a limit answers
RESOURCE_EXHAUSTED (gRPC) or 413 (REST) naming the limit and the ``serve`` flag that raises it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, fields

from tensorflow.core.framework import tensor_pb2

from tfrs_coldstart.errors import ConfigError
from tfrs_coldstart.serving.devserver.errors import RpcError, invalid
from tfrs_coldstart.serving.devserver.signature import dtype_name, np_dtype
from tfrs_coldstart.serving.status import Code

__all__ = ["FLAGS", "RequestLimits", "too_large"]

#: The ``tfrs-coldstart serve`` flag of each limit (named in every refusal).
FLAGS = {
    "max_request_bytes": "--max-request-bytes",
    "max_instances": "--max-instances",
    "max_tensor_elements": "--max-tensor-elements",
}

#: TF's largest tensor rank (TensorShape::MaxDimensions); deeper JSON is not a tensor.
MAX_RANK = 254


@dataclass(frozen=True)
class RequestLimits:
    """The most one request may declare; defaults fit any sane recommender request.

    ``max_request_bytes`` bounds the REST body, the gRPC message and the decoded tensors of
    one request (elements x dtype size, summed over its inputs); ``max_instances`` the rows
    of a REST ``instances`` list; ``max_tensor_elements`` the elements of any one tensor.
    """

    max_request_bytes: int = 64 * 1024 * 1024
    max_instances: int = 10_000
    max_tensor_elements: int = 2**24

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
