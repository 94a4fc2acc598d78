"""The DP-SGD update: per-example clipping, noise, and the checks around it.

- `step`: one private update, as functions a privacy reviewer reads top to
  bottom.
- `clipping`: per-example gradients and their clipping (vectorized path).
- `ghost/`: clipping without per-example gradients (ghost norms).
- `noise`: the one place where the sigma * C noise is drawn.
- `checks`, `separability`: whether a model and a batch are safe to train
  privately (labels, sample weights, examples that influence each other).
"""

from tf_dpfair import _lazy

__getattr__, __dir__, __all__ = _lazy.attach(
        __name__, submodules=("checks", "clipping", "ghost", "noise", "separability", "step"))
