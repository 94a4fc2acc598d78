"""What sampling a `fit` call's input really has, and what the ledger records for it.

A privacy statement is true only if its sampling assumption is how the
batches were really drawn. `DPTraining.fit` therefore resolves, for every
call, how it is fed (`Feeding`), refuses input that would break the
accounting, and opens a segment of the privacy ledger (`tf_dpfair.privacy.ledger`)
that says how this call's updates are accounted (`Feeding.segment`):

- the package's pipeline (`tf_dpfair.data.make_train_dataset`, given to
  `fit` as the `TrainData` or its `dataset`): Poisson with the spec's q, or
  shuffled passes of `steps_per_epoch` updates starting `start_step` into the
  pipeline. A pass entered in its middle by a new fit counts as a new one,
  because the model cannot check that a resumed pipeline uses the same
  secret permutation (resume at a pass boundary to avoid it);
- numpy arrays (or tensors): Keras shuffles N examples into fixed batches of
  B rows (`batch_size`; without it ceil(N / steps_per_epoch) with
  `steps_per_epoch`, else 32, as Keras does), a fresh permutation at the
  start of every `fit` call and every ceil(N/B) updates;
- any other input the user states is shuffled (`PrivacyLogger(sampling=
  "shuffle", num_examples=N)`): passes of N // B updates, the count of a
  pipeline that drops the last partial batch (one that keeps it has more
  updates per pass, so this never undercounts); stated Poisson: q = B / N on
  the user's word;
- input nobody described: every update may hold any example.

Observed, not declared: each segment carries the most rows of weight > 0 an
update may hold under its accounting (B for shuffled batches and arrays, the
padded batch of the package's Poisson pipeline, a binomial tail bound for a
stated Poisson pipeline), and the DP step refuses a batch with more before
applying it.

The pipeline's tag is in `tf_dpfair.privacy.pipeline_tag`; which input is
arrays, and its N, `tf_dpfair.training.fitting` works out (with TensorFlow)
and passes to `resolve`.
"""

import dataclasses
import math

from tf_dpfair.privacy import ledger
from tf_dpfair.privacy import sampling
# Importable from here, as before they had modules of their own.
from tf_dpfair.privacy.pipeline_tag import (  # noqa: F401 (re-exported)
    PipelineTag, pipeline_tag, tag_pipeline)
from tf_dpfair.privacy.sampling import POISSON, SHUFFLE

# What a fit call is given.
PIPELINE = "pipeline"
ARRAYS = "arrays"
OTHER = "other"

# Sampling nobody stated.
UNKNOWN_SAMPLING = "unknown"


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


# A stated Poisson batch above this tail probability refutes the statement.
STATED_POISSON_TAIL = 1e-9


@dataclasses.dataclass(frozen=True)
class Feeding:
    """How one `fit` call is fed.

    Attributes:
      kind: "pipeline", "arrays" or "other".
      sampling: how this call's batches are accounted: "poisson", "shuffle",
        or "unknown" (nobody stated it).
      num_examples: N where known (pipeline, arrays, or stated), else None.
      batch_size: rows per batch for arrays; the expected batch otherwise.
      spec: the pipeline's `SamplingSpec` (pipeline, or stated), else None.
      start_update: the model's update count when the call began.
      start_step: pipeline index of the call's first batch (pipeline only).
      stated_poisson: Poisson rests on the user's word, not on the pipeline.
    """

    kind: str
    sampling: str
    num_examples: int | None
    batch_size: int
    spec: object = None
    start_update: int = 0
    start_step: int | None = None
    stated_poisson: bool = False

    def segment(self, noise_multiplier):
        """What the ledger records for this call's updates.

        Args:
          noise_multiplier: the `DPConfig`'s sigma.

        Returns:
          `(fields, row_limit, reason)`: `ledger.Segment` fields, the most
          rows of weight > 0 an update may hold (None: no limit), and one
          sentence saying what that limit rests on.
        """
        source = {PIPELINE: ledger.PIPELINE, ARRAYS: ledger.ARRAYS}.get(
            self.kind, ledger.STATED)
        if self.sampling == UNKNOWN_SAMPLING:
            return ({"sampling": ledger.PASSES, "source": ledger.UNSTATED,
                     "noise_multiplier": noise_multiplier, "updates_per_pass": 1,
                     "num_examples": self.num_examples}, None,
                    "Nobody stated how this input draws its batches.")
        common = {"source": source, "noise_multiplier": noise_multiplier,
                  "num_examples": self.num_examples,
                  "stated_poisson": self.stated_poisson}
        spec = self.spec
        if self.sampling == POISSON:
            q = (spec.sampling_probability if spec is not None
                 else self.batch_size / self.num_examples)
            overflow = (spec.overflow_probability
                        if spec is not None and self.kind == PIPELINE else 0.0)
            if spec is not None:
                limit = spec.padded_batch_size
                reason = (f"Poisson batches of this pipeline hold at most "
                          f"{limit} rows (its padded batch size).")
            elif self.kind == ARRAYS:
                limit = self.batch_size
                reason = (f"Keras batches these arrays {limit} rows at a time.")
            else:
                limit = poisson_row_cap(self.num_examples, q)
                reason = (f"A Poisson sample at q={q:.4g} from N="
                          f"{self.num_examples} holds more than {limit} "
                          f"examples with probability below "
                          f"{STATED_POISSON_TAIL:g}: a larger batch refutes "
                          f"the stated Poisson sampling (check num_examples "
                          f"and DPConfig.expected_batch_size).")
            return ({"sampling": ledger.POISSON, "sampling_probability": q,
                     "overflow_probability": overflow, **common}, limit, reason)
        if self.kind == PIPELINE:
            per_pass = spec.steps_per_epoch
            offset = self.start_step % per_pass
            limit = spec.expected_batch_size
            reason = f"The pipeline's shuffled batches hold {limit} rows."
        elif self.kind == ARRAYS:
            per_pass = math.ceil(self.num_examples / self.batch_size)
            offset, limit = 0, self.batch_size
            reason = (f"Keras batches these arrays {limit} rows at a time "
                      f"(batch_size, or ceil(N / steps_per_epoch) without it), "
                      f"so a pass over N={self.num_examples} takes {per_pass} "
                      f"updates.")
        else:
            limit = spec.expected_batch_size if spec is not None else self.batch_size
            per_pass = max(1, self.num_examples // limit)
            offset = 0
            reason = (f"Shuffled batches were stated for N={self.num_examples}; "
                      f"they are accounted as passes of {per_pass} updates of "
                      f"at most {limit} rows (DPConfig.expected_batch_size or "
                      f"the stated spec's batch). Make the pipeline's batches "
                      f"that size, or state its real batch size.")
        return ({"sampling": ledger.PASSES, "updates_per_pass": per_pass,
                 "pass_offset": offset, **common}, limit, reason)

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
        elif self.sampling == UNKNOWN_SAMPLING:
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


def planned_ledger(spec, steps, noise_multiplier):
    """The ledger a fit of `steps` updates of the package's pipeline would hold.

    For the privacy calculator: one segment, from the pipeline's first
    update, accounted exactly as `fit` would account it.

    Args:
      spec: the pipeline's `SamplingSpec`.
      steps: updates, >= 0.
      noise_multiplier: sigma.

    Returns:
      A `ledger.Ledger`.
    """
    fed = Feeding(PIPELINE, spec.accounting_sampling, spec.num_examples,
                  spec.expected_batch_size, spec=spec, start_step=0,
                  stated_poisson=spec.accept_shuffle_as_poisson)
    fields, row_limit, _ = fed.segment(noise_multiplier)
    planned = ledger.Ledger()
    segment = planned.append(row_limit=row_limit, **fields)
    planned.record(segment.segment_id, int(steps))
    return planned


def poisson_row_cap(num_examples, q):
    """Rows a Poisson sample of N+1 examples at rate q exceeds w.p. < 1e-9."""
    return sampling.poisson_cap(num_examples, q, 1, STATED_POISSON_TAIL)[0]


def prospective(stated, *, expected_batch_size, update_count):
    """The `Feeding` the next `fit` would get from `stated`, before it runs.

    For a statement before training continues (e.g. whether a restored run
    has budget left): the next `fit` is assumed to be fed as stated, starting
    at the model's update count.

    Args:
      stated: the `StatedSampling` of a `PrivacyLogger`.
      expected_batch_size: `DPConfig.expected_batch_size`.
      update_count: the model's update count.

    Returns:
      A `Feeding`, or None when nothing was stated.
    """
    if stated.spec is not None:
        spec = stated.spec
        return Feeding(PIPELINE, spec.accounting_sampling, spec.num_examples,
                       spec.expected_batch_size, spec=spec,
                       start_update=int(update_count),
                       start_step=int(update_count),
                       stated_poisson=spec.accept_shuffle_as_poisson)
    if stated.sampling is None or stated.num_examples is None:
        return None
    return Feeding(OTHER, stated.sampling, stated.num_examples,
                   expected_batch_size, start_update=int(update_count),
                   stated_poisson=stated.sampling == POISSON)


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


def resolve(*, x, batch_size, epochs, initial_epoch, steps_per_epoch,
            expected_batch_size, update_count, array_examples=None, stated=()):
    """The `Feeding` of one `fit` call, refusing input that would break accounting.

    Args:
      x: `fit`'s `x` (a `TrainData` is unpacked by the caller).
      batch_size, epochs, initial_epoch, steps_per_epoch: `fit`'s arguments
        (steps_per_epoch already defaulted for pipelines).
      expected_batch_size: `DPConfig.expected_batch_size`.
      update_count: the model's update count.
      array_examples: when `x` is input that Keras batches itself (arrays,
        tensors, lists), the number of examples Keras trains on (after
        `validation_split`); None for any other input. The caller works it
        out, with TensorFlow (`tf_dpfair.training.fitting`).
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
    common = dict(start_update=int(update_count))
    tag = pipeline_tag(x)
    if tag is not None:
        return _pipeline_feeding(tag, said, epochs, initial_epoch,
                                 steps_per_epoch, expected_batch_size, common)
    if said.spec is not None:
        spec = said.spec
        _check_spec_batch(spec, expected_batch_size)
        if array_examples is not None:
            raise ValueError(
                "A SamplingSpec was given, but fit got arrays that Keras "
                "batches itself, so the batches were not drawn by that spec. "
                "Feed fit the TrainData of tf_dpfair.data.make_train_dataset.")
        poisson = spec.accounting_sampling == POISSON
        return Feeding(OTHER, POISSON if poisson else SHUFFLE,
                       spec.num_examples, spec.expected_batch_size, spec=spec,
                       stated_poisson=poisson, **common)
    if array_examples is not None:
        num = int(array_examples)
        rows = keras_batch_size(num, batch_size, steps_per_epoch)
        if said.num_examples is not None and said.num_examples != num:
            raise ValueError(
                f"num_examples={said.num_examples} was stated, but fit trains "
                f"on {num} examples of the arrays it was given.")
        if said.sampling == POISSON and not said.accept_shuffle_as_poisson:
            raise ValueError(
                "fit got arrays with batch_size: Keras shuffles them into "
                "fixed-size batches, which are not Poisson samples, so the "
                "Poisson statement (amplification by subsampling) would not "
                "hold. Feed fit "
                "tf_dpfair.data.make_train_dataset(..., mode='poisson') "
                "to get Poisson sampling, drop sampling='poisson' to be "
                "accounted as shuffled batches, or pass "
                "accept_shuffle_as_poisson=True to accept a heuristic, "
                "unproven statement.")
        poisson = said.sampling == POISSON
        return Feeding(ARRAYS, POISSON if poisson else SHUFFLE, num, rows,
                       stated_poisson=poisson, **common)
    if said.sampling is None:
        return Feeding(OTHER, UNKNOWN_SAMPLING, said.num_examples, expected_batch_size,
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
            f"does not allow for. Build it with "
            f"tf_dpfair.data.make_train_dataset(..., "
            f"start_step=model.update_count), or let "
            f"tf_dpfair.training.checkpoints.fit_resumable do it.")
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


def keras_batch_size(num_examples, batch_size, steps_per_epoch):
    """The rows per batch Keras cuts arrays into (Keras 3.15's array adapter).

    `batch_size` if given; else ceil(N / steps_per_epoch) with
    `steps_per_epoch`; else 32. The DP step refuses a batch larger than what
    this returns, so a change in Keras is caught, not mis-accounted.
    """
    if batch_size:
        return int(batch_size)
    if steps_per_epoch:
        return int(math.ceil(num_examples / steps_per_epoch))
    return 32
