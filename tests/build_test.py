"""Checks that BUILD has a target for every module, test and script."""

import configparser
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def build_srcs():
    text = (ROOT / "BUILD").read_text()
    return set(re.findall(r'"([^"]+\.py)"', text))


def test_every_python_file_is_in_a_build_target():
    wanted = [p.relative_to(ROOT) for p in (ROOT / "tf_dpfair").rglob("*.py")]
    wanted += [p.relative_to(ROOT) for d in ("tests", "benchmarks")
               for p in (ROOT / d).glob("*.py")]
    assert wanted, "found no Python files to check"
    missing = sorted(str(p) for p in wanted if str(p) not in build_srcs())
    assert not missing, f"files without a BUILD target: {missing}"


def test_every_test_file_is_a_py_test():
    text = (ROOT / "BUILD").read_text()
    tests = sorted((ROOT / "tests").glob("*_test.py"))
    assert tests
    for path in tests:
        rel = path.relative_to(ROOT)
        assert re.search(r'py_test\(\n    name = "[^"]+",\n    srcs = \["'
                         + re.escape(str(rel)), text), f"{rel} is not a py_test"


def test_every_console_command_of_the_experiments_is_a_py_binary():
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    lines = config["options.entry_points"]["console_scripts"].strip().splitlines()
    modules = [line.split("=")[1].strip().split(":")[0] for line in lines]
    binaries = [m for m in modules if m.startswith("tf_dpfair.experiments.")]
    assert len(binaries) == 5, lines
    text = (ROOT / "BUILD").read_text()
    for module in binaries:
        path = module.replace(".", "/") + ".py"
        assert re.search(r'py_binary\(\n    name = "[^"]+",\n    srcs = \["'
                         + re.escape(path), text), f"{path} is not a py_binary"


def test_build_file_is_what_the_generator_writes():
    result = subprocess.run([sys.executable, "tools/gen_build.py", "--check"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
