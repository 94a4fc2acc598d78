"""One run of DP updates with one accounting (`Segment`), and its ids.

The record the privacy ledger (`tf_dpfair.privacy.ledger`) is a list of:
how a run of consecutive updates was sampled (Poisson with rate q, or
passes over the data), where that sampling comes from (`SOURCES`: how
much of it the package checked), its noise multiplier, the noise stream's
(non-secret) key id and the noise index of its first update. Its
`dp_event` is what the accountant composes.

Ids are 52-bit integers, exact in the float64 table the ledger is saved as
(`tf_dpfair.privacy.ledger_table`). No TensorFlow here.
"""

import dataclasses
import hashlib
import secrets

import dp_accounting

from tf_dpfair.privacy.sampling import POISSON

# Updates accounted as passes over the data (the other kind is POISSON).
PASSES = "passes"
SAMPLINGS = (POISSON, PASSES)

# Where a segment's sampling comes from: how much of it is checked.
PIPELINE = "pipeline"          # the package's own sampler (make_train_dataset)
ARRAYS = "arrays"              # numpy arrays Keras shuffles into fixed batches
STATED = "stated"              # a pipeline the package did not build, as stated by the user
UNSTATED = "unstated"          # nobody said how the batches were drawn
SINGLE_BATCH = "single_batch"  # train_on_batch
LEGACY = "legacy"              # a model saved before the ledger existed
SOURCES = (PIPELINE, ARRAYS, STATED, UNSTATED, SINGLE_BATCH, LEGACY)

# Values stored in a float64 table: ids and counts stay below 2**53.
ID_BITS = 52


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
    return (int.from_bytes(digest, "big") >> (64 - ID_BITS)) or 1


def new_id():
    """A fresh random segment or ledger id (52 bits, exact in float64)."""
    return secrets.randbits(ID_BITS) or 1


def derived_id(root, position):
    """The id of the segment at `position` of a ledger with id `root`.

    Derived, not random, so that workers that share the ledger's root (see
    `tf_dpfair.training.fitting`) give their segments the same ids.
    """
    digest = hashlib.blake2b(f"{root}:{position}".encode(), digest_size=8,
                             person=b"tfdpf-segment").digest()
    return (int.from_bytes(digest, "big") >> (64 - ID_BITS)) or 1


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
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {SAMPLINGS}, got "
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
