"""Every example in the README, in docs/ and in docstrings runs as written.

Markdown: each ```python block runs on its own in a fresh interpreter, in an
empty working directory. Docstrings: each `>>>` example of every module of
the package runs under doctest (expected output included).
"""

import doctest
import importlib
import os
import pathlib
import pkgutil
import re
import subprocess
import sys

import pytest

import tf_dpfair

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.M | re.S)


def python_blocks():
    for document in DOCUMENTS:
        text = document.read_text()
        for number, match in enumerate(BLOCK.finditer(text), 1):
            line = text[:match.start()].count("\n") + 1
            yield pytest.param(match.group(1),
                               id=f"{document.relative_to(ROOT)}:{line}")


def test_the_documents_have_examples():
    assert len(list(python_blocks())) >= 2  # pytest would pass an empty list


@pytest.mark.parametrize("code", list(python_blocks()))
def test_markdown_example_runs(code, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def _is_binary(info):
    """An experiment binary (tf_dpfair/experiments/<name>.py, not `*_lib`)."""
    package, _, name = info.name.rpartition(".")
    return package == "tf_dpfair.experiments" and not info.ispkg and not name.endswith("_lib")


def package_modules():
    """Every module of the package but the experiment binaries.

    Importing a binary defines its absl flags process-wide, and binaries share
    flag names (--config, --work_dir), so importing them all in one process
    fails; `test_binaries_have_no_docstring_examples` checks that skipping
    them skips no example.
    """
    infos = list(pkgutil.walk_packages(tf_dpfair.__path__, "tf_dpfair."))
    return sorted(["tf_dpfair"] + [info.name for info in infos if not _is_binary(info)])


def binary_paths():
    infos = pkgutil.walk_packages(tf_dpfair.__path__, "tf_dpfair.")
    return sorted(ROOT / (info.name.replace(".", "/") + ".py")
                  for info in infos if _is_binary(info))


def test_binaries_have_no_docstring_examples():
    paths = binary_paths()
    assert {p.stem for p in paths} >= {"train", "sweep", "report", "demo", "mechanism"}
    with_examples = [str(p.relative_to(ROOT)) for p in paths if ">>>" in p.read_text()]
    assert not with_examples, f"doctests that no test runs: {with_examples}"


def test_docstring_examples_exist():
    finder = doctest.DocTestFinder()
    count = sum(len(test.examples)
                for name in package_modules()
                for test in finder.find(importlib.import_module(name)))
    assert count >= 20


@pytest.mark.parametrize("name", package_modules())
def test_docstring_examples_run(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    module = importlib.import_module(name)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for test in doctest.DocTestFinder().find(module):
        runner.run(test)
    assert runner.failures == 0, f"{runner.failures} doctest failures in {name}"
