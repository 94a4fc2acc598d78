"""Times DP training against plain Keras training of the same model, in one run.

Models:
- the benchmark CNN: 32x32x3 input, Conv32-GroupNorm-MaxPool-Conv64-
  GlobalAvgPool-Dense10;
- an NF-ResNet (depth 8) at 64x64x3.
Random data, logical batch 256, noise multiplier 1, clip norm 1. For each
clipping mode ("vectorized", "ghost", "auto") and for plain Keras `fit`, the
median epoch time over interleaved rounds (after a tracing epoch) gives
examples per second; the DP / non-private ratio is in the same run. `--memory` also measures the
peak resident memory of one update at logical batches 1,024 and 65,536 (same
micro-batch), each in a fresh process, minus the input batch itself.

`--xla` adds the DP modes compiled with XLA (jit_compile=True).

Usage: python benchmarks/dp_overhead.py [--epochs 4] [--microbatch 64] [--memory] [--xla]
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tf_dpfair as dpf  # noqa: E402
from tf_dpfair import models  # noqa: E402


def benchmark_cnn(seed=0):
    """The benchmark CNN of the DP-overhead comparison."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((32, 32, 3))
    h = keras.layers.Conv2D(32, 3, padding="same", activation="relu")(inputs)
    h = keras.layers.GroupNormalization(groups=8)(h)
    h = keras.layers.MaxPooling2D()(h)
    h = keras.layers.Conv2D(64, 3, padding="same", activation="relu")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    outputs = keras.layers.Dense(10)(h)
    return keras.Model(inputs, outputs)


def nf_resnet_64(seed=0):
    keras.utils.set_random_seed(seed)
    return models.nf_resnet((64, 64, 3), 10, depth=8)


MODELS = {"cnn32": (benchmark_cnn, (32, 32, 3)),
          "nf_resnet64": (nf_resnet_64, (64, 64, 3))}


def compile_model(model, jit_compile=False):
    model.compile(optimizer=keras.optimizers.SGD(0.1),
                  loss=keras.losses.SparseCategoricalCrossentropy(
                      from_logits=True), jit_compile=jit_compile)
    return model


def dp_config(batch, microbatch, clipping):
    return dpf.DPConfig(l2_norm_clip=1.0, noise_multiplier=1.0,
                        expected_batch_size=batch, microbatch_size=microbatch,
                        clipping=clipping)


def speed(name, args):
    """Prints examples/s of each variant and its ratio to non-private.

    Every variant is warmed up (traced) first; then rounds time one epoch of
    each variant in turn, so load from other processes hits all of them alike.
    The figure is the median over rounds.
    """
    build, shape = MODELS[name]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.examples,) + shape).astype("float32")
    y = rng.integers(0, 10, size=args.examples)
    variants = {"non-private": compile_model(build())}
    for jit in ((False, True) if args.xla else (False,)):
        for clipping in ("vectorized", "ghost", "auto"):
            label = f"DP {clipping}{' XLA' if jit else ''}"
            variants[label] = compile_model(dpf.make_private(
                build(), dp_config(args.batch, args.microbatch, clipping)), jit)
    for model in variants.values():
        model.fit(x, y, batch_size=args.batch, epochs=1, verbose=0,
                  shuffle=False)
    times = {label: [] for label in variants}
    for _ in range(args.epochs):
        for label, model in variants.items():
            start = time.perf_counter()
            model.fit(x, y, batch_size=args.batch, epochs=1, verbose=0,
                      shuffle=False)
            times[label].append(time.perf_counter() - start)
    plain = statistics.median(times["non-private"])
    for label, values in times.items():
        median = statistics.median(values)
        print(f"[{name}] {label:>16}: {args.examples / median:6.0f} ex/s, "
              f"ratio to non-private {median / plain:.2f}x", flush=True)


def one_update_peak_memory(batch, microbatch, clipping):
    """Peak RSS (MiB) of one DP update at logical batch `batch`, input excluded."""
    build, shape = MODELS["cnn32"]
    # One copy of the input, held by TensorFlow: it is subtracted below.
    x = tf.random.normal((batch,) + shape)
    y = tf.zeros([batch], tf.int64)
    model = compile_model(dpf.make_private(build(), dp_config(batch, microbatch,
                                                              clipping)))
    model.fit(x[:microbatch], y[:microbatch], batch_size=microbatch, verbose=0)
    model.fit(tf.data.Dataset.from_tensors((x, y)), verbose=0)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return peak_mib - x.shape.num_elements() * 4 / 2**20


def memory(args):
    for clipping in ("vectorized", "ghost"):
        peaks = {}
        for batch in (1024, 65536):
            out = subprocess.run(
                [sys.executable, __file__, "--_memory_child",
                 f"{batch},{args.microbatch},{clipping}"],
                capture_output=True, text=True, check=True).stdout
            peaks[batch] = json.loads(out.strip().splitlines()[-1])["peak_mib"]
        print(f"[memory, {clipping}] peak RSS minus input: logical 1,024: "
              f"{peaks[1024]:.0f} MiB; 65,536: {peaks[65536]:.0f} MiB "
              f"(ratio {peaks[65536] / peaks[1024]:.2f})", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--examples", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--microbatch", type=int, default=64)
    parser.add_argument("--models", default="cnn32,nf_resnet64")
    parser.add_argument("--memory", action="store_true")
    parser.add_argument("--xla", action="store_true",
                        help="also time the DP modes with jit_compile=True")
    parser.add_argument("--_memory_child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._memory_child:
        batch, microbatch, clipping = args._memory_child.split(",")
        peak = one_update_peak_memory(int(batch), int(microbatch), clipping)
        print(json.dumps({"peak_mib": peak}))
        return
    for name in filter(None, args.models.split(",")):
        speed(name, args)
    if args.memory:
        memory(args)


if __name__ == "__main__":
    main()
