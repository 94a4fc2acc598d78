"""Tests of the stateless noise stream."""

import numpy as np
import tensorflow as tf

from tf_dpfair.dpsgd import noise


def draw(seed, step):
    return [t.numpy() for t in noise.gaussian_noise(
        [(50, 40), (40,)], 2.0, seed, tf.constant(step, tf.int64))]


def test_same_seed_and_step_reproduce_the_draw():
    for a, b in zip(draw(7, 3), draw(7, 3)):
        np.testing.assert_array_equal(a, b)


def test_draws_differ_across_steps_variables_and_seeds():
    base = draw(7, 3)
    assert not np.allclose(base[0], draw(7, 4)[0])
    assert not np.allclose(base[0], draw(8, 3)[0])
    assert not np.allclose(base[0][0, :40], base[1])


def test_draws_have_the_requested_stddev():
    values = np.concatenate([d[0].ravel() for d in
                             (draw(11, s) for s in range(10))])
    assert abs(values.std() / 2.0 - 1) < 0.02
    assert abs(values.mean()) < 0.05
