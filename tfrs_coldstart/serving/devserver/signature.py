"""Signatures: what a request is checked against, and TF's dtype names in error texts."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import types_pb2
from tensorflow.core.protobuf import meta_graph_pb2

__all__ = ["SIGNATURE_DEFAULT", "Signature", "dtype_name", "np_dtype", "shape_of"]

#: The signature a request without ``signature_name`` runs.
SIGNATURE_DEFAULT = "serving_default"


def dtype_name(enum: int) -> str:
    """TF's DataTypeString: DT_FLOAT -> 'float'."""
    try:
        return types_pb2.DataType.Name(enum)[3:].lower()
    except ValueError:
        return f"dtype({enum})"


def shape_of(info: meta_graph_pb2.TensorInfo) -> list[int] | None:
    """A tensor's declared shape (-1 = any size), or None when even its rank is unknown."""
    if info.tensor_shape.unknown_rank:
        return None
    return [int(d.size) for d in info.tensor_shape.dim]


def np_dtype(enum: int) -> np.dtype:
    """The numpy dtype requests of this TF dtype arrive in (strings as bytes objects)."""
    if enum == types_pb2.DT_STRING:
        return np.dtype(object)
    return np.dtype(tf.dtypes.as_dtype(enum).as_numpy_dtype)


@dataclass
class Signature:
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
            shape = shape_of(info)
            if not shape or shape[0] != -1:
                return False
        return True


def signature_from_proto(name: str, sig: meta_graph_pb2.SignatureDef, fn: Any) -> Signature:
    """A SignatureDef and its loaded function (None if it cannot be run)."""
    return Signature(name=name, fn=fn, inputs=dict(sig.inputs), outputs=dict(sig.outputs))

