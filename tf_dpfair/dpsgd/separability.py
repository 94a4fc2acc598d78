"""Separability probe: is each example's loss a function of its own row?

Both clipping paths rest on one assumption: example i's loss depends on row i
of the batch alone. `clipping` differentiates each example's loss on its own,
and `ghost` reads every example's gradient off one batched forward and
backward pass over a micro-batch, which is example i's own only under that
assumption. Per-example clipping bounds one example's influence on an update
only then. BatchNormalization in training mode breaks it, and so can any
layer, loss or custom gradient that computes across the batch axis, wherever
it sits, and possibly only at some batch sizes (a layer may mix batches of
more than 4 rows only). `check_separability` tests the model itself, without
knowing its layer types, on the batch that training runs:

1. A probe batch with the structure, inner shapes and dtypes of the training
   inputs (`probe_batch`: uniform [0, 1) floats, 0/1 integers and booleans,
   from a fixed seed, so the probe is reproducible). DP training probes the
   batch its batched pass really sees: `microbatch_size` examples (at least
   2) of `augmult` views each, rows of one example adjacent, as ghost
   clipping feeds them; with labels shaped like the training labels and the
   compiled loss, so the per-example losses are checked as well as the
   model's outputs.
2. The model runs in training mode on it, then once per set of examples
   with only those examples changed: every integer and boolean flipped,
   every float redrawn at random, within the batch's range for even
   examples and from a range `WIDE` times wider for odd ones (labels stay
   within their range). A random change, not a constant shift, and of two
   sizes, because some mixing only shows for some inputs (a maximum over
   the batch behind a ReLU threshold shows for large values only). Up to 6
   examples each set is one example; beyond, the sets are the examples whose
   index has bit b set, and those whose index has it clear, for every bit b:
   2 * ceil(log2 n) runs, and every ordered pair (r, j) of examples has a set
   that holds r and not j, so any influence of one example on another is
   tested (on failure the set is bisected down to one culprit). For every
   example outside the set, these must stay within `TOLERANCE` times the
   largest magnitude (at least 1) of the first run: its outputs and its
   loss; and, with a loss, the gradient of the weighted sum of the losses
   of the examples outside the set (random weights in [0.5, 1.5], weight 0
   for the changed ones), within `TOLERANCE` times each variable's largest
   gradient: what the update reads, so mixing that shows in the gradient
   only (a custom gradient, a batch statistic scaled by a weight that is 0
   now) is seen too. In practice all are bit for bit equal. The variable
   state the call writes is compared too: state that changes with the data
   (BatchNorm's moving statistics, a stateful RNN's carry) reaches the
   released model without clipping or noise.
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
   kind of runs, and the first in graph order whose other examples change is
   the one that mixes; a nested graph model found so is searched the same way
   with the real inputs it received.

Cost: one training-mode forward pass of the probe batch, then one forward
and backward pass per set: up to 6 for up to 6 examples, 2 * ceil(log2 n)
beyond (12 for 64 examples), plus one backward pass per set on the
unchanged batch (bisection and location run only on failure). DP models run
the probe once per `compile`, before the first update (at the first trace of
`train_step`).

What it cannot see: mixing smaller than `TOLERANCE`; mixing that these
random rows do not trigger (a layer that mixes only for inputs far outside
[0, 1), or only for some label values); mixing inside the model that
cancels before the outputs, the losses and their gradient at the current
weights; a computation that depends on an example's position in the batch
rather than on other examples.

Why one long module (about 750 lines): the check, the bisection down to one
culprit, the search for the layer that mixes (`find_mixing_layer`) and the
refusal messages all run and compare the same probe calls through one set of
helpers (`_run`, `_alternatives`, `_mixes`); split apart, each part would
import the others' private helpers. A tenth of it is this statement of the
method, and much of the rest the messages a refused user reads. The checks
that call it, and the model's other safety checks, are in
`tf_dpfair.dpsgd.checks`.
"""

import contextlib

import keras
import numpy as np
import tensorflow as tf
# Only to resume gradient recording inside `tf.init_scope` (see `_recording`).
from tensorflow.python import pywrap_tfe

# Rows of a probe batch where the batch size is not given (DP training
# probes its micro-batch instead).
PROBE_ROWS = 4
# Outputs, losses and gradients of other examples may move by this much
# relative to the largest magnitude (at least 1 for outputs and losses; each
# variable's own largest gradient for gradients). Mixing of a 4-row batch by
# BatchNorm or a batch mean moves them by about a quarter of the change;
# 1e-6 leaves room for non-deterministic accelerator kernels only.
TOLERANCE = 1e-6
# A gradient counts as moved beyond this many times what it moves between
# two identical runs (accelerators' non-deterministic reductions round
# differently from run to run; on CPU identical runs agree bit for bit).
NOISE_FACTOR = 10.0
# Size given to inner dimensions that the training inputs leave unknown.
UNKNOWN_DIM = 32
# Odd examples are redrawn from a range this many times wider than the batch's.
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


def change_sets(n):
    """The sets of examples changed together, one set per run of the probe.

    Args:
      n: examples in the probe batch, >= 2.

    Returns:
      A list of lists of example indices such that every ordered pair
      (r, j), r != j, has a set holding r and not j: every single example
      while that takes no more runs than bit sets do (n <= 6), otherwise,
      for every bit b of the index, the examples with bit b set and those
      with it clear (2 * ceil(log2 n) sets).
    """
    bits = max(1, (n - 1).bit_length())
    if n <= 2 * bits:
        return [[e] for e in range(n)]
    sets = []
    for b in range(bits):
        sets.append([e for e in range(n) if e >> b & 1])
        sets.append([e for e in range(n) if not e >> b & 1])
    return sets


def check_separability(model, inputs, tolerance=TOLERANCE, *, targets=None,
                       loss_fn=None, views=1):
    """Refuses a model whose training-mode output or loss for one example depends on another.

    See the module docstring for the method. The model's variables are not
    changed.

    Args:
      model: a built Keras model or layer, called as `model(inputs,
        training=True)`.
      inputs: a nest of eager tensors with a common leading dimension
        n * `views`, n >= 2 (e.g. `probe_batch(...)`): the `views` rows of
        example e are rows e * views ... e * views + views - 1, as ghost
        clipping flattens `[n, views, ...]` inputs.
      tolerance: how far, relative to the largest magnitude (see
        `TOLERANCE`), another example's output, loss or gradient may move.
      targets: None, or a nest of eager tensors `[n, ...]` (one row per
        example, e.g. `probe_batch(label_spec, rows=n)`), passed to
        `loss_fn` repeated over views.
      loss_fn: `loss_fn(targets, y_pred) -> [n * views]` unreduced per-row
        losses (an example's loss is the mean over its views); given with
        `targets`. Its gradient with respect to `model.trainable_variables`
        is checked too.
      views: rows per example (augmentation multiplicity), >= 1.

    Raises:
      ValueError: changing some examples changed another example's output,
        loss or the gradient of the others' losses, or changed the state the
        call writes; or two identical calls differed (random ops outside
        Keras' seed generators), so the check cannot decide; or the model
        (or the loss) could not be run on `inputs` or their changed copies;
        or the arguments are inconsistent. The message names the offending
        layer or variable where it can be found.
    """
    probe = _Probe(model, inputs, targets, loss_fn, views, tolerance)
    sets = change_sets(probe.n)
    weightings = [probe.weighting(s) for s in sets]
    base = probe.run(inputs, targets, weightings)
    findings, written = [], set()
    for i, changed_set in enumerate(sets):
        found, state, deviation = probe.effect(base, changed_set, gradient=i)
        written.update(state)
        if found is not None:
            findings.append((changed_set, found, deviation))
    if not findings and not written:
        return
    again = probe.run(inputs, targets, weightings)
    if probe.differ(base, again):
        raise ValueError(
            f"Could not check that examples stay independent in "
            f"{model.name!r}: two identical training-mode calls gave different "
            f"results although every Keras seed generator started from the "
            f"same state, so random numbers drawn outside keras.random (such "
            f"as tf.random.uniform or a tf.random.Generator) would hide "
            f"whether one example's output depends on another. Draw them with "
            f"keras.random and a keras.random.SeedGenerator held by the layer, "
            f"as keras.layers.Dropout does.")
    # Gradients of two identical runs may differ by the rounding of
    # non-deterministic accelerator reductions: a gradient counts as moved
    # only well beyond what it moves between identical runs.
    rounding = max([_relative_deviation(a, b)
                    for a, b in zip(base.gradients, again.gradients)] or [0.0])
    probe.gradient_tolerance = max(tolerance, NOISE_FACTOR * rounding)
    findings = [(changed_set, found) for changed_set, found, deviation in findings
                if found[0] != "gradient" or deviation > probe.gradient_tolerance]
    if not findings and not written:
        return
    # A moved output or loss says more about where the mixing is.
    findings.sort(key=lambda finding: finding[1][0] == "gradient")
    problems = []
    if findings:
        culprits, found = probe.pin(*findings[0])
        problems.append(_mixing_message(probe, culprits, found))
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


def find_mixing_layer(model, inputs, tolerance=TOLERANCE, views=1, changes=None):
    """Names the first layer of a graph model whose output mixes examples.

    Args:
      model: a built functional or Sequential Keras model.
      inputs: as for `check_separability`.
      tolerance: as for `check_separability`.
      views: as for `check_separability`.
      changes: the sets of examples changed together, one run each;
        default every single example.

    Returns:
      `(path, layer)`: the first layer (or Keras operation) in graph order
      whose output for one example changes when only other examples change,
      searched into nested graph models; `path` joins the names of `model`,
      the nested models and the layer with "/". None when `model` is not a
      graph model or no node's output mixes.
    """
    n = _rows(inputs) // views
    if changes is None:
        changes = [[e] for e in range(n)]
    return _locate(model, inputs, tolerance, model.name, views, changes)


class _Probe:
    """The runs of one `check_separability`: a probe batch, its changed
    copies, and what moved between them."""

    def __init__(self, model, inputs, targets, loss_fn, views, tolerance):
        if not isinstance(views, int) or views < 1:
            raise ValueError(f"views must be an int >= 1; got {views!r}.")
        if (targets is None) != (loss_fn is None):
            raise ValueError("The separability check needs targets and "
                             "loss_fn together, or neither.")
        rows = _rows(inputs)
        if rows % views or rows // views < 2:
            raise ValueError(
                f"The probe inputs need at least 2 examples of {views} "
                f"view(s) each; got {rows} rows.")
        self.model, self.inputs, self.targets = model, inputs, targets
        self.loss_fn, self.views, self.tolerance = loss_fn, views, tolerance
        self.n = rows // views
        if targets is not None and _rows(targets, minimum=1) != self.n:
            raise ValueError(
                f"The probe targets need one row per example ({self.n}); got "
                f"{_rows(targets, minimum=1)}.")
        self.alternative = _alternatives(inputs, views)
        self.alternative_targets = (None if targets is None
                                    else _alternatives(targets, 1, wide=False))
        # Random positive weights of the examples outside a changed set.
        self.weights = np.random.default_rng(_SEED + 2).uniform(0.5, 1.5, self.n)
        self.gradient_tolerance = tolerance

    def weighting(self, changed):
        """[n] float32: the random weights, 0 for the examples in `changed`."""
        w = self.weights.copy()
        w[list(changed)] = 0.0
        return tf.constant(w, tf.float32)

    def changed(self, changed):
        """The probe inputs and targets with the examples `changed` redrawn."""
        inputs = _with_rows(self.inputs, self.alternative,
                            _row_mask(changed, self.n, self.views))
        targets = None
        if self.targets is not None:
            targets = _with_rows(self.targets, self.alternative_targets,
                                 _row_mask(changed, self.n, 1))
        return inputs, targets

    def run(self, inputs, targets, weightings=()):
        return _run(self.model, inputs, targets, self.loss_fn, self.views,
                    weightings)

    def effect(self, base, changed, gradient=None):
        """What changing the examples `changed` moved outside them.

        Args:
          base: the `_Result` of the unchanged batch.
          changed: example indices.
          gradient: index in `base.gradients` of the gradient weighted by
            `weighting(changed)`; None to compute it on the unchanged batch
            here.

        Returns:
          `(found, written, deviation)`: found is None or `(what, j)` with
          what one of "output", "loss" (j the first other example that
          moved) or "gradient" (j None: the gradient of the others' losses
          moved by more than `gradient_tolerance`, relative); written is the
          set of indices of non-trainable variables whose written state
          moved; deviation is how far that gradient moved (relative, see
          `_relative_deviation`; 0 without a loss).
        """
        weighting = self.weighting(changed)
        base_gradient = []
        if self.loss_fn is not None:
            base_gradient = (
                self.run(self.inputs, self.targets, [weighting]).gradients
                if gradient is None else base.gradients[gradient:gradient + 1])
        result = self.run(*self.changed(changed), [weighting])
        inside = np.zeros([self.n], bool)
        inside[list(changed)] = True
        found = None
        for what, a_list, b_list, views in (
                ("output", base.outputs, result.outputs, self.views),
                ("loss", base.losses, result.losses, 1)):
            for a, b in zip(a_list, b_list):
                moved = _changed_rows(a, b, self.n, views, self.tolerance) & ~inside
                if found is None and moved.any():
                    found = (what, int(np.flatnonzero(moved)[0]))
        deviation = 0.0
        if base_gradient:
            deviation = _relative_deviation(base_gradient[0], result.gradients[0])
            if found is None and deviation > self.gradient_tolerance:
                found = ("gradient", None)
        written = {i for i, (a, b) in enumerate(zip(base.state, result.state))
                   if _differs(a, b, self.tolerance)}
        return found, written, deviation

    def differ(self, first, second):
        """Whether two runs of the same batch gave different outputs, losses
        or written state (gradients may differ by rounding, see
        `check_separability`)."""
        return any(_differs(a, b, self.tolerance)
                   for x, y in ((first.outputs, second.outputs),
                                (first.losses, second.losses),
                                (first.state, second.state))
                   for a, b in zip(x, y))

    def pin(self, changed, found):
        """Bisects `changed` down to one example whose change alone moves
        another example (or the others' gradient); stops where neither half
        does on its own."""
        base = self.run(self.inputs, self.targets)
        while len(changed) > 1:
            half = len(changed) // 2
            for part in (changed[:half], changed[half:]):
                part_found, _, _ = self.effect(base, part)
                if part_found is not None:
                    changed, found = part, part_found
                    break
            else:
                break
        return changed, found


class _Result:
    """Flat outputs, per-example losses ([n] or absent), written state and
    gradients (one list per weighting) of one training-mode call."""

    def __init__(self, outputs, losses, state, gradients):
        self.outputs, self.losses = outputs, losses
        self.state, self.gradients = state, gradients


def _mixing_message(probe, culprits, found):
    what, j = found
    model, n = probe.model, probe.n
    batch = f"a probe batch of {n}" + (
        f" examples of {probe.views} views" if probe.views > 1 else "")
    if len(culprits) == 1:
        changing = f"changing only example {culprits[0]} of {batch}"
    else:
        changing = (f"changing only examples {_some(culprits)} of {batch} "
                    f"together")
    if what == "gradient":
        effect = (f"changed the gradient of the weighted sum of the other "
                  f"examples' losses (the changed ones at weight 0), although "
                  f"their outputs and losses stayed the same")
        where = (f"The mixing is in the backward pass: look for a custom "
                 f"gradient, or a statistic over the batch axis whose effect "
                 f"on the outputs vanishes at the current weights (scaled by "
                 f"a weight that is zero now).")
    elif what == "loss":
        effect = (f"changed the loss of example {j}, although the model's "
                  f"outputs for it stayed the same")
        where = (f"The loss mixes examples: a per-example loss must depend "
                 f"on its own row alone (no mean, normalisation or ranking "
                 f"over the batch axis).")
    else:
        effect = f"changed the output of example {j}"
        located = find_mixing_layer(model, probe.inputs, probe.tolerance,
                                    probe.views, [culprits])
        if located is not None:
            path, layer = located
            where = (f"The first layer whose output mixes examples is "
                     f"{path.split('/', 1)[-1]!r} ({type(layer).__name__}).")
        else:
            where = (f"The layer could not be located ({model.name!r} is not "
                     f"a functional or Sequential graph): look for "
                     f"computations over the batch axis in custom layers' "
                     f"call, or test one layer with tf_dpfair.dpsgd.separability."
                     f"check_separability(layer, inputs).")
    return (
        f"Examples are not independent in {model.name!r}: in training mode, "
        f"{changing} {effect}. Per-example clipping bounds one example's "
        f"influence only if its loss depends on its own inputs alone (both "
        f"clipping paths rest on this), so DP training refuses the model. "
        f"{where} Typical causes: BatchNormalization in training mode "
        f"(freeze it with tf_dpfair.models.freeze_batchnorm, or replace it "
        f"with GroupNormalization) and layers that compute over the batch "
        f"axis (a mean, maximum or sort over axis 0), possibly only at some "
        f"batch sizes: the probe runs at the training micro-batch.")


def _some(indices, shown=8):
    text = ", ".join(str(i) for i in indices[:shown])
    return f"[{text}{', ...' if len(indices) > shown else ''}]"


def _rows(inputs, minimum=2):
    flat = tf.nest.flatten(inputs)
    sizes = {int(t.shape[0]) for t in flat if t.shape.rank}
    if len(sizes) != 1 or sizes.pop() < minimum:
        raise ValueError("The probe inputs need one common leading dimension "
                         ">= 2 (rows of the batch).")
    return int(next(t for t in flat if t.shape.rank).shape[0])


def _run(model, inputs, targets=None, loss_fn=None, views=1, weightings=()):
    """One training-mode call: a `_Result`.

    The call runs under a `keras.StatelessScope` mapping every variable to
    its current value: writes stay in the scope, so each call starts from
    the same state (seed generators included) and the model is not changed.
    With `loss_fn`, the per-example losses (mean over views) and, for each
    [n] weighting, the gradient of their weighted sum with respect to the
    trainable variables' values (examples of weight 0 left out).
    """
    variables = model.variables
    values = [tf.convert_to_tensor(v.value) for v in variables]
    trainable = {id(v) for v in model.trainable_variables}
    watched = [t for v, t in zip(variables, values) if id(v) in trainable]
    weightings = list(weightings) if loss_fn is not None else []
    with _recording(), tf.GradientTape(persistent=len(weightings) > 1,
                                       watch_accessed_variables=False) as tape:
        tape.watch(watched)
        try:
            with keras.StatelessScope(state_mapping=list(zip(variables, values))) as scope:
                outputs = model(inputs, training=True)
                state = [scope.get_current_value(v)
                         for v in model.non_trainable_variables]
        except Exception as error:  # any failure: the model cannot be checked
            raise ValueError(
                f"The separability check could not run {model.name!r} in "
                f"training mode on a probe batch of random data shaped like "
                f"its inputs ({_describe(inputs)}): {type(error).__name__}: "
                f"{error}") from error
        losses, totals = [], []
        if loss_fn is not None:
            try:
                repeated = targets if views == 1 else tf.nest.map_structure(
                    lambda t: tf.repeat(t, views, axis=0), targets)
                per_row = tf.cast(loss_fn(repeated, outputs), tf.float32)
                example_losses = tf.reduce_mean(
                    tf.reshape(per_row, [-1, views]), axis=1)
            except Exception as error:
                raise ValueError(
                    f"The separability check could not compute the "
                    f"per-example loss of {model.name!r} on probe targets "
                    f"shaped like the training targets ({_describe(targets)})"
                    f": {type(error).__name__}: {error}") from error
            losses = [example_losses]
            totals = [tf.reduce_sum(tf.where(w > 0, w * example_losses, 0.0))
                      for w in weightings]
    gradients = []
    for total in totals:
        with _recording():
            grads = tape.gradient(total, watched)
        gradients.append([tf.zeros_like(t) if g is None else tf.convert_to_tensor(g)
                          for g, t in zip(grads, watched)])
    del tape
    return _Result([tf.convert_to_tensor(o) for o in tf.nest.flatten(outputs)],
                   losses, [tf.convert_to_tensor(s) for s in state], gradients)


@contextlib.contextmanager
def _recording():
    """Resumes gradient recording on this thread where it is paused.

    DP training runs the probe eagerly from inside the trace of
    `train_step` by way of `tf.init_scope()`, which pauses every gradient
    tape on the thread, so the probe's own tape would record nothing and
    every gradient would read as unconnected. TensorFlow has no public way
    to resume recording there; these are the calls of its own
    `tensorflow.python.eager.record.stop_recording`, undone for the block.
    """
    stopped = pywrap_tfe.TFE_Py_TapeSetIsStopped()
    if stopped:
        pywrap_tfe.TFE_Py_TapeSetRestartOnThread()
    try:
        yield
    finally:
        if stopped:
            pywrap_tfe.TFE_Py_TapeSetStopOnThread()


def _describe(inputs):
    return ", ".join(f"{t.dtype.name}{list(t.shape)}" for t in tf.nest.flatten(inputs))


def _alternatives(inputs, views=1, wide=True):
    """Values that differ from `inputs` everywhere they can, row by row.

    Floats are redrawn uniformly within the tensor's range for even examples
    (rows // views) and, with `wide`, within a range `WIDE` times as wide
    (same centre) for odd ones.
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
            odd = (np.arange(values.shape[0]) // views) % 2 == 1
            spread = np.where(odd & wide, WIDE, 1.0)
            spread = spread.reshape([-1] + [1] * (values.ndim - 1))
            centre, half = (low + high) / 2, (high - low) / 2
            draws = centre + half * spread * (2 * rng.random(values.shape) - 1)
            return tf.cast(draws, t.dtype)
        return t

    return tf.nest.map_structure(one, inputs)


def _row_mask(examples, n, views):
    """[n * views] bools: the rows of `examples`."""
    inside = np.zeros([n], bool)
    inside[list(examples)] = True
    return tf.constant(np.repeat(inside, views))


def _with_rows(inputs, alternative, rows):
    """`inputs` with the rows where `rows` is True taken from `alternative`."""
    def one(t, a):
        if not t.shape.rank:
            return t
        mask = tf.reshape(rows, [-1] + [1] * (t.shape.rank - 1))
        return tf.where(mask, a, t)

    return tf.nest.map_structure(one, inputs, alternative)


def _as_float(t):
    return tf.cast(tf.math.real(t) if t.dtype.is_complex else t, tf.float64).numpy()


def _mismatch(a, b, tolerance, floor=1.0):
    """Elementwise: a and b differ (NaN against NaN and equal infinities
    agree), beyond `tolerance` times the largest finite magnitude of `a`
    (at least `floor`)."""
    finite = np.abs(a[np.isfinite(a)])
    scale = max(floor, float(finite.max()) if finite.size else floor)
    with np.errstate(invalid="ignore"):
        close = np.abs(a - b) <= tolerance * scale
    return ~(close | (a == b) | (np.isnan(a) & np.isnan(b)))


def _relative_deviation(a_list, b_list):
    """The largest of max|a - b| / max|a| over pairs of gradients (inf where
    a gradient that was 0 or finite moved, or became NaN or Inf)."""
    worst = 0.0
    for a, b in zip(a_list, b_list):
        a, b = _as_float(a), _as_float(b)
        if a.shape != b.shape:
            return float("inf")
        same = (a == b) | (np.isnan(a) & np.isnan(b))
        if same.all():
            continue
        finite = np.isfinite(a) & np.isfinite(b)
        if not finite[~same].all():
            return float("inf")
        scale = float(np.abs(a[np.isfinite(a)]).max(initial=0.0))
        moved = float(np.abs(a - b)[finite].max())
        worst = max(worst, moved / scale if scale > 0 else float("inf"))
    return worst


def _changed_rows(a, b, n, views, tolerance):
    """[n] bools: examples (`views` adjacent rows each) of output `b` that
    moved away from `a` (all False for an output without a leading batch
    dimension, which no example owns)."""
    if not a.shape.rank or a.shape[0] != n * views or a.shape != b.shape:
        return np.zeros([n], bool)
    mismatch = _mismatch(_as_float(a), _as_float(b), tolerance)
    return mismatch.reshape(n, -1).any(axis=1)


def _mixes(a, b, n, views, changed, tolerance):
    """Whether changing the examples `changed` moved tapped tensor `b` away
    from `a` outside them. A tensor without a row dimension (a statistic of
    the whole batch) mixes when it moves at all."""
    if a.shape.rank and a.shape[0] == n * views and a.shape == b.shape:
        moved = _changed_rows(a, b, n, views, tolerance)
        moved[list(changed)] = False
        return bool(moved.any())
    return _differs(a, b, tolerance)


def _differs(a, b, tolerance, floor=1.0):
    if a.shape != b.shape:
        return True
    return bool(_mismatch(_as_float(a), _as_float(b), tolerance, floor).any())


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


def _locate(model, inputs, tolerance, path, views, changes):
    """`find_mixing_layer` below `path` (the names down to `model`)."""
    if not _is_graph(model):
        return None
    nodes = _graph_nodes(model)
    taps = [(node, tensor) for node in nodes for tensor in node.output_tensors]
    try:
        tapped = keras.Model(_graph_input(model), [tensor for _, tensor in taps])
        base = _run(tapped, inputs).outputs
    except ValueError:
        return None
    n = _rows(inputs) // views
    alternative = _alternatives(inputs, views)
    first = len(taps)
    for changed in changes:
        outputs = _run(tapped, _with_rows(inputs, alternative,
                                          _row_mask(changed, n, views))).outputs
        for i in range(first):
            if _mixes(base[i], outputs[i], n, views, changed, tolerance):
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
        found = _locate(layer, inner, tolerance, layer_path, views, changes)
        if found is not None:
            return found
    return layer_path, layer
