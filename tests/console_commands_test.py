"""The experiment binaries as installed console commands (tf-dpfair-train, ...).

The wheel is built from this checkout and installed into a fresh virtualenv
(tests/wheel_fixtures.py); every command runs from a temporary working
directory, away from the checkout, with no PYTHONPATH, as a user who ran
`pip install tf_dpfair-*.whl` would run it. The fast tests borrow the
running environment's dependencies (so `make test` runs a tiny train and
report through the installed commands in about a minute); the slow one
installs the wheel with the locked versions of its dependencies alone.
"""

import ast
import configparser
import json
import pathlib
import shutil
import subprocess
import zipfile

import pandas as pd
from packaging.utils import canonicalize_name
import pytest

from experiment_fixtures import tiny_flags
from tf_dpfair.cli import privacy
from tf_dpfair.experiments import configs
from tf_dpfair.experiments import sweep_lib
import wheel_fixtures

ROOT = pathlib.Path(__file__).resolve().parent.parent
COMMANDS = {
    "tf-dpfair-train": "tf_dpfair.experiments.train:run",
    "tf-dpfair-sweep": "tf_dpfair.experiments.sweep:run",
    "tf-dpfair-report": "tf_dpfair.experiments.report:run",
    "tf-dpfair-demo": "tf_dpfair.experiments.demo:run",
    "tf-dpfair-mechanism": "tf_dpfair.experiments.mechanism:run",
}
TIMEOUT = 600  # seconds for one command; a tiny run takes about a minute here


def declared_commands():
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    lines = config["options.entry_points"]["console_scripts"].strip().splitlines()
    return dict(tuple(part.strip() for part in line.split("=")) for line in lines)


def test_setup_cfg_declares_the_experiment_commands():
    declared = declared_commands()
    assert {name: declared.get(name) for name in COMMANDS} == COMMANDS
    for target in COMMANDS.values():
        module, function = target.split(":")
        path = ROOT / (module.replace(".", "/") + ".py")
        # Parsed, not imported: importing the binaries defines their flags.
        tree = ast.parse(path.read_text())
        functions = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
        assert {function, "main"} <= functions, path
        # `python -m` runs the same entry point as the console command.
        guard = tree.body[-1]
        assert ast.unparse(guard) == f"if __name__ == '__main__':\n    {function}()", path


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The wheel built from this checkout."""
    return wheel_fixtures.build_wheel(tmp_path_factory.mktemp("wheel"))


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory):
    """A fresh virtualenv with the wheel, dependencies borrowed; (wheel, bin folder)."""
    venv = tmp_path_factory.mktemp("borrowing") / "venv"
    return wheel, wheel_fixtures.venv_borrowing_dependencies(wheel, venv)


@pytest.fixture(scope="module")
def pinned(wheel, tmp_path_factory):
    """A fresh virtualenv with the wheel and its locked dependencies; (wheel, bin folder)."""
    venv = tmp_path_factory.mktemp("pinned") / "venv"
    yield wheel, wheel_fixtures.venv_with_pinned_dependencies(wheel, venv)
    shutil.rmtree(venv)  # 2.6 GB; pytest keeps its last three temporary trees


def command(bin_dir, name, args, cwd):
    """Runs the command `name` of a virtualenv's bin/ from `cwd`; the CompletedProcess."""
    return subprocess.run([str(bin_dir / name), *args], cwd=cwd,
                          env=wheel_fixtures.clean_env(), capture_output=True,
                          text=True, timeout=TIMEOUT)


def test_the_wheel_holds_the_binaries_configs_and_commands(installed):
    wheel, bin_dir = installed
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points, = [n for n in names if n.endswith("entry_points.txt")]
        text = archive.read(entry_points).decode()
    for name, target in COMMANDS.items():
        assert f"{name} = {target}" in text
        assert (bin_dir / name).exists()
    sources = {p.relative_to(ROOT).as_posix()
               for p in (ROOT / "tf_dpfair" / "experiments").rglob("*.py")}
    assert "tf_dpfair/experiments/configs/chexpert.py" in sources
    assert sources <= names, sorted(sources - names)


def test_installed_train_help_shows_its_docstring_and_flags(installed, tmp_path):
    done = command(installed[1], "tf-dpfair-train", ["--help"], tmp_path)
    assert done.returncode == 1, done.stderr[-3000:]  # absl's --help exits 1
    lines = done.stdout.splitlines()
    assert lines[0] == ("Trains one model (private or not) and writes its reports "
                        "and result.json.")
    # Without the lent key flags, absl would list none here (they belong to
    # tf_dpfair.experiments.flags_lib, and __main__ is pip's wrapper).
    for flag in ("--config", "--epsilon", "--work_dir", "--dataset_options"):
        assert any(line.startswith(f"  {flag}:") for line in lines), flag
    # The binary itself, not the checkout, answered.
    where = subprocess.run([str(installed[1] / "python"), "-c",
                            "import tf_dpfair.experiments.configs as c; print(c.__file__)"],
                           cwd=tmp_path, env=wheel_fixtures.clean_env(),
                           capture_output=True, text=True, timeout=TIMEOUT)
    assert where.stdout.strip().startswith(str(installed[1].parent)), where.stderr[-3000:]


def train_then_report(bin_dir, cwd):
    """Runs a tiny `tf-dpfair-train` then `tf-dpfair-report` from `cwd` and checks both."""
    # Relative paths: they resolve against the working directory (cwd).
    train = command(bin_dir, "tf-dpfair-train",
                    tiny_flags(epsilon=3.0, work_dir="runs/epsilon=3"), cwd)
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    assert "Results in runs/epsilon=3" in train.stdout
    # TensorFlow's C++ start-up logs are hidden (tf_dpfair.cli.tf_startup).
    for noise in ("absl::InitializeLog", "oneDNN", "cuda"):
        assert noise not in train.stderr, train.stderr[-3000:]
    result = json.loads((cwd / "runs" / "epsilon=3" / "result.json").read_text())
    assert result["privacy"]["private"] is True
    assert 2.5 < result["privacy"]["epsilon"] <= 3.0  # calibrated to the target
    assert result["privacy"]["steps"] == 6
    assert 0 <= result["metrics"]["ema"]["auc"] <= 1

    report = command(bin_dir, "tf-dpfair-report",
                     ["--sweep_dir=runs", "--out_dir=report", "--bootstrap=20"], cwd)
    assert report.returncode == 0, report.stdout[-3000:] + report.stderr[-3000:]
    assert report.stdout.splitlines()[0] == "Report: report/report.md"
    text = (cwd / "report" / "report.md").read_text()
    assert text.startswith(f"# Sweep report: {cwd / 'runs'}")
    assert "1 finished runs" in text and "## Summary, EMA weights" in text
    summary = pd.read_csv(cwd / "report" / "summary_ema.csv")
    assert summary["auc"].tolist() == [pytest.approx(result["metrics"]["ema"]["auc"],
                                                     abs=5e-4)]
    assert (cwd / "report" / "metric_vs_epsilon.png").stat().st_size > 5000


def test_installed_train_then_report_from_outside_the_checkout(installed, tmp_path):
    # Not slow on purpose: the one run of installed commands that `make test`
    # (and so CI) makes, about a minute here.
    train_then_report(installed[1], tmp_path)


@pytest.mark.slow
def test_installed_commands_load_the_configs_by_name(installed, tmp_path):
    # The configs ship with the wheel: a sweep config's grid is listed...
    sweep = command(installed[1], "tf-dpfair-sweep",
                    ["--config=rotated_study", "--work_dir=study", "--dry_run"], tmp_path)
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    expected = [name for name, _ in sweep_lib.expand_grid(
        sweep_lib.sweep_grid("rotated_study"))]
    assert len(expected) > 1 and sweep.stdout.splitlines() == expected
    assert not (tmp_path / "study").exists()  # a dry run writes nothing
    # ... and a name that is not a config is refused with the list of names.
    bad = command(installed[1], "tf-dpfair-train", ["--config=nope", "--work_dir=run"],
                  tmp_path)
    assert bad.returncode == 1
    assert f"Unknown config 'nope'; choose from {configs.NAMES}." in bad.stderr
    missing = command(installed[1], "tf-dpfair-sweep", ["--config=rotated_study"], tmp_path)
    assert missing.returncode == 1
    assert "--work_dir is required." in missing.stderr


@pytest.mark.slow
def test_the_wheel_with_only_its_locked_dependencies_runs_the_commands(pinned, tmp_path):
    _, bin_dir = pinned
    python = str(bin_dir / "python")
    # install_requires is complete and consistent, at the locked versions.
    check = subprocess.run([python, "-m", "pip", "check"], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout
    listed = subprocess.run([python, "-m", "pip", "list", "--format=json"],
                            capture_output=True, text=True, check=True).stdout
    installed_versions = {canonicalize_name(d["name"]): d["version"]
                          for d in json.loads(listed)}
    pins = dict(line.split("==") for line in wheel_fixtures.LOCK.read_text().splitlines()
                if line and not line.startswith("#"))
    pins = {canonicalize_name(name): version for name, version in pins.items()}
    assert installed_versions.pop("tf-dpfair") == "0.1.0"
    for name in ("tensorflow", "keras", "dp-accounting"):
        assert installed_versions[name] == pins[name]
    # pip and setuptools come with the virtualenv, not from the lock.
    off_lock = {name: version for name, version in installed_versions.items()
                if pins.get(name) != version and name not in ("pip", "setuptools")}
    assert not off_lock, off_lock
    # No test extras: the report needs only install_requires.
    assert "pytest" not in installed_versions

    # The privacy calculator prints what the library computes.
    calculator = command(bin_dir, "tf-dpfair-privacy", [
        "--num_examples=1000", "--batch_size=300", "--epochs=10", "--noise_multiplier=1",
        "--delta=1e-5", "--sampling=shuffle"], tmp_path)
    assert calculator.returncode == 0, calculator.stderr[-3000:]
    assert calculator.stdout.splitlines() == privacy.plan(
        num_examples=1000, batch_size=300, epochs=10, noise_multiplier=1.0, delta=1e-5,
        sampling_mode="shuffle").lines()
    train_then_report(bin_dir, tmp_path)
