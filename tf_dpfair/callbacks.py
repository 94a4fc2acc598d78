"""Every Keras callback of the package, in one index.

- `PrivacyLogger`: epsilon in the logs, from the model's privacy ledger.
- `BudgetGuard`: stops training before an epsilon budget is exceeded.
- `EMAEvaluation`: evaluates with the EMA weights as well.
- `DPCheckpoint`: crash-safe checkpoints with the privacy state.
- `GroupDiagnostics`: per-group clipping diagnostics (outside the guarantee).
- `FairnessDashboard`: TensorBoard pages of group disparities and privacy spend.
"""

from tf_dpfair import _lazy

__getattr__, __dir__, __all__ = _lazy.attach(
        "tf_dpfair",
        names={
            "PrivacyLogger": "training.privacy_callbacks",
            "BudgetGuard": "training.privacy_callbacks",
            "EMAEvaluation": "training.privacy_callbacks",
            "DPCheckpoint": "training.checkpoints",
            "GroupDiagnostics": "training.diagnostics",
            "FairnessDashboard": "dashboards.callback",
        })
