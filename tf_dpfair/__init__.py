"""tf_dpfair: differentially private, fairness-aware training of Keras image classifiers.

Layout, each layer importing only those above it in this list:

- `privacy/`: sampling specs, the privacy ledger, accounting, private search
  (plain Python and `dp_accounting`: no TensorFlow).
- `config.py`, `workers.py`: `DPConfig`; the chief and agreement across workers.
- `data/`: batch structure, groups, augmentation, input pipelines;
  `datasets/`: loaders.
- `dpsgd/`: the DP step as functions (`step.py`), clipping, noise, the
  checks that a model is safe to train privately, `ghost/` clipping.
- `training/`: the Keras model classes, `fit`, EMA, checkpoints, the
  model's side of the ledger, diagnostics, multi-worker `fit`.
- `fairness/`: per-group evaluation (AUC, error rates, calibration),
  thresholds, matching, reports, streaming Keras metrics.
- `dashboards/`: the TensorBoard callback, its pages, the sweep view.
- `callbacks.py`: every callback of the package, in one index.
- `models/`, `audit.py`, `cli/`, `experiments/`: models, the privacy audit,
  console commands, experiment binaries.

Names are imported on first use, so `import tf_dpfair` does not import
TensorFlow.
"""

from tf_dpfair import _keras_registration
from tf_dpfair import _lazy
from tf_dpfair import _old_paths

__version__ = "0.1.0"

_old_paths.install()

_public_getattr, __dir__, __all__ = _lazy.attach(
        __name__,
        submodules=("audit", "callbacks", "config", "dashboards", "data", "datasets",
                    "dpsgd", "fairness", "models", "privacy", "training", "workers"),
        names={
            "DPConfig": "config",
            "DPModel": "training.model",
            "DPTraining": "training.model",
            "PrivateModel": "training.model",
            "make_private": "training.model",
            "NonPrivateModel": "training.non_private",
            "make_non_private": "training.non_private",
        })


def __getattr__(name):
    if name in _old_paths.MOVED:
        return _old_paths.module(name)
    return _public_getattr(name)


_keras_registration.install()
