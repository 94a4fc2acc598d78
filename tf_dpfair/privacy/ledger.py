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

No TensorFlow here: the model (`tf_dpfair/fitting.py`) holds the counter
and the saved table; this module is plain Python.
"""

import dataclasses
import hashlib
import math
import secrets

import dp_accounting
import numpy as np

from tf_dpfair.privacy import accounting

POISSON = "poisson"
PASSES = "passes"

# Where a segment's sampling comes from: how much of it is checked.
PIPELINE = "pipeline"          # the package's own sampler (data.make_train_dataset)
ARRAYS = "arrays"              # numpy arrays Keras shuffles into fixed batches
STATED = "stated"              # a pipeline the package did not build, as stated by the user
UNSTATED = "unstated"          # nobody said how the batches were drawn
SINGLE_BATCH = "single_batch"  # train_on_batch
LEGACY = "legacy"              # a model saved before the ledger existed
SOURCES = (PIPELINE, ARRAYS, STATED, UNSTATED, SINGLE_BATCH, LEGACY)

# Rows of the saved table; compaction (conservative) beyond that.
TABLE_ROWS = 128
_FIELDS = ("segment_id", "sampling", "source", "noise_multiplier",
           "sampling_probability", "updates_per_pass", "pass_offset",
           "updates", "first_noise_index", "noise_key", "overflow_probability",
           "num_examples", "row_limit", "stated_poisson")
_SAMPLING_CODES = (POISSON, PASSES)
# Values stored in a float64 table: ids and counts stay below 2**53.
_ID_BITS = 52


def noise_key_id(seed):
    """A 32-bit id of a noise seed (BLAKE2b of it; the seed has 62 random bits)."""
    digest = hashlib.blake2b(str(int(seed)).encode(), digest_size=4,
                             person=b"tfdpf-noise-key").digest()
    return int.from_bytes(digest, "big")


def root_for_seed(seed):
    """The root id of a new ledger whose first updates draw noise with `seed`.

    Derived from the secret noise seed (62 random bits, so distinct for
    every run that does not fix it), so that two models trained alike with
    one fixed seed, as tests do, hold the same ledger; the seed cannot be
    read back from 52 bits of its hash.
    """
    digest = hashlib.blake2b(str(int(seed)).encode(), digest_size=8,
                             person=b"tfdpf-ledger").digest()
    return (int.from_bytes(digest, "big") >> (64 - _ID_BITS)) or 1


def new_id():
    """A fresh random segment or ledger id (52 bits, exact in float64)."""
    return secrets.randbits(_ID_BITS) or 1


def derived_id(root, position):
    """The id of the segment at `position` of a ledger with id `root`.

    Derived, not random, so that workers that share the ledger's root (see
    `tf_dpfair.training.fitting`) give their segments the same ids.
    """
    digest = hashlib.blake2b(f"{root}:{position}".encode(), digest_size=8,
                             person=b"tfdpf-segment").digest()
    return (int.from_bytes(digest, "big") >> (64 - _ID_BITS)) or 1


@dataclasses.dataclass(frozen=True)
class Segment:
    """A run of consecutive updates with one accounting.

    Attributes:
      segment_id: identifies the run across saves and restores.
      sampling: "poisson" or "passes".
      source: where the sampling comes from (`SOURCES`).
      noise_multiplier: sigma of each update's Gaussian mechanism.
      sampling_probability: Poisson: q; None for passes.
      updates_per_pass: passes: updates per pass over the data (1: every
        update may hold every example); None for Poisson.
      pass_offset: passes: the segment's first update is this many updates
        into a pass.
      updates: updates applied in this segment.
      first_noise_index: the noise index of its first update.
      noise_key: `noise_key_id` of the noise seed it drew with.
      overflow_probability: Poisson from the package's pipeline: per update,
        the probability that truncation changed the sample (adds to delta).
      num_examples: N where known, else None.
      row_limit: the most rows of weight > 0 an update was allowed (the
        step refuses larger batches), or None.
      stated_poisson: Poisson rests on the user's word.
    """

    segment_id: int
    sampling: str
    source: str
    noise_multiplier: float
    sampling_probability: float | None = None
    updates_per_pass: int | None = None
    pass_offset: int = 0
    updates: int = 0
    first_noise_index: int = 0
    noise_key: int = 0
    overflow_probability: float = 0.0
    num_examples: int | None = None
    row_limit: int | None = None
    stated_poisson: bool = False

    def __post_init__(self):
        if self.sampling not in _SAMPLING_CODES:
            raise ValueError(f"sampling must be one of {_SAMPLING_CODES}, got "
                             f"{self.sampling!r}.")
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got "
                             f"{self.source!r}.")
        if self.sampling == POISSON and not 0 < (self.sampling_probability or 0) <= 1:
            raise ValueError(f"A Poisson segment needs q in (0, 1], got "
                             f"{self.sampling_probability!r}.")
        if self.sampling == PASSES and not (self.updates_per_pass or 0) >= 1:
            raise ValueError(f"A passes segment needs updates_per_pass >= 1, "
                             f"got {self.updates_per_pass!r}.")
        if self.updates < 0 or not self.noise_multiplier >= 0:
            raise ValueError("updates and noise_multiplier must be >= 0.")

    @property
    def passes(self):
        """Most updates of this segment any one example joined."""
        if self.updates == 0:
            return 0
        if self.sampling == POISSON:
            return self.updates
        return (self.pass_offset + self.updates - 1) // self.updates_per_pass + 1

    def dp_event(self):
        """The `dp_accounting.DpEvent` of this segment's updates."""
        gaussian = dp_accounting.GaussianDpEvent(self.noise_multiplier)
        if self.sampling == POISSON:
            return dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(self.sampling_probability,
                                                    gaussian), self.updates)
        return dp_accounting.SelfComposedDpEvent(gaussian, self.passes)

    def same_accounting(self, other):
        """Whether `other` is accounted like this segment (not the counts)."""
        keys = ("sampling", "noise_multiplier", "sampling_probability",
                "updates_per_pass", "stated_poisson")
        return all(getattr(self, k) == getattr(other, k) for k in keys)

    def describe(self):
        """One line: how many updates, how sampled, how accounted."""
        first = self.first_noise_index
        span = (f"{self.updates} update{'s' if self.updates != 1 else ''}"
                f" (noise indices {first}..{first + self.updates - 1})"
                if self.updates else "0 updates")
        origin = {
            PIPELINE: "the package's pipeline",
            ARRAYS: "numpy arrays batched by Keras",
            STATED: "a pipeline the package did not build, as stated by the user",
            UNSTATED: "input nobody described",
            SINGLE_BATCH: "train_on_batch",
            LEGACY: "a model saved before the ledger (conservative)",
        }[self.source]
        if self.sampling == POISSON:
            how = f"Poisson q={self.sampling_probability:.4g}"
        elif self.updates_per_pass == 1:
            how = "each update an unamplified Gaussian mechanism"
        else:
            how = (f"passes of {self.updates_per_pass} updates, at most "
                   f"{self.passes} per example")
        limit = (f", at most {self.row_limit} rows per update (checked)"
                 if self.row_limit is not None else "")
        return (f"{span} from {origin}: {how}, noise multiplier "
                f"{self.noise_multiplier:.4g}{limit}")


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
                    delta=delta, sampling="shuffle", participations=0,
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
                delta=delta, sampling="shuffle",
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
        root id in its first column and the format version; segments follow.
        """
        used = Ledger([s for s in self._segments if s.updates], root=self.root)
        ledger = used if len(used._segments) < rows else used.compacted(rows - 1)
        table = np.zeros((rows, len(_FIELDS)), np.float64)
        if not ledger._segments:
            return table  # nothing applied: all zeros, as a new model's
        table[0, 0], table[0, 1] = ledger.root, 1.0  # format version 1
        for i, s in enumerate(ledger._segments, start=1):
            table[i] = [
                s.segment_id, _SAMPLING_CODES.index(s.sampling) + 1,
                SOURCES.index(s.source), s.noise_multiplier,
                s.sampling_probability or 0.0, s.updates_per_pass or 0,
                s.pass_offset, s.updates, s.first_noise_index, s.noise_key,
                s.overflow_probability,
                -1 if s.num_examples is None else s.num_examples,
                -1 if s.row_limit is None else s.row_limit,
                float(s.stated_poisson)]
        return table

    @classmethod
    def from_table(cls, table):
        """The ledger saved by `to_table`.

        Raises:
          ValueError: the array is not a ledger table.
        """
        table = np.asarray(table, np.float64)
        if table.ndim != 2 or table.shape[1] != len(_FIELDS) or table.shape[0] < 1:
            raise ValueError(f"Not a ledger table: shape {table.shape}.")
        if not table.any():
            return cls(root=None)
        if table[0, 1] != 1.0:
            raise ValueError(f"Unknown ledger table format {table[0, 1]!r}.")
        segments = []
        for row in table[1:]:
            if row[0] == 0:
                continue
            sampling = _SAMPLING_CODES[int(row[1]) - 1]
            segments.append(Segment(
                segment_id=int(row[0]), sampling=sampling,
                source=SOURCES[int(row[2])], noise_multiplier=float(row[3]),
                sampling_probability=float(row[4]) if sampling == POISSON else None,
                updates_per_pass=int(row[5]) if sampling == PASSES else None,
                pass_offset=int(row[6]), updates=int(row[7]),
                first_noise_index=int(row[8]), noise_key=int(row[9]),
                overflow_probability=float(row[10]),
                num_examples=None if row[11] < 0 else int(row[11]),
                row_limit=None if row[12] < 0 else int(row[12]),
                stated_poisson=bool(row[13])))
        return cls(segments, root=int(table[0, 0]))

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
