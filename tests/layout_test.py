"""The package layout: its layers, its TensorFlow-free core, and its old paths.

- Each part imports only the parts below it (`LAYERS`), so a reader can
  learn the package bottom up and nothing runs back up.
- `tf_dpfair.privacy` (the statement's maths) and `import tf_dpfair` load no
  TensorFlow.
- Every module path of the former flat layout still imports, as an alias of
  the module it became, with one `FutureWarning` naming the new path.
- A `.keras` file saved by the package before the move loads, with its
  privacy ledger.
"""

import ast
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import keras
import numpy as np

import tf_dpfair as dpf
from tf_dpfair import _old_paths

PACKAGE = pathlib.Path(dpf.__file__).parent
ROOT = PACKAGE.parent

# Lowest first: a part may import its own modules and those of lower rank.
LAYERS = (
    ("_lazy", "_old_paths", "_keras_registration"),
    ("privacy",),
    ("config", "workers"),
    ("data",),
    ("datasets", "models"),
    ("dpsgd",),
    ("training",),
    ("fairness",),
    ("dashboards",),
    ("callbacks",),
    ("audit",),
    ("cli", "experiments", "__init__"),  # the entry points may use each other
)
TOP = len(LAYERS) - 1
RANK = {part: rank for rank, parts in enumerate(LAYERS) for part in parts}


def part_of(module):
    """'tf_dpfair.privacy.ledger' -> 'privacy'; 'tf_dpfair' -> '__init__'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def module_name(path):
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path):
    """Every tf_dpfair module a file imports, at any depth of its code."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "tf_dpfair":
                found.update(f"tf_dpfair.{a.name}" for a in node.names)
            elif node.module.startswith("tf_dpfair."):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("tf_dpfair"))
    return found


def python_files():
    return sorted(PACKAGE.rglob("*.py"))


def test_every_part_of_the_package_has_a_layer():
    parts = {part_of(module_name(path)) for path in python_files()}
    assert parts <= set(RANK), sorted(parts - set(RANK))


def test_each_part_imports_only_the_parts_below_it():
    upward = []
    for path in python_files():
        source = part_of(module_name(path))
        for target in imports_of(path):
            part = part_of(target)
            if part == source or RANK[source] == RANK.get(part) == TOP:
                continue
            if RANK.get(part, TOP) >= RANK[source]:
                upward.append(f"{module_name(path)} imports {target}")
    assert not upward, "\n".join(upward)


def test_the_layer_check_catches_an_upward_import(tmp_path):
    # The check above must be able to fail: an import of training from data.
    bad = tmp_path / "bad.py"
    bad.write_text("from tf_dpfair.training import model\n")
    (target,) = imports_of(bad)
    assert RANK[part_of(target)] > RANK["data"]


def test_the_privacy_package_never_imports_tensorflow():
    for path in (PACKAGE / "privacy").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert name.split(".")[0] not in ("tensorflow", "keras"), (path, name)


def run_python(code):
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_importing_the_package_and_its_privacy_core_loads_no_tensorflow():
    out = run_python("""
        import sys
        import tf_dpfair as dpf
        from tf_dpfair.privacy import accounting, input_sampling, ledger, sampling, search
        from tf_dpfair import config
        eps = dpf.privacy.compute_epsilon(noise_multiplier=1.1, sampling="poisson",
                                          sampling_probability=256 / 60000,
                                          steps=14063, delta=1e-5)
        print(round(eps, 2), "tensorflow" in sys.modules, "keras" in sys.modules)
    """)
    # 2.60: TF-Privacy's figure for N=60000, B=256, 60 epochs, sigma=1.1 (DESIGN.md).
    assert out.split() == ["2.6", "False", "False"]


def test_every_old_module_path_imports_the_module_it_became_and_warns_once():
    old_paths = sorted(_old_paths.MOVED) + ["ghost.plan", "ghost.norms"]
    out = run_python(f"""
        import importlib, warnings
        old_paths = {old_paths!r}
        for old in old_paths:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                module = importlib.import_module("tf_dpfair." + old)
                again = importlib.import_module("tf_dpfair." + old)
                import tf_dpfair
                attribute = getattr(tf_dpfair, old.split(".")[0])
            messages = [str(w.message) for w in caught if w.category is FutureWarning]
            print(old, module.__name__, again is module, len(messages),
                  messages[0].split()[3] if messages else "-",
                  attribute.__name__)
    """)
    lines = out.strip().splitlines()
    assert len(lines) == len(old_paths)
    for line, old in zip(lines, old_paths):
        name, new, same, warnings_seen, named, attribute = line.split()
        head = old.split(".")[0]
        expected = "tf_dpfair." + ".".join([_old_paths.MOVED[head]] + old.split(".")[1:])
        assert (name, new, same) == (old, expected, "True"), line
        if "." not in old:
            # Once: the import and the attribute read share one warning.
            assert (warnings_seen, named, attribute) == ("1", expected + ";", expected), line


def test_names_of_the_former_fairness_data_and_dashboards_modules_still_work():
    out = run_python("""
        import warnings
        import tf_dpfair as dpf
        from tf_dpfair.fairness import auc
        from tf_dpfair.data import pipeline
        from tf_dpfair.dashboards import callback
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            print(dpf.fairness.evaluate is auc.evaluate, dpf.fairness.evaluate is auc.evaluate)
            from tf_dpfair.fairness import prepare_inputs
            print(prepare_inputs is auc.prepare_inputs)
        print(sum(w.category is FutureWarning for w in caught))
        print(dpf.data.make_train_dataset is pipeline.make_train_dataset,
              dpf.data.ExampleSource is pipeline.ExampleSource,
              dpf.dashboards.FairnessDashboard is callback.FairnessDashboard)
    """)
    assert out.split() == ["True", "True", "True", "2", "True", "True", "True"]


def test_a_model_saved_before_the_move_loads_with_its_ledger():
    # tests/fixtures/saved_before_the_layout.keras: a DPModel (small CNN, EMA
    # 0.9) saved by the flat-layout package after fit(x, y, batch_size=10,
    # epochs=2) on 40 examples: 8 updates, noise multiplier 1. Its config
    # names the module `tf_dpfair.model`.
    path = os.path.join(os.path.dirname(__file__), "fixtures", "saved_before_the_layout.keras")
    model = keras.models.load_model(path)
    assert type(model) is dpf.DPModel
    assert model.update_count == 8
    # Second method: the same fit with today's code gives the same statement.
    rng = np.random.default_rng(7)
    x = rng.random((40, 8, 8, 1)).astype("float32")
    y = rng.integers(0, 3, 40).astype("int32")
    from tf_dpfair.models.small_cnn import small_cnn
    fresh = dpf.make_private(small_cnn((8, 8, 1), 3, filters=(4, 4), groups=2),
                             model.dp_config)
    fresh.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(
        from_logits=True))
    fresh.fit(x, y, batch_size=10, epochs=2, verbose=0)
    loaded = model.privacy_ledger.statement(delta=1e-5)
    assert loaded.epsilon == fresh.privacy_ledger.statement(delta=1e-5).epsilon
    assert loaded.epsilon > 0
    # It trains on, and its noise indices go on from 8.
    before = [w.copy() for w in model.get_weights()]
    model.fit(x, y, batch_size=10, epochs=1, verbose=0)
    assert model.update_count == 12
    assert any(not np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    with model.ema_weights():
        assert all(np.isfinite(w).all() for w in model.get_weights())


def test_import_tf_dpfair_then_keras_loads_a_saved_model_in_a_fresh_process():
    # The registering modules load once Keras does (tf_dpfair._keras_registration).
    path = os.path.join(os.path.dirname(__file__), "fixtures", "saved_before_the_layout.keras")
    out = run_python(f"""
        import sys
        import tf_dpfair
        print("keras" in sys.modules)
        import keras
        model = keras.models.load_model({path!r})
        print(type(model).__name__, model.update_count)
    """)
    assert out.split() == ["False", "DPModel", "8"]


LONG = 420  # lines: "a file over ~400 lines is a smell" (DESIGN.md)


def test_every_long_module_says_at_its_top_why_it_is_long():
    unexplained = []
    for path in python_files():
        lines = path.read_text().count("\n")
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        if lines > LONG and not re.search(r"about [\d,]+ lines", doc, re.IGNORECASE):
            unexplained.append(f"{module_name(path)}: {lines} lines")
    assert not unexplained, unexplained
