"""Tests of the pinned install: requirements/lock.txt against setup.cfg, the
installed environment and the Makefile recipes that use it.

`make lock` runs these tests with TF_DPFAIR_LOCK naming the freshly resolved
lock, before it replaces requirements/lock.txt.
"""

import configparser
import importlib.metadata
import os
import pathlib
import re
import subprocess

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = pathlib.Path(__file__).resolve().parent.parent
LOCK = pathlib.Path(os.environ.get("TF_DPFAIR_LOCK") or ROOT / "requirements/lock.txt")
EXTRAS = ("test", "datasets", "pretrained")  # what the Makefile installs
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s=;]+)$")


def lock_pins():
    """dict canonical name -> version of the lock; fails on a line that is no pin."""
    pins = {}
    for number, line in enumerate(LOCK.read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        match = PIN.match(line)
        assert match, f"{LOCK.name}:{number} is not an exact pin: {line!r}"
        name = canonicalize_name(match.group(1))
        assert name not in pins, f"{LOCK.name}:{number} pins {name} twice"
        pins[name] = match.group(2)
    return pins


def setup_requirements():
    """The `Requirement`s of install_requires and of the installed extras."""
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    texts = config["options"]["install_requires"].splitlines()
    for extra in EXTRAS:
        texts += config["options.extras_require"][extra].splitlines()
    return [Requirement(t.strip()) for t in texts if t.strip()]


def test_lock_pins_exact_versions_once():
    pins = lock_pins()
    assert len(pins) > 50  # the TF stack alone is dozens of packages
    assert "tf-dpfair" not in pins  # the package itself comes from the checkout
    # The tools that build the package are pinned too (installed first).
    assert {"pip", "setuptools", "wheel"} <= set(pins)


def test_lock_satisfies_every_range_in_setup_cfg():
    pins = lock_pins()
    for requirement in setup_requirements():
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement} is not in {LOCK.name}"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"{LOCK.name} pins {name}=={pins[name]}, outside setup.cfg's "
            f"{requirement}")


def test_keras_and_tensorflow_have_upper_bounds():
    # The code relies on Keras internals (see the comment in setup.cfg); an
    # unbounded range would let a fresh install pull a release that breaks it.
    bounded = {canonicalize_name(r.name): r.specifier for r in setup_requirements()}
    for name in ("keras", "tensorflow"):
        assert any(spec.operator == "<" for spec in bounded[name]), name


def _dependency_closure(requirements):
    """Distributions the requirements reach through installed metadata.

    Returns:
      (dict canonical name -> installed version, list of names not installed).
    """
    extras_of, installed, missing = {}, {}, []
    todo = list(requirements)
    while todo:
        requirement = todo.pop()
        name = canonicalize_name(requirement.name)
        wanted = set(requirement.extras)
        if name in extras_of and wanted <= extras_of[name]:
            continue
        extras_of[name] = extras_of.get(name, set()) | wanted
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(name)
            continue
        installed[name] = dist.version
        for text in dist.requires or []:
            child = Requirement(text)
            if child.marker is None or any(child.marker.evaluate({"extra": e})
                                           for e in extras_of[name] or {""}):
                todo.append(child)
    return installed, missing


def test_lock_holds_every_dependency_of_the_locked_environment():
    pins = lock_pins()
    installed, missing = _dependency_closure(setup_requirements())
    differs = sorted(f"{n} {v} (lock: {pins[n]})" for n, v in installed.items()
                     if n in pins and pins[n] != v)
    if missing or differs:
        pytest.skip(f"This environment is not the locked one (`make test` builds "
                    f"it): missing {sorted(missing)}, versions differ: {differs}")
    unpinned = sorted(set(installed) - set(pins))
    assert not unpinned, (f"installed as dependencies but not pinned in "
                          f"{LOCK.name}: {unpinned}")


def _dry_run(*targets):
    """The commands `make` would run, without running them."""
    # Under `make test`, variables given to the outer make (LOCK=...) would
    # reach this one through MAKEFLAGS; the Makefile's own defaults are wanted.
    env = {k: v for k, v in os.environ.items()
           if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "LOCK", "VENV")}
    result = subprocess.run(["make", "-n", *targets], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_make_test_and_demo_install_only_the_locked_versions(tmp_path):
    # A virtualenv that does not exist yet: make shows the whole set-up.
    venv = tmp_path / "venv"
    for target in ("test", "demo"):
        commands = _dry_run(f"VENV={venv}", target)
        installs = [line for line in commands.splitlines() if "pip install" in line]
        assert len(installs) == 2, commands
        for line in installs:
            assert "-c requirements/lock.txt" in line, line
        # The package and promise are built with the locked setuptools.
        assert "--no-build-isolation" in installs[1]
    assert "make test" in (ROOT / ".ci/run").read_text()


def test_make_lock_tests_before_it_replaces_the_lock():
    commands = _dry_run("lock").splitlines()
    test = next(i for i, line in enumerate(commands) if "pytest" in line)
    replace = next(i for i, line in enumerate(commands)
                   if line.startswith("mv requirements/lock.txt.new"))
    assert test < replace
    assert "TF_DPFAIR_LOCK=requirements/lock.txt.new" in commands[test]
    # It re-resolves: no constraint on the installs of the fresh virtualenv.
    installs = [line for line in commands if "pip install" in line]
    assert installs and not any(" -c " in line for line in installs)
