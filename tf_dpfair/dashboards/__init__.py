"""TensorBoard dashboards of group disparities and privacy spend.

- `callback`: `FairnessDashboard`, the Keras callback, and its layout.
- `sweep`: the HParams table and private vs non-private view of a sweep.
"""

from tf_dpfair import _lazy

__getattr__, __dir__, __all__ = _lazy.attach(
        __name__,
        submodules=("callback", "rates", "sweep"),
        names={
            "FairnessDashboard": "callback",
            "dashboard_layout": "callback",
            "run_hparams": "callback",
            "figure_to_image": "callback",
        })
