"""What `TPUStrategy` needs from the DP step, tested where a CPU can test it.

TPUStrategy compiles each replica's whole step with XLA, with static shapes,
no host ops (Python callbacks, prints) and no float64; XLA drops
assertions; its random-number algorithm differs from the CPU's. Each test
below checks one of these on CPU, compiling the step whole with XLA as the
TPU would (`tf.function(..., jit_compile=True)` around `train_step`, outside
`fit`). What only a TPU can show is listed in docs/multi_worker.md (TPU
readiness).
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_dpfair as dpf
from tf_dpfair.data import pipeline as data
from tf_dpfair.dpsgd import noise

HOST_OPS = {"PyFunc", "PyFuncStateless", "EagerPyFunc", "PrintV2", "Print",
            "StringFormat", "WriteFile", "ReadFile"}


@pytest.fixture(params=["vectorized", "ghost"])
def clipping(request):
    return request.param


def classifier(clipping, noise_multiplier=0.0, seed=1, ema_decay=0.9):
    """A small conv net (3 classes) under DPModel, Adam, fixed initial weights."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4, 4, 1))
    hidden = keras.layers.Conv2D(2, 3, padding="same")(inputs)
    outputs = keras.layers.Dense(3)(keras.layers.Flatten()(hidden))
    model = dpf.DPModel(inputs=inputs, outputs=outputs, dp_config=dpf.DPConfig(
        l2_norm_clip=1.0, noise_multiplier=noise_multiplier, expected_batch_size=8,
        microbatch_size=4, ema_decay=ema_decay, seed=seed, clipping=clipping))
    model.compile(optimizer=keras.optimizers.Adam(0.05),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def batch(weights=None, labels=None):
    rng = np.random.default_rng(0)
    x = tf.constant(rng.uniform(size=(8, 4, 4, 1)).astype(np.float32))
    y = tf.constant(rng.integers(0, 3, 8).astype(np.int32) if labels is None
                    else np.asarray(labels, np.int32))
    w = tf.constant(np.ones(8, np.float32) if weights is None
                    else np.asarray(weights, np.float32))
    return x, y, w


def step(model, data_batch, xla):
    """One `train_step`, traced as a plain graph or compiled whole with XLA."""
    return tf.function(model.train_step, jit_compile=xla)(data_batch)


def state(model):
    with model.ema_weights():
        ema = [v.numpy().copy() for v in model.trainable_variables]
    return ([v.numpy().copy() for v in model.trainable_variables],
            [v.numpy().copy() for v in model.optimizer.variables], ema)


def assert_same_state(got, want):
    for got_group, want_group in zip(got, want):
        assert len(got_group) == len(want_group)
        for a, b in zip(got_group, want_group):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def graph_nodes(function, *args):
    """Every node of a traced function, nested functions (loop bodies) included."""
    graph = tf.function(function).get_concrete_function(*args).graph.as_graph_def()
    return list(graph.node) + [n for f in graph.library.function for n in f.node_def]


# ------------------------------------------------------- static shapes

@pytest.mark.parametrize("augmult", [1, 2])
def test_training_and_evaluation_batches_have_static_shapes(augmult):
    rng = np.random.default_rng(0)
    source = data.ExampleSource.from_arrays(
        rng.uniform(size=(40, 8, 8, 1)).astype(np.float32),
        (rng.uniform(size=(40, 2)) < 0.5).astype(np.float32),
        label_mask=np.ones((40, 2), np.float32))
    train = data.make_train_dataset(source, expected_batch_size=10, seed=3,
                                    microbatch_size=4, num_replicas=8, augmult=augmult)
    assert train.spec.padded_batch_size % (4 * 8) == 0  # 8 TPU cores, micro 4
    test = data.make_eval_dataset(source, batch_size=32, num_replicas=8)
    for dataset in (train.dataset, test):
        for spec in tf.nest.flatten(dataset.element_spec):
            assert spec.shape.is_fully_defined(), dataset.element_spec
    x_spec = train.dataset.element_spec[0]
    assert x_spec.shape[0] == train.spec.padded_batch_size
    assert x_spec.shape[1:] == ((augmult, 8, 8, 1) if augmult > 1 else (8, 8, 1))


# ------------------------------------------------------- the step compiled whole

def test_the_whole_dp_step_compiles_with_xla_and_gives_the_plain_steps_weights(clipping):
    plain, xla = classifier(clipping), classifier(clipping)
    for _ in range(2):
        step(plain, batch(), xla=False)
        step(xla, batch(), xla=True)
    assert plain.update_count == xla.update_count == 2
    assert_same_state(state(xla), state(plain))
    assert not np.allclose(state(plain)[0][0], classifier(clipping).trainable_variables[0].numpy())


def test_the_evaluation_step_with_grouped_auc_compiles_with_xla():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    model = dpf.DPModel(inputs=inputs, outputs=keras.layers.Dense(2)(inputs),
                        dp_config=dpf.DPConfig(l2_norm_clip=1.0, noise_multiplier=0.0,
                                               expected_batch_size=4))
    model.compile(optimizer="sgd", loss=keras.losses.BinaryCrossentropy(from_logits=True),
                  metrics=[dpf.fairness.streaming_auc.GroupedAUC({"sex": ["f", "m"]}, label_names=["a", "b"],
                                                  from_logits=True)])
    rng = np.random.default_rng(1)
    x = tf.constant(rng.normal(size=(8, 4)).astype(np.float32))
    y = {"label": tf.constant((rng.uniform(size=(8, 2)) < 0.5).astype(np.float32)),
         "groups": {"sex": tf.constant(rng.integers(0, 2, 8).astype(np.int32))}}
    model(x)
    plain = tf.function(model.test_step)((x, y, tf.ones(8)))
    model.reset_metrics()
    xla = tf.function(model.test_step, jit_compile=True)((x, y, tf.ones(8)))
    assert plain.keys() == xla.keys() and "auc_gap/sex" in xla
    for name in plain:
        np.testing.assert_allclose(xla[name], plain[name], rtol=1e-6, equal_nan=True)


def test_the_step_has_no_host_ops_and_no_float64(clipping):
    model = classifier(clipping, noise_multiplier=1.0)
    model(batch()[0])
    specs = tuple(tf.TensorSpec(t.shape, t.dtype) for t in batch())
    nodes = graph_nodes(model.train_step, specs)
    assert {"While", "StatelessRandomNormalV2"} <= {n.op for n in nodes}
    assert not {n.op for n in nodes} & HOST_OPS
    double = tf.float64.as_datatype_enum
    with_double = [f"{n.name} ({n.op})" for n in nodes
                   if any(v.type == double or double in v.list.type for v in n.attr.values())]
    assert not with_double


# ------------------------------------------------------- checks that XLA drops

def test_without_its_assertion_a_weight_above_one_counts_as_one():
    # In the plain graph the step refuses the batch; compiled whole (as on a
    # TPU) XLA drops the assertion and the clamp keeps the bound at C.
    want, got = classifier("vectorized"), classifier("vectorized")
    step(want, batch(), xla=False)
    step(got, batch(weights=[5.0] + [1.0] * 7), xla=True)
    assert_same_state(state(got), state(want))
    with pytest.raises(tf.errors.InvalidArgumentError, match="sample weights above 1"):
        step(classifier("vectorized"), batch(weights=[5.0] + [1.0] * 7), xla=False)


def test_without_its_assertion_a_nan_weight_counts_as_zero():
    want, got = classifier("vectorized"), classifier("vectorized")
    step(want, batch(weights=[0.0] + [1.0] * 7), xla=False)
    step(got, batch(weights=[np.nan] + [1.0] * 7), xla=True)
    assert_same_state(state(got), state(want))


def test_without_its_assertion_an_out_of_range_class_id_adds_nothing():
    # Its loss is NaN under XLA, so the example is dropped and counted as
    # non-finite: the update is that of the batch without it.
    labels = np.array(batch()[1])
    labels[0] = 7  # 3 classes
    want, got = classifier("vectorized"), classifier("vectorized")
    step(want, batch(weights=[0.0] + [1.0] * 7), xla=False)
    step(got, batch(labels=labels), xla=True)
    assert_same_state(state(got), state(want))
    assert got.nonfinite_examples == 1
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"class ids must be in \[0, 3\)"):
        step(classifier("vectorized"), batch(labels=labels), xla=False)


# ------------------------------------------------------- random numbers

def test_noise_names_the_philox_algorithm():
    # TF's default ("auto_select") picks Philox on CPU and ThreeFry on TPU; a
    # pinned algorithm is a constant input of each draw, not a device choice.
    nodes = graph_nodes(lambda t: noise.gaussian_noise([(3,), (2, 2)], 1.0, 5, t),
                        tf.TensorSpec([], tf.int64))
    by_name = {n.name: n for n in nodes}
    draws = [n for n in nodes if n.op == "StatelessRandomNormalV2"]
    assert len(draws) == 2
    for draw in draws:
        alg = by_name[draw.input[3].split(":")[0]]
        assert alg.op == "Const"
        assert int(tf.make_ndarray(alg.attr["value"].tensor)) == 1  # RNG_ALG_PHILOX
    assert not {n.op for n in nodes} & {"StatelessRandomGetKeyCounterAlg",
                                        "StatelessRandomGetAlg", "StatelessRandomGetKeyCounter"}


def test_noise_in_a_step_compiled_whole_is_one_seeded_draw_of_the_right_size():
    # XLA's Philox normals are not the CPU kernel's (same seed, other
    # numbers; measured), so a step compiled whole draws its own stream:
    # check it is a function of (seed, update) with std sigma * C / B.
    def noise_update(seed):
        keras.utils.set_random_seed(0)
        inputs = keras.Input((1000,))
        model = dpf.DPModel(
            inputs=inputs,
            outputs=keras.layers.Dense(20, kernel_initializer="zeros", use_bias=False)(inputs),
            dp_config=dpf.DPConfig(l2_norm_clip=2.0, noise_multiplier=1.5,
                                   expected_batch_size=50, microbatch_size=8, seed=seed))
        model.compile(optimizer=keras.optimizers.SGD(1.0), loss="mse")
        step(model, (tf.ones((16, 1000)), tf.zeros((16, 20)), tf.zeros(16)), xla=True)
        return model.trainable_variables[0].numpy().ravel()

    first, again, other = noise_update(123), noise_update(123), noise_update(124)
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, other)
    want = 1.5 * 2.0 / 50
    assert abs(first.std() / want - 1) < 0.03  # 20,000 draws, ~6 standard errors
