"""The model's side of the privacy ledger: counter, row limit, saved copy.

`LedgerState` is mixed into `model.DPTraining`. It keeps three things:

- An update counter that only the DP step touches: the step draws the
  update's noise with it as the noise index and adds one in the same graph
  step that applies the update. It is a plain `tf.Variable` held outside
  Keras' tracking, so no weight assignment (`set_weights`, `load_weights`,
  `EarlyStopping(restore_best_weights=True)`, `BackupAndRestore`) can lower
  it: no noise index is ever drawn twice with one key.
- The row limit of the running segment: the step refuses, before applying
  it, a logical batch with more rows of weight > 0 than the accounting of
  this fit assumes (observed, not declared).
- `dp_ledger`, a Keras weight holding `ledger.Ledger.to_table()`, so
  checkpoints, `.keras` files and `workers.copy_from_chief` carry the ledger
  with the weights. It is only a copy: whatever is assigned to it is merged
  into the live ledger (`Ledger.absorb`), never trusted in its place.

`_sync_ledger` brings the three together; it runs around every step
(`LedgerCallback`), at the end of every `fit` whatever happened, and before
any save or after any load of weights.
"""

import dataclasses
import re

import keras
import numpy as np
import tensorflow as tf

from tf_dpfair import workers
from tf_dpfair.privacy import ledger as ledger_lib
from tf_dpfair.training import ema

# The attribute that ties a ledger to the variables it trained.
_ATTRIBUTE = "_tf_dpfair_ledger"
# In the message of the step's row check; `fit` turns it into a ValueError.
ROW_LIMIT_MARKER = "tf_dpfair row limit:"
_NO_LIMIT = 2**62


class _Counters:
    """The step's counter and row limit (deliberately not tracked by Keras)."""

    def __init__(self, strategy):
        with strategy.scope():
            self.applied = tf.Variable(
                0, dtype=tf.int64, trainable=False, name="dp_applied_updates",
                aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
            self.row_limit = tf.Variable(
                _NO_LIMIT, dtype=tf.int64, trainable=False, name="dp_row_limit",
                aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)


@dataclasses.dataclass
class _Open:
    """The segment the model is adding updates to."""

    segment_id: int
    start: int           # the counter when it opened
    fields: dict         # to open its continuation
    row_limit: int | None
    reason: str          # why its row limit is what it is
    pipeline: bool       # the package's pipeline: a jump in the count refuses


class LedgerState:
    """The privacy ledger of a DP model (a mixin; see the module docstring)."""

    def _init_ledger(self):
        self._ledger_table = self.add_weight(
            shape=(ledger_lib.TABLE_ROWS, len(ledger_lib.Ledger().to_table()[0])),
            dtype="float64", initializer="zeros", trainable=False,
            name="dp_ledger", aggregation="only_first_replica")
        self._ledger = None  # bound to the weights at the first sync
        self._counters = _Counters(self.distribute_strategy)
        self._open = None
        self._table_written = None

    # ----------------------------------------------------------- reading

    @property
    def privacy_ledger(self):
        """The `ledger.Ledger` of every DP update these weights had (live)."""
        self._sync_ledger()
        return self._ledger

    @property
    def update_count(self):
        """DP updates applied to these weights so far, over every fit (int).

        Never lowered by restoring weights: see `tf_dpfair.privacy.ledger`.
        """
        return self.privacy_ledger.total_updates

    @property
    def participations(self):
        """Most updates any one training example can have joined (int)."""
        return self.privacy_ledger.participations

    @property
    def non_poisson_updates(self):
        """Updates so far whose batch was not drawn by Poisson sampling (int)."""
        return self.privacy_ledger.non_poisson_updates

    def _step_counter(self):
        """The counter variable the step reads as the noise index and bumps."""
        return self._counters.applied

    def _step_row_limit(self):
        return self._counters.row_limit

    # ----------------------------------------------------------- segments

    def _open_segment(self, fields, *, row_limit, reason, pipeline=False):
        """Starts recording updates as a new segment with these fields.

        Args:
          fields: `Segment` fields (sampling, source, noise_multiplier, ...).
          row_limit: most rows of weight > 0 per update, or None.
          reason: what the row limit rests on (for the refusal message).
          pipeline: the package's pipeline (its batches follow the count).
        """
        self._close_segment()
        ledger = self._bound_ledger()
        start = max(int(self._counters.applied.numpy()), ledger.total_updates)
        self._counters.applied.assign(start)
        self._counters.row_limit.assign(_NO_LIMIT if row_limit is None
                                        else int(row_limit))
        config = self._dp_config
        segment = ledger.append(
            first_noise_index=start, noise_key=ledger_lib.noise_key_id(config.seed),
            row_limit=row_limit, **fields)
        self._open = _Open(segment.segment_id, start, dict(fields), row_limit,
                           reason, pipeline)
        self._sync_ledger()

    def _close_segment(self):
        """Records the open segment's updates and stops adding to it."""
        if self._open is not None:
            self._sync_ledger()
            segment = self._ledger.find(self._open.segment_id)
            if segment is not None and segment.updates == 0:
                self._ledger._segments.remove(segment)  # never held an update
            self._open = None
            self._counters.row_limit.assign(_NO_LIMIT)
            self._sync_ledger()

    def _row_limit_error(self, error):
        """The ValueError for a batch the step refused for its rows."""
        reason = self._open.reason if self._open is not None else ""
        text = str(error).split(ROW_LIMIT_MARKER, 1)[-1]
        numbers = re.findall(r"\[(\d+)\]", text)[:2]
        found = (f"{numbers[0]} rows > {numbers[1]} allowed" if len(numbers) == 2
                 else text.strip().splitlines()[0])
        return ValueError(
            f"DPModel refused a logical batch before applying it: it holds "
            f"more rows of weight > 0 than the accounting of this fit allows "
            f"({found}). {reason} Updates applied before it are in the ledger "
            f"(model.update_count = {self.update_count}).")

    # ----------------------------------------------------------- sync

    def _bound_ledger(self):
        """The ledger of these weights, shared with any other DP wrapper of them."""
        variables = list(self.trainable_variables)
        attached = []
        for variable in variables:
            found = getattr(variable, _ATTRIBUTE, None)
            if found is not None and all(found is not a for a in attached):
                attached.append(found)
        if self._ledger is None:
            self._ledger = (attached[0] if attached else ledger_lib.Ledger(
                root=ledger_lib.root_for_seed(self._dp_config.seed)))
        for other in attached:
            if other is not self._ledger:
                self._ledger.absorb(other)
        for variable in variables:
            if getattr(variable, _ATTRIBUTE, None) is not self._ledger:
                setattr(variable, _ATTRIBUTE, self._ledger)
        return self._ledger

    def _sync_ledger(self):
        """Brings counter, live ledger and saved table into one history."""
        ledger = self._bound_ledger()
        applied = int(self._counters.applied.numpy())
        if self._open is not None:
            done = applied - self._open.start
            if done > ledger.find(self._open.segment_id).updates:
                ledger.record(self._open.segment_id, done)
        elif applied > ledger.total_updates:
            # The step ran outside fit and train_on_batch (a custom loop
            # calling train_step): nobody described those batches.
            extra = applied - ledger.total_updates
            segment = ledger.append(
                sampling=ledger_lib.PASSES, source=ledger_lib.UNSTATED,
                noise_multiplier=self._dp_config.noise_multiplier,
                updates_per_pass=1, first_noise_index=applied - extra,
                noise_key=ledger_lib.noise_key_id(self._dp_config.seed))
            ledger.record(segment.segment_id, extra)
        table = self._ledger_table.numpy()
        if self._table_written is None or not np.array_equal(table, self._table_written):
            try:
                saved = ledger_lib.Ledger.from_table(table)
            except (ValueError, IndexError):
                saved = ledger_lib.Ledger()  # not a ledger: ours stands
            if ledger.total_updates == 0 and not any(
                    s.updates for s in ledger.segments):
                ledger.root = saved.root if saved.segments else ledger.root
            before = ledger.total_updates
            if ledger.absorb(saved):
                self._after_absorb(before)
        if ledger.total_updates > int(self._counters.applied.numpy()):
            self._counters.applied.assign(ledger.total_updates)
            if self._open is not None:
                self._continue_open()
        written = ledger.to_table()
        if not np.array_equal(written, table):
            self._ledger_table.assign(written)
        self._table_written = written

    def _after_absorb(self, before):
        """Another history arrived (a load): the open segment restarts after it."""
        if self._open is None:
            return
        if self._open.pipeline and self._ledger.total_updates != before:
            open_ = self._open
            self._open = None
            raise ValueError(
                f"The model's update count moved from {open_.start} to "
                f"{self._ledger.total_updates} between the start of fit and "
                f"its first step (a callback loaded other weights?), so the "
                f"pipeline, built to start at update {open_.start}, would not "
                f"match it. Restore before calling fit and build the pipeline "
                f"with start_step=model.update_count (tf_dpfair.training.checkpoints.fit_resumable "
                f"does both).")

    def _continue_open(self):
        """Closes the open segment and opens its continuation at the counter."""
        open_ = self._open
        segment = self._ledger.find(open_.segment_id)
        fields = dict(open_.fields)
        if segment.updates and fields.get("updates_per_pass"):
            fields["pass_offset"] = ((segment.pass_offset + segment.updates)
                                     % fields["updates_per_pass"])
        if segment.updates == 0:
            self._ledger._segments.remove(segment)  # never held an update
        self._open = None
        self._open_segment(fields, row_limit=open_.row_limit, reason=open_.reason,
                           pipeline=open_.pipeline)

    def _share_ledger_root(self):
        """On several workers, every worker names new segments as the chief does."""
        ledger = self._bound_ledger()
        ledger.root = workers.share_from_chief(self.distribute_strategy,
                                               ledger.root)

    # ----------------------------------------------------------- Keras hooks

    def get_weights(self):
        self._sync_ledger()
        return super().get_weights()

    def set_weights(self, weights):
        """Like Keras' `set_weights`; the DP ledger is merged, never rolled back."""
        super().set_weights(weights)
        self._sync_ledger()

    def save_own_variables(self, store):
        self._sync_ledger()
        super().save_own_variables(store)

    def load_own_variables(self, store):
        """Loads this model's own weights, merging the saved ledger.

        A file saved before the ledger existed (update count, participations
        and non-Poisson count as three int64 weights) loads with a
        conservative ledger (`Ledger.from_legacy`). A model saved after
        `compile` with `ema_decay` holds its EMA shadows, which `compile`
        creates: loaded without compile (`load_model(..., compile=False)`),
        they are created here first, so the weights and shadows load as saved.
        """
        self._create_saved_shadows(store)
        own = self._trainable_variables + self._non_trainable_variables
        keys = sorted(store.keys(), key=int)
        if len(keys) == len(own) + 2 and np.asarray(store["0"]).shape == ():
            legacy = ledger_lib.Ledger.from_legacy(
                update_count=int(np.asarray(store["0"])),
                participations=int(np.asarray(store["2"])),
                non_poisson_updates=int(np.asarray(store["3"])),
                noise_multiplier=self._dp_config.noise_multiplier)
            values = [legacy.to_table(), store["1"]] + [store[k] for k in keys[4:]]
            for variable, value in zip(own, values):
                variable.assign(value)
        else:
            super().load_own_variables(store)
        self._sync_ledger()


    def _create_saved_shadows(self, store):
        own = self._trainable_variables + self._non_trainable_variables
        config = getattr(self, "_dp_config", None)
        if (config is None or config.ema_decay is None or self._ema_shadows is not None
                or not self.built):
            return
        if len(store.keys()) == len(own) + len(self.trainable_variables):
            self._ema_shadows = ema.create_shadows(self, self.trainable_variables)


class LedgerCallback(keras.callbacks.Callback):
    """Syncs the ledger around every step of a DP model's `fit`.

    `DPTraining.fit` puts it first among the callbacks, so checkpoints
    written at the end of a step (`ModelCheckpoint`, `checkpoints.DPCheckpoint`)
    hold that step's ledger, and weights a callback loaded before the first
    step (`BackupAndRestore`) have their history merged before it runs.
    """

    def on_train_batch_begin(self, batch, logs=None):
        self.model._sync_ledger()

    def on_train_batch_end(self, batch, logs=None):
        self.model._sync_ledger()

    def on_train_end(self, logs=None):
        self.model._sync_ledger()
