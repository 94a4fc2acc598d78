"""Renders the fairness dashboard of a short DP run to a PNG (docs/dashboard.png).

Trains a tiny private model on synthetic CheXpert-shaped data with a planted
gap (female examples carry a weaker signal), logs it with
`keras.callbacks.TensorBoard` and `FairnessDashboard`, starts TensorBoard on
a free loopback port and captures its custom-scalars page with headless
Chromium (Debian's `chromium`).

Usage, from the repository root:
  python -m tf_dpfair.experiments.render_dashboard [--out docs/dashboard.png]

TensorFlow's start-up logs are hidden; set TF_DPFAIR_TF_LOGS=1 to see them.
"""

from tf_dpfair.cli import tf_startup

# Before anything imports TensorFlow.
tf_startup.quiet_tensorflow()

import argparse  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

from tf_dpfair.experiments import dashboard_lib  # noqa: E402


def render(out, *, log_dir=None, epochs=8):
    """Trains the demo run, serves it and writes the screenshot.

    Args:
        out: path of the PNG.
        log_dir: directory for the logs (default: a temporary one, removed after).
        epochs: epochs of 4 updates each.

    Returns:
        dict with the final `history` figures and the `seconds` taken.
    """
    start = time.monotonic()
    with tempfile.TemporaryDirectory() as scratch:
        log_dir = log_dir or scratch
        history, _, _ = dashboard_lib.train_demo_run(
            os.path.join(log_dir, "dp_run"), epochs=epochs, steps_per_epoch=4,
            num_train=2048, num_eval=1024, image_size=16, ema_decay=0.95)
        with dashboard_lib.tensorboard_server(log_dir) as url:
            dashboard_lib.wait_for(
                lambda: "dp_run/fairness_ema" in dashboard_lib.fetch(url + "/data/runs"),
                what="the run to load")
            dashboard_lib.screenshot_custom_scalars(url, out)
    final = {key: values[-1] for key, values in history.history.items()
             if key in ("val_auc/sex/female", "val_auc/sex/male", "epsilon")}
    return {"history": final, "seconds": time.monotonic() - start}


def main(argv=None):
    """Parses the flags and renders the dashboard."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/dashboard.png", help="PNG to write.")
    parser.add_argument("--log_dir", default=None, help="Keep the logs here.")
    parser.add_argument("--epochs", type=int, default=8, help="Epochs of 4 updates.")
    args = parser.parse_args(argv)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    result = render(args.out, log_dir=args.log_dir, epochs=args.epochs)
    print(f"Wrote {args.out} ({os.path.getsize(args.out) // 1024} KB) in "
          f"{result['seconds']:.0f} s; final figures: {result['history']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
