"""The derivations of :class:`~tfrs_coldstart.data.schema.Derive`, in TensorFlow ops.

This is the one implementation: the table loaders run it eagerly on a table's source columns
(:func:`derive_column`) and the exported models trace it into their signatures
(``features.sources.SourceInputs``), so a served request and a training row go through the
same ops and cannot disagree. Only stock TensorFlow ops (``tf.strings``, ``Bucketize``,
ragged masks): TF Serving needs nothing of this project to run them.

Shapes: every source is ``[batch]`` (``tf.string`` for string sources, ``float32`` for
numeric ones, missing cells ``""`` / NaN); the result is ``[batch]``, ``tf.string`` for
categorical, text and multi_hot features (stripped, as a loaded cell is) and ``float32`` for
numeric ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from tfrs_coldstart.data.schema import AGE_BUCKETS, Derive, FeatureSpec

__all__ = ["derive", "derive_column"]

#: "Toy Story (1995)": a year in parentheses ending the title (RE2 syntax; ``(?s)``: a title
#: spanning lines still matches as a whole).
_TITLE_YEAR = r"(?s)^(.*?)\s*\((\d{4})\)\s*$"
#: A date string's year: its first group of exactly four digits ("01-Jan-1995", "1995-01-01").
_DATE_YEAR = r"(?s)^(?:.*?\D)?(\d{4})(?:\D.*)?$"


def _year(text: tf.Tensor, pattern: str, group: str) -> tf.Tensor:
    """``float32 [batch]``: the year ``pattern`` finds in ``text`` (its ``group``), else NaN."""
    found = tf.strings.regex_full_match(text, pattern)
    digits = tf.where(found, tf.strings.regex_replace(text, pattern, group), "0")
    return tf.where(found, tf.strings.to_number(digits, tf.float32), np.nan)


def derive(spec: FeatureSpec, sources: Sequence[tf.Tensor]) -> tf.Tensor:
    """The derived feature ``spec`` from its source tensors (in ``spec.source`` order)."""
    d = spec.derivation
    if d is None:
        raise ValueError(f"feature '{spec.name}' is not derived")
    kind, arg = d
    if len(sources) != len(spec.source):
        raise ValueError(f"feature '{spec.name}' reads {len(spec.source)} source(s), got "
                         f"{len(sources)}")
    if spec.numeric_sources:
        xs = [tf.cast(s, tf.float32) for s in sources]
    else:
        xs = [tf.strings.strip(s) for s in sources]
    x = xs[0]
    if kind is Derive.PREFIX:
        return tf.strings.strip(tf.strings.substr(x, 0, int(arg or 0), unit="UTF8_CHAR"))
    if kind is Derive.AGE_BUCKET:
        bounds = [float(lower) for lower, _ in AGE_BUCKETS[1:]]
        band = tf.gather(tf.constant([label for _, label in AGE_BUCKETS]),
                         tf.raw_ops.Bucketize(input=x, boundaries=bounds))
        return tf.where(tf.math.is_nan(x), "", band)
    if kind is Derive.CODE_LABEL:
        labels = tf.constant(list(spec.labels))
        known = tf.logical_and(tf.logical_and(x >= 0, x < len(spec.labels)),
                               tf.equal(x, tf.round(x)))
        label = tf.gather(labels, tf.cast(tf.where(known, x, 0.0), tf.int32))
        other = tf.where(tf.math.is_nan(x), "", tf.strings.as_string(x, shortest=True))
        return tf.where(known, label, other)
    if kind is Derive.STRIP_YEAR:
        has = tf.strings.regex_full_match(x, _TITLE_YEAR)
        stripped = tf.strings.strip(tf.strings.regex_replace(x, _TITLE_YEAR, r"\1"))
        return tf.where(tf.logical_and(has, tf.not_equal(stripped, "")), stripped, x)
    if kind in (Derive.YEAR_FROM_TITLE, Derive.YEAR_FROM_DATE):
        if kind is Derive.YEAR_FROM_TITLE:
            year = _year(x, _TITLE_YEAR, r"\2")
            for date in xs[1:]:  # the date fallback
                year = tf.where(tf.math.is_nan(year), _year(date, _DATE_YEAR, r"\1"), year)
        else:
            year = _year(x, _DATE_YEAR, r"\1")
        if spec.fill is not None:
            year = tf.where(tf.math.is_nan(year), float(spec.fill), year)
        return year
    if kind is Derive.FLAGS_TO_MULTI_HOT:
        flags = tf.stack([s > 0 for s in xs], axis=1)  # NaN > 0 is False: a missing flag is off
        labels = tf.constant(list(spec.labels or spec.source))
        tags = tf.ragged.boolean_mask(tf.broadcast_to(labels, tf.shape(flags)), flags)
        return tf.strings.reduce_join(tags, axis=1, separator=spec.separator)
    raise ValueError(f"feature '{spec.name}': no implementation of derive {kind.value!r}")


def derive_column(spec: FeatureSpec, sources: Sequence[np.ndarray]) -> np.ndarray:
    """:func:`derive` run eagerly on numpy columns (the loaders' path): strings come back as
    an ``object`` array of ``str``, numbers as ``float32``."""
    dtype = tf.float32 if spec.numeric_sources else tf.string
    tensors = [tf.constant(np.asarray(s, dtype=np.float32 if spec.numeric_sources else object),
                           dtype=dtype) for s in sources]
    out = derive(spec, tensors).numpy()
    if out.dtype == object:
        return np.array([b.decode("utf-8") for b in out], dtype=object)
    return out.astype(np.float32)
