"""Empirical privacy audit: a lower bound on epsilon from one training run.

Method of Steinke, Nasr and Jagielski 2023, "Privacy Auditing with One (1)
Training Run" (NeurIPS 2023). m canaries (e.g. mislabelled or
out-of-distribution images) are each put into the training set
independently with probability 1/2. After training, every canary is scored
(minus its loss: a model tends to fit what it was trained on); the auditor
guesses "included" for the k highest scores and "excluded" for the k lowest,
and abstains on the rest. With r = 2k guesses of which v are right, if
training is (epsilon, delta)-DP then (their main theorem, approximate DP):

    P[V >= v] <= f(v) + 2 m delta max_{1 <= i <= v} (f(v - i) - f(v)) / i,
    f(u) = P[Binomial(r, e^eps / (1 + e^eps)) >= u],

over the inclusion coins and the training randomness. An epsilon for which
the right-hand side is below beta = 1 - confidence is rejected; the bound
reported is the largest rejected epsilon. For a correct DP implementation it
stays below the claimed epsilon (with the stated confidence); a bound above
the claim means the implementation or its accounting is wrong. Picking k
after seeing the scores would void the confidence, so every k of
`guess_counts` is tested at level beta / len(guess_counts) (Bonferroni) and
the largest bound is reported.

The audit is weak by design (few canaries, input-space canaries, the final
model only): a small bound does not show that the claimed epsilon is tight.
"""

import dataclasses
import math

import keras
import numpy as np
from scipy import stats

from tf_dpfair import callbacks
from tf_dpfair.data import pipeline


@dataclasses.dataclass(frozen=True)
class AuditResult:
    """The measured lower bound next to the claimed epsilon.

    Attributes:
      epsilon_lower_bound: epsilon that training exceeds with probability at
        least `confidence` (0 when nothing is rejected).
      claimed_epsilon: the accountant's epsilon for the run (inf without
        noise).
      delta: the delta of the claim, used by the bound.
      confidence: e.g. 0.95.
      num_canaries: m.
      num_included: canaries that were in the training set.
      num_guesses: r, guesses behind the reported bound.
      num_correct: v, correct guesses among them.
    """

    epsilon_lower_bound: float
    claimed_epsilon: float
    delta: float
    confidence: float
    num_canaries: int
    num_included: int
    num_guesses: int
    num_correct: int

    @property
    def consistent(self):
        """True when the measured bound does not contradict the claim."""
        return self.epsilon_lower_bound <= self.claimed_epsilon

    def __str__(self):
        text = (f"Privacy audit (one run, Steinke et al. 2023): claimed "
                f"epsilon {self.claimed_epsilon:.4g} "
                f"(delta {self.delta:.3g}); "
                f"measured lower bound {self.epsilon_lower_bound:.4g} at "
                f"{self.confidence:.0%} confidence ({self.num_correct} of "
                f"{self.num_guesses} membership guesses right; "
                f"{self.num_canaries} canaries, {self.num_included} "
                f"included).")
        if not self.consistent:
            text += (" The lower bound EXCEEDS the claim: the training is "
                     "less private than stated.")
        return text


def p_value(epsilon, delta, num_canaries, num_guesses, num_correct):
    """Bound on P[at least `num_correct` right] under (epsilon, delta)-DP.

    Args:
      epsilon: the epsilon tested, >= 0.
      delta: its delta, in [0, 1].
      num_canaries: m, canaries included independently with probability 1/2.
      num_guesses: r, guesses made (the rest abstained).
      num_correct: v, right guesses.

    Returns:
      A float in [0, 1]; small values reject (epsilon, delta).

    Raises:
      ValueError: not 0 <= v <= r <= m, or epsilon/delta out of range.
    """
    m, r, v = num_canaries, num_guesses, num_correct
    if not 0 <= v <= r <= m:
        raise ValueError(f"Need 0 <= num_correct <= num_guesses <= "
                         f"num_canaries, got {v}, {r}, {m}.")
    if not (epsilon >= 0 and 0 <= delta <= 1):
        raise ValueError(f"Need epsilon >= 0 and delta in [0, 1], got "
                         f"{epsilon}, {delta}.")
    if v == 0:
        return 1.0
    p = 1.0 / (1.0 + math.exp(-epsilon)) if epsilon < 700 else 1.0
    tail = stats.binom.sf(v - 1, r, p)  # f(v)
    # f(v - i) - f(v) = P[v - i <= B < v]: cumulative pmf going down from v-1.
    below = np.cumsum(stats.binom.pmf(np.arange(v - 1, -1, -1), r, p))
    worst = np.max(below / np.arange(1, v + 1))
    return float(min(1.0, tail + 2 * m * delta * worst))


def epsilon_lower_bound(num_canaries, num_guesses, num_correct, *, delta=0.0,
                        confidence=0.95):
    """The largest epsilon rejected at `confidence` by the one-run test.

    Args:
      num_canaries: m.
      num_guesses: r.
      num_correct: v.
      delta: the delta of the DP claim being audited.
      confidence: 1 - beta, in (0, 1).

    Returns:
      The lower bound on epsilon (0 if even epsilon = 0 is not rejected).

    Raises:
      ValueError: bad counts or confidence.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}.")
    beta = 1 - confidence

    def rejected(eps):
        return p_value(eps, delta, num_canaries, num_guesses,
                       num_correct) < beta

    if not rejected(0.0):
        return 0.0
    low, high = 0.0, 1.0
    while rejected(high):
        low, high = high, 2 * high
        if high > 1e3:
            return math.inf
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if rejected(mid) else (low, mid)
    return low


def count_correct(scores, included, k):
    """Guesses "in" for the k highest scores, "out" for the k lowest.

    Args:
      scores: float [m], higher = more likely included.
      included: bool [m], the truth.
      k: guesses on each side (2k <= m).

    Returns:
      (num_guesses, num_correct).
    """
    order = np.argsort(scores, kind="stable")
    included = np.asarray(included, bool)
    right = int(np.sum(included[order[len(order) - k:]]))
    right += int(np.sum(~included[order[:k]]))
    return 2 * k, right


def audit_scores(scores, included, *, claimed_epsilon, delta, confidence=0.95,
                 guess_counts=None):
    """Turns canary scores into an `AuditResult`.

    Args:
      scores: float [m], higher = more likely included (e.g. minus the loss).
      included: bool [m], which canaries were trained on.
      claimed_epsilon: the epsilon the run claims.
      delta: the delta of the claim.
      confidence: of the lower bound, split over `guess_counts`.
      guess_counts: guesses per side to try; default m/20, m/10, m/4, m/2.

    Returns:
      An `AuditResult` with the largest bound over `guess_counts`.

    Raises:
      ValueError: shapes differ, or a guess count is not in [1, m/2].
    """
    scores = np.asarray(scores, np.float64)
    included = np.asarray(included, bool)
    m = len(scores)
    if included.shape != scores.shape or scores.ndim != 1:
        raise ValueError(f"scores and included must both be [m]; got "
                         f"{scores.shape} and {included.shape}.")
    if guess_counts is None:
        guess_counts = sorted({max(1, m // d) for d in (20, 10, 4, 2)})
    if any(not 1 <= k <= m // 2 for k in guess_counts):
        raise ValueError(f"guess counts must be in [1, {m // 2}], got "
                         f"{guess_counts}.")
    level = 1 - (1 - confidence) / len(guess_counts)
    best = None
    for k in guess_counts:
        r, v = count_correct(scores, included, k)
        bound = epsilon_lower_bound(m, r, v, delta=delta, confidence=level)
        if best is None or bound > best[0]:
            best = (bound, r, v)
    return AuditResult(epsilon_lower_bound=best[0],
                       claimed_epsilon=float(claimed_epsilon), delta=delta,
                       confidence=confidence, num_canaries=m,
                       num_included=int(included.sum()), num_guesses=best[1],
                       num_correct=best[2])


def loss_scores(model, x, y):
    """Minus each example's loss under `model` (its compiled loss).

    Args:
      model: a compiled Keras model.
      x: inputs [m, ...]; y: labels [m, ...].

    Returns:
      float64 [m]; higher = lower loss = guess "included".
    """
    predictions = model.predict(x, verbose=0)
    loss = model.loss
    # `call`: the unreduced, unscaled loss of each example.
    loss_fn = (loss.call if isinstance(loss, keras.losses.Loss)
               else keras.losses.get(loss))
    values = np.asarray(loss_fn(keras.ops.convert_to_tensor(y),
                                keras.ops.convert_to_tensor(predictions)))
    return -values.reshape(len(values), -1).mean(axis=1).astype(np.float64)


def run_audit(model, images, labels, canary_images, canary_labels, *,
              num_updates, delta, seed, confidence=0.95, guess_counts=None,
              verbose=0):
    """Trains `model` with canaries on the package pipeline and audits it.

    Each canary joins the training set with probability 1/2; the model
    trains for `num_updates` DP updates on Poisson batches (expected size
    `model.dp_config.expected_batch_size`); the claim is what
    `callbacks.PrivacyLogger` states for the run.

    Args:
      model: a fresh, compiled DPModel (noise, clip, batch in its config).
      images, labels: the ordinary training examples (`from_arrays` format).
      canary_images, canary_labels: the m canaries, same format.
      num_updates: DP updates to train.
      delta: target delta of the claim.
      seed: integer seed of the canary coins and the batch sampling.
      confidence, guess_counts: see `audit_scores`.
      verbose: passed to `fit`.

    Returns:
      An `AuditResult`; `str()` prints claim and measurement side by side.
    """
    rng = np.random.default_rng(seed)
    m = len(canary_images)
    included = rng.random(m) < 0.5
    train_images = np.concatenate([images, canary_images[included]])
    train_labels = np.concatenate([labels, canary_labels[included]])
    config = model.dp_config
    train = pipeline.make_train_dataset(
        pipeline.ExampleSource.from_arrays(train_images, train_labels),
        expected_batch_size=config.expected_batch_size,
        seed=int(rng.integers(2**62)), microbatch_size=config.microbatch_size)
    logger = callbacks.PrivacyLogger(delta=delta, sampling_spec=train.spec,
                                     verbose=verbose)
    model.fit(train.dataset, steps_per_epoch=num_updates, epochs=1,
              callbacks=[logger], verbose=verbose)
    claim = logger.statement()
    # Without noise the truncation allowance makes delta infinite too; the
    # bound is then taken at the nominal delta against an infinite claim.
    claim_delta = claim.delta if math.isfinite(claim.epsilon) else delta
    canary_x = pipeline.image_to_float(np.asarray(canary_images)).numpy()
    if canary_x.ndim == 3:
        canary_x = canary_x[..., np.newaxis]
    scores = loss_scores(model, canary_x, np.asarray(canary_labels))
    return audit_scores(scores, included, claimed_epsilon=claim.epsilon,
                        delta=claim_delta, confidence=confidence,
                        guess_counts=guess_counts)
