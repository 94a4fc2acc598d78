"""`tf-dpfair-privacy`: the privacy statement of a planned DP-SGD run.

TF-Privacy's `compute_dp_sgd_privacy` answers "what epsilon do N examples,
batch B, E epochs and noise multiplier sigma give?", and `--target_epsilon`
answers the inverse ("which sigma keeps epsilon within the budget?"). This
command answers both for the run the package makes of those numbers:

    train = tf_dpfair.data.make_train_dataset(
        source, expected_batch_size=B, mode=SAMPLING, seed=SECRET)
    model.fit(train, epochs=E,
              callbacks=[tf_dpfair.callbacks.PrivacyLogger(delta=DELTA)])

It builds that pipeline's `SamplingSpec` (`sampling.make_sampling_spec`), so
an epoch has the pipeline's number of updates (Poisson: round(N / B);
shuffle: N // B, the last partial batch dropped) and a Poisson delta carries
the same allowance for truncated batches, and it prints the two lines that
`PrivacyLogger` prints at the end of that run: the
`accounting.PrivacyStatement` and the pipeline's sampling sentence.

Example:
  tf-dpfair-privacy --num_examples=60000 --batch_size=256 --epochs=60 \
      --noise_multiplier=1.1 --delta=1e-5 --sampling=poisson
"""

import argparse
import dataclasses
import logging
import math
import sys

from tf_dpfair.privacy import accounting
from tf_dpfair.privacy import input_sampling
from tf_dpfair.privacy import sampling
from tf_dpfair.privacy import search as search_privacy

PROG = "tf-dpfair-privacy"

_SAMPLING_HELP = (
    "Required, with no default: how the training pipeline draws each "
    "update's examples. 'poisson' (make_train_dataset(mode='poisson')): each "
    "example joins each update independently with q = B / N, and "
    "amplification by subsampling applies. 'shuffle' "
    "(make_train_dataset(mode='shuffle')): fixed batches from a fresh "
    "permutation per epoch, no amplification. Poisson's epsilon is far "
    "smaller (2.6 against 57 for TF-Privacy's MNIST example) and holds only "
    "for a pipeline that really samples that way, so it is never assumed "
    "unless asked for.")


@dataclasses.dataclass(frozen=True)
class PlannedRun:
    """The privacy of one planned run, as `plan` works it out.

    Attributes:
      spec: the `sampling.SamplingSpec` of the training pipeline.
      epochs: E, passes of `spec.steps_per_epoch` updates.
      steps: optimizer updates, `epochs * spec.steps_per_epoch`.
      noise_multiplier: sigma, as given or as calibrated.
      delta: the delta asked for; a Poisson statement's delta adds the
        allowance for truncated batches to it.
      target_epsilon: the budget sigma was calibrated for; None when sigma
        was given.
      statement: the `accounting.PrivacyStatement` that `PrivacyLogger`
        makes after `steps` updates of this pipeline (one trial's training,
        for a search).
      search: the `search_privacy.SearchStatement` of a private search of
        such runs, or None.
    """

    spec: sampling.SamplingSpec
    epochs: int
    steps: int
    noise_multiplier: float
    delta: float
    target_epsilon: float | None
    statement: accounting.PrivacyStatement
    search: object = None

    def lines(self):
        """The command's output, one string per line.

        The last two lines are, word for word, what `PrivacyLogger` prints at
        the end of the run ("Privacy: ..." and the sampling sentence).

        Returns:
          A list of str.
        """
        spec = self.spec
        if spec.mode == sampling.POISSON:
            rule = "round(N / B) under Poisson sampling"
        else:
            rule = "N // B fixed batches, the last partial batch dropped"
        out = []
        if self.target_epsilon is not None and self.search is not None:
            out.append(
                f"Noise multiplier: {self.noise_multiplier:.4f} per trial, the "
                f"smallest (rounded up to 4 decimals) that keeps the whole "
                f"search's epsilon <= {self.target_epsilon:g}; pass "
                f"DPConfig(noise_multiplier={self.noise_multiplier:.4f}) to "
                f"every trial.")
        elif self.target_epsilon is not None:
            out.append(
                f"Noise multiplier: {self.noise_multiplier:.4f}, the smallest "
                f"(rounded up to 4 decimals) that keeps epsilon <= "
                f"{self.target_epsilon:g}; pass "
                f"DPConfig(noise_multiplier={self.noise_multiplier:.4f}).")
        out.append(f"Updates: {self.epochs} epochs x {spec.steps_per_epoch} "
                   f"updates per epoch ({rule}) = {self.steps}.")
        if self.delta >= 1.0 / spec.num_examples:
            # The same warning PrivacyLogger gives when training starts.
            out.append(f"Warning: delta={self.delta} >= "
                       f"1/N={1 / spec.num_examples:.3g}: a guarantee this "
                       f"weak allows releasing an example outright.")
        out.append(f"Privacy: {self.statement}")
        out.append(spec.statement())
        if self.search is not None:
            out.append(f"Search: {self.search}")
        return out


def statement_for(spec, steps, *, noise_multiplier, delta, accountant="rdp"):
    """The statement `PrivacyLogger` makes after `steps` updates of `spec`.

    Args:
      spec: a `sampling.SamplingSpec`.
      steps: updates from the pipeline's first one, >= 0.
      noise_multiplier: sigma, >= 0.
      delta: delta of the Poisson (or shuffle) mechanism, in (0, 1).
      accountant: "rdp" or "pld".

    Returns:
      An `accounting.PrivacyStatement`; under Poisson sampling its delta
      includes `spec.delta_overhead` for truncated batches, as training's
      does.

    Raises:
      ValueError: an argument is out of range.
    """
    spec.accountant_kwargs(steps)  # refuses a negative or fractional count
    # The ledger that training would hold after `steps` updates of `spec`,
    # stated by the same code as PrivacyLogger's.
    return input_sampling.planned_ledger(spec, steps, noise_multiplier).statement(
        delta, accountant)


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def plan(*, num_examples, batch_size, epochs, delta, sampling_mode,
         noise_multiplier=None, target_epsilon=None, accountant="rdp",
         microbatch_size=1, num_replicas=1,
         max_overflow_probability=sampling.DEFAULT_MAX_OVERFLOW_PROBABILITY,
         trials=None, score_noise_multiplier=None, public_validation=False):
    """Works out the privacy of E epochs of the package's pipeline.

    With `trials`, of a private hyperparameter search of such runs
    (`search_privacy`): K trials drawn from `trials`, each one run and the
    private release of its selection score, only the best released. Then
    `target_epsilon` is the budget of the whole search, and sigma the
    per-trial noise that keeps it.

    Exactly one of `noise_multiplier` and `target_epsilon` is given. With
    `target_epsilon`, sigma is calibrated (`accounting.calibrate_noise_multiplier`,
    at `delta`) and rounded up to 4 decimals, so that the printed sigma,
    passed to `DPConfig`, keeps epsilon within the budget.

    >>> run = plan(num_examples=1000, batch_size=300, epochs=10,
    ...            noise_multiplier=1.0, delta=1e-5, sampling_mode="shuffle")
    >>> run.steps, run.statement.participations, round(run.statement.epsilon, 2)
    (30, 10, 19.05)

    Args:
      num_examples: N, training examples.
      batch_size: B, the expected (Poisson) or fixed (shuffle) logical batch,
        1 <= B <= N.
      epochs: E >= 1, as in `fit(train, epochs=E)`.
      delta: delta in (0, 1); 1/N or smaller is customary.
      sampling_mode: "poisson" or "shuffle", the pipeline's `mode`.
      noise_multiplier: sigma >= 0, or None with `target_epsilon`.
      target_epsilon: epsilon budget > 0, or None with `noise_multiplier`.
      accountant: "rdp" or "pld".
      microbatch_size, num_replicas, max_overflow_probability: as given to
        `make_train_dataset`; under Poisson sampling they set the padded
        batch and so delta's allowance for truncated batches.
      trials: a `search_privacy.TrialCount`, or None for one run.
      score_noise_multiplier: with `trials`: the Gaussian noise of each
        trial's selection score (a count of correct validation predictions).
      public_validation: with `trials`: the validation data is declared
        public instead, and its score costs nothing.

    Returns:
      A `PlannedRun`.

    Raises:
      ValueError: an argument is missing, out of range or contradicts
        another, or no sigma up to 1e4 meets `target_epsilon`.
    """
    if sampling_mode not in sampling.MODES:
        raise ValueError(f"sampling must be one of {sampling.MODES}, got "
                         f"{sampling_mode!r}.")
    if (noise_multiplier is None) == (target_epsilon is None):
        raise ValueError("Give exactly one of noise_multiplier (to get "
                         "epsilon) and target_epsilon (to get the noise "
                         "multiplier).")
    _positive_int("num_examples", num_examples)
    _positive_int("batch_size", batch_size)
    _positive_int("epochs", epochs)
    if batch_size > num_examples:
        raise ValueError(f"batch_size={batch_size} is larger than "
                         f"num_examples={num_examples}.")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}.")
    if noise_multiplier is not None and not noise_multiplier >= 0:
        raise ValueError(f"noise_multiplier must be >= 0, got "
                         f"{noise_multiplier}.")
    spec = sampling.make_sampling_spec(
        sampling_mode, num_examples, batch_size,
        microbatch_size=microbatch_size, num_replicas=num_replicas,
        max_overflow_probability=max_overflow_probability)
    steps = epochs * spec.steps_per_epoch
    if trials is not None:
        return _plan_search(spec, epochs, steps, delta, noise_multiplier,
                            target_epsilon, accountant, trials,
                            score_noise_multiplier, public_validation)
    if target_epsilon is not None:
        sigma = accounting.calibrate_noise_multiplier(
            target_epsilon=target_epsilon, delta=delta, accountant=accountant,
            tolerance=1e-5, **spec.accountant_kwargs(steps))
        # Epsilon falls as sigma grows: rounding up keeps the budget, and
        # the bisection's 1e-5 keeps the rounded sigma within 1e-4 + 1e-5
        # of the smallest one.
        noise_multiplier = math.ceil(round(sigma * 1e4, 6)) / 1e4
    statement = statement_for(spec, steps, noise_multiplier=noise_multiplier,
                              delta=delta, accountant=accountant)
    return PlannedRun(spec=spec, epochs=epochs, steps=steps,
                      noise_multiplier=float(noise_multiplier),
                      delta=float(delta), target_epsilon=target_epsilon,
                      statement=statement)


def _plan_search(spec, epochs, steps, delta, noise_multiplier, target_epsilon,
                 accountant, trials, score_noise_multiplier, public_validation):
    """`plan` for a private search: per-trial sigma or the search's epsilon."""
    if accountant != "rdp":
        raise ValueError("A search is accounted with the RDP accountant "
                         "(Papernot & Steinke's theorem is stated in RDP); "
                         "use --accountant=rdp.")

    def trial(sigma):
        return search_privacy.trial_event(
            input_sampling.planned_ledger(spec, steps, sigma).dp_event(),
            score_noise_multiplier, public_validation=public_validation)

    if target_epsilon is not None:
        sigma = search_privacy.calibrate_trial_noise(
            target_epsilon=target_epsilon, trials=trials, delta=delta,
            make_training_event=lambda s: input_sampling.planned_ledger(
                spec, steps, s).dp_event(),
            score_noise_multiplier=score_noise_multiplier,
            public_validation=public_validation, tolerance=1e-5)
        noise_multiplier = math.ceil(round(sigma * 1e4, 6)) / 1e4
    truncated = -math.expm1(steps * math.log1p(-spec.overflow_probability))
    search = search_privacy.search_statement(
        trial(noise_multiplier), trials, delta,
        public_validation=public_validation, truncation_probability=truncated)
    return PlannedRun(
        spec=spec, epochs=epochs, steps=steps,
        noise_multiplier=float(noise_multiplier), delta=float(delta),
        target_epsilon=target_epsilon,
        statement=statement_for(spec, steps, noise_multiplier=noise_multiplier,
                                delta=delta, accountant=accountant),
        search=search)


def make_parser():
    """The command-line parser of `tf-dpfair-privacy`.

    Returns:
      An `argparse.ArgumentParser`.
    """
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Prints the (epsilon, delta) statement, with its assumptions, of "
            "E epochs of DP-SGD on the package's pipeline "
            "(model.fit(tf_dpfair.data.make_train_dataset(...), epochs=E) "
            "with a PrivacyLogger): the lines the logger prints at the end "
            "of that run. With --target_epsilon instead of "
            "--noise_multiplier, finds the noise multiplier for the budget."),
        epilog=("Example: %(prog)s --num_examples=60000 --batch_size=256 "
                "--epochs=60 --noise_multiplier=1.1 --delta=1e-5 "
                "--sampling=poisson"))
    parser.add_argument("--num_examples", type=int, required=True,
                        help="N, the number of training examples.")
    parser.add_argument("--batch_size", type=int, required=True,
                        help="B, the logical batch of one update (expected "
                             "size under Poisson sampling).")
    parser.add_argument("--epochs", type=int, required=True,
                        help="E, epochs of fit; an epoch is round(N / B) "
                             "updates under Poisson sampling and N // B "
                             "under shuffle, as in the pipeline.")
    noise = parser.add_mutually_exclusive_group(required=True)
    noise.add_argument("--noise_multiplier", type=float,
                       help="sigma: noise stddev / clip norm. Prints epsilon.")
    noise.add_argument("--target_epsilon", type=float,
                       help="An epsilon budget. Prints the smallest noise "
                            "multiplier that keeps it, and its statement.")
    parser.add_argument("--delta", type=float, required=True,
                        help="delta; 1/N or smaller is customary. Under "
                             "Poisson sampling the statement adds the "
                             "pipeline's allowance for truncated batches.")
    parser.add_argument("--sampling", choices=sampling.MODES, required=True,
                        help=_SAMPLING_HELP)
    parser.add_argument("--accountant", choices=accounting.ACCOUNTANTS,
                        default="rdp",
                        help="'rdp' (TF-Privacy's, the default, as in "
                             "PrivacyLogger) or 'pld' (tighter).")
    parser.add_argument("--microbatch_size", type=int, default=1,
                        help="make_train_dataset's microbatch_size (Poisson: "
                             "sets the padded batch, hence delta's allowance).")
    parser.add_argument("--num_replicas", type=int, default=1,
                        help="make_train_dataset's num_replicas (likewise).")
    parser.add_argument("--max_overflow_probability", type=float,
                        default=sampling.DEFAULT_MAX_OVERFLOW_PROBABILITY,
                        help="make_train_dataset's max_overflow_probability "
                             "(likewise).")
    search = parser.add_argument_group(
        "private hyperparameter search",
        "The privacy of a search of such runs (Papernot & Steinke 2022): a "
        "random number K of trials, each run with hyperparameters drawn at "
        "random and its selection score released with noise, only the best "
        "released. --target_epsilon is then the whole search's budget.")
    search.add_argument("--search_trials", choices=search_privacy.DISTRIBUTIONS,
                        help="The distribution of K. A fixed K is not covered "
                             "by the theorem.")
    search.add_argument("--search_mean", type=float,
                        help="E[K], the expected number of trials (>= 1).")
    search.add_argument("--search_shape", type=float,
                        help="truncated_negative_binomial's shape eta >= 0 "
                             "(0 logarithmic, 1 geometric).")
    score = search.add_mutually_exclusive_group()
    score.add_argument("--score_noise", type=float,
                       help="Noise multiplier of each trial's selection "
                            "score (a noisy count of correct validation "
                            "predictions, sensitivity 1).")
    score.add_argument("--public_validation", action="store_true",
                       help="The validation data is public: the score costs "
                            "nothing (the statement says so).")
    return parser


class _DropAccountantNoise(logging.Filter):
    """Drops dp_accounting's per-order convergence warnings (one per RDP order)."""

    def filter(self, record):
        return "failed to converge" not in record.getMessage()


def main(argv=None):
    """Runs the command: parses `argv`, prints the statement.

    Args:
      argv: arguments without the program name (default: `sys.argv[1:]`).

    Returns:
      0. Bad arguments exit with status 2 and a message on stderr.
    """
    parser = make_parser()
    args = parser.parse_args(argv)
    logging.getLogger("absl").addFilter(_DropAccountantNoise())
    trials = None
    try:
        if args.search_trials is not None:
            if args.search_mean is None:
                raise ValueError("--search_trials needs --search_mean.")
            trials = search_privacy.TrialCount(
                args.search_trials, args.search_mean, args.search_shape)
        elif (args.search_mean, args.search_shape, args.score_noise) != (
                None, None, None) or args.public_validation:
            raise ValueError("The search flags go with --search_trials.")
        run = plan(num_examples=args.num_examples, batch_size=args.batch_size,
                   epochs=args.epochs, delta=args.delta,
                   sampling_mode=args.sampling,
                   noise_multiplier=args.noise_multiplier,
                   target_epsilon=args.target_epsilon,
                   accountant=args.accountant,
                   microbatch_size=args.microbatch_size,
                   num_replicas=args.num_replicas,
                   max_overflow_probability=args.max_overflow_probability,
                   trials=trials, score_noise_multiplier=args.score_noise,
                   public_validation=args.public_validation)
    except ValueError as error:
        parser.error(str(error))
    print("\n".join(run.lines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
