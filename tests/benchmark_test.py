"""The benchmark script runs and prints what docs/performance.md quotes from it.

Timings themselves are not asserted (this machine's speed varies); what is
checked is that every variant trains and that the memory probe measures the
update it claims to.
"""

import importlib.util
import os
import re
import sys

import pytest

from tf_dpfair.dpsgd.ghost import dense_conv

_PATH = os.path.join(os.path.dirname(__file__), os.pardir,
                     "benchmarks/dp_overhead.py")


def _load():
    spec = importlib.util.spec_from_file_location("dp_overhead", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_speed_prints_every_variant_with_its_ratio(monkeypatch, capsys):
    bench = _load()
    monkeypatch.setattr(sys, "argv", [
        "dp_overhead.py", "--models", "cnn32", "--examples", "64",
        "--batch", "32", "--microbatch", "16", "--epochs", "1"])
    bench.main()
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("[cnn32]")]
    labels = [line.split("]")[1].split(":")[0].strip() for line in lines]
    assert labels == ["non-private", "DP vectorized", "DP ghost", "DP auto"]
    # Which kernels ran, and every epoch's time beside the fastest.
    assert re.search(r"^\[setup\] TensorFlow \S+, CPU kernels (oneDNN|Eigen) ",
                     out, re.M)
    assert len(re.findall(r"^\[cnn32 epochs\] .*: [\d.]+ s wall$", out, re.M)) == 4
    for line in lines:
        speed, ratio = re.search(r"(\d+) ex/s, ratio to non-private ([\d.]+)x",
                                 line).groups()
        assert int(speed) > 0 and float(ratio) > 0
    assert "ratio to non-private 1.00x" in lines[0]


def test_diagnostics_variants_train_and_print_their_ratio(monkeypatch, capsys):
    bench = _load()
    monkeypatch.setattr(sys, "argv", [
        "dp_overhead.py", "--models", "cnn32", "--clipping", "auto", "--examples",
        "64", "--batch", "32", "--microbatch", "16", "--epochs", "2",
        "--diagnostics", "--diagnostic_groups", "2,3"])
    traces = []
    make = bench.dpf.DPModel.make_train_function

    def counted(model, force=False):
        if model.train_function is None or force:
            traces.append(model)
        return make(model, force=force)

    monkeypatch.setattr(bench.dpf.DPModel, "make_train_function", counted)
    bench.main()
    lines = [line for line in capsys.readouterr().out.splitlines()
             if line.startswith("[cnn32]")]
    labels = [line.split("]")[1].split(":")[0].strip() for line in lines]
    assert labels == ["non-private", "DP auto", "DP auto+group ids",
                      "DP auto+diagnostics", "DP auto+diagnostics+alignment"]
    for line in lines:
        cpu = re.search(r"CPU time ([\d.]+)x", line).group(1)
        assert float(cpu) > 0
    # One train function per DP model: the epochs timed are not retraced.
    assert len(traces) == len(set(map(id, traces))) == 4


def test_memory_probe_reports_the_input_it_was_given():
    bench = _load()
    got = bench.one_update_peak_memory(64, 16, "ghost")
    # 64 images of 32x32x3 float32 and 64 int64 labels.
    assert abs(got["input_mib"] - (64 * 32 * 32 * 3 * 4 + 64 * 8) / 2**20) < 1e-9
    assert got["added_mib"] >= 0 and got["before_mib"] > 0


@pytest.mark.slow
def test_scaling_benchmark_runs_one_and_two_local_workers():
    import subprocess

    script = os.path.join(os.path.dirname(__file__), os.pardir,
                          "benchmarks/multi_worker_scaling.py")
    done = subprocess.run(
        [sys.executable, script, "--batch", "16", "--microbatch", "8", "--examples", "64",
         "--updates", "2", "--warmup", "1", "--rounds", "1", "--timeout", "400"],
        capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("[workers=")]
    assert [line.split("]")[0] for line in lines] == ["[workers=1", "[workers=2"]
    assert "replicas 2, 3 updates" in lines[1]
    for line in lines:
        speed, ratio = re.search(r"(\d+) ex/s, ratio to 1 worker\(s\) ([\d.]+)x",
                                 line).groups()
        assert int(speed) > 0 and float(ratio) > 0


def test_profile_prints_the_plan_and_a_time_per_layer(monkeypatch, capsys):
    bench = _load()
    monkeypatch.setattr(sys, "argv", [
        "dp_overhead.py", "--models", "cnn32", "--microbatch", "4", "--profile",
        "--profile_all"])
    bench.main()
    out = capsys.readouterr().out
    rows = [row for row in (line.split() for line in out.splitlines()
                            if line.startswith("[cnn32 profile]"))
            if len(row) == 9 and row[3] in ("linear", "normalization")]
    layers = list(dict.fromkeys((row[2], row[3]) for row in rows))
    assert [kind for _, kind in layers] == [
        "linear", "normalization", "linear", "linear"]
    # Every method of the first conv, the chosen one starred, with an
    # estimate and a time in ms.
    methods = [row[5] for row in rows if row[2] == layers[0][0]]
    grouped = ["folded_conv"] if dense_conv.grouped_kernel_gradient_supported() else []
    assert sorted(m.rstrip("*") for m in methods) == sorted(
        grouped + ["norm_trick", "patches", "per_example_conv"])
    assert sum(m.endswith("*") for m in methods) == 1
    assert all(float(value) >= 0 for row in rows for value in row[6:9])
    assert "whole ghost clipped sum" in out


def test_frozen_features_benchmark_times_both_probes(monkeypatch, capsys, tmp_path):
    path = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks/frozen_features.py")
    spec = importlib.util.spec_from_file_location("frozen_features_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out_json = str(tmp_path / "out.json")
    monkeypatch.setattr(sys, "argv", [
        "frozen_features.py", "--examples", "64", "--batch", "32", "--microbatch", "16",
        "--image_size", "32", "--augmult", "2", "--rounds", "1", "--json", out_json])
    result = bench.main()
    out = capsys.readouterr().out
    assert re.search(r"uncached: +\d+\.\d training examples/s", out), out
    assert re.search(r"cached: +\d+\.\d training examples/s \(\d+\.\dx\)", out), out
    assert len(result["epoch_seconds"]["cached"]) == len(result["epoch_seconds"]["uncached"]) == 1
    assert result["speedup"] == pytest.approx(
        result["examples_per_second"]["cached"] / result["examples_per_second"]["uncached"])
    assert os.path.exists(out_json)
