"""How `fit` was fed, and how many updates any one example can have joined.

A privacy statement is true only if its sampling assumption is how the
batches were really drawn. `DPTraining.fit` therefore records, for every
call, how it is fed (`Feeding`), and keeps a ledger in two model variables
that are saved with the model like the update count:

- `participations`: an upper bound on the number of updates any one example
  has taken part in, over every `fit` call of the model's life;
- `non_poisson_updates`: updates whose batch was not drawn by Poisson
  sampling.

A `fit` call of u updates adds to `participations`:

- the package's pipeline (`data.make_train_dataset`, given to `fit` as the
  `TrainData` or its `dataset`), shuffle mode, pipeline steps s .. s+u-1 with
  P updates per pass: the passes those steps touch, (s+u-1)//P - s//P + 1.
  A pass entered in its middle counts as a new one, because the model cannot
  check that a resumed pipeline uses the same secret permutation (resume at
  a pass boundary to avoid the extra participation);
- numpy arrays (or tensors) with `batch_size` B: Keras shuffles N examples
  into fixed batches, B rows each (the last one partial), with a fresh
  permutation at the start of every `fit` call and every ceil(N/B) updates:
  `accounting.epochs_started(u, ceil(N/B))`;
- any other input the user states is shuffled (`PrivacyLogger(sampling=
  "shuffle", num_examples=N)`): `epochs_started(u, N // B)`, the count of a
  pipeline that drops the last partial batch; one that keeps it has more
  updates per pass, so this never undercounts;
- Poisson-sampled batches (the package's pipeline in Poisson mode, or stated
  by the user) and input nobody described: u, since any update may hold any
  example.

The Poisson statement (amplification by subsampling) is made only while
every update of the model was Poisson-sampled; otherwise the accountant gets
the shuffle statement with `participations`. Input whose sampling nobody
stated (a user's own `tf.data` pipeline, a generator) still trains and still
moves the ledger, but `PrivacyLogger` refuses to make a statement for it.
"""

import dataclasses
import math

import keras

from tf_dpfair import accounting

PIPELINE = "pipeline"
ARRAYS = "arrays"
OTHER = "other"

POISSON = "poisson"
SHUFFLE = "shuffle"
UNKNOWN = "unknown"

# The attribute `data.make_train_dataset` sets on its dataset.
_TAG = "_tf_dpfair_pipeline"


@dataclasses.dataclass(frozen=True)
class PipelineTag:
    """What the package's pipeline knows about the dataset it built.

    Attributes:
      spec: the `sampling.SamplingSpec` the batches were drawn with.
      start_step: the pipeline index of the dataset's first batch.
      num_steps: batches in the dataset, or None for endless.
    """

    spec: object
    start_step: int
    num_steps: int | None


def tag_pipeline(dataset, spec, start_step, num_steps):
    """Marks `dataset` as drawn by the package's pipeline; returns it."""
    setattr(dataset, _TAG, PipelineTag(spec, int(start_step),
                                       None if num_steps is None else int(num_steps)))
    return dataset


def pipeline_tag(dataset):
    """The `PipelineTag` of a dataset built by `data.make_train_dataset`, or None."""
    return getattr(dataset, _TAG, None)


@dataclasses.dataclass(frozen=True)
class StatedSampling:
    """What a user states about how batches are drawn (from `PrivacyLogger`).

    Attributes:
      sampling: "poisson", "shuffle", or None (nothing stated).
      num_examples: N, or None.
      spec: a `SamplingSpec` the user passed, or None.
      accept_shuffle_as_poisson: the user accepts that shuffled batches are
        accounted as Poisson samples (a heuristic, not a proof).
    """

    sampling: str | None = None
    num_examples: int | None = None
    spec: object = None
    accept_shuffle_as_poisson: bool = False


@dataclasses.dataclass(frozen=True)
class Feeding:
    """How one `fit` call is fed, and the ledger when it began.

    Attributes:
      kind: "pipeline", "arrays" or "other".
      sampling: how this call's batches are accounted: "poisson", "shuffle",
        or "unknown" (nobody stated it).
      num_examples: N where known (pipeline, arrays, or stated), else None.
      batch_size: rows per batch for arrays; the expected batch otherwise.
      spec: the pipeline's `SamplingSpec` (pipeline, or stated), else None.
      start_update: the model's update count when the call began.
      start_step: pipeline index of the call's first batch (pipeline only).
      participations_before: the ledger's participations at the start.
      non_poisson_before: the ledger's non-Poisson updates at the start.
      stated_poisson: Poisson rests on the user's word, not on the pipeline.
    """

    kind: str
    sampling: str
    num_examples: int | None
    batch_size: int
    spec: object = None
    start_update: int = 0
    start_step: int | None = None
    participations_before: int = 0
    non_poisson_before: int = 0
    stated_poisson: bool = False

    def participations_after(self, updates):
        """The ledger's participations once the model has `updates` updates.

        Args:
          updates: the model's total update count, >= `start_update`.

        Returns:
          An int, an upper bound on the updates any one example joined.

        Raises:
          ValueError: `updates` is before the start of this call.
        """
        done = int(updates) - self.start_update
        if done < 0:
            raise ValueError(f"The ledger of this fit starts at update "
                             f"{self.start_update}; cannot account for "
                             f"{updates} updates.")
        return self.participations_before + self._passes(done)

    def non_poisson_after(self, updates):
        """The ledger's non-Poisson updates once the model has `updates`."""
        done = int(updates) - self.start_update
        extra = 0 if self.sampling == POISSON else done
        return self.non_poisson_before + extra

    def _passes(self, done):
        if done == 0:
            return 0
        if self.sampling in (POISSON, UNKNOWN):
            return done
        if self.kind == PIPELINE:
            per_pass = self.spec.steps_per_epoch
            first, last = self.start_step, self.start_step + done - 1
            return last // per_pass - first // per_pass + 1
        if self.kind == ARRAYS:
            return accounting.epochs_started(
                done, math.ceil(self.num_examples / self.batch_size))
        return accounting.epochs_started(done,
                                         self.num_examples // self.batch_size)

    @property
    def poisson_holds(self):
        """True when every update so far, and this call's, was Poisson-sampled."""
        return self.sampling == POISSON and self.non_poisson_before == 0

    def describe(self):
        """One sentence saying how this call's batches were drawn."""
        if self.kind == PIPELINE:
            return self.spec.statement()
        if self.kind == ARRAYS:
            text = (f"Batches: numpy arrays of N={self.num_examples} examples, "
                    f"shuffled by Keras into batches of {self.batch_size} "
                    f"(a new permutation every "
                    f"{math.ceil(self.num_examples / self.batch_size)} updates "
                    f"and at every fit call).")
        elif self.sampling == UNKNOWN:
            return ("Batches: an input pipeline the package did not build; "
                    "nobody stated how it draws examples.")
        else:
            text = (f"Batches: an input pipeline the package did not build, "
                    f"stated by the user to be {self.sampling}-sampled "
                    f"(N={self.num_examples}).")
        if self.stated_poisson:
            text += (" Accounted as Poisson on the user's word: the guarantee "
                     "holds only if every example entered each update "
                     "independently with probability q.")
        return text


def rebase(fed, *, update_count, participations, non_poisson_updates):
    """The `Feeding` of a call whose model was restored after fit had begun.

    `keras.callbacks.BackupAndRestore` loads weights (the update count and
    the ledger among them) when training begins. Keras then starts its input
    afresh, so for arrays and other input the ledger simply continues from
    the restored one. The package's pipeline was built for the old count; its
    batches would no longer match the restored one.

    Args:
      fed: the `Feeding` recorded when `fit` was called.
      update_count, participations, non_poisson_updates: the restored ledger.

    Returns:
      A `Feeding` starting at the restored count.

    Raises:
      ValueError: `fed` is the package's pipeline.
    """
    if fed.kind == PIPELINE:
        raise ValueError(
            f"The model's update count moved from {fed.start_update} to "
            f"{update_count} between the start of fit and its first step (a "
            f"callback restored weights?), so the pipeline, built to start at "
            f"update {fed.start_step}, would not match it. Restore before "
            f"calling fit and build the pipeline with "
            f"start_step=model.update_count (resume.fit_resumable does both).")
    return dataclasses.replace(
        fed, start_update=int(update_count),
        participations_before=int(participations),
        non_poisson_before=int(non_poisson_updates))


def prospective(stated, *, expected_batch_size, update_count, participations,
                non_poisson_updates):
    """The `Feeding` a model restored without a `fit` yet would get from `stated`.

    For a statement before training continues (e.g. whether a restored run
    has budget left): the next `fit` is assumed to be fed as stated, starting
    at the model's update count, with the model's ledger.

    Args:
      stated: the `StatedSampling` of a `PrivacyLogger`.
      expected_batch_size: `DPConfig.expected_batch_size`.
      update_count, participations, non_poisson_updates: the model's ledger.

    Returns:
      A `Feeding`, or None when nothing was stated.
    """
    common = dict(start_update=int(update_count),
                  participations_before=int(participations),
                  non_poisson_before=int(non_poisson_updates))
    if stated.spec is not None:
        spec = stated.spec
        return Feeding(PIPELINE, spec.accounting_sampling, spec.num_examples,
                       spec.expected_batch_size, spec=spec,
                       start_step=int(update_count),
                       stated_poisson=spec.accept_shuffle_as_poisson, **common)
    if stated.sampling is None or stated.num_examples is None:
        return None
    return Feeding(OTHER, stated.sampling, stated.num_examples,
                   expected_batch_size,
                   stated_poisson=stated.sampling == POISSON, **common)


def infer_num_examples(x, validation_split=0.0):
    """N of array input as Keras will train on it (after `validation_split`).

    Args:
      x: arrays, tensors, or a (nested) structure of them.
      validation_split: `fit`'s fraction of the data held out.

    Returns:
      An int.
    """
    import tensorflow as tf  # Only here: the rest of the module is plain Python.

    first = tf.nest.flatten(x)[0]
    total = int(first.shape[0]) if hasattr(first, "shape") else len(first)
    if validation_split:
        # Keras' own split (keras/src/trainers/data_adapters/array_slicing.py).
        return int(math.floor(total * (1.0 - validation_split)))
    return total


def is_array_input(x):
    """True for input that Keras batches itself (arrays, tensors, lists)."""
    import tensorflow as tf

    if x is None or isinstance(x, tf.data.Dataset):
        return False
    leaves = tf.nest.flatten(x)
    return bool(leaves) and all(
        hasattr(leaf, "shape") and hasattr(leaf, "dtype") and len(leaf.shape) > 0
        or isinstance(leaf, (list, tuple)) for leaf in leaves)


def _one_statement(stated):
    """Merges the statements of several callbacks; they must agree."""
    stated = [s for s in stated
              if s.sampling is not None or s.spec is not None
              or s.num_examples is not None]
    if not stated:
        return StatedSampling()
    first = stated[0]
    for other in stated[1:]:
        if other != first:
            raise ValueError(
                f"Two callbacks state different sampling for one fit: "
                f"{first} and {other}. State it once.")
    return first


def resolve(*, x, batch_size, validation_split, epochs, initial_epoch,
            steps_per_epoch, expected_batch_size, update_count,
            participations, non_poisson_updates, stated=()):
    """The `Feeding` of one `fit` call, refusing input that would break accounting.

    Args:
      x: `fit`'s `x` (a `TrainData` is unpacked by the caller).
      batch_size, validation_split, epochs, initial_epoch, steps_per_epoch:
        `fit`'s arguments (steps_per_epoch already defaulted for pipelines).
      expected_batch_size: `DPConfig.expected_batch_size`.
      update_count, participations, non_poisson_updates: the model's ledger.
      stated: `StatedSampling` of the callbacks of this call.

    Returns:
      A `Feeding`.

    Raises:
      ValueError: the input or the statements disagree with the accountant:
        a pipeline not started at the model's update count, a finite pipeline
        that Keras would replay, arrays stated as Poisson without
        `accept_shuffle_as_poisson`, a spec for a different batch size, N
        that disagrees with the data, or callbacks that disagree.
    """
    said = _one_statement(stated)
    common = dict(start_update=int(update_count),
                  participations_before=int(participations),
                  non_poisson_before=int(non_poisson_updates))
    tag = pipeline_tag(x)
    if tag is not None:
        return _pipeline_feeding(tag, said, epochs, initial_epoch,
                                 steps_per_epoch, expected_batch_size, common)
    if said.spec is not None:
        spec = said.spec
        _check_spec_batch(spec, expected_batch_size)
        if is_array_input(x):
            raise ValueError(
                "A SamplingSpec was given, but fit got arrays that Keras "
                "batches itself, so the batches were not drawn by that spec. "
                "Feed fit the TrainData of data.make_train_dataset.")
        poisson = spec.accounting_sampling == POISSON
        return Feeding(OTHER, POISSON if poisson else SHUFFLE,
                       spec.num_examples, spec.expected_batch_size, spec=spec,
                       stated_poisson=poisson, **common)
    if is_array_input(x):
        num = infer_num_examples(x, validation_split)
        rows = int(batch_size or 32)  # Keras' default batch size
        if said.num_examples is not None and said.num_examples != num:
            raise ValueError(
                f"num_examples={said.num_examples} was stated, but fit trains "
                f"on {num} examples of the arrays it was given.")
        if said.sampling == POISSON and not said.accept_shuffle_as_poisson:
            raise ValueError(
                "fit got arrays with batch_size: Keras shuffles them into "
                "fixed-size batches, which are not Poisson samples, so the "
                "Poisson statement (amplification by subsampling) would not "
                "hold. Feed fit data.make_train_dataset(..., mode='poisson') "
                "to get Poisson sampling, drop sampling='poisson' to be "
                "accounted as shuffled batches, or pass "
                "accept_shuffle_as_poisson=True to accept a heuristic, "
                "unproven statement.")
        poisson = said.sampling == POISSON
        return Feeding(ARRAYS, POISSON if poisson else SHUFFLE, num, rows,
                       stated_poisson=poisson, **common)
    if said.sampling is None:
        return Feeding(OTHER, UNKNOWN, said.num_examples, expected_batch_size,
                       **common)
    if said.num_examples is None:
        raise ValueError(f"sampling={said.sampling!r} needs num_examples, the "
                         f"number of training examples.")
    if expected_batch_size > said.num_examples:
        raise ValueError(
            f"expected_batch_size {expected_batch_size} is larger than "
            f"num_examples {said.num_examples}: the sampling rate would "
            f"exceed 1. Use a logical batch of at most {said.num_examples} "
            f"examples, or check num_examples.")
    return Feeding(OTHER, said.sampling, said.num_examples, expected_batch_size,
                   stated_poisson=said.sampling == POISSON, **common)


def _check_spec_batch(spec, expected_batch_size):
    if spec.expected_batch_size != expected_batch_size:
        raise ValueError(
            f"The pipeline samples batches of expected size "
            f"{spec.expected_batch_size} but DPConfig.expected_batch_size is "
            f"{expected_batch_size}: the noise would be calibrated to the "
            f"wrong batch. Make them equal.")


def _pipeline_feeding(tag, said, epochs, initial_epoch, steps_per_epoch,
                      expected_batch_size, common):
    spec = tag.spec
    _check_spec_batch(spec, expected_batch_size)
    if said.spec is not None and said.spec != spec:
        raise ValueError(
            "The sampling_spec given to the callback is not the spec of the "
            "pipeline given to fit. Pass the pipeline's own spec, or none: "
            "the model learns it from the pipeline.")
    if said.sampling is not None and said.sampling != spec.accounting_sampling:
        raise ValueError(
            f"sampling={said.sampling!r} was stated, but the pipeline given "
            f"to fit is accounted as {spec.accounting_sampling!r} "
            f"({spec.mode} mode). Drop the statement: the model learns it "
            f"from the pipeline.")
    if said.num_examples is not None and said.num_examples != spec.num_examples:
        raise ValueError(
            f"num_examples={said.num_examples} disagrees with the pipeline's "
            f"{spec.num_examples}; drop it: the model learns it from the "
            f"pipeline.")
    if tag.start_step != common["start_update"]:
        raise ValueError(
            f"The pipeline starts at update {tag.start_step} but the model "
            f"has applied {common['start_update']} updates: its batches "
            f"would repeat earlier ones (or skip some), which the accountant "
            f"does not allow for. Build it with data.make_train_dataset(..., "
            f"start_step=model.update_count), or let resume.fit_resumable "
            f"do it.")
    if tag.num_steps is not None:
        per_epoch = steps_per_epoch or tag.num_steps
        planned = (epochs - initial_epoch) * per_epoch
        if planned > tag.num_steps:
            raise ValueError(
                f"fit would run {planned} updates ({epochs - initial_epoch} "
                f"epochs of {per_epoch}) on a pipeline of {tag.num_steps} "
                f"batches: Keras would start it again and repeat batches, "
                f"which the accountant does not allow for. Build it with "
                f"num_steps=None (endless) or at least {planned}.")
    return Feeding(PIPELINE, spec.accounting_sampling, spec.num_examples,
                   spec.expected_batch_size, spec=spec,
                   start_step=tag.start_step,
                   stated_poisson=spec.accept_shuffle_as_poisson, **common)


class LedgerCallback(keras.callbacks.Callback):
    """Writes the accountant's ledger into the model after every step.

    `DPTraining.fit` puts it first among the callbacks, so checkpoints
    written at the end of a step (`ModelCheckpoint`, `resume.DPCheckpoint`)
    hold that step's ledger.
    """

    def on_train_batch_begin(self, batch, logs=None):
        self.model._sync_feeding(first_step=True)

    def _write(self):
        fed, count = self.model.feeding, self.model.update_count
        self.model._participations.assign(fed.participations_after(count))
        self.model._non_poisson_updates.assign(fed.non_poisson_after(count))

    def on_train_batch_end(self, batch, logs=None):
        self._write()

    def on_train_end(self, logs=None):
        self._write()  # `feeding` follows a restore even if no step ran
