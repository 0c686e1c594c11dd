"""Loss terms as the in-batch softmax of ``tfrs.tasks.Retrieval`` forms them, and the
distillation terms built on the same logits.

Shapes: queries and candidates ``float32 [batch, dim]``; logits ``[batch, batch]`` (row: a
query, column: a candidate; the diagonal holds each query's own item).
"""

from __future__ import annotations

import tensorflow as tf

_NEG = -1e9


def _logq(prob: tf.Tensor) -> tf.Tensor:
    # The clip of tfrs.layers.loss.SamplingProbablityCorrection, so both losses see one logit.
    return tf.math.log(tf.clip_by_value(prob, 1e-6, 1.0))


def accidental_hits(candidate_ids: tf.Tensor) -> tf.Tensor:
    """``bool [batch, batch]``: True where another column holds the row's own item."""
    same = tf.equal(candidate_ids[:, None], candidate_ids[None, :])
    return tf.logical_and(same, tf.logical_not(tf.eye(tf.shape(candidate_ids)[0], dtype=tf.bool)))


def in_batch_logits(query: tf.Tensor, candidates: tf.Tensor, temperature: float,
                    item_prob: tf.Tensor | None = None,
                    candidate_ids: tf.Tensor | None = None,
                    hits: tf.Tensor | None = None) -> tf.Tensor:
    """In-batch score matrix ``[batch, batch]`` as ``tfrs.tasks.Retrieval`` forms it.

    Scores are divided by ``temperature``, log-Q corrected when ``item_prob`` is
    given, and accidental hits (the same item at another column) are masked out;
    pass ``hits`` (:func:`accidental_hits`) instead of ids to reuse one mask.
    """
    logits = tf.matmul(query, candidates, transpose_b=True) / temperature
    if item_prob is not None:
        logits -= _logq(item_prob)[None, :]
    if hits is None and candidate_ids is not None:
        hits = accidental_hits(candidate_ids)
    if hits is not None:
        logits = tf.where(hits, tf.cast(_NEG, logits.dtype), logits)
    return logits


def kl_rows(teacher_logits: tf.Tensor, student_logits: tf.Tensor,
            temperature: float) -> tf.Tensor:
    """Per row ``KL(softmax(t / T) || softmax(s / T))``: ``[batch, n]`` -> ``[batch]``."""
    t = tf.cast(teacher_logits, tf.float32) / temperature
    s = tf.cast(student_logits, tf.float32) / temperature
    p = tf.stop_gradient(tf.nn.softmax(t, axis=1))
    return (tf.nn.softmax_cross_entropy_with_logits(labels=p, logits=s)
            - tf.nn.softmax_cross_entropy_with_logits(labels=p, logits=t))


def distillation_loss(teacher_logits: tf.Tensor, student_logits: tf.Tensor,
                      temperature: float, weight: tf.Tensor | None = None) -> tf.Tensor:
    """Mean over rows of ``KL(softmax(t / T) || softmax(s / T))``: ``[batch, n]`` -> scalar
    (``weight [batch]``: each row's weight in the mean).

    Multiply by ``T**2`` (as the caller does) to keep gradient scale independent of T.
    Computed as ``CE(p, s) - CE(p, t)`` with ``p = softmax(t / T)``: two fused
    cross-entropy kernels instead of three softmax passes over a ``[batch, batch]`` matrix.
    """
    kl = kl_rows(teacher_logits, student_logits, temperature)
    return tf.reduce_mean(kl if weight is None else kl * weight)


def contrastive_and_kl(q: tf.Tensor, c: tf.Tensor, tq: tf.Tensor, tc: tf.Tensor,
                        prob: tf.Tensor | None, keys: tf.Tensor | None,
                        student_temperature: float,
                        teacher_temperature: float, kd_temperature: float,
                        weight: tf.Tensor | None = None) -> tuple[tf.Tensor, tf.Tensor]:
    """A distilling student's ``(L_C, mean KL)`` from one pair of ``[batch, batch]`` logits.

    L_C is what ``tfrs.tasks.Retrieval`` computes (the sum over queries of the softmax
    cross-entropy with the diagonal as labels), taken here from the logits the KL needs
    anyway: building them twice cost a third of a distillation step. (XLA compiling this was
    measured slower on CPU.) ``prob`` / ``keys`` None switch off log-Q / hit removal.
    ``weight [batch]`` weighs each query's terms (interaction weights, as the task's
    ``sample_weight``). ``tests/test_models.py`` checks both terms against the task and a
    hand computation.
    """
    hits = accidental_hits(keys) if keys is not None else None
    t_logits = in_batch_logits(tq, tc, teacher_temperature, prob, hits=hits)
    s_logits = in_batch_logits(q, c, student_temperature, prob, hits=hits)
    n = tf.shape(s_logits)[0]
    ce = tf.nn.softmax_cross_entropy_with_logits(labels=tf.eye(n, tf.shape(s_logits)[1]),
                                                 logits=s_logits)
    contrastive = tf.reduce_sum(ce if weight is None else ce * weight)
    return contrastive, distillation_loss(t_logits, s_logits, kd_temperature, weight)
