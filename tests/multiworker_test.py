"""Training on several workers: the Keras workaround, the cluster helpers, a 2-worker job.

The slow tests start tests/multiworker_worker.py as two local worker
processes of one `MultiWorkerMirroredStrategy` job (TF_CONFIG on two free
localhost ports) and once as a single process, then compare: every figure
the two workers report must be identical, and equal to the single process's
to float tolerance (its reference is one replica; the DP step divides by
the expected batch, so the replica layout must not matter). Processes are
killed by PID if they outlive `TIMEOUT`.
"""

import glob
import json
import os
import pathlib
import re
import socket
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

import conftest
import multiworker_worker as job
import tf_dpfair as dpf
from tf_dpfair import workers as cluster
from tf_dpfair.data import pipeline as data
from tf_dpfair.privacy import input_sampling as feeding
from tf_dpfair.training import keras_multiworker as multiworker

ROOT = pathlib.Path(__file__).resolve().parent.parent
TIMEOUT = 600  # seconds for the whole job (two workers and the reference)


# ------------------------------------------------------- the Keras workaround

def test_keras_internals_the_workaround_relies_on_are_still_there():
    multiworker.check_keras_internals()
    # What the check cannot see without data: fit's epoch iterator yields
    # (begin step, end step, iterator of distributed batches).
    from keras.src.backend.tensorflow import trainer
    dataset = tf.data.Dataset.from_tensor_slices(np.arange(4.0)).batch(2)
    iterator = trainer.TFEpochIterator(
        x=dataset, distribute_strategy=tf.distribute.get_strategy())
    begin, end, batches = next(iter(iterator._enumerate_iterator()))
    assert (begin, end) == (0, 0)
    np.testing.assert_array_equal(next(batches), [0.0, 1.0])


@pytest.mark.parametrize("what, replacement, named", [
    ("_maybe_symbolic_build", lambda self, data_batch=None: None,
     "_maybe_symbolic_build(self, iterator, data_batch) changed"),
    ("_symbolic_build", lambda self, iterator=None: None,
     "_symbolic_build no longer takes data_batch"),
])
def test_a_renamed_keras_internal_fails_loudly(monkeypatch, what, replacement,
                                               named):
    from keras.src.backend.tensorflow import trainer
    monkeypatch.setattr(trainer.TensorFlowTrainer, what, replacement)
    with pytest.raises(RuntimeError, match=r"keras-team/keras#20585") as error:
        multiworker.check_keras_internals()
    assert named in str(error.value)
    assert "delete tf_dpfair/multiworker.py" in str(error.value)


def test_a_changed_log_reduction_fails_loudly(monkeypatch):
    from keras.src.backend.tensorflow import trainer

    def reduce_per_replica(values, strategy, reduction):  # a "fixed" Keras
        return values

    monkeypatch.setattr(trainer, "reduce_per_replica", reduce_per_replica)
    with pytest.raises(RuntimeError, match=r"reduce_per_replica no longer"):
        multiworker.check_keras_internals()


def test_the_docstring_names_the_upstream_issues():
    for issue in ("keras-team/keras#20585", "tensorflow/tensorflow#72388"):
        assert issue in multiworker.__doc__
    assert multiworker.UPSTREAM_ISSUES == ("keras-team/keras#20585",
                                           "tensorflow/tensorflow#72388")


def test_the_model_classes_wrap_their_steps_with_the_workaround():
    for cls in (dpf.DPModel, dpf.PrivateModel, dpf.NonPrivateModel):
        # First base: its train_step/test_step wrap the class's own.
        assert cls.__mro__[1] is multiworker.MultiWorkerFit


def test_logs_get_a_leading_axis_of_one():
    logs = multiworker._with_leading_axis(
        {"loss": tf.constant(2.0), "per_label": tf.constant([1.0, 3.0]),
         "count": 4})
    assert logs["loss"].shape == (1,) and float(logs["loss"][0]) == 2.0
    assert logs["per_label"].shape == (1, 2)
    assert logs["count"].shape == (1,)


def test_outside_multi_worker_mode_logs_and_build_are_keras_own():
    strategy = conftest.mirrored_strategy()
    assert not multiworker.in_multi_worker_mode(strategy)
    assert not multiworker.in_multi_worker_mode(tf.distribute.get_strategy())
    assert not multiworker.in_multi_worker_mode(None)
    x = np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32)
    y = np.zeros((8, 1), np.float32)
    with strategy.scope():
        inputs = keras.Input((3,))
        model = dpf.DPModel(inputs=inputs, outputs=keras.layers.Dense(1)(inputs),
                            dp_config=dpf.DPConfig(l2_norm_clip=1.0,
                                                   noise_multiplier=0.0,
                                                   expected_batch_size=8))
        model.compile(optimizer="sgd", loss="mse")
    history = model.fit(x, y, batch_size=8, verbose=0)
    assert np.ndim(history.history["loss"][0]) == 0  # scalars, as in Keras
    assert model.update_count == 1


# ------------------------------------------------------- cluster helpers

def test_cluster_helpers_in_one_process():
    for strategy in (tf.distribute.get_strategy(), conftest.mirrored_strategy()):
        assert cluster.is_chief(strategy)
        assert cluster.num_workers(strategy) == 1
        assert not cluster.is_multi_worker(strategy)
        assert cluster.share_from_chief(strategy, 2**62 + 5) == 2**62 + 5
    variable = keras.Variable(np.ones(2, np.float32))
    cluster.copy_from_chief(tf.distribute.get_strategy(), [variable])
    np.testing.assert_array_equal(variable.numpy(), [1.0, 1.0])


@pytest.mark.parametrize("value", [-1, 2**63, 1.5, True, "7"])
def test_share_from_chief_refuses_what_is_not_a_seed(value):
    with pytest.raises(ValueError, match=r"share_from_chief needs an integer in "
                       r"\[0, 2\*\*63\); got " + re.escape(repr(value))):
        cluster.share_from_chief(tf.distribute.get_strategy(), value)


def test_pipelines_are_sharded_by_data_and_keep_their_tag():
    examples = job.source()
    train = data.make_train_dataset(examples, expected_batch_size=8, seed=1,
                                    microbatch_size=4, num_replicas=2, start_step=3)
    test = data.make_eval_dataset(examples, batch_size=16, num_replicas=2)
    for dataset in (train.dataset, test):
        assert (dataset.options().experimental_distribute.auto_shard_policy
                == tf.data.experimental.AutoShardPolicy.DATA)
    tag = feeding.pipeline_tag(train.dataset)
    assert tag is not None and tag.spec == train.spec and tag.start_step == 3


# ------------------------------------------------------- two workers

def free_ports(count):
    """Ports free now (bound to port 0, then released)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("localhost", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def tf_config(ports, index):
    return json.dumps({"cluster": {"worker": [f"localhost:{p}" for p in ports]},
                       "task": {"type": "worker", "index": index}})


def start(program, args, *, tf_config_value=None, log=None):
    """Starts `python <program> <args>` with the worktree on the path.

    Args:
        program: a script's path, or a list of interpreter arguments such as
            `TRAIN` (["-m", module]).
        args: the program's arguments.
        tf_config_value: TF_CONFIG for the process (unset if None).
        log: open file for its output (discarded if None).

    Returns:
        The `subprocess.Popen`.
    """
    env = dict(os.environ, PYTHONPATH=f"{ROOT}:{ROOT / 'tests'}",
               TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    env.pop("TF_CONFIG", None)
    if tf_config_value is not None:
        env["TF_CONFIG"] = tf_config_value
    program = list(program) if isinstance(program, list) else [str(program)]
    return subprocess.Popen([sys.executable, *program, *map(str, args)], env=env,
                            stdout=log or subprocess.DEVNULL, stderr=subprocess.STDOUT)


def wait_all(processes, timeout):
    """Waits for every process; kills each by PID past `timeout` seconds.

    Returns:
      The exit codes, or raises (pytest failure) after killing them.
    """
    deadline = time.time() + timeout
    try:
        return [p.wait(timeout=max(1.0, deadline - time.time())) for p in processes]
    except subprocess.TimeoutExpired:
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.wait()
        pytest.fail(f"processes still running after {timeout} s; killed")


def log_tail(path, lines=30):
    with open(path) as f:
        return "".join(f.readlines()[-lines:])


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
    """Runs the job on two workers and in one process; returns the results."""
    out = tmp_path_factory.mktemp("multiworker")
    ports = free_ports(2)
    script = ROOT / "tests" / "multiworker_worker.py"
    logs = [open(out / f"{name}.log", "w") for name in ("w0", "w1", "single")]
    try:
        processes = [start(script, [out], tf_config_value=tf_config(ports, i),
                           log=logs[i]) for i in range(2)]
        processes.append(start(script, [out], log=logs[2]))
        codes = wait_all(processes, TIMEOUT)
    finally:
        for f in logs:
            f.close()
    results = {}
    for role, log in (("worker0", "w0"), ("worker1", "w1"), ("single", "single")):
        path = out / f"{role}.json"
        assert path.exists(), f"{role} failed (exit codes {codes}):\n" + log_tail(
            out / f"{log}.log")
        results[role] = json.loads(path.read_text())
    results["out"] = out
    return results


def close(got, want, rtol=1e-5, atol=1e-6):
    np.testing.assert_allclose(np.asarray(got, float), np.asarray(want, float),
                               rtol=rtol, atol=atol)


@pytest.mark.slow
def test_both_workers_end_with_identical_state(two_workers):
    one, two = two_workers["worker0"], two_workers["worker1"]
    assert one["replicas"] == two["replicas"] == 2
    for part in ("dp", "private", "non_private", "jit", "noise", "checkpoint"):
        a, b = dict(one[part]), dict(two[part])
        a.pop("stop_reason", None), b.pop("stop_reason", None)  # says who saved
        assert a == b, part


@pytest.mark.slow
def test_dp_training_equals_one_process_on_the_same_batches(two_workers):
    got, want = two_workers["worker0"]["dp"], two_workers["single"]["dp"]
    assert two_workers["single"]["replicas"] == 1
    for key in ("weights", "ema", "optimizer", "predict"):
        close(got[key], want[key])
    for key in ("update_count", "participations", "non_poisson_updates",
                "nonfinite_examples"):
        assert got[key] == want[key], key
    assert got["update_count"] == 3  # BudgetGuard stopped before update 4
    assert got["evaluate"].keys() == want["evaluate"].keys()
    assert "auc_gap/sex" in got["evaluate"]
    for name, value in got["evaluate"].items():
        close(value, want["evaluate"][name])
    assert got["history"].keys() == want["history"].keys()
    for name, values in got["history"].items():
        # The step-log training loss averages each replica's mean (a training
        # diagnostic, as in Keras); everything else is exact.
        close(values, want["history"][name],
              rtol=1e-2 if name == "loss" else 1e-5)
    for part in ("private", "jit"):
        assert two_workers["worker0"][part]["update_count"] == 2
        close(two_workers["worker0"][part]["weights"],
              two_workers["single"][part]["weights"])
    assert two_workers["worker0"]["private"]["type"] == "PrivateModel"


@pytest.mark.slow
def test_epsilon_counts_updates_not_workers(two_workers):
    spec = data.make_train_dataset(job.source(), expected_batch_size=job.BATCH,
                                   seed=0, microbatch_size=job.MICRO).spec
    # Worked out from the accountant directly: 3 Poisson updates, q = 8/48.
    three = dpf.privacy.accounting.compute_epsilon(
        noise_multiplier=job.NOISE, delta=job.DELTA, sampling="poisson",
        steps=3, sampling_probability=8 / 48)
    six = dpf.privacy.accounting.compute_epsilon(
        noise_multiplier=job.NOISE, delta=job.DELTA, sampling="poisson",
        steps=6, sampling_probability=8 / 48)
    assert spec.sampling_probability == 8 / 48
    for role in ("worker0", "worker1", "single"):
        result = two_workers[role]["dp"]
        assert result["epsilon"] == pytest.approx(three, rel=1e-9)
        assert result["epsilon"] < six
        assert result["history"]["epsilon"][-1] == pytest.approx(three, rel=1e-9)
        assert "stopped after 3 updates" in result["stop_reason"]


@pytest.mark.slow
def test_non_private_model_equals_one_process_with_as_many_replicas(two_workers):
    got, want = two_workers["worker0"]["non_private"], two_workers["single"]["non_private"]
    assert got["iterations"] == want["iterations"] == 2
    close(got["weights"], want["weights"])
    close(got["predict"], want["predict"])
    for name, value in got["evaluate"].items():
        close(value, want["evaluate"][name])


@pytest.mark.slow
def test_noise_is_added_once_per_update_for_the_whole_job(two_workers):
    got = np.asarray(two_workers["worker0"]["noise"]["update"])
    want = job.NOISE_MULTIPLIER * job.NOISE_CLIP / job.BATCH  # SGD, learning rate 1
    assert got.size == 20_000
    assert two_workers["worker0"]["noise"]["nonfinite_examples"] == 0
    # 20,000 draws: the sample std is within 3% of the truth by ~6 standard
    # errors; noise from both workers would give sqrt(2) = 1.41 times as much.
    assert abs(got.std() / want - 1) < 0.03
    assert abs(got.mean()) < 4 * want / np.sqrt(got.size)
    # The very draw of the one-process run (same seed, same update).
    close(got, two_workers["single"]["noise"]["update"], rtol=1e-6, atol=1e-9)


@pytest.mark.slow
def test_only_the_chief_writes(two_workers):
    out = two_workers["out"]
    assert (out / "budget_worker0.keras").exists()
    assert (out / "budget_single.keras").exists()
    assert list((out / "checkpoint_worker0").iterdir())
    for written in ("budget_worker1.keras", "tensorboard_worker1", "checkpoint_worker1"):
        assert not (out / written).exists(), written
    assert "The chief saves the model." in two_workers["worker1"]["dp"]["stop_reason"]


def scalars(log_dir):
    """{(run, tag, step): value} of every scalar in a TensorBoard log dir."""
    found = {}
    for path in glob.glob(os.path.join(log_dir, "**", "events.out.tfevents.*"),
                          recursive=True):
        run = os.path.relpath(os.path.dirname(path), log_dir)
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.HasField("tensor"):
                    array = tf.make_ndarray(value.tensor)
                    if array.shape == () and array.dtype.kind == "f":
                        found[(run, value.tag, event.step)] = float(array)
    return found


@pytest.mark.slow
def test_dashboard_and_grouped_auc_give_the_figures_of_one_process(two_workers):
    out = two_workers["out"]
    got, want = scalars(out / "tensorboard_worker0"), scalars(out / "tensorboard_single")
    assert got.keys() == want.keys()
    tags = {tag for _, tag, _ in got}
    assert {"auc/sex/female", "auc_gap/sex", "privacy/epsilon",
            "ci/auc_gap/sex"} <= tags
    for key, value in got.items():
        assert value == pytest.approx(want[key], rel=1e-5, abs=1e-6, nan_ok=True), key


@pytest.mark.slow
def test_checkpoints_resume_every_worker_from_the_chiefs_files(two_workers):
    for role in ("worker0", "worker1"):
        result = two_workers[role]["checkpoint"]
        assert result["restored_count"] == 2
        # Worker 1 has no checkpoint files: its state came from the chief.
        assert result["restored"] == result["trained"]
        assert result["rekeyed_after_clean_end"] is False
        assert result["count_after_lost_updates"] == 2
        assert result["rekeyed_after_lost_updates"] is True
        assert result["noise_seed_changed"] is True
    close(two_workers["worker0"]["checkpoint"]["trained"],
          two_workers["single"]["checkpoint"]["trained"])


@pytest.mark.slow
def test_cluster_helpers_and_refusals_on_two_workers(two_workers):
    one, two = two_workers["worker0"]["cluster"], two_workers["worker1"]["cluster"]
    assert (one["is_chief"], two["is_chief"]) == (True, False)
    assert one["num_workers"] == two["num_workers"] == 2
    assert one["shared"] == two["shared"] == 1000  # worker 1 offered 1001
    assert two["before_copy"] == [[6.0, 6.0, 6.0], 41]
    assert one["after_copy"] == two["after_copy"] == [[5.0, 5.0, 5.0], 40]
    for result in (one, two):
        refused = result["refused"]
        assert "needs the TrainData of tf_dpfair.data.make_train_dataset" in refused["arrays"]
        assert "count it twice" in refused["own_pipeline"]
        assert "must be sharded by data" in refused["sharding_off"]
        assert "AutoShardPolicy.OFF" in refused["sharding_off"]
        assert "each example would count 2 times" in refused["train_on_batch"]
        assert result["update_count_after_refusals"] == 0


# ------------------------------------------------------- workers that disagree

@pytest.fixture(scope="module")
def disagreeing_workers(tmp_path_factory):
    """Two workers whose fits must be refused: worker 1 builds other batches."""
    out = tmp_path_factory.mktemp("agreement")
    ports = free_ports(2)
    script = ROOT / "tests" / "multiworker_worker.py"
    logs = [open(out / f"w{i}.log", "w") for i in range(2)]
    try:
        codes = wait_all([start(script, [out, "agreement"],
                                tf_config_value=tf_config(ports, i), log=logs[i])
                          for i in range(2)], TIMEOUT)
    finally:
        for f in logs:
            f.close()
    results = {}
    for i in range(2):
        path = out / f"agreement_worker{i}.json"
        assert path.exists(), f"worker {i} failed (exit codes {codes}):\n" + log_tail(
            out / f"w{i}.log")
        results[i] = json.loads(path.read_text())
    return results


@pytest.mark.slow
@pytest.mark.parametrize("case, named, fix", [
    ("seed", "they differ in the sampling seed.",
     "tf_dpfair.workers.share_from_chief(strategy, secrets.randbits(62))"),
    ("num_examples", "the sampling spec (num_examples, sampling_probability",
     "the same tf_dpfair.data.make_train_dataset arguments"),
    ("batch", "the sampling spec (expected_batch_size, sampling_probability",
     "the same tf_dpfair.data.make_train_dataset arguments"),
    ("resume", "they differ in the sampling seed.", "share_from_chief"),
])
def test_workers_that_would_draw_other_batches_both_refuse(disagreeing_workers,
                                                          case, named, fix):
    chief, other = disagreeing_workers[0][case], disagreeing_workers[1][case]
    assert chief["error"] is not None and chief["error"] == other["error"]
    message = chief["error"]
    assert message.startswith("The 2 workers of this job do not agree on what "
                              "decides the logical batches")
    assert named in message and fix in message
    assert "Refused on every worker before the first update" in message
    for result in disagreeing_workers.values():
        assert str(result["own_seed"]) not in message
        assert f"{result['own_seed']:x}" not in message
    if case == "resume":
        # Resumed at update 2 from the chief's checkpoint, then refused:
        # no update, and the checkpoint files are those of the first fit,
        # untouched.
        first = disagreeing_workers[0]["resume_first"]
        assert first["error"] is None and first["update_count"] == 2
        assert chief["update_count"] == other["update_count"] == 2
        assert chief["files"] == first["files"] and first["files"]
    else:
        # Nothing trained, nothing written: the chief's checkpoint directory
        # (made by restore) is empty, and worker 1 never has one.
        assert chief["update_count"] == other["update_count"] == 0
        assert chief["files"] == {} and other["files"] is None


# ------------------------------------------------------- train.py on two workers

TRAIN = ["-m", "tf_dpfair.experiments.train"]  # what tf-dpfair-train runs

@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    """train.py on two workers, worker 1 killed before update 4, then rerun.

    An uninterrupted one-process run of the same flags runs beside it. The
    runs are deterministic (fixed seeds), so the resumed job must end with
    the one-process run's model.
    """
    from experiment_fixtures import tiny_flags

    out = tmp_path_factory.mktemp("train")
    flags = tiny_flags(noise_multiplier=1.0)
    killer = ROOT / "tests" / "multiworker_train_worker.py"
    logs = {}

    def log(name):
        logs[name] = open(out / f"{name}.log", "w")
        return logs[name]

    def workers(script, extra, name):
        ports = free_ports(2)
        return [start(script, [*flags, "--strategy=multi_worker",
                               f"--work_dir={out / f'worker{i}'}", *extra],
                      tf_config_value=tf_config(ports, i), log=log(f"{name}{i}"))
                for i in range(2)]

    try:
        single = start(TRAIN, [*flags, f"--work_dir={out / 'single'}"],
                       log=log("single"))
        killed = wait_all(workers(killer, ["--kill_worker=1", "--kill_at_update=3"],
                                  "killed"), TIMEOUT)
        backup = out / "worker0" / "backup" / "training_metadata.json"
        backup_epoch = json.loads(backup.read_text())["epoch"] if backup.exists() else None
        result_after_kill = (out / "worker0" / "result.json").exists()
        resumed = wait_all(workers(TRAIN, [], "resumed") + [single], TIMEOUT)
    finally:
        for f in logs.values():
            f.close()
    return {"out": out, "killed": killed, "resumed": resumed,
            "backup_epoch": backup_epoch, "result_after_kill": result_after_kill,
            "log": lambda name: (out / f"{name}.log").read_text()}


@pytest.mark.slow
def test_train_py_on_two_workers_resumes_after_a_kill(killed_and_resumed):
    run = killed_and_resumed
    # Worker 1 died by SIGKILL before update 4; the chief saw it (its
    # collectives were aborted) and stopped, leaving the backup of epoch 1
    # (2 updates) and no result.
    assert run["killed"][1] == -9, run["log"]("killed1")
    assert run["killed"][0] != 0
    assert "unhealthy" in run["log"]("killed0") or "aborted" in run["log"]("killed0")
    assert run["backup_epoch"] == 1 and not run["result_after_kill"]
    assert run["resumed"] == [0, 0, 0], run["log"]("resumed0")[-3000:]
    assert "Training from update 2 of 6." in run["log"]("resumed0")
    assert "Training from update 2 of 6." in run["log"]("resumed1")
    assert "Worker 1 of 2 done; the chief writes the results" in run["log"]("resumed1")


@pytest.mark.slow
def test_resumed_two_worker_job_equals_the_uninterrupted_one_process_run(
        killed_and_resumed):
    out = killed_and_resumed["out"]
    got = json.loads((out / "worker0" / "result.json").read_text())
    want = json.loads((out / "single" / "result.json").read_text())
    assert got["training"]["workers"] == 2 and got["training"]["replicas"] == 2
    assert want["training"]["workers"] == 1 and want["training"]["replicas"] == 1
    assert got["privacy"]["steps"] == want["privacy"]["steps"] == 6
    # Poisson, q = 50/200, sigma = 1, delta = 1/N, 6 updates: from the
    # accountant directly.
    epsilon = dpf.privacy.accounting.compute_epsilon(
        noise_multiplier=1.0, delta=1 / 200, sampling="poisson", steps=6,
        sampling_probability=0.25)
    assert got["privacy"]["epsilon"] == pytest.approx(epsilon, rel=1e-9)
    assert want["privacy"]["epsilon"] == pytest.approx(epsilon, rel=1e-9)
    scores = np.load(out / "worker0" / "predictions.npz")
    reference = np.load(out / "single" / "predictions.npz")
    for name in ("scores_raw", "scores_ema"):
        close(scores[name], reference[name], rtol=1e-4, atol=1e-5)
    assert got["metrics"]["raw"]["auc"] == pytest.approx(want["metrics"]["raw"]["auc"],
                                                         abs=1e-6)
    # The other worker wrote nothing, in its own work_dir or anywhere else
    # the test can see.
    assert not (out / "worker1").exists()
