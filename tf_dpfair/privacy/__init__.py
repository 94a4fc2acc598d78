"""What the privacy statement rests on: sampling, the ledger, accounting.

Plain Python and `dp_accounting`, no TensorFlow, so the privacy calculator
(`tf-dpfair-privacy`) and a reviewer can use them alone.

- `sampling`: how a logical batch is drawn (`SamplingSpec`), as data.
- `input_sampling`: what sampling a `fit` call's input really has, and the
  ledger segment its updates go to.
- `ledger`: every applied update as an event, append-only.
- `accounting`: DP events, epsilon, noise calibration (the RDP accountant).
- `search`: the cost of a private hyperparameter search.
"""

from tf_dpfair import _lazy

__getattr__, __dir__, __all__ = _lazy.attach(
        __name__,
        submodules=("accounting", "input_sampling", "ledger", "sampling", "search"),
        names={
            "PrivacyStatement": "accounting",
            "privacy_statement": "accounting",
            "compute_epsilon": "accounting",
            "calibrate_noise_multiplier": "accounting",
            "Ledger": "ledger",
            "Segment": "ledger",
            "SamplingSpec": "sampling",
            "make_sampling_spec": "sampling",
            "TrialCount": "search",
            "search_statement": "search",
        })
