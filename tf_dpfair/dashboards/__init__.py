"""TensorBoard dashboards of group disparities and privacy spend.

- `callback`: `FairnessDashboard`, the Keras callback that writes them.
- `summaries`: every run and tag it writes (AUC, error rates, privacy,
  training diagnostics), and the functions that write them.
- `layout`: what TensorBoard shows: the custom-scalars page and the HParams.
- `sweep`: the HParams table and private vs non-private view of a sweep.
- `rates`: old home of the error-rate names, kept importable.
"""

from tf_dpfair import _lazy

__getattr__, __dir__, __all__ = _lazy.attach(
        __name__,
        submodules=("callback", "layout", "rates", "summaries", "sweep"),
        names={
            "FairnessDashboard": "callback",
            "dashboard_layout": "layout",
            "run_hparams": "layout",
            "figure_to_image": "summaries",
        })
