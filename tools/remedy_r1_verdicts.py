"""Writes only the clipping-mode verdicts (mechanisms.md/.csv) of a sweep.

The pre-registered claims of the remedy study, with the options
`tf-dpfair-report` passes for `--weights=ema --plateau_window=0.25
--tuned_settings=batch_size,ema_decay --verdict_bootstrap=2000`, without
the rest of the report (its figures and private-vs-non-private verdicts
take longer than the claims themselves):

  python tools/remedy_r1_verdicts.py SWEEP_DIR [OUT_DIR]
"""

import os
import sys
import time

from tf_dpfair.experiments import mechanisms_lib
from tf_dpfair.experiments import report_lib
from tf_dpfair.experiments import verdicts_lib


def main(argv):
    if len(argv) not in (2, 3):
        raise SystemExit(__doc__)
    start = time.time()
    sweep = argv[1]
    out_dir = argv[2] if len(argv) == 3 else os.path.join(sweep, "report")
    os.makedirs(out_dir, exist_ok=True)
    table, keys = report_lib.load_sweep(sweep)
    options = verdicts_lib.VerdictOptions(weights="ema", plateau_window=0.25,
                                          n_bootstrap=2000, tuned=("batch_size", "ema_decay"))
    paths, _ = mechanisms_lib.write_mechanism_verdicts(sweep, table, keys, out_dir, options)
    if not paths:
        raise SystemExit(f"No arm of {sweep} sets adaptive_clipping: no claims.")
    print(f"{paths['mechanisms_md']} ({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main(sys.argv)
