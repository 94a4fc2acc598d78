"""Builds the package's wheel and installs it where only the wheel's files import.

Shared by the tests of the console commands (privacy_cli_test.py,
console_commands_test.py). Everything runs offline: the wheel is built with
the running environment's setuptools (--no-build-isolation), and a fresh
virtualenv borrows its dependencies from the running environment.
"""

import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig

ROOT = pathlib.Path(__file__).resolve().parent.parent


def build_wheel(out_dir):
    """Builds the wheel from a copy of what it is made of.

    pip builds in place (it writes build/ and *.egg-info next to setup.py),
    so the checkout is copied first: the setup files, the README (the long
    description) and the package, without byte code.

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
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--no-build-isolation", "-w", str(out_dir / "dist"),
                    str(source.resolve())], check=True, capture_output=True)
    wheel, = (out_dir / "dist").glob("tf_dpfair-*.whl")
    return wheel


def fresh_venv(wheel, venv_dir):
    """A new virtualenv holding `wheel` and nothing else of this project.

    The dependencies (TensorFlow, Keras, ...) are not installed again, which
    would need the network: a .pth file names the running environment's
    site-packages. A path line in a .pth file only appends that folder to
    `sys.path` after the virtualenv's own site-packages; the .pth files inside
    it are not run, so an editable install of tf_dpfair there (a checkout)
    stays out of reach, and the wheel's copy is the one imported.

    Args:
        wheel: path of the built wheel.
        venv_dir: folder to create the virtualenv in (must not exist).

    Returns:
        The virtualenv's bin/ folder (its python and the console commands).
    """
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv_dir)],
                   check=True, capture_output=True)
    python = venv_dir / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print("
                           "sysconfig.get_paths()['purelib'])"], check=True,
                          capture_output=True, text=True).stdout.strip()
    pathlib.Path(site, "dependencies.pth").write_text(
        sysconfig.get_paths()["purelib"] + "\n")
    # --ignore-installed: the running environment's tf_dpfair (visible through
    # the .pth line) is neither "already satisfied" nor a candidate to
    # uninstall; pip itself comes from there too.
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps",
                    "--no-index", "--ignore-installed", "--disable-pip-version-check",
                    str(wheel)], check=True, capture_output=True)
    return venv_dir / "bin"


def clean_env():
    """The environment for a command run from the virtualenv: no PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    return env
