"""Multi-token prediction in TensorFlow (SEMANTICS.md section 4), written independently of the reference.

Depth k at position i: eh_proj of [enorm(E[t(i+k)]); hnorm(state)], where the state is the main model's
output after its final norm (k = 1) or depth k-1's output after shared_head.norm; a full block with its
own cache; logits = shared_head.head(shared_head.norm(y)).
"""

from __future__ import annotations

import tensorflow as tf

from dsv3_conformance.format.config import ModelConfig
from dsv3_conformance.format.mtp import MTPOptions
from dsv3_conformance.format.weights import MTPWeights

from .layers import dense_weight, head_logits, project, rms_norm


def mtp_source(hidden: tf.Tensor, normed: tf.Tensor) -> tf.Tensor:
    """The main model's state depth 1 reads: after the final norm."""
    return normed


def tokens_ahead(stream: tf.Tensor, depth: int, count: int) -> tf.Tensor:
    """t(i+depth) for `count` positions, from a stream starting at the first position's token (may come out
    shorter: drafts fill the rest)."""
    return stream[:, depth: depth + count]


def mtp_embedding(embed: tf.Tensor, tokens: tf.Tensor, positions: tf.Tensor, options: MTPOptions) -> tf.Tensor:
    """E[t] at absolute `positions` [n]; zero at position 0 only when the option asks for it."""
    embedding = tf.gather(embed, tokens)
    if options.zero_first_position:
        embedding = tf.where((positions == 0)[None, :, None], tf.zeros_like(embedding), embedding)
    return embedding


def mtp_input(embedding: tf.Tensor, hidden: tf.Tensor, weights: MTPWeights, config: ModelConfig,
              options: MTPOptions) -> tf.Tensor:
    """eh_proj over the two normed halves, the embedding first unless the option says otherwise."""
    halves = (rms_norm(embedding, weights.enorm, config.rms_norm_eps), rms_norm(hidden, weights.hnorm,
                                                                                config.rms_norm_eps))
    joined = tf.concat(halves if options.concat == "embedding-first" else halves[::-1], axis=-1)
    return project(joined, dense_weight(weights.eh_proj, joined.dtype))


def mtp_head(block_output: tf.Tensor, weights: MTPWeights, config: ModelConfig) -> tuple[tf.Tensor, tf.Tensor]:
    """(shared_head.norm(y), float32 logits of shared_head.head)."""
    normed = rms_norm(block_output, weights.head_norm, config.rms_norm_eps)
    return normed, tf.cast(head_logits(normed, weights.head), tf.float32)


def chained(block_output: tf.Tensor, normed: tf.Tensor, options: MTPOptions) -> tf.Tensor:
    return normed if options.chain == "normed" else block_output


def accepted_prefix(drafts: tf.Tensor, predicted: tf.Tensor) -> tf.Tensor:
    """How many leading drafts [B, d] every sequence's own prediction agrees with (an int32 scalar)."""
    agree = tf.reduce_sum(tf.math.cumprod(tf.cast(drafts == predicted, tf.int32), axis=1), axis=1)
    return tf.reduce_min(agree) if drafts.shape[1] else tf.constant(0, tf.int32)
