"""TF Serving's status codes: the canonical gRPC codes and how REST maps them to HTTP.

One table for both sides of the wire: the dev server answers a failed REST request with
``HTTP_STATUS[code]`` and the REST client turns the HTTP status back into a code name with
:func:`code_for_http`, so a client sees the same code from the dev server, from TF Serving,
over REST and over gRPC.

Example::

    >>> HTTP_STATUS[Code.NOT_FOUND], code_for_http(404)
    (404, 'NOT_FOUND')
"""

from __future__ import annotations

import grpc

__all__ = [
    "CODE_BY_HTTP",
    "HTTP_STATUS",
    "Code",
    "code_for_http",
    "code_from_number",
    "code_name",
    "http_status",
]

#: The canonical codes (``tensorflow.error.Code`` numbers are the same).
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

#: HTTP status back to a code. Where several codes share a status (400, 409, 500) the
#: most likely one is named; the REST body's message says more.
CODE_BY_HTTP: dict[int, grpc.StatusCode] = {
    400: Code.INVALID_ARGUMENT,
    401: Code.UNAUTHENTICATED,
    403: Code.PERMISSION_DENIED,
    404: Code.NOT_FOUND,
    409: Code.ABORTED,
    429: Code.RESOURCE_EXHAUSTED,
    499: Code.CANCELLED,
    500: Code.INTERNAL,
    501: Code.UNIMPLEMENTED,
    503: Code.UNAVAILABLE,
    504: Code.DEADLINE_EXCEEDED,
}

_CODE_BY_NUMBER: dict[int, grpc.StatusCode] = {c.value[0]: c for c in Code}


def http_status(code: grpc.StatusCode) -> int:
    """The HTTP status TF Serving's REST API answers for ``code`` (500 if unmapped)."""
    return HTTP_STATUS.get(code, 500)


def code_for_http(status: int) -> str:
    """The code name for a REST answer's HTTP status (``UNKNOWN`` if unmapped)."""
    code = CODE_BY_HTTP.get(status)
    return code.name if code is not None else "UNKNOWN"


def code_from_number(number: int) -> grpc.StatusCode | None:
    """The code with this canonical number (a ``tf.errors.OpError.error_code``), or None."""
    return _CODE_BY_NUMBER.get(number)


def code_name(number: int) -> str:
    """A canonical code number as its name (``5`` -> ``NOT_FOUND``); unknown numbers as text."""
    code = _CODE_BY_NUMBER.get(number)
    return code.name if code is not None else str(number)
