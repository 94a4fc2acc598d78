"""Tests of `tf-dpfair-privacy` (tf_dpfair/cli/privacy.py): the figures the
README and docs/training_and_privacy.md quote, the inverse, the text training prints, bad arguments, and the
console command installed from a built wheel."""

import configparser
import math
import os
import pathlib
import re
import shlex
import subprocess
import sys
import zipfile

import dp_accounting
import keras
import numpy as np
import pytest
from scipy import stats

import tf_dpfair as dpf
from tf_dpfair.cli import privacy
import wheel_fixtures

ROOT = pathlib.Path(__file__).resolve().parent.parent

# TF-Privacy's MNIST example: N=60000, batch 256, 60 epochs, sigma 1.1, delta 1e-5.
MNIST = dict(num_examples=60000, batch_size=256, epochs=60, delta=1e-5)
MNIST_ARGS = ["--num_examples=60000", "--batch_size=256", "--epochs=60",
              "--delta=1e-5"]
# round(60000 / 256) = round(234.375) = 234 Poisson updates per epoch, and
# 60000 // 256 = 234 shuffled batches: 60 epochs are 14040 updates either way.
MNIST_STEPS = 60 * 234


def rdp_poisson(sigma, q, steps, delta):
    """Epsilon straight from dp_accounting's RDP accountant."""
    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(dp_accounting.PoissonSampledDpEvent(
        q, dp_accounting.GaussianDpEvent(sigma)), steps)
    return accountant.get_epsilon(delta)


def rdp_gaussians(sigma, count, delta):
    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(sigma), count)
    return accountant.get_epsilon(delta)


def truncation_delta(num_examples, batch_size, steps, epsilon, bound=1e-12):
    """delta's allowance for truncated Poisson batches, worked out from scratch.

    The pipeline pads to the smallest size c whose Binomial(N + 1, q) tail
    P(X > c) is at most `bound`; any of `steps` updates overflows with
    probability 1 - (1 - tail)^steps, and the allowance is e^epsilon times that.
    """
    q = batch_size / num_examples
    cap = batch_size
    while stats.binom.sf(cap, num_examples + 1, q) > bound:
        cap += 1
    tail = stats.binom.sf(cap, num_examples + 1, q)
    return math.exp(epsilon) * (1 - (1 - tail) ** steps)


# ------------------------------------------------------------ the documented figures


def test_poisson_mnist_figure():
    run = privacy.plan(**MNIST, noise_multiplier=1.1, sampling_mode="poisson")
    assert run.steps == MNIST_STEPS
    expected = rdp_poisson(1.1, 256 / 60000, MNIST_STEPS, 1e-5)
    assert run.statement.epsilon == pytest.approx(expected, rel=1e-9)
    assert run.statement.epsilon == pytest.approx(2.60, abs=0.01)  # TF-Privacy
    assert run.statement.delta == pytest.approx(
        1e-5 + truncation_delta(60000, 256, MNIST_STEPS, expected), rel=1e-6)
    # TF-Privacy counts ceil(60 * 60000 / 256) = 14063 updates: the documented 2.597.
    at_14063 = privacy.statement_for(run.spec, 14063, noise_multiplier=1.1,
                                     delta=1e-5)
    assert round(at_14063.epsilon, 3) == 2.597


def test_shuffle_mnist_figure():
    run = privacy.plan(**MNIST, noise_multiplier=1.1, sampling_mode="shuffle")
    assert (run.steps, run.statement.participations) == (MNIST_STEPS, 60)
    expected = rdp_gaussians(1.1, 60, 1e-5)
    assert run.statement.epsilon == pytest.approx(expected, rel=1e-9)
    assert run.statement.epsilon == pytest.approx(56.95, abs=0.01)
    assert run.statement.delta == 1e-5  # nothing is truncated


def test_shuffle_when_the_batch_does_not_divide_n():
    # 1000 // 300 = 3 updates per epoch: 10 epochs are 30 updates, 10 passes.
    run = privacy.plan(num_examples=1000, batch_size=300, epochs=10,
                       noise_multiplier=1.0, delta=1e-5, sampling_mode="shuffle")
    assert (run.steps, run.statement.participations) == (30, 10)
    assert run.statement.epsilon == pytest.approx(rdp_gaussians(1.0, 10, 1e-5),
                                                  rel=1e-9)
    assert round(run.statement.epsilon, 2) == 19.05


def test_pld_accountant_matches_dp_accounting():
    run = privacy.plan(num_examples=1000, batch_size=100, epochs=2,
                       noise_multiplier=1.0, delta=1e-5, sampling_mode="poisson",
                       accountant="pld")
    accountant = dp_accounting.pld.PLDAccountant()
    accountant.compose(dp_accounting.PoissonSampledDpEvent(
        0.1, dp_accounting.GaussianDpEvent(1.0)), 20)
    assert run.statement.accountant == "pld"
    assert run.statement.epsilon == pytest.approx(accountant.get_epsilon(1e-5),
                                                  rel=1e-9)
    assert "PLD accountant" in run.lines()[-2]


# -------------------------------------------------------------------- the inverse


def test_calibration_finds_the_mnist_noise():
    run = privacy.plan(**MNIST, target_epsilon=2.60, sampling_mode="poisson")
    sigma = run.noise_multiplier
    assert sigma == round(sigma, 4)  # printed in full
    # 60 epochs at sigma 1.1 give 2.594 < 2.60, so slightly less noise will do.
    assert 1.09 < sigma < 1.1
    assert rdp_poisson(sigma, 256 / 60000, MNIST_STEPS, 1e-5) <= 2.60
    assert rdp_poisson(sigma - 2e-4, 256 / 60000, MNIST_STEPS, 1e-5) > 2.60
    assert run.statement.noise_multiplier == sigma
    assert run.lines()[0] == (
        f"Noise multiplier: {sigma:.4f}, the smallest (rounded up to 4 decimals) "
        f"that keeps epsilon <= 2.6; pass DPConfig(noise_multiplier={sigma:.4f}).")


def test_shuffle_calibration_inverts_the_19_05_figure():
    run = privacy.plan(num_examples=1000, batch_size=300, epochs=10,
                       target_epsilon=19.05, delta=1e-5, sampling_mode="shuffle")
    assert run.noise_multiplier == pytest.approx(1.0, abs=5e-4)
    assert rdp_gaussians(run.noise_multiplier, 10, 1e-5) <= 19.05
    assert rdp_gaussians(run.noise_multiplier - 2e-4, 10, 1e-5) > 19.05


# ----------------------------------------------------------------- the printed text


def test_main_prints_updates_statement_and_sampling(capsys):
    assert privacy.main(MNIST_ARGS + ["--noise_multiplier=1.1",
                                      "--sampling=shuffle"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "Updates: 60 epochs x 234 updates per epoch (N // B fixed batches, the "
        "last partial batch dropped) = 14040.",
        "Privacy: (epsilon=56.95, delta=1e-05)-DP for 14040 updates at noise "
        "multiplier 1.1, each example in at most 60 of them (one per pass "
        "started); RDP accountant; sampling: shuffled batches (each example in "
        "at most one update per pass over the data; no amplification by "
        "subsampling is assumed); zero-out neighbouring datasets (one example "
        "replaced by one that contributes nothing)",
        "Sampling: shuffle. Fixed batches of 256 from a fresh permutation of "
        "N=60000 examples each epoch (234 updates). Poisson amplification does "
        "not apply; accounted as shuffle."]


def test_weak_delta_and_zero_noise_are_called_out():
    run = privacy.plan(num_examples=100, batch_size=10, epochs=1,
                       noise_multiplier=0.0, delta=0.02, sampling_mode="shuffle")
    lines = run.lines()
    assert ("Warning: delta=0.02 >= 1/N=0.01: a guarantee this weak allows "
            "releasing an example outright.") in lines
    assert lines[-2].startswith("Privacy: NOT private: (epsilon=inf")


def _fit_and_capture(mode, capsys):
    """Trains 2 epochs on 53 examples, batch 10, and returns the printed lines."""
    images = np.random.default_rng(0).random((53, 2, 1, 1)).astype("float32")
    source = dpf.data.ExampleSource.from_arrays(images, np.zeros(53, int))
    train = dpf.data.make_train_dataset(source, expected_batch_size=10, seed=5,
                                        mode=mode, microbatch_size=5)
    config = dpf.DPConfig(l2_norm_clip=1.0, noise_multiplier=1.3,
                          expected_batch_size=10, microbatch_size=5)
    inputs = keras.Input((2, 1, 1))
    outputs = keras.layers.Dense(1)(keras.layers.Flatten()(inputs))
    model = dpf.DPModel(inputs=inputs, outputs=outputs, dp_config=config)
    model.compile(optimizer="sgd", loss="mse")
    capsys.readouterr()
    model.fit(train, epochs=2, verbose=0,
              callbacks=[dpf.callbacks.PrivacyLogger(delta=1e-3)])
    return capsys.readouterr().out.splitlines()


@pytest.mark.parametrize("mode", ["poisson", "shuffle"])
def test_the_text_is_what_training_prints(mode, capsys):
    # 53 examples, batch 10: round(5.3) = 5 Poisson updates an epoch, and
    # 53 // 10 = 5 shuffled batches; micro-batches of 5 set the Poisson padding.
    printed = _fit_and_capture(mode, capsys)
    assert privacy.main(["--num_examples=53", "--batch_size=10", "--epochs=2",
                         "--noise_multiplier=1.3", "--delta=1e-3",
                         f"--sampling={mode}", "--microbatch_size=5"]) == 0
    calculated = capsys.readouterr().out.splitlines()
    at = printed.index(calculated[-2])  # the logger's "Privacy: ..." line
    assert calculated[-2].startswith("Privacy: (epsilon=")
    assert printed[at + 1] == calculated[-1]
    assert "for 10 updates" in calculated[-2]


# -------------------------------------------------------------------- bad input


@pytest.mark.parametrize("argv, message", [
    (MNIST_ARGS + ["--noise_multiplier=1.1"],
     "the following arguments are required: --sampling"),
    (MNIST_ARGS + ["--noise_multiplier=1.1", "--sampling=uniform"],
     "argument --sampling: invalid choice: 'uniform'"),
    (MNIST_ARGS + ["--sampling=poisson"],
     "one of the arguments --noise_multiplier --target_epsilon is required"),
    (MNIST_ARGS + ["--sampling=poisson", "--noise_multiplier=1", "--target_epsilon=2"],
     "argument --target_epsilon: not allowed with argument --noise_multiplier"),
    (MNIST_ARGS + ["--sampling=poisson", "--noise_multiplier=1", "--accountant=gdp"],
     "argument --accountant: invalid choice: 'gdp'"),
    (["--num_examples=60000", "--batch_size=256", "--epochs=1.5", "--delta=1e-5",
      "--sampling=poisson", "--noise_multiplier=1"],
     "argument --epochs: invalid int value: '1.5'"),
    (["--num_examples=0", "--batch_size=256", "--epochs=1", "--delta=1e-5",
      "--sampling=poisson", "--noise_multiplier=1"],
     "num_examples must be a positive integer, got 0."),
    (["--num_examples=100", "--batch_size=300", "--epochs=1", "--delta=1e-5",
      "--sampling=shuffle", "--noise_multiplier=1"],
     "batch_size=300 is larger than num_examples=100."),
    (["--num_examples=100", "--batch_size=0", "--epochs=1", "--delta=1e-5",
      "--sampling=shuffle", "--noise_multiplier=1"],
     "batch_size must be a positive integer, got 0."),
    (["--num_examples=100", "--batch_size=10", "--epochs=0", "--delta=1e-5",
      "--sampling=shuffle", "--noise_multiplier=1"],
     "epochs must be a positive integer, got 0."),
    (["--num_examples=100", "--batch_size=10", "--epochs=1", "--delta=1",
      "--sampling=shuffle", "--noise_multiplier=1"],
     "delta must be in (0, 1), got 1.0."),
    (["--num_examples=100", "--batch_size=10", "--epochs=1", "--delta=1e-3",
      "--sampling=shuffle", "--noise_multiplier=-1"],
     "noise_multiplier must be >= 0, got -1.0."),
    (["--num_examples=100", "--batch_size=10", "--epochs=1", "--delta=1e-3",
      "--sampling=shuffle", "--target_epsilon=0"],
     "target_epsilon must be > 0, got 0.0."),
    (["--num_examples=100", "--batch_size=10", "--epochs=1", "--delta=1e-3",
      "--sampling=poisson", "--noise_multiplier=1", "--max_overflow_probability=1"],
     "max_overflow_probability must be in (0, 1); got 1.0."),
    (["--num_examples=100", "--batch_size=10", "--epochs=1", "--delta=1e-3",
      "--sampling=poisson", "--noise_multiplier=1", "--microbatch_size=0"],
     "microbatch_size must be a positive integer; got 0."),
])
def test_bad_arguments_exit_2_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        privacy.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: tf-dpfair-privacy")
    assert f"tf-dpfair-privacy: error: {message}" in err


def test_plan_refuses_contradictions():
    with pytest.raises(ValueError, match="Give exactly one of noise_multiplier"):
        privacy.plan(**MNIST, sampling_mode="poisson")
    with pytest.raises(ValueError, match="Give exactly one of noise_multiplier"):
        privacy.plan(**MNIST, sampling_mode="poisson", noise_multiplier=1.0,
                     target_epsilon=2.0)
    with pytest.raises(ValueError, match=r"sampling must be one of \('poisson', "
                                         r"'shuffle'\), got None"):
        privacy.plan(**MNIST, sampling_mode=None, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="epochs must be a positive integer, got 2.5"):
        privacy.plan(num_examples=100, batch_size=10, epochs=2.5, delta=1e-3,
                     sampling_mode="shuffle", noise_multiplier=1.0)


def test_help_says_why_sampling_has_no_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        privacy.main(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "Required, with no default" in text
    assert "never assumed unless asked for" in text


# --------------------------------------------------------- the installed command


def test_setup_cfg_declares_the_console_command():
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    scripts = config["options.entry_points"]["console_scripts"].split("\n")
    assert "tf-dpfair-privacy = tf_dpfair.cli.privacy:main" in scripts


def test_console_command_from_the_built_wheel(tmp_path):
    # Install the wheel into a folder of its own and run the command from
    # there, away from the checkout, so only the wheel's files can be imported.
    wheel = wheel_fixtures.build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        entry_points, = [n for n in names if n.endswith("entry_points.txt")]
        assert ("tf-dpfair-privacy = tf_dpfair.cli.privacy:main"
                in archive.read(entry_points).decode())
    assert "tf_dpfair/cli/privacy.py" in names
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--target", str(target), str(wheel)], check=True,
                   capture_output=True)
    command = target / "bin" / "tf-dpfair-privacy"
    env = dict(os.environ, PYTHONPATH=str(target), TF_CPP_MIN_LOG_LEVEL="2")
    argv = ["--num_examples=1000", "--batch_size=300", "--epochs=10",
            "--noise_multiplier=1", "--delta=1e-5", "--sampling=shuffle"]
    result = subprocess.run([str(command)] + argv, cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = privacy.plan(num_examples=1000, batch_size=300, epochs=10,
                            noise_multiplier=1.0, delta=1e-5,
                            sampling_mode="shuffle").lines()
    assert result.stdout.splitlines() == expected
    assert "(epsilon=19.05, delta=1e-05)-DP for 30 updates" in result.stdout
    # And the module it ran is the wheel's, not the checkout's.
    where = subprocess.run(
        [sys.executable, "-c", "import tf_dpfair.cli.privacy as m; print(m.__file__)"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert where.stdout.strip().startswith(str(target))


def test_documented_example_is_what_the_command_prints(capsys):
    text = (ROOT / "docs/training_and_privacy.md").read_text()
    block = re.search(r"^```\n\$ (tf-dpfair-privacy .*?)^```", text, re.M | re.S)
    assert block, "docs/training_and_privacy.md has no tf-dpfair-privacy example"
    command, *shown = block.group(1).replace("\\\n", " ").splitlines()
    argv = shlex.split(command)[1:]
    assert privacy.main(argv) == 0
    assert capsys.readouterr().out.splitlines() == shown
