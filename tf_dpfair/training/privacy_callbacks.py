"""Keras callbacks: epsilon in the logs, a budget guard, EMA evaluation."""

import keras

from tf_dpfair.privacy import accounting
from tf_dpfair import workers
from tf_dpfair.privacy import input_sampling
from tf_dpfair.privacy import ledger as ledger_lib
from tf_dpfair.training import checkpoints

OUTSIDE_GUARANTEE_NOTE = (
    "Note: loss, accuracy, clip_fraction and nonfinite_examples of training "
    "batches are computed on training data without noise; they are outside "
    "the DP guarantee. Validation figures are on held-out data.")


class PrivacyLogger(keras.callbacks.Callback):
    """Adds `epsilon` to the epoch logs and can stop before a target epsilon.

    The statement's sampling assumption is the one the batches really had,
    never a silent Poisson default (see `tf_dpfair.privacy.input_sampling`):

    - fed the package's pipeline (`model.fit(data.make_train_dataset(...))`,
      or its `.dataset`), the model knows the `SamplingSpec`, and `delta` is
      all this callback needs;
    - fed numpy arrays with `batch_size`, the batches are Keras' shuffled
      fixed-size batches and are accounted as such (no amplification);
      `sampling="poisson"` is refused there unless
      `accept_shuffle_as_poisson=True`;
    - fed anything else (a `tf.data` pipeline of your own, a generator),
      the sampling must be stated: `sampling="shuffle"` (at most one update
      per pass over N examples) or `sampling="poisson"` (then a notice says,
      once, what that assumes), with `num_examples`. Nothing stated is
      refused rather than defaulted: only the author of a pipeline knows
      whether it draws each example once per pass (a `.repeat()` before
      `.shuffle()` does not), so even the shuffle figure cannot be assumed.

    Epsilon composes the model's privacy ledger (`DPModel.privacy_ledger`,
    see `tf_dpfair.privacy.ledger`): every update the step applied, with the
    sampling, noise multiplier and noise index it really had, over every
    `fit` of these weights, saved with them and never rolled back by a
    restore. So it is right after a resume, an `EarlyStopping` restore or
    a re-wrap too, and it counts updates (logical batches), not replicas or
    workers: on several workers every worker's logger states the job's
    epsilon. With
    `target_epsilon`, training stops before any update that would take
    epsilon above it, and refuses to start if not even one more update fits.

    It also turns the model's running count of examples with a NaN/Inf
    gradient (`DPModel.nonfinite_examples`) into each epoch's count in the
    logs, and warns at the end of `fit` when any example of this `fit` had
    one: a diagnostic on training data, outside the guarantee. A noise
    multiplier of 0 with a `target_epsilon` is refused: such a run has
    epsilon = inf.

    Args:
      delta: the delta the accountant targets (1/N or smaller is customary).
      target_epsilon: optional budget; None never stops training.
      sampling: for input the package did not build: "poisson" or "shuffle".
      num_examples: N, with `sampling`.
      sampling_spec: the `tf_dpfair.privacy.sampling.SamplingSpec` of the pipeline;
        not needed when `fit` gets the pipeline itself, and then it must be
        that pipeline's spec.
      accept_shuffle_as_poisson: accept the heuristic Poisson statement for
        arrays that Keras shuffles into fixed batches.
      accountant: "rdp" or "pld".
      verbose: 1 prints the privacy statement at the end of training.

    Raises:
      ValueError: bad arguments (see `accounting.privacy_statement`); at the
        start of `fit`, input whose sampling nobody stated, or statements
        that contradict the input (see `input_sampling.resolve`).
    """

    def __init__(self, *, delta=None, target_epsilon=None, sampling=None,
                 num_examples=None, sampling_spec=None,
                 accept_shuffle_as_poisson=False, accountant="rdp", verbose=1):
        super().__init__()
        if delta is None:
            raise ValueError("delta is required (1/N or smaller is customary).")
        if sampling is not None and sampling not in accounting.SAMPLING_MODES:
            raise ValueError(f"sampling must be one of "
                             f"{accounting.SAMPLING_MODES} or None, got "
                             f"{sampling!r}.")
        if sampling_spec is not None:
            if num_examples not in (None, sampling_spec.num_examples):
                raise ValueError(
                    f"num_examples={num_examples} disagrees with the sampling "
                    f"spec's {sampling_spec.num_examples}; pass one of them.")
            if sampling not in (None, sampling_spec.accounting_sampling):
                raise ValueError(
                    f"sampling={sampling!r} disagrees with the sampling "
                    f"spec, accounted as {sampling_spec.accounting_sampling!r}"
                    f"; pass one of them.")
        elif num_examples is not None and (
                not isinstance(num_examples, int) or num_examples < 1):
            raise ValueError(f"num_examples must be a positive integer, got "
                             f"{num_examples!r}.")
        if sampling is not None and sampling_spec is None and num_examples is None:
            raise ValueError(f"sampling={sampling!r} needs num_examples, the "
                             f"number of training examples.")
        if accept_shuffle_as_poisson and sampling != "poisson":
            raise ValueError("accept_shuffle_as_poisson=True goes with "
                             "sampling='poisson'.")
        if target_epsilon is not None and not target_epsilon > 0:
            raise ValueError(f"target_epsilon must be > 0 or None, got "
                             f"{target_epsilon!r}.")
        # Validates delta and accountant early.
        accounting.privacy_statement(noise_multiplier=1.0, steps=0,
                                     delta=delta, sampling="poisson",
                                     sampling_probability=1.0,
                                     accountant=accountant)
        self.stated_sampling = input_sampling.StatedSampling(
            sampling=sampling, num_examples=num_examples, spec=sampling_spec,
            accept_shuffle_as_poisson=bool(accept_shuffle_as_poisson))
        self.delta = delta
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

    def _feeding(self):
        fed = getattr(self.model, "feeding", None)
        if fed is None:
            # Not fit in this process (e.g. restored): as stated, if stated.
            fed = input_sampling.prospective(
                self.stated_sampling,
                expected_batch_size=self._dp_config().expected_batch_size,
                update_count=self.model.update_count)
        if fed is None:
            raise ValueError(
                "The model has not been fit yet and no sampling was stated, so "
                "how its batches are drawn is unknown; the statement is made "
                "during fit (or pass sampling_spec, or sampling and "
                "num_examples).")
        if fed.sampling == input_sampling.UNKNOWN_SAMPLING:
            raise ValueError(
                "fit got an input pipeline the package did not build, and "
                "nobody stated how it draws examples, so no honest privacy "
                "statement can be made. Feed fit the TrainData of "
                "tf_dpfair.data.make_train_dataset (Poisson or shuffle: the "
                "model then knows), or state it: "
                "PrivacyLogger(sampling='shuffle', num_examples=N, ...) if "
                "every example is in at most one batch per pass over the "
                "data, or sampling='poisson' only if every example enters "
                "each batch independently with probability q.")
        return fed

    def statement(self, steps=None):
        """The `PrivacyStatement` of the model's ledger, or of `steps` updates.

        Args:
          steps: the model's total update count to account for (default: the
            updates applied). More than applied projects the extra updates
            as fed now (the running or latest `fit`; for a model not fit in
            this process, as this logger states). Never fewer than applied:
            that statement would leave updates out.

        Returns:
          An `accounting.PrivacyStatement` (delta includes the pipeline's
          allowance for truncated Poisson batches).

        Raises:
          ValueError: no `fit` yet and nothing stated, input whose sampling
            nobody stated, or `steps` below the updates applied.
        """
        fed = self._feeding()
        ledger = self.model.privacy_ledger
        applied = ledger.total_updates
        steps = applied if steps is None else int(steps)
        if steps < applied:
            raise ValueError(
                f"The model's ledger holds {applied} applied updates; a "
                f"statement for {steps} would leave some out.")
        if steps > applied:
            segment = (ledger.find(self.model._last_segment_id)
                       if getattr(self.model, "feeding", None) is not None
                       else None)
            if segment is None:
                fields, row_limit, _ = fed.segment(
                    self._dp_config().noise_multiplier)
                segment = ledger_lib.Segment(segment_id=-1, row_limit=row_limit,
                                             **fields)
            ledger = ledger.with_projection(steps - applied, segment)
        return ledger.statement(self.delta, self.accountant)

    def _updates_per_call(self):
        return int(getattr(self.model, "steps_per_execution", 1) or 1)

    def _next_would_exceed(self):
        ahead = self.model.update_count + self._updates_per_call()
        return self.statement(ahead).epsilon > self.target_epsilon

    def on_train_begin(self, logs=None):
        config = self._dp_config()
        self.nonfinite_examples = 0
        self._nonfinite_seen = self.model.nonfinite_examples
        fed = self._feeding()
        if fed.num_examples is not None and (
                config.expected_batch_size > fed.num_examples):
            raise ValueError(
                f"expected_batch_size {config.expected_batch_size} is larger "
                f"than num_examples {fed.num_examples}: the sampling rate "
                f"would exceed 1. Use a logical batch of at most "
                f"{fed.num_examples} examples, or check num_examples.")
        self.statement()  # Bad settings fail here, before any update.
        if fed.stated_poisson:
            # Once per fit: the guarantee rests on the user's word here.
            print(f"Note: Poisson sampling is assumed on your word "
                  f"(q={fed.batch_size / fed.num_examples:.4g}): "
                  f"the guarantee holds only if every example entered each "
                  f"update independently with probability q. "
                  f"tf_dpfair.data.make_train_dataset(mode='poisson') draws "
                  f"batches that way.")
        if self.verbose:
            print(OUTSIDE_GUARANTEE_NOTE)
        if config.noise_multiplier == 0:
            print("Warning: noise_multiplier is 0: this run is NOT private "
                  "(epsilon = inf).")
        if fed.num_examples is not None and self.delta >= 1.0 / fed.num_examples:
            print(f"Warning: delta={self.delta} >= 1/N={1 / fed.num_examples:.3g}:"
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
            print(self._feeding().describe())
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

    Epsilon, as for `PrivacyLogger`, comes from the model's count of updates
    (one per logical batch, whatever the number of replicas or workers).
    On several workers give it to every worker: all stop at the same update,
    and only the chief saves.

    Args:
      target_epsilon: the budget, > 0.
      save_path: where the model is saved when the budget stops training; a
        `.keras` file.
      **kwargs: the other `PrivacyLogger` arguments (`delta`, and
        `sampling` with `num_examples` where `fit` does not get the
        package's pipeline).

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
            # Every worker stops at the same update (the count is the
            # job's); only the chief writes the model.
            chief = workers.is_chief(self.model.distribute_strategy)
            if chief:
                checkpoints.atomic_save_model(self.model, self.save_path)
            self.stop_reason = (
                f"Privacy budget reached: stopped after {done} updates at "
                f"epsilon={now.epsilon:.4g} (delta={now.delta:.3g}); update "
                f"{done + 1} would take epsilon to {after.epsilon:.4g}, above "
                f"the target {self.target_epsilon}. "
                + (f"Model saved to {self.save_path}." if chief else
                   "The chief saves the model."))
            print(self.stop_reason)
