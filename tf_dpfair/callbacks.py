"""Keras callbacks: epsilon in the logs, a budget guard, EMA evaluation."""

import dataclasses

import keras

from tf_dpfair import accounting
from tf_dpfair import resume

OUTSIDE_GUARANTEE_NOTE = (
    "Note: loss, accuracy, clip_fraction and nonfinite_examples of training "
    "batches are computed on training data without noise; they are outside "
    "the DP guarantee. Validation figures are on held-out data.")


class PrivacyLogger(keras.callbacks.Callback):
    """Adds `epsilon` to the epoch logs and can stop before a target epsilon.

    Epsilon is computed from the model's own count of applied DP updates
    (`DPModel.update_count`, saved with the model), so it is right after a
    resume too. With `target_epsilon`, training stops before any update that
    would take epsilon above it, and refuses to start if not even one more
    update fits.

    It also turns the model's running count of examples with a NaN/Inf
    gradient (`DPModel.nonfinite_examples`) into each epoch's count in the
    logs, and warns at the end of `fit` when any example of this `fit` had
    one: a diagnostic on training data, outside the guarantee. A noise
    multiplier of 0 with a `target_epsilon` is refused: such a run has
    epsilon = inf.

    Give it the pipeline's `sampling_spec` (from `tf_dpfair.data`) so the
    accountant's assumption is the pipeline's own; then `num_examples` and
    `sampling` come from the spec, and the delta of the statement includes
    the spec's allowance for truncated Poisson batches.

    Args:
      num_examples: N, the size of the training set (or from `sampling_spec`).
      delta: the delta the accountant targets (1/N or smaller is customary).
      sampling: "poisson" or "shuffle": how the pipeline draws logical batches
        (see `tf_dpfair.accounting`); ignored with `sampling_spec`.
      accountant: "rdp" or "pld".
      target_epsilon: optional budget; None never stops training.
      verbose: 1 prints the privacy statement at the end of training.
      sampling_spec: the `tf_dpfair.sampling.SamplingSpec` of the pipeline.

    Raises:
      ValueError: bad arguments (see `accounting.privacy_statement`).
    """

    def __init__(self, num_examples=None, delta=None, sampling="poisson",
                 accountant="rdp", target_epsilon=None, verbose=1,
                 sampling_spec=None):
        super().__init__()
        self.sampling_spec = sampling_spec
        if sampling_spec is not None:
            if num_examples not in (None, sampling_spec.num_examples):
                raise ValueError(
                    f"num_examples={num_examples} disagrees with the sampling "
                    f"spec's {sampling_spec.num_examples}; pass one of them.")
            num_examples = sampling_spec.num_examples
            sampling = sampling_spec.accounting_sampling
        if delta is None:
            raise ValueError("delta is required (1/N or smaller is customary).")
        if not isinstance(num_examples, int) or num_examples < 1:
            raise ValueError(f"num_examples must be a positive integer, got "
                             f"{num_examples!r}.")
        if target_epsilon is not None and not target_epsilon > 0:
            raise ValueError(f"target_epsilon must be > 0 or None, got "
                             f"{target_epsilon!r}.")
        # Validates delta, sampling and accountant early.
        accounting.privacy_statement(noise_multiplier=1.0,
                                     sampling_probability=1.0, steps=0,
                                     delta=delta, sampling=sampling,
                                     accountant=accountant)
        self.num_examples = num_examples
        self.delta = delta
        self.sampling = sampling
        self.accountant = accountant
        self.target_epsilon = target_epsilon
        self.verbose = verbose
        self.stopped_for_budget = False
        # Examples of this fit whose gradient was NaN/Inf (they contributed zero).
        self.nonfinite_examples = 0
        self._nonfinite_seen = 0  # The model's running count, last read.
        self._nonfinite_at_epoch_start = 0

    def _dp_config(self):
        config = getattr(self.model, "dp_config", None)
        if config is None:
            raise ValueError("PrivacyLogger needs a DPModel (see "
                             "tf_dpfair.make_private).")
        return config

    def statement(self, steps=None):
        """The `PrivacyStatement` after `steps` updates (default: so far)."""
        config = self._dp_config()
        if config.expected_batch_size > self.num_examples:
            raise ValueError(
                f"expected_batch_size {config.expected_batch_size} is larger "
                f"than num_examples {self.num_examples}: the sampling rate "
                f"would exceed 1. Use a logical batch of at most "
                f"{self.num_examples} examples, or check num_examples.")
        spec = self.sampling_spec
        if spec is not None and spec.expected_batch_size != config.expected_batch_size:
            raise ValueError(
                f"The pipeline samples batches of expected size "
                f"{spec.expected_batch_size} but DPConfig.expected_batch_size is "
                f"{config.expected_batch_size}: the noise would be calibrated "
                f"to the wrong batch. Make them equal.")
        steps = self.model.update_count if steps is None else steps
        statement = accounting.privacy_statement(
            noise_multiplier=config.noise_multiplier,
            sampling_probability=config.expected_batch_size / self.num_examples,
            steps=steps, delta=self.delta, sampling=self.sampling,
            accountant=self.accountant)
        if spec is not None:
            overhead = spec.delta_overhead(steps, statement.epsilon)
            statement = dataclasses.replace(statement,
                                            delta=statement.delta + overhead)
        return statement

    def _updates_per_call(self):
        return int(getattr(self.model, "steps_per_execution", 1) or 1)

    def _next_would_exceed(self):
        ahead = self.model.update_count + self._updates_per_call()
        return self.statement(ahead).epsilon > self.target_epsilon

    def on_train_begin(self, logs=None):
        config = self._dp_config()
        self.nonfinite_examples = 0
        self._nonfinite_seen = self.model.nonfinite_examples
        self.statement()  # Bad settings fail here, before any update.
        if self.verbose:
            print(OUTSIDE_GUARANTEE_NOTE)
        if config.noise_multiplier == 0:
            print("Warning: noise_multiplier is 0: this run is NOT private "
                  "(epsilon = inf).")
        if self.delta >= 1.0 / self.num_examples:
            print(f"Warning: delta={self.delta} >= 1/N={1 / self.num_examples:.3g}:"
                  f" a guarantee this weak allows releasing an example outright.")
        if self.target_epsilon is not None and config.noise_multiplier == 0:
            raise ValueError(
                f"noise_multiplier is 0, so epsilon is infinite after one "
                f"update: this run cannot meet target_epsilon="
                f"{self.target_epsilon} and is not private. Set a noise "
                f"multiplier > 0 (accounting.calibrate_noise_multiplier finds "
                f"one for the budget), or drop target_epsilon for a "
                f"non-private baseline.")
        if self.target_epsilon is not None and self._next_would_exceed():
            raise ValueError(
                f"The privacy budget epsilon={self.target_epsilon} does not "
                f"allow one more update: after {self.model.update_count} "
                f"updates, {self.statement()}. Raise the noise multiplier or "
                f"the budget.")

    def on_epoch_begin(self, epoch, logs=None):
        self._nonfinite_at_epoch_start = self._nonfinite_seen

    def on_train_batch_end(self, batch, logs=None):
        # The step logs the model's running count: with steps_per_execution
        # k > 1, Keras shows every k-th step only, and the count still covers
        # the steps in between.
        seen = (logs or {}).get("nonfinite_examples")
        if seen is not None:
            seen = int(float(seen))
            self.nonfinite_examples += seen - self._nonfinite_seen
            self._nonfinite_seen = seen
        if self.target_epsilon is not None and self._next_would_exceed():
            self.model.stop_training = True
            self.stopped_for_budget = True

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["epsilon"] = self.statement().epsilon
            if "nonfinite_examples" in logs:
                logs["nonfinite_examples"] = float(
                    self._nonfinite_seen - self._nonfinite_at_epoch_start)

    def on_train_end(self, logs=None):
        if self.verbose:
            print(f"Privacy: {self.statement()}")
            if self.sampling_spec is not None:
                print(self.sampling_spec.statement())
            if self.stopped_for_budget:
                print(f"Training stopped after {self.model.update_count} "
                      f"updates: one more would exceed the budget "
                      f"epsilon={self.target_epsilon}.")
            if self.nonfinite_examples:
                print(f"Warning: {self.nonfinite_examples} training examples "
                      f"had a NaN or Inf gradient (check inputs and labels "
                      f"for NaN/Inf) and contributed zero to their update. "
                      f"This count is a diagnostic on training data, "
                      f"outside the DP guarantee.")


class EMAEvaluation(keras.callbacks.Callback):
    """Evaluates the EMA weights at each epoch end and adds them to the logs.

    The logs gain `val_ema_<metric>` for every metric of
    `model.evaluate(validation_data)` run with the EMA weights swapped in.
    Keys starting with `val_` are what `keras.callbacks.TensorBoard` writes to
    its validation run (without the `val_`), so these figures appear there as
    `epoch_ema_<metric>`, beside `epoch_<metric>` of the current weights,
    and not among the training figures.

    Args:
      validation_data: a dataset or `(x, y)` tuple of held-out data.
      prefix: prefix of the log keys; keep it starting with `val_` for the
        TensorBoard placement above.
    """

    def __init__(self, validation_data, prefix="val_ema_"):
        super().__init__()
        self.validation_data = validation_data
        self.prefix = prefix

    def on_epoch_end(self, epoch, logs=None):
        data = self.validation_data
        with self.model.ema_weights():
            if isinstance(data, tuple):
                results = self.model.evaluate(*data, verbose=0,
                                              return_dict=True)
            else:
                results = self.model.evaluate(data, verbose=0,
                                              return_dict=True)
        if logs is not None:
            for name, value in results.items():
                logs[self.prefix + name] = value


class BudgetGuard(PrivacyLogger):
    """A `PrivacyLogger` with a required budget; saves and says why it stops.

    Training stops before the update that would take epsilon above
    `target_epsilon`; the model is then saved to `save_path` (atomically, so
    a crash cannot leave half a file) and the reason is printed and kept in
    `stop_reason`. It refuses to start (ValueError, nothing trained or saved)
    when not even one more update fits, e.g. with noise_multiplier 0.

    Args:
      target_epsilon: the budget, > 0.
      save_path: where the model is saved when the budget stops training; a
        `.keras` file.
      **kwargs: the other `PrivacyLogger` arguments (`delta`,
        `sampling_spec` or `num_examples`, ...).

    Attributes:
      stop_reason: None, or the message saying why training stopped.

    Raises:
      ValueError: `save_path` is not a `.keras` path, or bad `PrivacyLogger`
        arguments.
    """

    def __init__(self, target_epsilon, save_path, **kwargs):
        if not str(save_path).endswith(".keras"):
            raise ValueError(f"save_path must end in .keras, got "
                             f"{save_path!r}.")
        if target_epsilon is None:
            raise ValueError("BudgetGuard needs a target_epsilon; use "
                             "PrivacyLogger to log epsilon without a budget.")
        super().__init__(target_epsilon=target_epsilon, **kwargs)
        self.save_path = str(save_path)
        self.stop_reason = None

    def on_train_batch_end(self, batch, logs=None):
        super().on_train_batch_end(batch, logs)
        if self.stopped_for_budget and self.stop_reason is None:
            done = self.model.update_count
            now = self.statement()
            after = self.statement(done + self._updates_per_call())
            resume.atomic_save_model(self.model, self.save_path)
            self.stop_reason = (
                f"Privacy budget reached: stopped after {done} updates at "
                f"epsilon={now.epsilon:.4g} (delta={now.delta:.3g}); update "
                f"{done + 1} would take epsilon to {after.epsilon:.4g}, above "
                f"the target {self.target_epsilon}. Model saved to "
                f"{self.save_path}.")
            print(self.stop_reason)
