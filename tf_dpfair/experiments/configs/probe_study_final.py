"""Study 2 redone, Stage A3: the final runs of the probe, as chosen on validation.

The settings of `probe_study`, each arm at the batch, learning rate and
weights (raw or EMA) that Stage A1 chose on the validation split
(docs/study2_redo/a1_r10_choices.csv; A2 kept one view per example), with
seeds 0-4 and checkpoints every 4 updates. An arm whose choice was the raw
weights runs without EMA, so that `--weights=ema` reads every arm's chosen
weights. One command reproduces the 10 % share's final runs and verdicts:

  tf-dpfair-sweep --config=probe_study_final --work_dir=/tmp/probe_a3 && \\
  tf-dpfair-report --sweep_dir=/tmp/probe_a3 --weights=ema \\
      --plateau_window=0.25 --tuned_settings=batch_size,ema_decay
"""

from tf_dpfair.experiments.configs import probe_study

SETTINGS = dict(probe_study.SETTINGS, checkpoint_every_updates=4, n_bootstrap=200)

# (epsilon, batch, EMA decay (0 = the raw weights were chosen), learning rate)
_CHOSEN_R10 = [(1.0, 1024, 0.996, 0.1), (2.0, 1024, 0.0, 0.1), (4.0, 4096, 0.984, 3.0),
               (8.0, 4096, 0.0, 1.0), (float("inf"), 1024, 0.0, 0.003)]

SWEEP = {"grid": [
    {"rotated_fraction": [0.1], "batch_size": [batch], "ema_decay": [decay],
     "epsilon": [epsilon], "learning_rate": [rate], "seed": [0, 1, 2, 3, 4]}
    for epsilon, batch, decay, rate in _CHOSEN_R10]}
