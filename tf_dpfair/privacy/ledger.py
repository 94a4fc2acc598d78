"""The privacy ledger: every applied DP update, append-only, and its statement.

A privacy statement is true only if it composes what really ran. The ledger
is therefore a record of applied updates, not of settings:

- It is a list of `Segment`s, each a run of consecutive updates that share
  one accounting: Poisson sampling with rate q, or "passes" (every example in
  at most one update per pass of `updates_per_pass` updates; 1 when any
  update may hold any example), the noise multiplier, the noise stream's
  (non-secret) key id and the noise index of its first update.
- A segment's update count comes from a counter that the DP step itself
  increments in the same graph step that applies the update
  (`DPTraining.train_step`), so an update is recorded whatever fails after
  it, and nothing that restores weights can lower the counter: the noise
  index of the next update is the counter, so no noise draw is ever reused.
- The ledger only grows. It is saved with the weights (`to_table`), and a
  table read back (`load_weights`, `set_weights`, `EarlyStopping`'s restore,
  `BackupAndRestore`, a checkpoint) is merged in by segment id (`absorb`): an
  older copy of this history changes nothing; a longer one, or another
  history, is added. The statement thus never falls below the epsilon of
  what ran.
- The ledger is attached to the trainable variables it trained, so a new
  DP wrapper of the same weights (`make_private` again) continues it.
  Values copied into other variables (`set_weights` on another model, a
  plain base model saved and loaded) carry no ledger: save and load the DP
  model, whose file holds it.

`statement` composes the segments as they are with `dp_accounting`:
heterogeneous q, noise multipliers, and Poisson beside shuffled passes. A
Poisson-sampled Gaussian mechanism is analysed for adding or removing one
example, which also bounds replacing one by an example that contributes
nothing (zero-out); passes of shuffled batches are bounded only for the
latter, so a ledger that holds any is stated for zero-out neighbours.

This module composes the segments and keeps the list; the `Segment` record
and its ids are in `tf_dpfair.privacy.segment`, the saved table's layout in
`tf_dpfair.privacy.ledger_table`. No TensorFlow here: the model
(`tf_dpfair.training.ledger_state`) holds the counter and the saved table.
"""

import dataclasses
import math

import dp_accounting

from tf_dpfair.privacy import accounting
from tf_dpfair.privacy import ledger_table
from tf_dpfair.privacy.sampling import POISSON, SHUFFLE
# The record, its constants and ids, importable from here as before the split.
from tf_dpfair.privacy.ledger_table import TABLE_ROWS  # noqa: F401 (re-exported)
from tf_dpfair.privacy.segment import (  # noqa: F401 (re-exported)
    ARRAYS, ID_BITS, LEGACY, PASSES, PIPELINE, SAMPLINGS, SINGLE_BATCH, SOURCES,
    STATED, UNSTATED, Segment, derived_id, new_id, noise_key_id, root_for_seed)

_FIELDS = ledger_table.FIELDS
_SAMPLING_CODES = SAMPLINGS
_ID_BITS = ID_BITS


class Ledger:
    """The append-only list of `Segment`s of one set of weights.

    Args:
      segments: the segments so far (oldest first).
      root: the ledger's id, from which new segment ids derive.
    """

    def __init__(self, segments=(), root=None):
        self._segments = list(segments)
        self.root = int(root) if root is not None else new_id()

    @property
    def segments(self):
        """The segments, oldest first (a tuple)."""
        return tuple(self._segments)

    @property
    def total_updates(self):
        """Updates applied, over all segments."""
        return sum(s.updates for s in self._segments)

    @property
    def participations(self):
        """Most updates any one example can have joined (Poisson: all)."""
        return sum(s.passes for s in self._segments)

    @property
    def non_poisson_updates(self):
        """Updates not drawn by Poisson sampling."""
        return sum(s.updates for s in self._segments if s.sampling != POISSON)

    def find(self, segment_id):
        """The segment with this id, or None."""
        for segment in self._segments:
            if segment.segment_id == segment_id:
                return segment
        return None

    def append(self, **fields):
        """Opens a new segment (0 updates) at the end; returns it.

        Its id derives from the ledger's root and its position, and its
        first noise index is `first_noise_index` (the model's counter).
        """
        segment = Segment(segment_id=derived_id(self.root, len(self._segments)),
                          **fields)
        if self.find(segment.segment_id) is not None:  # a clash after absorb
            segment = dataclasses.replace(segment, segment_id=new_id())
        self._segments.append(segment)
        return segment

    def record(self, segment_id, updates):
        """Sets a segment's update count; it can only grow.

        Raises:
          ValueError: the segment is unknown or the count would shrink.
        """
        for i, segment in enumerate(self._segments):
            if segment.segment_id == segment_id:
                if updates < segment.updates:
                    raise ValueError(
                        f"The ledger only grows: segment {segment_id} has "
                        f"{segment.updates} updates, cannot record {updates}.")
                self._segments[i] = dataclasses.replace(segment, updates=int(updates))
                return self._segments[i]
        raise ValueError(f"No segment {segment_id} in the ledger.")

    def absorb(self, other):
        """Merges another copy of history (e.g. read back from saved weights).

        Segments are matched by id: a known one keeps the larger count, an
        unknown one is added (before any segment still open, which stays
        last). So an older copy of this ledger changes nothing, and another
        history is composed with this one. Returns whether anything changed.
        """
        changed = False
        for theirs in other.segments:
            ours = self.find(theirs.segment_id)
            if ours is None:
                self._segments.insert(self._insert_position(), theirs)
                changed = True
            elif theirs.updates > ours.updates:
                self.record(ours.segment_id, theirs.updates)
                changed = True
        return changed

    def _insert_position(self):
        # Before a trailing empty segment (the one a fit has just opened).
        if self._segments and self._segments[-1].updates == 0:
            return len(self._segments) - 1
        return len(self._segments)

    def with_projection(self, extra, segment=None):
        """A copy with `extra` more updates (for "would one more exceed?").

        Args:
          extra: updates to add, >= 0.
          segment: where they go: a `Segment` to add them to (or append,
            if it is not in the ledger); None: the last segment.

        Returns:
          A new `Ledger`.
        """
        copy = Ledger(self._segments, root=self.root)
        if extra <= 0:
            return copy
        if segment is None:
            if not copy._segments:
                raise ValueError("An empty ledger has no segment to project.")
            segment = copy._segments[-1]
        ours = copy.find(segment.segment_id)
        if ours is None:
            copy._segments.append(dataclasses.replace(
                segment, updates=segment.updates + int(extra)))
        else:
            copy.record(ours.segment_id, ours.updates + int(extra))
        return copy

    # ---------------------------------------------------------- the statement

    def dp_event(self):
        """The `dp_accounting.DpEvent` composing every segment."""
        return dp_accounting.ComposedDpEvent(
            [s.dp_event() for s in self._segments if s.updates])

    def statement(self, delta, accountant="rdp"):
        """The `accounting.PrivacyStatement` of every update in the ledger.

        A ledger of one kind (all Poisson at one q and sigma, or all passes at
        one sigma) gives exactly the statement `accounting.privacy_statement`
        gives for it; any other mix is composed event by event
        (`sampling="mixed"`), and the statement lists the segments.

        Args:
          delta: target delta, in (0, 1).
          accountant: "rdp" or "pld".

        Returns:
          An `accounting.PrivacyStatement`. Delta includes the allowance for
          truncated Poisson batches of the package's pipeline.
        """
        used = [s for s in self._segments if s.updates]
        steps = sum(s.updates for s in used)
        kinds = {(s.sampling, s.noise_multiplier, s.sampling_probability)
                 for s in used}
        stated = tuple(s.describe() for s in used if s.stated_poisson
                       or s.source in (STATED, UNSTATED, LEGACY))
        if not used:
            last = self._segments[-1] if self._segments else None
            if last is not None and last.sampling == PASSES:
                return accounting.privacy_statement(
                    noise_multiplier=last.noise_multiplier, steps=0,
                    delta=delta, sampling=SHUFFLE, participations=0,
                    accountant=accountant)
            return accounting.privacy_statement(
                noise_multiplier=last.noise_multiplier if last else 0.0,
                steps=0, delta=delta, sampling=POISSON,
                sampling_probability=(last.sampling_probability if last
                                      else 1.0), accountant=accountant)
        sigmas = {s.noise_multiplier for s in used}
        if len(kinds) == 1 and used[0].sampling == POISSON:
            statement = accounting.privacy_statement(
                noise_multiplier=used[0].noise_multiplier, steps=steps,
                delta=delta, sampling=POISSON,
                sampling_probability=used[0].sampling_probability,
                accountant=accountant)
        elif all(s.sampling == PASSES for s in used) and len(sigmas) == 1:
            statement = accounting.privacy_statement(
                noise_multiplier=used[0].noise_multiplier, steps=steps,
                delta=delta, sampling=SHUFFLE,
                participations=sum(s.passes for s in used),
                accountant=accountant)
        else:
            statement = accounting.PrivacyStatement(
                epsilon=accounting.epsilon_of_event(self.dp_event(), delta,
                                                    accountant,
                                                    min(sigmas)),
                delta=delta, noise_multiplier=min(sigmas),
                sampling_probability=None, steps=steps, sampling="mixed",
                accountant=accountant,
                segments=tuple(s.describe() for s in used),
                zero_out=any(s.sampling == PASSES for s in used))
        overhead = self.delta_overhead(statement.epsilon)
        return dataclasses.replace(statement, delta=statement.delta + overhead,
                                   user_stated=stated)

    def delta_overhead(self, epsilon):
        """e^epsilon * eta: eta bounds the chance any Poisson batch was truncated.

        See `sampling.SamplingSpec.delta_overhead` (Chua et al. 2024); the
        union bound runs over every Poisson update of the ledger.
        """
        log_none = sum(s.updates * math.log1p(-s.overflow_probability)
                       for s in self._segments
                       if s.updates and s.overflow_probability > 0)
        if log_none == 0.0 or math.isinf(epsilon):
            return 0.0
        return math.exp(epsilon) * -math.expm1(log_none)

    # ---------------------------------------------------------- persistence

    def to_table(self, rows=TABLE_ROWS):
        """The ledger as a float64 `[rows, F]` array (unused rows are 0).

        Segments without updates are left out; a ledger longer than `rows`
        is first compacted conservatively (`compacted`). Row 0 holds the
        root id in its first column and the format version; segments follow
        (`tf_dpfair.privacy.ledger_table`).
        """
        used = Ledger([s for s in self._segments if s.updates], root=self.root)
        ledger = used if len(used._segments) < rows else used.compacted(rows - 1)
        return ledger_table.write(ledger._segments, ledger.root, rows)

    @classmethod
    def from_table(cls, table):
        """The ledger saved by `to_table`.

        Raises:
          ValueError: the array is not a ledger table.
        """
        segments, root = ledger_table.read(table)
        return cls(segments, root=root)

    def compacted(self, max_segments):
        """A ledger of at most `max_segments` whose epsilon is no smaller.

        The oldest segments are merged into one run that counts each of
        their passes as an unamplified Gaussian mechanism at the smallest
        noise multiplier among them: composing more, or noisier, mechanisms
        never lowers epsilon.
        """
        if len(self._segments) <= max_segments:
            return Ledger(self._segments, root=self.root)
        cut = len(self._segments) - max_segments + 1
        old = [s for s in self._segments[:cut] if s.updates]
        merged = Segment(
            segment_id=derived_id(self.root, -cut), sampling=PASSES,
            source=LEGACY, noise_multiplier=min(
                (s.noise_multiplier for s in old), default=0.0),
            updates_per_pass=1, updates=sum(s.passes for s in old),
            first_noise_index=min((s.first_noise_index for s in old), default=0))
        return Ledger([merged, *self._segments[cut:]], root=self.root)

    @classmethod
    def from_legacy(cls, *, update_count, participations, non_poisson_updates,
                    noise_multiplier):
        """A conservative ledger for a model saved before the ledger existed.

        Such a model kept only counts. Its Poisson updates' q was not saved,
        so every update is counted as an unamplified Gaussian mechanism
        (participations where updates were not Poisson).
        """
        updates = int(update_count)
        ledger = cls()
        if updates > 0:
            passes = (updates if int(non_poisson_updates) == 0
                      else min(max(int(participations), 1), updates))
            # ceil(updates / (updates // passes)) >= passes.
            ledger._segments.append(Segment(
                segment_id=new_id(), sampling=PASSES, source=LEGACY,
                noise_multiplier=float(noise_multiplier),
                updates_per_pass=updates // passes, updates=updates))
        return ledger

    def describe(self):
        """The segments, one line each."""
        if not self._segments:
            return "No DP update applied."
        return "\n".join(f"- {s.describe()}" for s in self._segments if s.updates)
