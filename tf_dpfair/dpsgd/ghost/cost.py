"""The cost model that picks, per layer, how ghost clipping computes it.

No closed form lives here. Each layer kind lists the methods that give its
per-example norms (and clipped sum) with the work each does for the layer's
actual shapes (`Estimate`: multiply-adds by kind of kernel, elements moved by
memory-bound ops, op calls, peak temporary memory); `seconds` turns that work
into time with the throughputs below, and `cheapest` picks the method with the
least time among those whose temporaries fit in `MAX_TEMPORARY_BYTES` (the
smallest one if none does).

The throughputs were measured on the 2-core x86 CPUs this package is
developed on, for each of TensorFlow's two CPU backends where they differ:
oneDNN (its default on recent Intel Xeons) and its own Eigen kernels (its
default elsewhere, e.g. AMD EPYC without AVX-512; see `onednn_enabled`). On
one AMD EPYC, with `TF_ENABLE_ONEDNN_OPTS=1` and without, the batched
products of patches and output gradients ran at 19-43 and 4-18 G
multiply-adds/s, and a per-example loop of kernel gradients cost ~250 and
~75 us per example. `benchmarks/dp_overhead.py --profile` prints the plan
with each layer's estimate beside its measured time, so a machine where they
disagree shows it. On such a machine the choice may be slower than the
best, never different in result: every method computes the same sums.
"""

import dataclasses
import math
import os

# Seconds per float read or written by elementwise ops, slices and transposes
# (0.2-0.35 ns measured on the tensors of one micro-batch, mostly in cache).
SECONDS_PER_ELEMENT = 0.3e-9
# Seconds per multiply-add of a batched matrix product (einsum/matmul), by
# backend.
SECONDS_PER_BLAS_MAC = {"onednn": 1 / 40e9, "eigen": 1 / 12e9}
# Seconds per multiply-add of TensorFlow's conv kernel gradient op (20-34
# G/s measured with oneDNN, 17-25 G/s with Eigen), and of the same op grouped
# with one group per example (oneDNN only: Eigen's takes no groups).
SECONDS_PER_CONV_MAC = {"onednn": 1 / 40e9, "eigen": 1 / 20e9}
SECONDS_PER_GROUPED_CONV_MAC = 1 / 30e9
# TensorFlow's depthwise kernel gradient op: with oneDNN fast for 3x3
# kernels and orders of magnitude slower for others (measured 6-65 M
# multiply-adds/s on 5x5 kernels over 15k-37k channels, against 2-17 G/s for
# 3x3); TensorFlow's own kernels run ~1.5 G/s for any size.
SECONDS_PER_DEPTHWISE_MAC = {"onednn_3x3": 1 / 8e9, "onednn_other": 1 / 20e6,
                             "eigen": 1 / 1.5e9}
# Seconds per multiply-add of a depthwise convolution (forward) whose filter is
# a feature map and whose output is a kernel: 0.9-8.6 G/s measured.
SECONDS_PER_CORRELATION_MAC = 1 / 4e9
# Fixed cost of one op call, and of one iteration of a per-example loop, by
# backend for the latter.
SECONDS_PER_CALL = 20e-6
SECONDS_PER_EXAMPLE_CALL = {"onednn": 200e-6, "eigen": 60e-6}
# Methods whose temporaries exceed this are avoided where another fits.
MAX_TEMPORARY_BYTES = 1 << 30


def onednn_enabled():
    """Whether TensorFlow runs its oneDNN CPU kernels.

    TensorFlow decides at start-up: on by default only on x86 CPUs with
    AVX-512 VNNI, BF16 or AMX (recent Intel Xeons), off elsewhere (AMD EPYC
    without AVX-512, ARM), and `TF_ENABLE_ONEDNN_OPTS` overrides it either
    way. The answer is TensorFlow's own; the variable is read only where that
    is not available.
    """
    try:
        from tensorflow.python.util import _pywrap_util_port
        return bool(_pywrap_util_port.IsMklEnabled())
    except (ImportError, AttributeError):
        return os.environ.get("TF_ENABLE_ONEDNN_OPTS", "").lower() in (
            "1", "true")


@dataclasses.dataclass(frozen=True)
class Estimate:
    """The work of one method on one micro-batch.

    Attributes:
      elementwise: floats read or written by memory-bound ops.
      blas: multiply-adds in batched matrix products.
      conv: multiply-adds in TensorFlow's conv kernel gradient op.
      grouped_conv: multiply-adds in that op grouped by example.
      native_depthwise: multiply-adds in its depthwise kernel gradient op.
      native_kernel: that op's (kh, kw).
      depthwise_correlation: multiply-adds in a depthwise convolution.
      calls: op calls.
      example_calls: iterations of a per-example loop.
      peak_bytes: largest temporary memory the method holds at once.
    """

    elementwise: float = 0
    blas: float = 0
    conv: float = 0
    grouped_conv: float = 0
    native_depthwise: float = 0
    native_kernel: tuple = (1, 1)
    depthwise_correlation: float = 0
    calls: int = 0
    example_calls: int = 0
    peak_bytes: float = 0

    def seconds(self):
        """The estimated time of the method on this machine model."""
        backend = "onednn" if onednn_enabled() else "eigen"
        if backend == "eigen":
            depthwise = SECONDS_PER_DEPTHWISE_MAC["eigen"]
        elif tuple(self.native_kernel) in ((3, 3), (1, 1)):
            depthwise = SECONDS_PER_DEPTHWISE_MAC["onednn_3x3"]
        else:
            depthwise = SECONDS_PER_DEPTHWISE_MAC["onednn_other"]
        return (self.elementwise * SECONDS_PER_ELEMENT
                + self.blas * SECONDS_PER_BLAS_MAC[backend]
                + self.conv * SECONDS_PER_CONV_MAC[backend]
                + self.grouped_conv * SECONDS_PER_GROUPED_CONV_MAC
                + self.native_depthwise * depthwise
                + self.depthwise_correlation * SECONDS_PER_CORRELATION_MAC
                + self.calls * SECONDS_PER_CALL
                + self.example_calls * SECONDS_PER_EXAMPLE_CALL[backend])

    def __add__(self, other):
        if self.native_depthwise and other.native_depthwise:
            raise ValueError("one native depthwise op per estimate")
        kernel = self.native_kernel if self.native_depthwise else other.native_kernel
        summed = {field.name: getattr(self, field.name) + getattr(other, field.name)
                  for field in dataclasses.fields(self)
                  if field.name not in ("native_kernel", "peak_bytes")}
        return Estimate(**summed, native_kernel=kernel,
                        peak_bytes=max(self.peak_bytes, other.peak_bytes))


# A method whose work cannot be sized (a dimension unknown before tracing).
UNKNOWN_COST = Estimate(elementwise=math.inf)


def cheapest(estimates):
    """The key of the fastest estimate whose temporaries fit in memory.

    Args:
      estimates: `{method: Estimate}`, in order of preference on ties.

    Returns:
      A key of `estimates`.
    """
    fitting = {k: e for k, e in estimates.items()
               if e.peak_bytes <= MAX_TEMPORARY_BYTES}
    if not fitting:
        return min(estimates, key=lambda k: estimates[k].peak_bytes)
    return min(fitting, key=lambda k: fitting[k].seconds())
