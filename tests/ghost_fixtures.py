"""Helpers of the ghost-clipping tests: one DP update by either path, and the
per-example norms and clipped sums of both paths on one micro-batch."""

import keras
import numpy as np
import tensorflow as tf

import tf_dpfair as dpf
from tf_dpfair.dpsgd import clipping
from tf_dpfair.dpsgd import ghost

LEARNING_RATE = 1000.0


def one_update(clipping_mode, x, y, weights, build, augmult=1, microbatch=4,
               strategy=None, l2_norm_clip=0.3):
    """The change of every trainable variable after one DP-SGD update.

    No noise; a large step, so that even weights near 1 (gains) move far more
    than their float32 spacing and the update shows the clipped sum.
    """
    scope = strategy.scope() if strategy else tf.distribute.get_strategy().scope()
    with scope:
        config = dpf.DPConfig(l2_norm_clip=l2_norm_clip, noise_multiplier=0.0,
                              expected_batch_size=len(y), augmult=augmult,
                              microbatch_size=microbatch, clipping=clipping_mode)
        model = dpf.make_private(build(), config)
        model.compile(optimizer=keras.optimizers.SGD(LEARNING_RATE),
                      loss=keras.losses.SparseCategoricalCrossentropy(
                          from_logits=True))
    before = [v.numpy().copy() for v in model.trainable_variables]
    model.fit(x, y, sample_weight=weights, batch_size=len(y), epochs=1,
              shuffle=False, verbose=0)
    return [b - v.numpy() for b, v in zip(before, model.trainable_variables)]


def assert_same_update(a, b, rtol=1e-5):
    """Each variable's update agrees to `rtol` relative to its L2 norm."""
    assert len(a) == len(b)
    for ga, gb in zip(a, b):
        assert np.all(np.isfinite(ga))
        error = np.linalg.norm(ga - gb) / max(np.linalg.norm(gb), 1e-30)
        assert error <= rtol, (error, ga.shape)


def both_paths(model, x, y, weights, l2_norm_clip=0.3):
    """`(ghost, vectorized)` `ClippedSum`s of one micro-batch, as numpy.

    Args:
      model: a functional model giving logits; every example's loss is its
        sparse categorical cross-entropy.
      x: [m, ...] inputs; y: [m] labels; weights: [m] in [0, 1].
    """
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True,
                                                      reduction=None)
    taps, probe = ghost.prepare(model, required=True)
    variables = model.trainable_variables
    x = tf.convert_to_tensor(x)
    y = tf.convert_to_tensor(y)
    weights = tf.convert_to_tensor(weights)

    @tf.function
    def fast():
        return ghost.clipped_gradient_sum(taps, probe, variables, loss, x, y,
                                          weights, l2_norm_clip)

    def example_loss(example):
        xi, yi = example
        logits = model(xi[tf.newaxis], training=True)
        return loss(yi[tf.newaxis], logits)[0], logits[0]

    @tf.function
    def slow():
        return clipping.clipped_gradient_sum(example_loss, variables, (x, y),
                                             weights, l2_norm_clip)

    return [tf.nest.map_structure(lambda t: t.numpy(), r._asdict())
            for r in (fast(), slow())]


def assert_same_norms_and_sums(model, x, y, weights, l2_norm_clip=0.3, rtol=1e-5):
    """Ghost and vectorized per-example norms and clipped sums agree."""
    fast, slow = both_paths(model, x, y, weights, l2_norm_clip)
    np.testing.assert_allclose(fast["norms"], slow["norms"], rtol=rtol)
    assert_same_update(fast["gradient_sum"], slow["gradient_sum"], rtol)
    return fast, slow
