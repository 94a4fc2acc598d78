"""The input pipelines of `DPModel`: training and evaluation batches of an `ExampleSource`.

The examples, their element structure and group ids are in
`tf_dpfair.data.source` (`ExampleSource`). Keras batches (see
`tf_dpfair.data.batch`), built by `to_keras_batch`:

- training (`make_train_dataset`): `(x, y, sample_weight)`, x float32
    `[P, H, W, C]` in [0, 1], or `[P, K, H, W, C]` with augmult K > 1; y the
    labels `[P]` / `[P, L]` (a dict `{"label", "label_mask"}` when the source
    has label masks; groups only on request); P = `spec.padded_batch_size`.
- evaluation (`make_eval_dataset`): `(x, {"label": y, "groups": {attr: [P]}},
    sample_weight)`, with `"label_mask"` too when present; never augmented.

`sample_weight` is float32 `[P]`: 1 for real rows, 0 for padding. Padding rows
are all zeros (image, label, group 0), so they carry no data; a model that
multiplies each example's clipped gradient by its weight gets exactly zero
from them. How examples are sampled, and what the accountant must be told,
is in `tf_dpfair.privacy.sampling` (`SamplingSpec`).
"""

import collections

import tensorflow as tf

from tf_dpfair import workers
from tf_dpfair.data import augment as augment_lib
from tf_dpfair.data import sampler
from tf_dpfair.privacy import pipeline_tag
from tf_dpfair.privacy import sampling
# Importable from here, as before the examples had a module of their own.
from tf_dpfair.data.groups import GroupSpec, UNKNOWN  # noqa: F401 (re-exported)
from tf_dpfair.data.images import (  # noqa: F401 (re-exported)
    decode_image, image_to_float, resize_image)
from tf_dpfair.data.source import (  # noqa: F401 (re-exported)
    GROUPS, IMAGE, LABEL, LABEL_MASK, ExampleSource)

TrainData = collections.namedtuple("TrainData", ["dataset", "spec"])
TrainData.__doc__ = """The training input and its sampling record.

Give it to `DPModel.fit` as is (`model.fit(train, epochs=...)`): the model
learns the spec, so `PrivacyLogger(delta=...)` states the sampling the
batches really had, and `steps_per_epoch` defaults to the spec's.

Attributes:
    dataset: `tf.data.Dataset` of `(x, y, sample_weight)`, one element per
        optimizer update.
    spec: the `sampling.SamplingSpec` to hand to the accountant.
"""


def to_keras_batch(elements, sample_weight=None, *, with_groups=True):
    """Converts (batched) elements to a Keras batch `(x, y, sample_weight)`.

    Args:
        elements: element dict, batched (`image` `[B, H, W, C]`) or not.
        sample_weight: float `[B]`, or None for all ones.
        with_groups: put the groups in y (`{"label": ..., "groups": ...}`); for
            evaluation. Training leaves them out.

    Returns:
        `(x, y, sample_weight)`: x float32 in [0, 1]; y the labels, or a dict
        with `"label"` and, where present or asked for, `"label_mask"` and
        `"groups"`; sample_weight float32 `[B]` (scalar if unbatched).

    Raises:
        ValueError: `elements` lacks `"image"` or `"label"`.
    """
    missing = {IMAGE, LABEL} - set(elements)
    if missing:
        raise ValueError(f"Elements lack the keys {sorted(missing)}; got {sorted(elements)}.")
    image = elements[IMAGE]
    x = image_to_float(image)
    y = elements[LABEL]
    extra = {}
    if LABEL_MASK in elements:
        extra[LABEL_MASK] = elements[LABEL_MASK]
    if with_groups:
        extra[GROUPS] = dict(elements.get(GROUPS, {}))
    if extra:
        y = {LABEL: y, **extra}
    if sample_weight is None:
        sample_weight = tf.ones(tf.shape(image)[:-3], tf.float32)
    return x, y, tf.cast(sample_weight, tf.float32)


def make_train_dataset(source, *, expected_batch_size, seed, mode=sampling.POISSON,
                       microbatch_size=1, num_replicas=1, augmult=1, augment_fn=None,
                       start_step=0, num_steps=None, with_groups=False,
                       max_overflow_probability=sampling.DEFAULT_MAX_OVERFLOW_PROBABILITY,
                       on_overflow="drop", accept_shuffle_as_poisson=False):
    """The training input of `DPModel.fit`, one element per optimizer update.

    Each element is a whole logical batch of static size P =
    `spec.padded_batch_size`: sampled rows, then weight-0 padding (with
    several replicas, dealt so each replica gets an equal share, see
    `sampler.replica_order`). The dataset is endless unless `num_steps` is
    given. Give the returned `TrainData` (or its dataset) to `DPModel.fit`:
    the model learns the spec and `steps_per_epoch` defaults to the spec's.
    To resume at update k, pass `start_step=k` (`fit` refuses a pipeline
    that does not start at the model's update count) and the same seed:
    batches are a function of `(seed, update)` only. On several workers
    (`MultiWorkerMirroredStrategy`) every worker builds it with the same
    secret seed (`tf_dpfair.workers.share_from_chief`) and `num_replicas` of the whole
    job; it is sharded by data, so each worker trains on its replicas' rows
    of every logical batch.

    Args:
        source: an `ExampleSource`.
        expected_batch_size: B; q = B / N.
        seed: secret integer seed of the sampling and augmentation draws.
        mode: `"poisson"` or `"shuffle"` (see `tf_dpfair.privacy.sampling`).
        microbatch_size: rows per micro-batch; P is a multiple of
            `microbatch_size * num_replicas`.
        num_replicas: replicas the batch is split over.
        augmult: K views per example; K > 1 gives x `[P, K, H, W, C]`.
        augment_fn: `fn(image [H, W, C], seed int64 [2]) -> [H, W, C]`; None
            means random crop (4 px reflect padding) + flip when K > 1 and no
            augmentation when K = 1.
        start_step: index of the first update.
        num_steps: number of updates, or None for endless.
        with_groups: also put the groups in y (outside the DP guarantee if
            anything is computed from them).
        max_overflow_probability: Poisson only; see `make_sampling_spec`.
        on_overflow: `"drop"` or `"raise"`.
        accept_shuffle_as_poisson: shuffle only; see `SamplingSpec`.

    Returns:
        `TrainData(dataset, spec)`.

    Raises:
        ValueError: bad arguments (see `make_sampling_spec`), or `source` is
            not an `ExampleSource`.
    """
    _check_source(source)
    if int(augmult) != augmult or augmult < 1:
        raise ValueError(f"augmult must be an integer >= 1; got {augmult!r}.")
    if augment_fn is None and augmult > 1:
        augment_fn = augment_lib.random_crop_flip
    spec = sampling.make_sampling_spec(
            mode, source.num_examples, expected_batch_size,
            microbatch_size=microbatch_size, num_replicas=num_replicas,
            max_overflow_probability=max_overflow_probability, on_overflow=on_overflow,
            accept_shuffle_as_poisson=accept_shuffle_as_poisson)
    augment_seed = sampler.stream_seed(seed, sampler.AUGMENT_STREAM)
    zeros = source.zeros()

    def example(step, index, valid):
        element = tf.cond(valid, lambda: source.load(index), lambda: zeros)
        x, y, weight = to_keras_batch(element, tf.cast(valid, tf.float32),
                                      with_groups=with_groups)
        if augment_fn is not None:
            example_seed = sampler.fold_in(sampler.fold_in(augment_seed, step), index)
            x = augment_lib.augment_views(x, example_seed, augmult, augment_fn)
        return x, y, weight

    def logical_batch(step, indices, valid):
        return _gathered_batch(source, indices, valid, with_groups)

    rows = sampler.index_dataset(spec, seed, start_step=start_step, num_steps=num_steps)
    if source.load_many is not None and augment_fn is None:
        # In-memory examples without augmentation: a logical batch per gather.
        dataset = rows.map(logical_batch, num_parallel_calls=tf.data.AUTOTUNE,
                           deterministic=True)
    else:
        rows = rows.flat_map(lambda step, indices, valid: tf.data.Dataset.from_tensor_slices(
                (tf.fill(tf.shape(indices), step), indices, valid)))
        dataset = rows.map(example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        dataset = dataset.batch(spec.padded_batch_size, drop_remainder=True)
    dataset = _sharded_by_data(dataset.prefetch(tf.data.AUTOTUNE))
    # The tag lets `DPModel.fit` learn the spec from the dataset itself; set
    # last, on the very object returned (`with_options` makes a new one).
    # Workers compare the seed's digest, never the seed, before a multi-worker
    # fit (`tf_dpfair.workers.check_workers_agree`).
    dataset = pipeline_tag.tag_pipeline(dataset, spec, start_step, num_steps,
                                   workers.seed_digest(seed))
    return TrainData(dataset, spec)


def make_eval_dataset(source, *, batch_size, microbatch_size=1, num_replicas=1,
                      with_groups=True):
    """Every example once, in index order, in batches of static size.

    The last batch is padded with weight-0 rows so every batch has
    `batch_size` rows. No augmentation.

    Args:
        source: an `ExampleSource`.
        batch_size: rows per batch, a multiple of `microbatch_size * num_replicas`.
        microbatch_size: rows per micro-batch.
        num_replicas: replicas the batch is split over.
        with_groups: put the groups in y (default True, for grouped metrics).

    Returns:
        A `tf.data.Dataset` of `(x, y, sample_weight)`, ceil(N / batch_size)
        batches.

    Raises:
        ValueError: `batch_size` is not a positive multiple of
            `microbatch_size * num_replicas`.
    """
    _check_source(source)
    granule = microbatch_size * num_replicas
    if int(batch_size) != batch_size or batch_size <= 0 or batch_size % granule:
        raise ValueError(
                f"batch_size must be a positive multiple of microbatch_size * "
                f"num_replicas = {granule}; got {batch_size!r}.")
    num = source.num_examples
    total = -(-num // batch_size) * batch_size
    zeros = source.zeros()

    def example(position):
        valid = position < num
        element = tf.cond(valid, lambda: source.load(position), lambda: zeros)
        return to_keras_batch(element, tf.cast(valid, tf.float32), with_groups=with_groups)

    def batch_from(start):
        # Padding rows read the last example; `_gathered_batch` zeroes them.
        positions = start + tf.range(batch_size, dtype=tf.int64)
        return _gathered_batch(source, tf.minimum(positions, num - 1), positions < num,
                               with_groups)

    if source.load_many is not None and num > 0:
        # In memory (arrays, cached features): a batch per gather, about 30x
        # faster than a map per example for 1,000 cached features.
        dataset = tf.data.Dataset.range(0, total, batch_size).map(
                batch_from, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    else:
        dataset = tf.data.Dataset.range(total).map(
                example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        dataset = dataset.batch(batch_size, drop_remainder=True)
    return _sharded_by_data(dataset.prefetch(tf.data.AUTOTUNE))


def _gathered_batch(source, indices, valid, with_groups):
    """The rows `indices` of an in-memory source, read in one gather (`load_many`).

    The same Keras batch as reading them row by row; rows where `valid` is
    False are zeroed, as `source.zeros()` would give them, with weight 0.
    """
    elements = tf.nest.map_structure(
            lambda t: tf.where(tf.reshape(valid, [-1] + [1] * (t.shape.rank - 1)), t,
                               tf.zeros_like(t)),
            source.load_many(indices))
    return to_keras_batch(elements, tf.cast(valid, tf.float32), with_groups=with_groups)


def _sharded_by_data(dataset):
    """`dataset` with tf.data auto-sharding by data, for several workers.

    Under `MultiWorkerMirroredStrategy` every worker then builds the same
    batches and keeps its own replicas' rows of each: every row is used
    once. (AUTO falls back to this for these datasets, since they read no
    files; OFF would give every worker the same rows.) No effect in one
    process.
    """
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = (
            tf.data.experimental.AutoShardPolicy.DATA)
    return dataset.with_options(options)


def _check_source(source):
    if not isinstance(source, ExampleSource):
        raise ValueError(f"source must be an ExampleSource; got {type(source).__name__}.")
