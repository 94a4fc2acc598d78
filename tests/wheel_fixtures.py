"""Builds the package's wheel and installs it where only the wheel's files import.

Shared by the tests of the console commands (privacy_cli_test.py,
console_commands_test.py). Two kinds of fresh virtualenv hold the wheel:

- `venv_borrowing_dependencies`: seconds to make; the dependencies are the
  running environment's (a .pth line). It shows that the wheel carries the
  binaries, the configs and the entry points, but not that setup.cfg's
  install_requires is complete.
- `venv_with_pinned_dependencies`: the wheel and its install_requires at
  requirements/lock.txt's versions, as `pip install -c lock.txt tf_dpfair-*.whl`
  gives a user; about two minutes (TensorFlow unpacks to 2.6 GB). pip
  installs from a local wheelhouse with --no-index, so once the wheelhouse
  holds the locked wheels it runs offline; a missing wheel is fetched from
  PyPI into it first (pip's HTTP cache makes a refetch cheap).
"""

import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig

ROOT = pathlib.Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements/lock.txt"
PIP_FLAGS = ("--quiet", "--disable-pip-version-check")


def build_wheel(out_dir):
    """Builds the wheel from a copy of what it is made of.

    pip builds in place (it writes build/ and *.egg-info next to setup.py),
    so the checkout is copied first: the setup files, the README (the long
    description) and the package, without byte code. The build is offline:
    the running environment's setuptools, --no-build-isolation.

    Args:
        out_dir: an empty folder (a `pathlib.Path`); receives source/ and dist/.

    Returns:
        The wheel's path.
    """
    source = out_dir / "source"
    source.mkdir()
    for name in ("setup.py", "setup.cfg", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "tf_dpfair", source / "tf_dpfair",
                    ignore=shutil.ignore_patterns("__pycache__"))
    # An absolute path: pip reads a bare folder name as a project to look up.
    subprocess.run([sys.executable, "-m", "pip", "wheel", *PIP_FLAGS, "--no-deps",
                    "--no-build-isolation", "-w", str(out_dir / "dist"),
                    str(source.resolve())], check=True, capture_output=True)
    wheel, = (out_dir / "dist").glob("tf_dpfair-*.whl")
    return wheel


def _new_venv(venv_dir, with_pip):
    """Creates a virtualenv; returns its python."""
    subprocess.run([sys.executable, "-m", "venv", str(venv_dir)]
                   + ([] if with_pip else ["--without-pip"]),
                   check=True, capture_output=True)
    return venv_dir / "bin" / "python"


def venv_borrowing_dependencies(wheel, venv_dir):
    """A new virtualenv holding `wheel`, its dependencies borrowed.

    The dependencies (TensorFlow, Keras, ...) are not installed again: a .pth
    file names the running environment's site-packages. A path line in a
    .pth file only appends that folder to `sys.path` after the virtualenv's
    own site-packages; the .pth files inside it are not run, so an editable
    install of tf_dpfair there (a checkout) stays out of reach, and the
    wheel's copy is the one imported.

    Args:
        wheel: path of the built wheel.
        venv_dir: folder to create the virtualenv in (must not exist).

    Returns:
        The virtualenv's bin/ folder (its python and the console commands).
    """
    python = _new_venv(venv_dir, with_pip=False)
    site = subprocess.run([str(python), "-c", "import sysconfig; print("
                           "sysconfig.get_paths()['purelib'])"], check=True,
                          capture_output=True, text=True).stdout.strip()
    pathlib.Path(site, "dependencies.pth").write_text(
        sysconfig.get_paths()["purelib"] + "\n")
    # --ignore-installed: the running environment's tf_dpfair (visible through
    # the .pth line) is neither "already satisfied" nor a candidate to
    # uninstall; pip itself comes from there too.
    subprocess.run([str(python), "-m", "pip", "install", *PIP_FLAGS, "--no-deps",
                    "--no-index", "--ignore-installed", str(wheel)],
                   check=True, capture_output=True)
    return venv_dir / "bin"


def wheelhouse():
    """Where the locked wheels are kept between runs.

    $TF_DPFAIR_WHEELHOUSE if set, else ~/.cache/tf_dpfair/wheelhouse
    ($XDG_CACHE_HOME is honoured). Deleting it costs one download.
    """
    if os.environ.get("TF_DPFAIR_WHEELHOUSE"):
        return pathlib.Path(os.environ["TF_DPFAIR_WHEELHOUSE"])
    cache = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(cache) / "tf_dpfair" / "wheelhouse"


def venv_with_pinned_dependencies(wheel, venv_dir, house=None):
    """A new virtualenv holding `wheel` and the locked versions of its dependencies.

    Only install_requires is installed (no extras), each at the version
    requirements/lock.txt pins: what `pip install -c lock.txt tf_dpfair-*.whl`
    gives a user. pip reads only the wheelhouse (--no-index); when the
    install cannot be satisfied from it, `pip download` fills it from PyPI
    and the install runs again.

    Args:
        wheel: path of the built wheel.
        venv_dir: folder to create the virtualenv in (must not exist).
        house: the wheelhouse folder; `wheelhouse()` by default.

    Returns:
        The virtualenv's bin/ folder.

    Raises:
        subprocess.CalledProcessError: the wheelhouse lacks a locked wheel and
            PyPI could not supply it (pip's output is in the error's stderr).
    """
    house = pathlib.Path(house or wheelhouse())
    house.mkdir(parents=True, exist_ok=True)
    python = _new_venv(venv_dir, with_pip=True)
    install = [str(python), "-m", "pip", "install", *PIP_FLAGS, "--no-index",
               "--find-links", str(house), "-c", str(LOCK), str(wheel)]
    # pip resolves before it installs anything, so a miss fails fast.
    if subprocess.run(install, capture_output=True).returncode == 0:
        return venv_dir / "bin"
    subprocess.run([str(python), "-m", "pip", "download", *PIP_FLAGS, "-d", str(house),
                    "-c", str(LOCK), str(wheel)], check=True, capture_output=True,
                   text=True)
    # pip download copies the wheel itself there too; a stale copy of the same
    # version must not stand in for the next build.
    for stale in house.glob("tf_dpfair-*.whl"):
        stale.unlink()
    subprocess.run(install, check=True, capture_output=True, text=True)
    return venv_dir / "bin"


def clean_env():
    """The environment for a command run from the virtualenv: no PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    return env
