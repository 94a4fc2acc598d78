"""The Keras side: model classes, `fit`, EMA, checkpoints, diagnostics, workers.

- `model`: `DPModel`, `PrivateModel`, `make_private` (the step is in
  `tf_dpfair.dpsgd.step`).
- `non_private`: the same evaluation for a non-private model.
- `fitting`: how a DP model plugs into `fit` (its input, ledger, XLA).
- `ledger_state`: the model's side of the privacy ledger.
- `privacy_callbacks`: epsilon in the logs, the budget guard, EMA evaluation.
- `ema`, `checkpoints`, `diagnostics`, `keras_multiworker`.
"""

from tf_dpfair import _lazy

__getattr__, __dir__, __all__ = _lazy.attach(
        __name__,
        submodules=("checkpoints", "diagnostics", "ema", "fitting", "keras_multiworker",
                    "ledger_state", "model", "non_private", "privacy_callbacks"))
