"""Separability probe: is each example's output a function of its own row?

Both clipping paths rest on one assumption: example i's loss depends on row i
of the batch alone. `clipping` differentiates each example's loss on its own,
and `ghost` reads every example's gradient off one batched backward pass,
which is example i's own only under that assumption. Per-example clipping
bounds one example's influence on an update only then. BatchNormalization in
training mode breaks it, and so can any layer that computes across the batch
axis, wherever it sits. `check_separability` tests the model itself, without
knowing its layer types:

1. A probe batch of `PROBE_ROWS` rows with the structure, inner shapes and
   dtypes of the training inputs (`probe_batch`: uniform [0, 1) floats, 0/1
   integers and booleans, from a fixed seed, so the probe is reproducible).
2. The model runs in training mode on it, then once per row r with only row
   r changed: every integer and boolean flipped, every float redrawn at
   random, within the batch's range for even r and from a range `WIDE` times
   wider for odd r. A random change, not a constant shift, and of two
   sizes, because some mixing only shows for some inputs (a maximum over
   the batch behind a ReLU threshold shows for large values only). Every
   other row's outputs must stay within `TOLERANCE` times the largest output
   magnitude (at least 1) of the first run; in practice they are bit for bit
   equal. The variable state the call writes is compared too: state that
   changes with the data (BatchNorm's moving statistics, a stateful RNN's
   carry) reaches the released model without clipping or noise.
3. Randomness: every run is a call under one `keras.StatelessScope` started
   from the same variable values, seed-generator states included, and Keras'
   global seed generator advances inside the scope only. So Dropout and every
   Keras random layer draw the same masks in every run and cannot pass for
   mixing, and the probe leaves the model's state as it found it. Random ops
   outside Keras' seed generators (stateful `tf.random.*`, a
   `tf.random.Generator`) differ between identical runs: when a check fails,
   the unchanged batch is run again, and if that differs too the model is
   refused as one whose randomness hides whether it mixes examples.
4. On failure the offending layer is named where the model is a graph
   (functional or Sequential): every node's output is tapped in the same
   kind of runs, and the first in graph order whose other rows change is the
   one that mixes; a nested graph model found so is searched the same way
   with the real inputs it received.

Cost: `PROBE_ROWS + 1` training-mode forward passes of `PROBE_ROWS` examples
(the location runs happen only on failure). DP models run the probe once per
`compile`, at the first trace of `train_step`.

What it cannot see: mixing smaller than `TOLERANCE`; mixing that these
random rows do not trigger; mixing inside the model that cancels before the
output (only outputs and written state are compared); a layer that mixes
rows only at batch sizes other than `PROBE_ROWS`.
"""

import keras
import numpy as np
import tensorflow as tf

PROBE_ROWS = 4
# Outputs of other rows may move by this much relative to the largest output
# magnitude (at least 1). Mixing of a 4-row batch by BatchNorm or a batch mean
# moves them by about a quarter of the change; 1e-6 leaves room for
# non-deterministic accelerator kernels only.
TOLERANCE = 1e-6
# Size given to inner dimensions that the training inputs leave unknown.
UNKNOWN_DIM = 32
# Odd rows are redrawn from a range this many times wider than the batch's.
WIDE = 10.0

_SEED = 0


def probe_batch(spec, rows=PROBE_ROWS, seed=_SEED):
    """Returns a random batch with the structure, inner shapes and dtypes of `spec`.

    Args:
      spec: a nest of tensors, `tf.TensorSpec`s or `keras.KerasTensor`s whose
        first dimension is the batch (its size is ignored).
      rows: rows of the returned batch, >= 2.
      seed: seed of the numpy generator.

    Returns:
      The same nest of eager tensors `[rows, ...]`: floats uniform in [0, 1),
      integers and booleans 0 or 1; unknown inner dimensions become
      `UNKNOWN_DIM`.

    Raises:
      ValueError: `rows` < 2, or an entry of unknown rank, of rank 0, or of a
        dtype that is not a number or a boolean.
    """
    if not isinstance(rows, int) or rows < 2:
        raise ValueError(f"A probe batch needs at least 2 rows; got {rows!r}.")
    rng = np.random.default_rng(seed)

    def one(t):
        dtype = tf.as_dtype(t.dtype)
        shape = tf.TensorShape(t.shape)
        if shape.rank is None or shape.rank == 0:
            raise ValueError(
                f"Cannot build a probe batch for an input of shape {shape}: "
                "inputs need a leading batch dimension and a known rank.")
        shape = [rows] + [UNKNOWN_DIM if d is None else d for d in shape[1:]]
        if dtype.is_floating:
            values = rng.random(shape)
        elif dtype.is_integer or dtype.is_bool:
            values = rng.integers(0, 2, shape)
        else:
            raise ValueError(f"Cannot build a probe batch for an input of dtype "
                             f"{dtype.name}: only numbers and booleans.")
        return tf.cast(tf.constant(values), dtype)

    return tf.nest.map_structure(one, spec)


def check_separability(model, inputs, tolerance=TOLERANCE):
    """Refuses a model whose training-mode output for one example depends on another.

    See the module docstring for the method. The model's variables are not
    changed.

    Args:
      model: a built Keras model or layer, called as `model(inputs,
        training=True)`.
      inputs: a nest of eager tensors with a common leading dimension n >= 2,
        e.g. `probe_batch(...)`.
      tolerance: how far, relative to the largest output magnitude (at least
        1), another row's output may move.

    Raises:
      ValueError: changing one row changed another row's output, or changed
        the state the call writes; or two identical calls differed (random
        ops outside Keras' seed generators), so the check cannot decide; or
        the model could not be run on `inputs` or their changed copies. The
        message names the offending layer or variable where it can be found.
    """
    n = _rows(inputs)
    base_outputs, base_state = _run(model, inputs)
    alternative = _alternatives(inputs)
    mixed = None
    written = set()
    for r in range(n):
        outputs, state = _run(model, _with_row(inputs, alternative, r))
        for a, b in zip(base_outputs, outputs):
            changed = _changed_rows(a, b, n, tolerance)
            changed[r] = False
            if mixed is None and changed.any():
                mixed = (r, int(np.flatnonzero(changed)[0]))
        written.update(i for i, (a, b) in enumerate(zip(base_state, state))
                       if _differs(a, b, tolerance))
    if mixed is None and not written:
        return
    again_outputs, again_state = _run(model, inputs)
    if (any(_differs(a, b, tolerance) for a, b in zip(base_outputs, again_outputs))
            or any(_differs(a, b, tolerance) for a, b in zip(base_state, again_state))):
        raise ValueError(
            f"Could not check that examples stay independent in "
            f"{model.name!r}: two identical training-mode calls gave different "
            f"results although every Keras seed generator started from the "
            f"same state, so random numbers drawn outside keras.random (such "
            f"as tf.random.uniform or a tf.random.Generator) would hide "
            f"whether one example's output depends on another. Draw them with "
            f"keras.random and a keras.random.SeedGenerator held by the layer, "
            f"as keras.layers.Dropout does.")
    problems = []
    if mixed is not None:
        problems.append(_mixing_message(model, inputs, tolerance, n, *mixed))
    if written:
        variables = model.non_trainable_variables
        names = ", ".join(repr(variables[i].path) for i in sorted(written))
        problems.append(
            f"The training-mode call of {model.name!r} writes state that "
            f"depends on the data: {names} (running statistics, a stateful "
            f"layer's carry). That state would reach the released model "
            f"without clipping or noise, so DP training refuses the model; "
            f"make those layers non-trainable or stateless.")
    raise ValueError(" ".join(problems))


def find_mixing_layer(model, inputs, tolerance=TOLERANCE):
    """Names the first layer of a graph model whose output mixes examples.

    Args:
      model: a built functional or Sequential Keras model.
      inputs: as for `check_separability`.
      tolerance: as for `check_separability`.

    Returns:
      `(path, layer)`: the first layer (or Keras operation) in graph order
      whose output for one row changes when only another row changes,
      searched into nested graph models; `path` joins the names of `model`,
      the nested models and the layer with "/". None when `model` is not a
      graph model or no node's output mixes.
    """
    return _locate(model, inputs, tolerance, model.name)


def _mixing_message(model, inputs, tolerance, n, r, j):
    found = find_mixing_layer(model, inputs, tolerance)
    if found is not None:
        path, layer = found
        where = (f"The first layer whose output mixes examples is "
                 f"{path.split('/', 1)[-1]!r} ({type(layer).__name__}).")
    else:
        where = (f"The layer could not be located ({model.name!r} is not a "
                 f"functional or Sequential graph): look for computations over "
                 f"the batch axis in custom layers' call, or test one layer "
                 f"with tf_dpfair.separability.check_separability(layer, "
                 f"inputs).")
    return (
        f"Examples are not independent in {model.name!r}: in training mode, "
        f"changing only example {r} of a probe batch of {n} changed the "
        f"output of example {j}. Per-example clipping bounds one example's "
        f"influence only if its loss depends on its own inputs alone (both "
        f"clipping paths rest on this), so DP training refuses the model. "
        f"{where} Typical causes: BatchNormalization in training mode "
        f"(freeze it with tf_dpfair.models.freeze_batchnorm, or replace it "
        f"with GroupNormalization) and layers that compute over the batch "
        f"axis (a mean, maximum or sort over axis 0).")


def _rows(inputs):
    flat = tf.nest.flatten(inputs)
    sizes = {int(t.shape[0]) for t in flat if t.shape.rank}
    if len(sizes) != 1 or sizes.pop() < 2:
        raise ValueError("The probe inputs need one common leading dimension "
                         ">= 2 (rows of the batch).")
    return int(flat[0].shape[0])


def _run(model, inputs):
    """Flat outputs and the written variable state of one training-mode call.

    The call runs under a `keras.StatelessScope` mapping every variable to
    its current value: writes stay in the scope, so each call starts from
    the same state (seed generators included) and the model is not changed.
    """
    variables = model.variables
    mapping = [(v, tf.convert_to_tensor(v.value)) for v in variables]
    try:
        with keras.StatelessScope(state_mapping=mapping) as scope:
            outputs = model(inputs, training=True)
            state = [scope.get_current_value(v) for v in model.non_trainable_variables]
    except Exception as error:  # any failure: the model cannot be checked
        raise ValueError(
            f"The separability check could not run {model.name!r} in training "
            f"mode on a probe batch of random data shaped like its inputs "
            f"({_describe(inputs)}): {type(error).__name__}: {error}") from error
    return ([tf.convert_to_tensor(o) for o in tf.nest.flatten(outputs)],
            [tf.convert_to_tensor(s) for s in state])


def _describe(inputs):
    return ", ".join(f"{t.dtype.name}{list(t.shape)}" for t in tf.nest.flatten(inputs))


def _alternatives(inputs):
    """Values that differ from `inputs` everywhere they can, row by row.

    Floats are redrawn uniformly within the tensor's range in even rows and
    within a range `WIDE` times as wide (same centre) in odd rows.
    """
    rng = np.random.default_rng(_SEED + 1)

    def one(t):
        if t.dtype.is_bool:
            return tf.logical_not(t)
        if t.dtype.is_integer:
            # Swaps the batch's smallest and largest values: 0 and 1 in a
            # probe batch, and ids that are valid wherever real ids are.
            low, high = tf.reduce_min(t), tf.reduce_max(t)
            return tf.where(tf.equal(t, high), low, high)
        if t.dtype.is_floating:
            values = t.numpy().astype(np.float64)
            finite = values[np.isfinite(values)]
            low, high = (finite.min(), finite.max()) if finite.size else (0.0, 1.0)
            if high <= low:
                low, high = low - 1.0, high + 1.0
            spread = np.where(np.arange(values.shape[0]) % 2, WIDE, 1.0)
            spread = spread.reshape([-1] + [1] * (values.ndim - 1))
            centre, half = (low + high) / 2, (high - low) / 2
            draws = centre + half * spread * (2 * rng.random(values.shape) - 1)
            return tf.cast(draws, t.dtype)
        return t

    return tf.nest.map_structure(one, inputs)


def _with_row(inputs, alternative, r):
    """`inputs` with row r of every tensor taken from `alternative`."""
    def one(t, a):
        if not t.shape.rank:
            return t
        mask = tf.reshape(tf.equal(tf.range(tf.shape(t)[0]), r),
                          [-1] + [1] * (t.shape.rank - 1))
        return tf.where(mask, a, t)

    return tf.nest.map_structure(one, inputs, alternative)


def _as_float(t):
    return tf.cast(tf.math.real(t) if t.dtype.is_complex else t, tf.float64).numpy()


def _mismatch(a, b, tolerance):
    """Elementwise: a and b differ (NaN against NaN and equal infinities agree)."""
    finite = np.abs(a[np.isfinite(a)])
    scale = max(1.0, float(finite.max()) if finite.size else 1.0)
    with np.errstate(invalid="ignore"):
        close = np.abs(a - b) <= tolerance * scale
    return ~(close | (a == b) | (np.isnan(a) & np.isnan(b)))


def _changed_rows(a, b, n, tolerance):
    """[n] bools: rows of output `b` that moved away from `a` (all False for
    an output without a leading batch dimension, which no row owns)."""
    if not a.shape.rank or a.shape[0] != n or a.shape != b.shape:
        return np.zeros([n], bool)
    mismatch = _mismatch(_as_float(a), _as_float(b), tolerance)
    return mismatch.reshape(n, -1).any(axis=1)


def _mixes(a, b, n, r, tolerance):
    """Whether changing row r moved tapped tensor `b` away from `a` outside
    row r. A tensor without a row dimension (a statistic of the whole batch)
    mixes when it moves at all."""
    if a.shape.rank and a.shape[0] == n and a.shape == b.shape:
        changed = _changed_rows(a, b, n, tolerance)
        changed[r] = False
        return bool(changed.any())
    return _differs(a, b, tolerance)


def _differs(a, b, tolerance):
    if a.shape != b.shape:
        return True
    return bool(_mismatch(_as_float(a), _as_float(b), tolerance).any())


def _is_graph(model):
    """True for functional and built Sequential models (their graph is known)."""
    try:
        return isinstance(model, keras.Model) and bool(model.outputs)
    except (AttributeError, ValueError):
        return False


def _graph_input(model):
    """The nest of input tensors `model` is called with."""
    try:
        return model.input
    except AttributeError:  # a Sequential model, never called as a layer
        inputs = model.inputs
        return inputs[0] if len(inputs) == 1 else inputs


def _node_of(tensor):
    history = getattr(tensor, "_keras_history", None)
    if history is None or history.operation is None:
        return None
    return history.operation._inbound_nodes[history.node_index]


def _graph_nodes(model):
    """The call nodes of `model`'s graph, each after every node it reads."""
    order, done = [], set()
    stack = [(node, False) for node in map(_node_of, reversed(model.outputs))
             if node is not None]
    while stack:
        node, ready = stack.pop()
        if id(node) in done:
            continue
        if ready:
            done.add(id(node))
            if not node.is_input:
                order.append(node)
            continue
        stack.append((node, True))
        for tensor in node.input_tensors:
            parent = _node_of(tensor)
            if parent is not None and id(parent) not in done:
                stack.append((parent, False))
    return order


def _locate(model, inputs, tolerance, path):
    """`find_mixing_layer` below `path` (the names down to `model`)."""
    if not _is_graph(model):
        return None
    nodes = _graph_nodes(model)
    taps = [(node, tensor) for node in nodes for tensor in node.output_tensors]
    try:
        tapped = keras.Model(_graph_input(model), [tensor for _, tensor in taps])
        base, _ = _run(tapped, inputs)
    except ValueError:
        return None
    n = _rows(inputs)
    alternative = _alternatives(inputs)
    first = len(taps)
    for r in range(n):
        outputs, _ = _run(tapped, _with_row(inputs, alternative, r))
        for i in range(first):
            if _mixes(base[i], outputs[i], n, r, tolerance):
                first = i
                break
    if first == len(taps):
        return None
    node = taps[first][0]
    layer = node.operation
    layer_path = f"{path}/{layer.name}"
    if _is_graph(layer) and node.arguments.args:
        values = {id(tensor): value for (_, tensor), value in zip(taps, base)}
        values.update((id(t), v) for t, v in zip(
            keras.tree.flatten(_graph_input(model)), keras.tree.flatten(inputs)))
        inner = keras.tree.map_structure(
            lambda t: values.get(id(t), t), node.arguments.args[0])
        found = _locate(layer, inner, tolerance, layer_path)
        if found is not None:
            return found
    return layer_path, layer
