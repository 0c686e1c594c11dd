"""The server's errors: a failed request (answered to its client) and a port it cannot use.

A failed request is an :class:`RpcError` with TF Serving's canonical code and message; it
goes back to the client and the server keeps running. A port that cannot be bound is a
:class:`ListenError`, the user's to fix, so ``tfrs-coldstart serve`` stops with one line.
"""

from __future__ import annotations

import grpc
import tensorflow as tf

from tfrs_coldstart.errors import UserError
from tfrs_coldstart.serving.status import Code, code_from_number, http_status

__all__ = ["ListenError", "RpcError", "invalid", "to_rpc_error"]


class ListenError(UserError, OSError):
    """The REST or gRPC port cannot be bound (in use, or not an address of this machine)."""


class RpcError(Exception):
    """A request failure carrying a canonical status code, like TF Serving's Status.

    Not a ``UserError``: it answers the client; the server keeps running.
    """

    def __init__(self, code: grpc.StatusCode, message: str, *, http: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self._http = http

    @property
    def http_status(self) -> int:
        """TF Serving's HTTP status for the code, unless the error names its own (413)."""
        return self._http if self._http is not None else http_status(self.code)


def invalid(message: str) -> RpcError:
    """An INVALID_ARGUMENT error (HTTP 400), the answer to most bad requests."""
    return RpcError(Code.INVALID_ARGUMENT, message)


def to_rpc_error(exc: BaseException) -> RpcError:
    """Any failure while answering as the code TF Serving would give it.

    TensorFlow's own errors keep their code; ``TypeError``/``ValueError`` are the
    caller's input (INVALID_ARGUMENT); anything else is INTERNAL.
    """
    if isinstance(exc, RpcError):
        return exc
    if isinstance(exc, tf.errors.OpError):
        code = code_from_number(int(exc.error_code)) or Code.UNKNOWN
        return RpcError(code, exc.message)
    if isinstance(exc, (TypeError, ValueError)):
        return invalid(str(exc))
    if isinstance(exc, RecursionError):
        return invalid("JSON value is nested too deeply")
    return RpcError(Code.INTERNAL, f"{type(exc).__name__}: {exc}")
