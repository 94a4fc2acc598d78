"""Accounting of a private hyperparameter search (repeat and select).

Every expected figure comes from `dp_accounting`'s RDP accountant called
directly on `RepeatAndSelectDpEvent`, or from the definition of the
distribution of K.
"""

import math

import dp_accounting
import numpy as np
import pytest

from tf_dpfair.privacy import accounting
from tf_dpfair.privacy import search as search_privacy

DELTA = 1e-5


def training(sigma=1.1, steps=200, q=0.01):
    return accounting.dp_event(noise_multiplier=sigma, steps=steps,
                               sampling="poisson", sampling_probability=q)


def direct(event, delta=DELTA):
    acc = dp_accounting.rdp.RdpAccountant()
    acc.compose(event)
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("trials", [
    search_privacy.TrialCount("poisson", 10),
    search_privacy.TrialCount("poisson", 3.5),
    search_privacy.TrialCount("truncated_negative_binomial", 10, shape=0.0),
    search_privacy.TrialCount("truncated_negative_binomial", 10, shape=1.0),
    search_privacy.TrialCount("truncated_negative_binomial", 4, shape=0.5),
], ids=lambda t: t.describe())
def test_search_epsilon_is_dp_accountings_repeat_and_select(trials):
    trial = search_privacy.trial_event(training(), 20.0)
    statement = search_privacy.search_statement(trial, trials, DELTA)
    want = direct(dp_accounting.dp_event.RepeatAndSelectDpEvent(
        dp_accounting.ComposedDpEvent([training(), dp_accounting.GaussianDpEvent(20.0)]),
        trials.mean, math.inf if trials.distribution == "poisson" else trials.shape))
    assert statement.epsilon == pytest.approx(want, rel=1e-6)
    assert "whole search" in str(statement)


@pytest.mark.parametrize("sigma", [0.8, 1.1, 2.0])
@pytest.mark.parametrize("steps", [500, 2000])
@pytest.mark.parametrize("trials", [
    search_privacy.TrialCount("poisson", 8),
    search_privacy.TrialCount("truncated_negative_binomial", 8, shape=1.0),
    search_privacy.TrialCount("truncated_negative_binomial", 20, shape=0.0),
])
def test_search_costs_more_than_one_trial_and_less_than_naive_composition(
        sigma, steps, trials):
    trial = search_privacy.trial_event(training(sigma, steps), 30.0)
    statement = search_privacy.search_statement(trial, trials, DELTA)
    assert statement.trial_epsilon == pytest.approx(direct(trial), rel=1e-9)
    assert statement.naive_epsilon == pytest.approx(direct(
        dp_accounting.SelfComposedDpEvent(trial, math.ceil(trials.mean))), rel=1e-9)
    assert statement.trial_epsilon < statement.epsilon < statement.naive_epsilon


def test_for_very_private_trials_naive_composition_can_be_lower():
    # The repeat-and-select bound pays log(E[K]) and a tail term per order:
    # for trials of epsilon ~1-2 and E[K] = 8, composing 8 fixed trials is
    # tighter. That figure holds only for a fixed number of trials, which
    # the search gives up; the statement shows both.
    trial = search_privacy.trial_event(training(1.1, 50), 30.0)
    statement = search_privacy.search_statement(
        trial, search_privacy.TrialCount("poisson", 8), DELTA)
    assert statement.naive_epsilon < statement.epsilon
    assert statement.trial_epsilon < statement.naive_epsilon


def test_the_score_release_is_counted_unless_the_validation_data_is_public():
    trials = search_privacy.TrialCount("poisson", 5)
    scored = search_privacy.search_statement(
        search_privacy.trial_event(training(), 5.0), trials, DELTA)
    public = search_privacy.search_statement(
        search_privacy.trial_event(training(), public_validation=True), trials,
        DELTA, public_validation=True)
    assert public.epsilon < scored.epsilon
    assert "declared public" in str(public) and "declared public" not in str(scored)


def test_k_is_drawn_at_random_with_the_right_mean_and_again_with_the_same_seed():
    rng = np.random.default_rng(0)
    for trials, smallest in ((search_privacy.TrialCount("poisson", 6), 0),
                             (search_privacy.TrialCount(
                                 "truncated_negative_binomial", 6, shape=1.0), 1),
                             (search_privacy.TrialCount(
                                 "truncated_negative_binomial", 6, shape=0.0), 1)):
        draws = np.array([trials.draw(int(s)) for s in rng.integers(0, 2**62, 4000)])
        assert draws.min() >= smallest
        assert len(set(draws.tolist())) > 3  # K varies with the seed
        # The mean of 4000 draws is within 5 standard errors of E[K].
        assert abs(draws.mean() - 6) < 5 * draws.std() / math.sqrt(len(draws))
        assert trials.draw(1234) == trials.draw(1234)  # a resumed search


def test_the_geometric_gamma_matches_its_closed_form():
    # shape 1 is the geometric distribution on {1, 2, ...}: mean 1 / gamma.
    assert search_privacy.TrialCount(
        "truncated_negative_binomial", 8, shape=1.0).gamma() == pytest.approx(1 / 8)


def test_per_trial_noise_for_a_total_budget():
    trials = search_privacy.TrialCount("poisson", 10)
    sigma = search_privacy.calibrate_trial_noise(
        target_epsilon=8.0, trials=trials, delta=DELTA,
        make_training_event=lambda s: training(s), score_noise_multiplier=20.0)
    epsilon = lambda s: search_privacy.search_statement(  # noqa: E731
        search_privacy.trial_event(training(s), 20.0), trials, DELTA).epsilon
    assert epsilon(sigma) <= 8.0 < epsilon(sigma - 2e-3)


@pytest.mark.parametrize("make, message", [
    (lambda: search_privacy.TrialCount("fixed", 10), "not covered"),
    (lambda: search_privacy.TrialCount("truncated_negative_binomial", 1, shape=1.0),
     "K = 1 always"),
    (lambda: search_privacy.TrialCount("poisson", 0.5), "mean must be"),
    (lambda: search_privacy.TrialCount("uniform", 5), "must be one of"),
    (lambda: search_privacy.TrialCount("truncated_negative_binomial", 5), "shape"),
    (lambda: search_privacy.TrialCount("truncated_negative_binomial", 5, shape=-1),
     "shape >= 0"),
    (lambda: search_privacy.TrialCount("poisson", 5, shape=1.0), "leave it None"),
    (lambda: search_privacy.trial_event(training()), "must be private"),
    (lambda: search_privacy.trial_event(training(), 0.0), "needs noise > 0"),
    (lambda: search_privacy.trial_event(training(), 1.0, public_validation=True),
     "not both"),
])
def test_bad_input_is_refused_with_a_reason(make, message):
    with pytest.raises(ValueError, match=message):
        make()


# ---------------------------------------------------------------- the calculator


def test_the_calculator_states_a_search_as_dp_accounting_does(capsys):
    from tf_dpfair.privacy import input_sampling as feeding
    from tf_dpfair.privacy import sampling
    from tf_dpfair.cli import privacy

    args = ["--num_examples=6000", "--batch_size=60", "--epochs=5", "--delta=1e-5",
            "--sampling=poisson", "--search_trials=poisson", "--search_mean=6",
            "--score_noise=10"]
    assert privacy.main(args + ["--noise_multiplier=1.2"]) == 0
    out = capsys.readouterr().out
    spec = sampling.make_sampling_spec("poisson", 6000, 60)
    training_event = feeding.planned_ledger(spec, 500, 1.2).dp_event()
    want = direct(dp_accounting.dp_event.RepeatAndSelectDpEvent(
        dp_accounting.ComposedDpEvent([training_event,
                                       dp_accounting.GaussianDpEvent(10.0)]),
        6.0, math.inf))
    assert f"Search: (epsilon={want:.4g}" in out
    run = privacy.plan(num_examples=6000, batch_size=60, epochs=5, delta=1e-5,
                       sampling_mode="poisson", target_epsilon=4.0,
                       trials=search_privacy.TrialCount("poisson", 6),
                       score_noise_multiplier=10.0)
    assert run.search.epsilon <= 4.0
    assert "per trial" in run.lines()[0]
    looser = privacy.plan(num_examples=6000, batch_size=60, epochs=5, delta=1e-5,
                          sampling_mode="poisson", target_epsilon=4.0)
    assert looser.noise_multiplier < run.noise_multiplier  # tuning costs noise


@pytest.mark.parametrize("extra, message", [
    (["--search_mean=5"], "go with --search_trials"),
    (["--search_trials=poisson"], "needs --search_mean"),
    (["--search_trials=poisson", "--search_mean=5", "--score_noise=5",
      "--accountant=pld"], "RDP accountant"),
    (["--search_trials=poisson", "--search_mean=5"], "must be private"),
])
def test_the_calculator_refuses_an_incomplete_search(extra, message, capsys):
    from tf_dpfair.cli import privacy

    with pytest.raises(SystemExit):
        privacy.main(["--num_examples=600", "--batch_size=60", "--epochs=1",
                      "--delta=1e-5", "--sampling=poisson",
                      "--noise_multiplier=1.0", *extra])
    assert message in capsys.readouterr().err
