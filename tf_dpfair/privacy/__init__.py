"""What the privacy statement rests on: sampling, the ledger, accounting.

Plain Python and `dp_accounting`, no TensorFlow, so the privacy calculator
(`tf-dpfair-privacy`) and a reviewer can use them alone.

- `sampling`: how a logical batch is drawn (`SamplingSpec`), as data.
- `input_sampling`: what sampling a `fit` call's input really has, and the
  ledger segment its updates go to.
- `pipeline_tag`: the mark the package's pipeline leaves on its dataset.
- `ledger`: every applied update as an event, append-only, and its statement.
- `segment`: one run of updates with one accounting (`Segment`), and its ids.
- `ledger_table`: the ledger as the float64 table saved with the weights.
- `accounting`: DP events, epsilon, noise calibration (the RDP accountant).
- `search`: the cost of a private hyperparameter search.
"""

from tf_dpfair import _lazy

__getattr__, __dir__, __all__ = _lazy.attach(
        __name__,
        submodules=("accounting", "input_sampling", "ledger",
                    "ledger_table", "pipeline_tag", "sampling", "search", "segment"),
        names={
            "PrivacyStatement": "accounting",
            "privacy_statement": "accounting",
            "compute_epsilon": "accounting",
            "calibrate_noise_multiplier": "accounting",
            "Ledger": "ledger",
            "Segment": "segment",
            "SamplingSpec": "sampling",
            "make_sampling_spec": "sampling",
            "TrialCount": "search",
            "search_statement": "search",
        })
