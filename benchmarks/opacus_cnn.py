"""Opacus on the benchmark CNN, for an examples-per-second comparison on one machine.

The same network as `dp_overhead.benchmark_cnn` written in PyTorch
(Conv32-GroupNorm-MaxPool-Conv64-GlobalAvgPool-Dense10 on 32x32x3), the same
random data (2,048 examples), logical batch 256, noise multiplier 1, clip
norm 1, SGD. Times plain PyTorch training and Opacus DP-SGD in its per-example
hook mode and its ghost-clipping mode, with the same interleaved rounds and
fastest-epoch statistic as `dp_overhead.py`; fixed-size shuffled batches for
all three, so only the cost of the step is compared.

Needs PyTorch and Opacus, which the package does not depend on; in a separate
virtualenv:

  pip install torch==2.13.0 opacus==1.6.0
  python benchmarks/opacus_cnn.py [--epochs 5] [--threads 2]
"""

import argparse
import time
import warnings

import numpy as np
import torch
from opacus import PrivacyEngine
from torch import nn


def benchmark_cnn():
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.GroupNorm(8, 32),
        nn.MaxPool2d(2), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


def variants(loader, make_model=benchmark_cnn):
    """Label -> (model, optimizer, criterion, data loader) ready to train.

    Plain PyTorch, Opacus with per-example hooks and Opacus ghost clipping,
    each on a fresh `make_model()` from the same seed; noise multiplier 1,
    clip norm 1, SGD, fixed-size shuffled batches.
    """
    out = {}
    torch.manual_seed(0)
    model = make_model()
    out["non-private"] = (model, torch.optim.SGD(model.parameters(), lr=0.1),
                          nn.CrossEntropyLoss(), loader)
    for label, mode in (("Opacus hooks", "hooks"), ("Opacus ghost", "ghost")):
        torch.manual_seed(0)
        model = make_model()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        engine = PrivacyEngine(accountant="rdp")
        kwargs = dict(module=model, optimizer=optimizer, data_loader=loader,
                      noise_multiplier=1.0, max_grad_norm=1.0,
                      poisson_sampling=False, grad_sample_mode=mode)
        if mode == "ghost":
            model, optimizer, criterion, dp_loader = engine.make_private(
                criterion=nn.CrossEntropyLoss(), **kwargs)
        else:
            model, optimizer, dp_loader = engine.make_private(**kwargs)
            criterion = nn.CrossEntropyLoss()
        out[label] = (model, optimizer, criterion, dp_loader)
    return out


def one_epoch(model, optimizer, criterion, loader):
    model.train()
    for x, y in loader:
        optimizer.zero_grad()
        loss = criterion(model(x), y)
        loss.backward()
        optimizer.step()


def time_variants(runs, examples, epochs, title):
    """One warm-up epoch each, then `epochs` interleaved rounds; prints each
    variant's fastest epoch in examples/s and its wall and CPU-time ratios to
    the non-private one."""
    for run in runs.values():
        one_epoch(*run)  # warm-up
    times = {label: [] for label in runs}
    cpu = {label: [] for label in runs}
    for _ in range(epochs):
        for label, run in runs.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            one_epoch(*run)
            times[label].append(time.perf_counter() - start)
            cpu[label].append(time.process_time() - start_cpu)
    plain, plain_cpu = min(times["non-private"]), min(cpu["non-private"])
    for label, values in times.items():
        print(f"[{title}] {label:>14}: {examples / min(values):6.1f} ex/s, ratio to "
              f"non-private {min(values) / plain:.2f}x (CPU time "
              f"{min(cpu[label]) / plain_cpu:.2f}x, {min(cpu[label]):.1f} s per epoch)",
              flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--examples", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    rng = np.random.default_rng(0)
    x = torch.tensor(rng.normal(size=(args.examples, 3, 32, 32)), dtype=torch.float32)
    y = torch.tensor(rng.integers(0, 10, size=args.examples))
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=args.batch, shuffle=True)
    time_variants(variants(loader), args.examples, args.epochs,
                  f"torch {torch.__version__}")

if __name__ == "__main__":
    main()
