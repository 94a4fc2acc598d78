"""Linear probes on a frozen backbone: features computed once, the head trained on them.

When only the last layers of a model train (`finetune="head"`, a linear
probe), every update of the uncached run pushes each sampled image through
the whole frozen backbone again, although the backbone's output for that
image never changes. Here the backbone runs once per example (once per view
with augmentation multiplicity K) and the head trains on the stored features:

    backbone, head = split_frozen_backbone(model)
    features = cache_features(backbone, source, views=K, seed=cache_seed)
    private_head = tf_dpfair.make_private(head, DPConfig(..., augmult=K))
    private_head.fit(make_train_dataset(features, ...))

What stays exactly as in the uncached run: the DP step (the head's
per-example gradients are the full model's, since the frozen layers carry no
trainable weights), the sampling (the same N, batch and seed give the same
logical batches) and so the accounting and the noise (drawn per update for
the same trainable variables). A test compares both runs update by update at
1e-5.

What changes, and is stated wherever it is used: with K > 1 views, each
example's K augmented views are drawn once (`view_seed` below) and reused
every time the example is sampled, where the uncached pipeline draws fresh
views at every update. Augmentation is a per-example function of the
example, so the DP guarantee is the same either way; what the model sees is
less varied, which the study measures rather than assumes away. The views
drawn are those the uncached pipeline would draw at update 0 with the
cache's seed. The seed need not be secret (DP does not rest on it), so runs
of a sweep can share one cache.

The split is checked, not trusted: the backbone must hold none of the
model's trainable weights, and its output with `training=True` must equal
its output with `training=False` on real inputs (a dropout or a BatchNorm
still using batch statistics would make the cached features differ from
what the uncached step sees).
"""

import hashlib
import json
import os

import keras
import numpy as np
import tensorflow as tf

from tf_dpfair.data import augment as augment_lib
from tf_dpfair.data import pipeline
from tf_dpfair.data import sampler
from tf_dpfair.data.source import ExampleSource

# Layers that behave differently in training: kept in the head so that the
# cached features are the same in both modes.
_RANDOM_IN_TRAINING = (keras.layers.Dropout, keras.layers.SpatialDropout1D,
                       keras.layers.SpatialDropout2D, keras.layers.SpatialDropout3D,
                       keras.layers.GaussianDropout, keras.layers.GaussianNoise,
                       keras.layers.AlphaDropout)
# Largest |training - inference| difference of backbone outputs accepted,
# relative to the outputs' scale.
_MODE_TOLERANCE = 1e-5
CACHE_FORMAT = 1


def _producer(tensor):
    """The layer that produced a functional tensor and the node of that call."""
    history = getattr(tensor, "_keras_history", None)
    if history is None:
        return None, None
    layer, node_index, _ = history
    return layer, layer._inbound_nodes[node_index]


def _trailing_chain(model):
    """[(layer, its input)] from the cut to the output: the head's layers, in order."""
    trainable = {id(v) for v in model.trainable_weights}
    if not trainable:
        raise ValueError(f"Model {model.name!r} has no trainable weights: nothing to train "
                         "on cached features.")
    chain, covered, tensor = [], set(), model.outputs[0]
    while True:
        layer, node = _producer(tensor)
        if layer is None or isinstance(layer, keras.layers.InputLayer) \
                or len(node.input_tensors) != 1:
            break
        tensor = node.input_tensors[0]
        chain.append((layer, tensor))
        covered |= {id(v) for v in layer.trainable_weights} & trainable
        if covered == trainable and not isinstance(_producer(tensor)[0], _RANDOM_IN_TRAINING):
            break
    if covered != trainable:
        raise ValueError(
                f"The trainable weights of {model.name!r} are not all in a chain of "
                "single-input layers at its end; cached features need a frozen backbone "
                "followed by a trained head (finetune='head').")
    return chain[::-1]


def split_frozen_backbone(model):
    """Splits a functional model into its frozen backbone and its trained head.

    The head is the shortest chain of single-input layers at the model's end
    that holds every trainable weight, extended backwards over layers that
    are random in training (dropout); the backbone is everything before it.

    Args:
        model: a functional Keras model with one input and one output whose
            trainable layers are all at its end (e.g. after
            `tf_dpfair.models.set_trainable(model, "head")`).

    Returns:
        `(backbone, head)`: `backbone` maps the model's input to the
        features; `head` maps features to the model's output and shares the
        model's layers (and weights), so `head(backbone(x))` is `model(x)`.

    Raises:
        ValueError: not a one-input, one-output functional model, no
            trainable weights, or trainable weights outside a trailing chain.
    """
    if not isinstance(model, keras.Model) or len(getattr(model, "inputs", None) or []) != 1 \
            or len(model.outputs) != 1:
        raise ValueError("split_frozen_backbone needs a functional Keras model with one "
                         f"input and one output; got {type(model).__name__}.")
    chain = _trailing_chain(model)
    cut = chain[0][1]
    first = chain[0][0]
    inner = _split_nested(first)
    if inner is None and _is_model_input(cut):
        raise ValueError(
                f"Every layer of {model.name!r} with weights trains (or sits after one that "
                "does): there is no frozen backbone whose features could be cached. Use "
                "finetune='head'.")
    if inner is None:
        backbone = keras.Model(model.inputs, cut, name=model.name + "_backbone")
        head_layers = [layer for layer, _ in chain]
    else:  # the cut lies inside a nested model (an input adapter before it)
        inner_backbone, inner_head = inner
        backbone = keras.Model(model.inputs, inner_backbone(cut),
                               name=model.name + "_backbone")
        head_layers = [inner_head] + [layer for layer, _ in chain[1:]]
    trained = {id(v) for v in model.trainable_weights}
    if {id(v) for v in backbone.trainable_weights} & trained:
        raise ValueError(f"The backbone of {model.name!r} shares trainable weights with "
                         "its head; its features would change during training.")
    features = keras.Input(tuple(backbone.outputs[0].shape[1:]), name="features")
    x = features
    for layer in head_layers:
        x = layer(x)
    head = keras.Model(features, x, name=model.name + "_head")
    return backbone, head


def _is_model_input(tensor):
    layer, _ = _producer(tensor)
    return layer is None or isinstance(layer, keras.layers.InputLayer)


def _split_nested(layer):
    """`split_frozen_backbone(layer)` for a nested functional model with frozen parts, else None."""
    if not isinstance(layer, keras.Model) or len(getattr(layer, "inputs", None) or []) != 1 \
            or not layer.non_trainable_weights:
        return None
    try:
        return split_frozen_backbone(layer)
    except ValueError:  # every weighted layer inside trains: keep it whole in the head
        return None


def check_same_in_both_modes(backbone, x):
    """Refuses a backbone whose output depends on the training flag.

    Args:
        backbone: the model the features come from.
        x: a batch of its inputs (a few real examples).

    Raises:
        ValueError: `backbone(x, training=True)` differs from
            `backbone(x, training=False)` (dropout, or BatchNorm with batch
            statistics): cached features would not be what training sees.
    """
    train = keras.ops.convert_to_numpy(backbone(x, training=True))
    infer = keras.ops.convert_to_numpy(backbone(x, training=False))
    scale = max(float(np.max(np.abs(infer))), 1.0)
    difference = float(np.max(np.abs(train - infer)))
    if not difference <= _MODE_TOLERANCE * scale:
        raise ValueError(
                f"The backbone's output differs between training and inference (by "
                f"{difference:.3g}, outputs up to {scale:.3g}): a dropout or a BatchNorm "
                "using batch statistics sits in it, so cached features would not be what "
                "the uncached step sees. Freeze BatchNorm (models.set_trainable does) or "
                "train without the cache.")


def view_seed(seed):
    """The per-example seeds' root: the uncached pipeline's at update 0 with `seed`."""
    return sampler.fold_in(sampler.stream_seed(seed, sampler.AUGMENT_STREAM), 0)


def _view_dataset(source, views, augment_fn, seed, batch_size):
    """(x, label, label_mask, groups) of every example in index order, batched."""
    root = view_seed(seed)

    def example(index):
        element = source.load(index)
        x, _, _ = pipeline.to_keras_batch(element, with_groups=False)
        if augment_fn is not None:
            x = augment_lib.augment_views(x, sampler.fold_in(root, index), views, augment_fn)
        mask = element.get("label_mask", tf.zeros([0], tf.float32))
        return x, element["label"], mask, dict(element.get("groups", {}))

    return tf.data.Dataset.range(source.num_examples).map(
            example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).batch(
            batch_size).prefetch(tf.data.AUTOTUNE)


def cache_features(backbone, source, *, views=1, augment_fn=None, seed=0, batch_size=256,
                   verbose=1):
    """The backbone's features of every example of a source, as a source of features.

    Args:
        backbone: from `split_frozen_backbone` (inference mode is used; see
            `check_same_in_both_modes`, run here on the first batch).
        source: an `ExampleSource` of images.
        views: K views per example; K > 1 gives features `[K, ...]` per
            example, for a `DPConfig(augmult=K)` head.
        augment_fn: `fn(image, seed) -> image`; None means random crop + flip
            when K > 1 and none when K = 1 (as `make_train_dataset`).
        seed: integer seed of the views (`view_seed`); not secret.
        batch_size: examples per backbone call.
        verbose: 1 shows a progress bar.

    Returns:
        An `ExampleSource` whose "image" is the float32 features, with the
        source's labels, label masks and groups.

    Raises:
        ValueError: bad `views` or `batch_size`, or a backbone that
            `check_same_in_both_modes` refuses.
    """
    if int(views) != views or views < 1:
        raise ValueError(f"views must be an integer >= 1; got {views!r}.")
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}.")
    if augment_fn is None and views > 1:
        augment_fn = augment_lib.random_crop_flip
    forward = tf.function(lambda x: backbone(x, training=False))
    columns = {"features": [], "labels": [], "mask": [], "groups": {}}
    progress = keras.utils.Progbar(source.num_examples, unit_name="example") if verbose else None
    for x, labels, mask, groups in _view_dataset(source, views, augment_fn, seed, batch_size):
        flat = tf.reshape(x, [-1, *x.shape[2:]]) if views > 1 else x
        if not columns["features"]:
            check_same_in_both_modes(backbone, flat[:8])
        out = forward(flat).numpy()
        if views > 1:
            out = out.reshape(len(labels), views, *out.shape[1:])
        columns["features"].append(out)
        columns["labels"].append(labels.numpy())
        columns["mask"].append(mask.numpy())
        for attribute, ids in groups.items():
            columns["groups"].setdefault(attribute, []).append(ids.numpy())
        if progress is not None:
            progress.add(len(labels))
    return _feature_source(
            np.concatenate(columns["features"]), np.concatenate(columns["labels"]),
            np.concatenate(columns["mask"]),
            {a: np.concatenate(v) for a, v in columns["groups"].items()}, source.group_spec)


def _feature_source(features, labels, mask, groups, group_spec):
    return ExampleSource.from_features(
            features, labels, groups=groups or None, group_spec=group_spec,
            label_mask=mask if mask.size else None)


def weights_digest(model):
    """SHA-256 of a model's weights (order, shapes, bytes): part of a cache's key.

    Names are left out: Keras numbers auto-named layers per process, so the
    same weights may carry other names in another run.
    """
    digest = hashlib.sha256()
    for position, variable in enumerate(model.weights):
        value = np.ascontiguousarray(keras.ops.convert_to_numpy(variable))
        digest.update(f"{position}:{value.dtype}:{value.shape};".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def save_features(path, source, key):
    """Writes a feature source (`cache_features`) to an .npz file, with its key.

    Written to a temporary file first and renamed, so a crash never leaves a
    truncated cache that a later run would trust.
    """
    element = source.elements().batch(source.num_examples).get_single_element()
    arrays = {"features": element["image"].numpy(), "labels": element["label"].numpy(),
              "key": np.array(key), "format": np.array(CACHE_FORMAT),
              "group_spec": np.array(json.dumps(source.group_spec.to_dict()))}
    if "label_mask" in element:
        arrays["label_mask"] = element["label_mask"].numpy()
    for attribute, ids in element.get("groups", {}).items():
        arrays["group_" + attribute] = ids.numpy()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    partial = path + ".partial.npz"
    np.savez(partial, **arrays)
    os.replace(partial, path)


def load_features(path, key):
    """Reads a feature source written by `save_features`, or None.

    Returns None when the file is missing or holds another key (other data,
    backbone weights or views), so the caller computes the features again.
    """
    if not os.path.exists(path):
        return None
    with np.load(path) as saved:
        if int(saved["format"]) != CACHE_FORMAT or str(saved["key"]) != key:
            return None
        groups = {name[len("group_"):]: saved[name] for name in saved.files
                  if name.startswith("group_") and name != "group_spec"}
        spec = json.loads(str(saved["group_spec"]))
        mask = saved["label_mask"] if "label_mask" in saved.files else np.zeros(0)
        return _feature_source(saved["features"], saved["labels"], mask, groups, spec)
