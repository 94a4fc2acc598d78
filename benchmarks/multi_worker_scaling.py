"""Examples per second of DP training on 1 and 2 local workers, in one run.

The same DP job (the benchmark CNN of dp_overhead.py, 32x32x3 random images,
Poisson logical batches of `--batch` examples, ghost clipping, noise
multiplier 1) runs first in one process, then as a
`MultiWorkerMirroredStrategy` job of 2 worker processes on this machine
(TF_CONFIG on free localhost ports). Each update is one logical batch,
whatever the number of workers; examples/s is the expected batch times the
updates timed, over the time of the fastest `--rounds` consecutive updates
after `--warmup` updates (tracing). With W workers each computes 1/W of the
per-example gradients and all take part in one all-reduce per update.

On a machine with fewer cores than workers times TF's threads this
measures contention, not scaling; see docs/training_and_privacy.md
(Training on several machines) for what was measured where.

Usage: python benchmarks/multi_worker_scaling.py [--workers 1 2] [--batch 256]
    [--updates 12] [--warmup 3]
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULT = "SCALING_RESULT "


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("localhost", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def worker(args):
    """One process of the job: trains, prints its update times as JSON."""
    import tensorflow as tf

    multi = "TF_CONFIG" in os.environ
    # First: collective ops are configured before any dataset exists.
    strategy = (tf.distribute.MultiWorkerMirroredStrategy() if multi
                else tf.distribute.get_strategy())
    import keras
    import numpy as np

    import tf_dpfair as dpf
    from tf_dpfair.data import pipeline as data

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(args.examples, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, size=args.examples)
    source = data.ExampleSource.from_arrays(images, labels)
    train = data.make_train_dataset(
        source, expected_batch_size=args.batch, seed=dpf.workers.share_from_chief(strategy, 7),
        microbatch_size=args.microbatch, num_replicas=strategy.num_replicas_in_sync)
    with strategy.scope():
        keras.utils.set_random_seed(0)
        inputs = keras.Input((32, 32, 3))
        h = keras.layers.Conv2D(32, 3, padding="same", activation="relu")(inputs)
        h = keras.layers.GroupNormalization(groups=8)(h)
        h = keras.layers.MaxPooling2D()(h)
        h = keras.layers.Conv2D(64, 3, padding="same", activation="relu")(h)
        h = keras.layers.GlobalAveragePooling2D()(h)
        model = dpf.DPModel(inputs=inputs, outputs=keras.layers.Dense(10)(h),
                            dp_config=dpf.DPConfig(
                                l2_norm_clip=1.0, noise_multiplier=1.0,
                                expected_batch_size=args.batch,
                                microbatch_size=args.microbatch, clipping="ghost"))
        model.compile(optimizer=keras.optimizers.SGD(0.1),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))

    class Clock(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.ends = []

        def on_train_batch_end(self, batch, logs=None):
            self.ends.append(time.perf_counter())

    clock = Clock()
    model.fit(train, epochs=1, steps_per_epoch=args.warmup + args.updates,
              callbacks=[clock], verbose=0)
    durations = np.diff(clock.ends[args.warmup - 1:])
    print(RESULT + json.dumps({
        "chief": dpf.workers.is_chief(strategy),
        "workers": dpf.workers.num_workers(strategy),
        "replicas": strategy.num_replicas_in_sync,
        "update_seconds": durations.tolist(),
        "update_count": model.update_count}), flush=True)


def run_job(workers, args):
    """Starts the job on `workers` local processes; returns the chief's result."""
    command = [sys.executable, os.path.abspath(__file__), "--worker",
               f"--batch={args.batch}", f"--microbatch={args.microbatch}",
               f"--examples={args.examples}", f"--updates={args.updates}",
               f"--warmup={args.warmup}"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]),
        CUDA_VISIBLE_DEVICES="")
    env.pop("TF_CONFIG", None)
    ports = _free_ports(workers)
    processes = []
    for index in range(workers):
        if workers > 1:
            env["TF_CONFIG"] = json.dumps({
                "cluster": {"worker": [f"localhost:{p}" for p in ports]},
                "task": {"type": "worker", "index": index}})
        processes.append(subprocess.Popen(command, env=dict(env), stdout=subprocess.PIPE,
                                          stderr=subprocess.DEVNULL, text=True))
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=args.timeout)[0])
    finally:
        for process in processes:  # by PID, on timeout or error
            if process.poll() is None:
                process.kill()
                process.wait()
    results = [json.loads(line[len(RESULT):]) for out in outputs
               for line in out.splitlines() if line.startswith(RESULT)]
    chief = [r for r in results if r["chief"]]
    if len(results) != workers or len(chief) != 1:
        raise RuntimeError(f"{workers}-worker job failed: exit codes "
                           f"{[p.returncode for p in processes]}")
    return chief[0]


def fastest_window(durations, count):
    """Smallest total time of `count` consecutive updates."""
    return min(sum(durations[i:i + count]) for i in range(len(durations) - count + 1))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch", type=int, default=256, help="expected logical batch")
    parser.add_argument("--microbatch", type=int, default=32)
    parser.add_argument("--examples", type=int, default=2048, help="N")
    parser.add_argument("--updates", type=int, default=12, help="updates timed")
    parser.add_argument("--warmup", type=int, default=3, help="updates not timed")
    parser.add_argument("--rounds", type=int, default=8,
                        help="consecutive updates of the fastest window")
    parser.add_argument("--timeout", type=float, default=1200.0)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    rounds = min(args.rounds, args.updates)
    print(f"cores: {os.cpu_count()}; logical batch {args.batch}, micro-batch "
          f"{args.microbatch}, fastest {rounds} of {args.updates} updates after "
          f"{args.warmup} untimed")
    base = None
    for workers in args.workers:
        result = run_job(workers, args)
        speed = args.batch * rounds / fastest_window(result["update_seconds"], rounds)
        base = base or speed
        print(f"[workers={workers}] replicas {result['replicas']}, "
              f"{result['update_count']} updates: {speed:.0f} ex/s, "
              f"ratio to {args.workers[0]} worker(s) {speed / base:.2f}x", flush=True)


if __name__ == "__main__":
    main()
