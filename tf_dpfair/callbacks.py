"""Keras callbacks: epsilon in the logs, a budget stop, EMA evaluation."""

import dataclasses

import keras

from tf_dpfair import accounting

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
                f"than num_examples {self.num_examples}.")
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
        if self.verbose:
            print(OUTSIDE_GUARANTEE_NOTE)
        if config.noise_multiplier == 0:
            print("Warning: noise_multiplier is 0: this run is NOT private "
                  "(epsilon = inf).")
        if self.delta >= 1.0 / self.num_examples:
            print(f"Warning: delta={self.delta} >= 1/N={1 / self.num_examples:.3g}:"
                  f" a guarantee this weak allows releasing an example outright.")
        if self.target_epsilon is not None and self._next_would_exceed():
            raise ValueError(
                f"The privacy budget epsilon={self.target_epsilon} does not "
                f"allow one more update: after {self.model.update_count} "
                f"updates, {self.statement()}. Raise the noise multiplier or "
                f"the budget.")

    def on_train_batch_end(self, batch, logs=None):
        if self.target_epsilon is not None and self._next_would_exceed():
            self.model.stop_training = True
            self.stopped_for_budget = True

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["epsilon"] = self.statement().epsilon

    def on_train_end(self, logs=None):
        if self.verbose:
            print(f"Privacy: {self.statement()}")
            if self.sampling_spec is not None:
                print(self.sampling_spec.statement())
            if self.stopped_for_budget:
                print(f"Training stopped after {self.model.update_count} "
                      f"updates: one more would exceed the budget "
                      f"epsilon={self.target_epsilon}.")


class EMAEvaluation(keras.callbacks.Callback):
    """Evaluates the EMA weights at each epoch end and adds them to the logs.

    The logs gain `ema_val_<metric>` for every metric of
    `model.evaluate(validation_data)` run with the EMA weights swapped in.

    Args:
      validation_data: a dataset or `(x, y)` tuple of held-out data.
      prefix: prefix of the log keys.
    """

    def __init__(self, validation_data, prefix="ema_val_"):
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

