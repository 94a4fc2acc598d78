"""BatchNormalization under DP: find it, explain it, freeze it or replace it.

A trainable BatchNormalization normalises each example with the statistics of
its batch, so one example's output (and gradient) depends on the others and
per-example clipping no longer bounds its influence. Freezing it (inference
mode) or replacing it with GroupNormalization makes examples independent.

Every function here finds BatchNormalization at any depth: in nested models,
held by custom layers, inside wrappers such as `TimeDistributed`. DP training
does not rely on this list alone: `tf_dpfair.dpsgd.separability` also checks the
model itself, whatever its layers, before the first update.
"""

import collections

import keras


def walk_layers(model, include_self=False):
    """Yields every layer held by `model`, however deeply, with its path.

    Sublayers are found wherever Keras tracks them: layers of nested models,
    layers held as attributes of custom layers, layers inside wrappers such
    as `TimeDistributed` or `Bidirectional`. A layer held twice is yielded
    once, under the first path met (depth first, in the order held).

    Args:
      model: a Keras model or layer.
      include_self: yield `model` itself first.

    Returns:
      An iterator of `(path, layer)`; `path` joins the names of `model`,
      every holder in between and the layer with "/".
    """
    seen = {id(model)}

    def visit(holder, path):
        for child in holder._flatten_layers(include_self=False, recursive=False):
            if id(child) in seen:
                continue
            seen.add(id(child))
            child_path = f"{path}/{child.name}"
            yield child_path, child
            yield from visit(child, child_path)

    if include_self:
        yield model.name, model
    yield from visit(model, model.name)


def _batchnorms(model):
    """(path, layer) of every BatchNormalization in `model`, itself included."""
    return [(path, layer) for path, layer in walk_layers(model, include_self=True)
            if isinstance(layer, keras.layers.BatchNormalization)]


def training_batchnorm_layers(model):
    """Returns the BatchNormalization layers of `model` that train their statistics.

    A trainable Keras 3 BatchNormalization layer normalises with the statistics of
    the current batch when called with `training=True`, so one example's output
    depends on the others and per-example clipping no longer bounds its
    influence. A non-trainable one runs in inference mode (moving statistics)
    and is safe.

    Args:
      model: a Keras model or layer; layers nested at any depth (in models,
        custom layers, wrappers) are searched.

    Returns:
      A list of the offending layers, in model order.
    """
    return [layer for _, layer in _batchnorms(model) if layer.trainable]


TRAINING_MODE = "training-mode"
FROZEN = "frozen"


class BatchNormFinding(collections.namedtuple(
        "BatchNormFinding", ["layer_name", "path", "status", "message"])):
    """One BatchNormalization layer and how it behaves under DP training.

    Fields:
      layer_name: the layer's name.
      path: the names of the model, every holder in between (nested
        models, custom layers, wrappers) and the layer, joined by "/".
      status: `"training-mode"` (trainable: batch statistics in `fit`, mixes
        examples, refused by DP training) or `"frozen"` (not trainable:
        moving statistics, examples stay independent, safe).
      message: a sentence saying the above for this layer.
    """


def check_batchnorm(model):
    """Lists every BatchNormalization layer of `model` and its behaviour under DP.

    Args:
      model: a Keras model or layer; layers nested at any depth (in models,
        custom layers, wrappers) are searched.

    Returns:
      A list of `BatchNormFinding`, in model order (empty when the model has no
      BatchNorm). The model is fit for DP training when no finding has status
      `"training-mode"`.
    """
    return [_finding(layer, path) for path, layer in _batchnorms(model)]


def _finding(layer, path):
    if layer.trainable:
        synchronized = getattr(layer, "synchronized", False)
        sync = " across replicas too (synchronized)" if synchronized else ""
        return BatchNormFinding(
            layer.name, path, TRAINING_MODE,
            f"{path}: trainable BatchNormalization normalises with the statistics of "
            f"the current batch{sync} in training, so one example's gradient depends "
            "on the others and clipping no longer bounds it; DP training refuses it. "
            "Fix with freeze_batchnorm(model) or replace_batchnorm(model).")
    return BatchNormFinding(
        layer.name, path, FROZEN,
        f"{path}: frozen BatchNormalization uses its moving statistics in training "
        "and inference; examples stay independent (safe under DP).")


def batchnorm_report(model):
    """Returns a human-readable summary of `check_batchnorm(model)`.

    Args:
      model: a Keras model or layer.

    Returns:
      A multi-line string: a verdict line, then one line per BatchNorm layer.
    """
    findings = check_batchnorm(model)
    if not findings:
        return f"{model.name}: no BatchNormalization layers; fit for DP training."
    bad = [f for f in findings if f.status == TRAINING_MODE]
    verdict = (f"{model.name}: {len(bad)} of {len(findings)} BatchNormalization layers would "
               "mix examples; not fit for DP training." if bad else
               f"{model.name}: all {len(findings)} BatchNormalization layers are frozen; "
               "fit for DP training.")
    return "\n".join([verdict] + [f"  [{f.status}] {f.message}" for f in findings])


def freeze_batchnorm(model):
    """Makes every BatchNormalization layer non-trainable, in place.

    A non-trainable Keras 3 BatchNormalization runs in inference mode even when
    called with `training=True`: it normalises with its moving statistics and
    does not update them, so each example's output depends on that example
    alone. Its gamma and beta are frozen too. Setting `model.trainable = True`
    afterwards would unfreeze them again (Keras applies it recursively); use
    `finetune.set_trainable`, which leaves BatchNorm frozen.

    Args:
      model: a Keras model or layer; layers nested at any depth (in models,
        custom layers, wrappers) included.

    Returns:
      `model`, for chaining.
    """
    for _, layer in _batchnorms(model):
        layer.trainable = False
    return model


def _divisor_at_most(channels, groups):
    """Largest divisor of `channels` that is <= `groups`."""
    for g in range(min(groups, channels), 0, -1):
        if channels % g == 0:
            return g
    return 1


def replace_batchnorm(model, group_norm_groups=32):
    """Returns a copy of `model` with every BatchNormalization replaced by GroupNorm.

    All other layers are cloned from their configs and get the original's
    weights (copied, not shared). Each GroupNormalization normalises over the
    BatchNorm's axis with `min(group_norm_groups, C)` groups, lowered to the
    largest divisor of the channel count C, keeps the BatchNorm's epsilon,
    center and scale, and starts from its gamma and beta; the moving statistics
    are dropped (GroupNorm computes per-example statistics instead). Outputs
    therefore change after the first replaced layer: fine-tune before use.

    Args:
      model: a built functional or Sequential `keras.Model`; nested functional
        or Sequential models are converted too.
      group_norm_groups: the largest number of groups to use.

    Returns:
      A new `keras.Model` of the same kind, with the same layer names.

    Raises:
      ValueError: `model` is subclassed or not built, `group_norm_groups` < 1,
        or a BatchNormalization sits inside a layer that is not a functional
        or Sequential model (a custom layer, a wrapper such as
        `TimeDistributed`, a subclassed model): cloning rebuilds such a layer
        from its config, so the BatchNorm inside would survive.
    """
    if not isinstance(group_norm_groups, int) or group_norm_groups < 1:
        raise ValueError(f"group_norm_groups must be a positive int; got {group_norm_groups!r}.")
    if not _is_graph_model(model):
        raise ValueError(
            f"replace_batchnorm needs a functional or Sequential model; "
            f"{getattr(model, 'name', model)!r} is a {type(model).__name__}. "
            "Use freeze_batchnorm(model), or "
            "rebuild it with GroupNormalization.")
    if not model.built:
        raise ValueError(f"Model {model.name!r} is not built: call it on data or give "
                         "it an Input first.")
    hidden = _unreachable_batchnorms(model, model.name)
    if hidden:
        path, holder = hidden[0]
        paths = ", ".join(repr(p) for p, _ in hidden)
        raise ValueError(
            f"replace_batchnorm cannot convert BatchNormalization {paths}: "
            f"{path!r} is held by {holder.name!r} ({type(holder).__name__}), "
            f"a layer that is not a functional or Sequential model, whose "
            f"inner layers cannot be swapped from outside. Freeze it instead "
            f"(freeze_batchnorm(model)), or rebuild {holder.name!r} with "
            f"GroupNormalization.")
    return _replace(model, group_norm_groups)


def _unreachable_batchnorms(model, path):
    """(path, holder) of each BatchNorm held by a layer `_replace` clones whole."""
    found = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            continue
        if _is_graph_model(layer):
            found.extend(_unreachable_batchnorms(layer, f"{path}/{layer.name}"))
            continue
        # Inner paths start with the holder's own name.
        found.extend((f"{path}/{inner_path}", layer)
                     for inner_path, _ in _batchnorms(layer))
    return found


def _is_graph_model(model):
    """True for Sequential and functional models (whose layer graph can be cloned)."""
    if isinstance(model, keras.Sequential):
        return True
    return isinstance(model, keras.Model) and any(
        cls.__name__ == "Functional" for cls in type(model).__mro__)


def _replace(model, groups):
    originals = {}

    def clone(layer):
        if isinstance(layer, keras.Model) and _is_graph_model(layer):
            new = _replace(layer, groups)
        elif isinstance(layer, keras.layers.BatchNormalization):
            axis = layer.axis if isinstance(layer.axis, int) else layer.axis[0]
            channels = layer.gamma.shape[0] if layer.scale else layer.beta.shape[0]
            new = keras.layers.GroupNormalization(
                groups=_divisor_at_most(channels, groups), axis=axis,
                epsilon=layer.epsilon, center=layer.center, scale=layer.scale,
                name=layer.name)
        else:
            new = layer.__class__.from_config(layer.get_config())
        originals[layer.name] = (layer, new)
        return new

    def call(layer, *args, **kwargs):
        if isinstance(layer, keras.layers.GroupNormalization):
            # The graph recorded BatchNorm's call arguments; GroupNorm takes neither.
            kwargs.pop("mask", None)
            kwargs.pop("training", None)
        return layer(*args, **kwargs)

    if isinstance(model, keras.Sequential):
        # Sequential passes only the arguments each layer accepts.
        result = keras.models.clone_model(model, clone_function=clone)
    else:
        result = keras.models.clone_model(model, clone_function=clone, call_function=call)
    for old, new in originals.values():
        if isinstance(old, keras.Model):
            continue  # already converted with its weights
        if isinstance(old, keras.layers.BatchNormalization):
            weights = ([old.gamma.numpy()] if old.scale else []) + \
                      ([old.beta.numpy()] if old.center else [])
            new.set_weights(weights)
        elif old.weights:
            new.set_weights(old.get_weights())
        new.trainable = old.trainable
    return result
