"""Tests of the sweep report's verdicts (tf_dpfair/experiments/verdicts_lib.py and
claims_lib.py), on sweep folders written by hand: every figure is checked against a
numpy computation of the same saved scores."""

import json
import math

import numpy as np
import pandas as pd
import pytest
from absl import app
from absl import flags

from tf_dpfair.experiments import claims_lib
from tf_dpfair.experiments import report
from tf_dpfair.experiments import report_lib
from tf_dpfair.experiments import verdicts_lib
from tf_dpfair.fairness import inference

N = 200  # test examples: 100 per group
GROUPS = np.repeat([0, 1], N // 2)
LABELS = np.tile([0, 1], N // 2)


def _correct(rng, accuracy, rotated=None):
    """0/1 flags with exactly `accuracy` per group (or per `rotated` group's own)."""
    out = np.zeros(N, bool)
    for g, share in enumerate((accuracy, accuracy if rotated is None else rotated)):
        rows = np.flatnonzero(GROUPS == g)
        out[rng.choice(rows, int(round(share * rows.size)), replace=False)] = True
    return out


def _scores(correct):
    """Two-class scores whose top class is the label exactly where `correct`."""
    top = np.where(correct, LABELS, 1 - LABELS)
    return np.eye(2, dtype=np.float32)[top] * 0.8 + 0.1


def write_run(sweep, name, *, private, seed, final, checkpoints=(), validation=None,
              learning_rate=0.5, selection=None, epsilon=2.0, settings=None, ema=None):
    """A finished run as train_lib writes it (the files the verdicts read).

    Args:
        final: `(accuracy of group 0, of group 1)` of the final model.
        checkpoints: one `(accuracy 0, accuracy 1)` per checkpoint, every 2 updates.
        validation: validation accuracy per checkpoint, or None.
        selection: a released selection score (of 50 validation examples), or None.
        ema: `(accuracy 0, accuracy 1)` of the final EMA weights, or None (no EMA).
    """
    rng = np.random.default_rng([seed, int(private), int(learning_rate * 100)])
    run = sweep / name
    (run / "checkpoints").mkdir(parents=True)
    arrays = {"labels": LABELS, "group_sex": GROUPS}
    correct = _correct(rng, *final)
    if ema is not None:
        arrays["scores_ema"] = _scores(_correct(rng, *ema))
    np.savez(run / "predictions.npz", scores_raw=_scores(correct), **arrays)
    arrays.pop("scores_ema", None)
    np.savez(run / "checkpoints" / "labels.npz", **arrays)
    if validation is not None:
        np.savez(run / "checkpoints" / "val_labels.npz", labels=LABELS[:50],
                 group_sex=GROUPS[:50])
    for k, shares in enumerate(checkpoints):
        saved = {"scores": _scores(_correct(rng, *shares)), "updates": 2 * (k + 1),
                 "epoch": k + 1}
        if validation is not None:
            hits = np.arange(50) < round(validation[k] * 50)
            saved["val_scores"] = _scores(np.r_[hits, np.zeros(N - 50, bool)])[:50]
        np.savez(run / "checkpoints" / f"update_{2 * (k + 1):06d}.npz", **saved)
    result = {"finished": True,
              "settings": {"seed": seed, "learning_rate": learning_rate,
                           "epsilon": epsilon if private else "inf", "non_private": False,
                           "noise_multiplier": None, "work_dir": str(run),
                           **(settings or {})},
              "privacy": {"private": private, "epsilon": 1.9 if private else None},
              "data": {"multi_label": False, "groups": {"sex": ["female", "male"]}}}
    if selection is not None:
        result["selection"] = {"score": selection, "validation_examples": 50}
    (run / "result.json").write_text(json.dumps(result))
    return correct


def write_axes(sweep, axes):
    (sweep / "sweep.json").write_text(json.dumps({"axes": axes}))


def _accuracy(correct):
    return correct.mean(), abs(correct[GROUPS == 0].mean() - correct[GROUPS == 1].mean())


CURVE = [(0.5, 0.3), (0.6, 0.45), (0.8, 0.7), (0.9, 0.86)]  # gap falls as accuracy rises


@pytest.fixture
def two_arms(tmp_path):
    """Two seeds per arm: private near 0.7 accuracy, non-private checkpoints 0.4 to 0.88."""
    finals = {}
    for seed in (0, 1):
        finals[("private", seed)] = write_run(
            tmp_path, f"epsilon=2__seed={seed}", private=True, seed=seed,
            final=[(0.8, 0.6), (0.78, 0.62)][seed])
        finals[("non-private", seed)] = write_run(
            tmp_path, f"epsilon=inf__seed={seed}", private=False, seed=seed,
            final=(0.9, 0.86), checkpoints=CURVE)
    write_axes(tmp_path, ["epsilon", "seed"])
    return tmp_path, finals


def _judge(sweep, **options):
    table, keys = report_lib.load_sweep(str(sweep))
    options = verdicts_lib.VerdictOptions(**{"n_bootstrap": 200, **options})
    entries, choices, notes = verdicts_lib.judge(str(sweep), table, keys, options)
    return verdicts_lib.verdict_table(entries), choices, notes


def _hand_curve(run_dir):
    """(accuracy, gap) of each checkpoint, by numpy from the saved files."""
    points = []
    for updates, path in claims_lib.checkpoint_files(str(run_dir)):
        correct = np.load(path)["scores"].argmax(1) == LABELS
        points.append(_accuracy(correct))
    return np.array(points)


def test_accuracy_gap_and_excess_disparity_equal_numpy(two_arms):
    sweep, finals = two_arms
    frame, _, _ = _judge(sweep)
    assert frame["claim"].tolist() == ["accuracy gap",
                                       "excess disparity at matched accuracy (sex)"]
    assert set(frame["split"]) == {"test"} and set(frame["seeds per arm"]) == {"2 / 2"}
    private = [_accuracy(finals[("private", s)]) for s in (0, 1)]
    non_private = [finals[("non-private", s)].mean() for s in (0, 1)]
    assert frame["estimate"][0] == pytest.approx(
        np.mean(non_private) - np.mean([a for a, _ in private]), abs=1e-12)
    # Each private model read off each non-private seed's curve by np.interp.
    curves = [_hand_curve(sweep / f"epsilon=inf__seed={s}") for s in (0, 1)]
    excess = []
    for accuracy, gap in private:
        readings = []
        for points in curves:
            order = np.argsort(points[:, 0])
            assert np.all(np.diff(points[order, 0]) > 0)  # distinct accuracies
            readings.append(np.interp(accuracy, points[order, 0], points[order, 1]))
        excess.append(gap - np.mean(readings))
    assert frame["estimate"][1] == pytest.approx(np.mean(excess), abs=1e-12)
    assert frame["interval_low"][1] <= frame["estimate"][1] <= frame["interval_high"][1]
    # No validation scores were saved: nothing is claimed about a plateau.
    assert all(verdicts_lib.NO_PLATEAU_CHECK in r for r in frame["reason"])


def test_private_accuracy_below_every_checkpoint_is_outside_the_curve(tmp_path):
    for seed in (0, 1):
        write_run(tmp_path, f"epsilon=2__seed={seed}", private=True, seed=seed,
                  final=(0.3, 0.2))
        write_run(tmp_path, f"epsilon=inf__seed={seed}", private=False, seed=seed,
                  final=(0.9, 0.86), checkpoints=CURVE)
    write_axes(tmp_path, ["epsilon", "seed"])
    frame, _, _ = _judge(tmp_path)
    row = frame.iloc[1]
    assert row["verdict"] == verdicts_lib.OUTSIDE and math.isnan(row["p"])
    assert "earlier" in row["reason"] and "nothing extrapolated" in row["reason"]
    # The accuracy claim is tested alone: Holm over one claim leaves p as it is.
    assert frame["Holm p"][0] == pytest.approx(frame["p"][0])


def test_holm_is_applied_across_every_claim_of_the_report(two_arms):
    sweep, _ = two_arms
    write_run(sweep, "epsilon=4__seed=0", private=True, seed=5, final=(0.75, 0.65),
              epsilon=4.0)
    frame, _, _ = _judge(sweep)
    assert len(frame) == 4  # two claims per private arm, all inside the curve
    tested = frame[frame["p"].notna()]
    p = tested["p"].to_numpy()
    m = len(p)
    order = np.argsort(p)
    hand = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order):  # Holm by hand
        running = max(running, min(1.0, (m - rank) * p[i]))
        hand[i] = running
    np.testing.assert_allclose(tested["Holm p"], hand)
    assert m == 4


def test_learning_rate_is_chosen_on_validation_never_on_test(tmp_path):
    # Learning rate 0.1: better on validation, worse on test. It is chosen.
    for lr, final, validation in ((0.1, (0.6, 0.5), 0.8), (0.5, (0.85, 0.8), 0.6)):
        for seed in (0, 1):
            write_run(tmp_path, f"epsilon=2__lr={lr}__seed={seed}", private=True,
                      seed=seed, final=final, learning_rate=lr, checkpoints=CURVE[:2],
                      validation=[validation - 0.1, validation])
    for seed in (0, 1):
        write_run(tmp_path, f"epsilon=inf__seed={seed}", private=False, seed=seed,
                  final=(0.9, 0.86), checkpoints=CURVE, validation=[0.5, 0.6, 0.7, 0.7])
    write_axes(tmp_path, ["epsilon", "learning_rate", "seed"])
    frame, choices, notes = _judge(tmp_path)
    private = choices[choices["private"]].set_index("learning_rate")
    assert private.loc["0.1", "chosen"] and not private.loc["0.5", "chosen"]
    assert private.loc["0.1", "validation figure"] == pytest.approx(0.8)
    assert set(choices["split"]) == {"validation"}
    assert set(frame["private arm"]) == {"epsilon=2.0, learning_rate=0.1"}
    assert "chosen on the validation split" in notes[0]
    # The validation curves were saved: plateau checked; private runs rose by 0.1
    # over 1 checkpoint with a window of 1 (not plateaued): inconclusive.
    frame, _, _ = _judge(tmp_path, plateau_window=1)
    assert set(frame["verdict"]) == {"inconclusive"}
    assert all("had not plateaued" in r for r in frame["reason"])


def test_a_released_selection_score_is_the_figure_of_the_choice(tmp_path):
    # Checkpoint validation says 0.5 is better; the released scores say 0.1.
    for lr, checkpoint_figure, score in ((0.1, 0.6, 45.0), (0.5, 0.9, 20.0)):
        write_run(tmp_path, f"epsilon=2__lr={lr}", private=True, seed=0,
                  final=(0.7, 0.6), learning_rate=lr, checkpoints=CURVE[:2],
                  validation=[checkpoint_figure] * 2, selection=score)
    write_axes(tmp_path, ["epsilon", "learning_rate"])
    _, choices, _ = _judge(tmp_path)
    chosen = choices[choices["chosen"]]
    assert chosen["learning_rate"].tolist() == ["0.1"]
    assert chosen["validation figure"].iloc[0] == pytest.approx(45.0 / 50)
    assert chosen["source"].iloc[0].startswith("selection score")


def test_without_validation_every_learning_rate_is_compared_apart(tmp_path):
    for lr in (0.1, 0.5):
        write_run(tmp_path, f"epsilon=2__lr={lr}", private=True, seed=0,
                  final=(0.7, 0.6), learning_rate=lr)
        write_run(tmp_path, f"epsilon=inf__lr={lr}", private=False, seed=0,
                  final=(0.9, 0.8), learning_rate=lr, checkpoints=CURVE)
    write_axes(tmp_path, ["epsilon", "learning_rate"])
    frame, choices, notes = _judge(tmp_path)
    assert not choices["chosen"].any()
    assert "could NOT be chosen on validation" in notes[0]
    pairs = set(zip(frame["private arm"], frame["counterpart"]))
    assert pairs == {(f"epsilon=2.0, learning_rate={lr}", f"epsilon=inf, learning_rate={lr}")
                     for lr in (0.1, 0.5)}


def test_ema_weights_are_judged_where_asked_for_and_kept(tmp_path):
    write_run(tmp_path, "epsilon=2", private=True, seed=0, final=(0.6, 0.6), ema=(0.8, 0.7))
    write_run(tmp_path, "epsilon=inf", private=False, seed=0, final=(0.9, 0.8),
              checkpoints=CURVE)
    write_axes(tmp_path, ["epsilon"])
    raw, _, _ = _judge(tmp_path)
    ema, _, _ = _judge(tmp_path, weights="ema")
    assert raw["estimate"][0] == pytest.approx(0.85 - 0.6)
    assert ema["estimate"][0] == pytest.approx(0.85 - 0.75)
    assert ema["weights"][0] == "private ema, non-private raw"
    assert raw["weights"][0] == "private raw, non-private raw"


def test_a_counterpart_checkpointed_more_densely_is_still_the_counterpart(tmp_path):
    write_run(tmp_path, "epsilon=2", private=True, seed=0, final=(0.7, 0.6),
              settings={"checkpoint_every_updates": 0, "optimizer": "sgd"})
    write_run(tmp_path, "epsilon=inf", private=False, seed=0, final=(0.9, 0.8),
              checkpoints=CURVE, settings={"checkpoint_every_updates": 5, "optimizer": "sgd"})
    write_run(tmp_path, "epsilon=inf__adam", private=False, seed=0, final=(0.9, 0.8),
              checkpoints=CURVE, settings={"checkpoint_every_updates": 5,
                                           "optimizer": "adam"})
    write_axes(tmp_path, ["epsilon", "optimizer"])
    frame, _, notes = _judge(tmp_path)
    # The same optimizer, however often checkpointed; never the Adam run.
    assert set(frame["counterpart"]) == {"epsilon=inf, optimizer=sgd"}
    assert not notes


def test_figures_match_scikit_learn_and_weights_count_repeats():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(3)
    labels = (rng.random((N, 3)) < 0.4).astype(float)
    scores = rng.normal(labels, 1.0)
    mask = (rng.random((N, 3)) < 0.9).astype(float)
    run = {"values": scores[:, None], "labels": labels, "mask": mask, "group_sex": GROUPS}
    got = claims_lib.figures(run, np.ones((1, N)), "sex", True)[0, :, 0]

    def mean_auc(rows):
        return np.mean([roc_auc_score(labels[rows & (mask[:, j] > 0), j],
                                      scores[rows & (mask[:, j] > 0), j]) for j in range(3)])

    everyone = np.ones(N, bool)
    by_group = [mean_auc(GROUPS == g) for g in (0, 1)]
    assert got[0] == pytest.approx(mean_auc(everyone))
    assert got[1] == pytest.approx(max(by_group) - min(by_group))
    # Integer weights are repeats: the same figures as the repeated examples.
    weights = rng.integers(0, 3, N).astype(float)
    repeat = np.repeat(np.arange(N), weights.astype(int))
    repeated = {"values": scores[repeat][:, None], "labels": labels[repeat],
                "mask": mask[repeat], "group_sex": GROUPS[repeat]}
    np.testing.assert_allclose(
        claims_lib.figures(run, weights[None], "sex", True),
        claims_lib.figures(repeated, np.ones((1, repeat.size)), "sex", True))
    correct = {"values": (rng.random((N, 2)) < 0.7).astype(float), "group_sex": GROUPS}
    accuracy = claims_lib.figures(correct, weights[None], "sex", False)[0]
    hits = correct["values"]
    group = [(weights * (GROUPS == g)) @ hits / (weights * (GROUPS == g)).sum()
             for g in (0, 1)]
    np.testing.assert_allclose(accuracy[0], weights @ hits / weights.sum())
    np.testing.assert_allclose(accuracy[1], np.abs(group[0] - group[1]))


def test_write_verdicts_writes_tables_that_name_their_split(two_arms, tmp_path):
    sweep, _ = two_arms
    table, keys = report_lib.load_sweep(str(sweep))
    out = tmp_path / "report"
    out.mkdir()
    paths, lines = verdicts_lib.write_verdicts(
        str(sweep), table, keys, str(out), verdicts_lib.VerdictOptions(n_bootstrap=50))
    text = open(paths["verdicts_md"]).read()
    assert "Split: test" in text and "Holm across the 2 tested claims" in text
    for column in verdicts_lib.COLUMNS:
        assert f"| {column} " in text or f" {column} |" in text
    assert pd.read_csv(paths["verdicts"])["split"].eq("test").all()
    assert lines[0] == "## Verdicts" and "Split: test" in lines[2]


def test_hierarchical_copies_reuse_one_resample_for_every_checkpoint():
    rng = np.random.default_rng(0)
    runs = [{"strata": GROUPS, "values": rng.random((N, 3))} for _ in range(2)]

    def statistic(run, weights):
        return weights @ run["values"] / weights.sum(1, keepdims=True)  # [k, 3]

    copies = inference.hierarchical_copies(runs, statistic, n_bootstrap=40, seed=1,
                                           strata="strata")
    assert copies.draws.shape == (40, 2, 3) and copies.picks.shape == (40, 2)
    np.testing.assert_allclose(copies.point, [r["values"].mean(0) for r in runs])
    # A statistic of identical columns gives identical values per copy: one
    # weight vector per copy, shared by its checkpoints.
    same = [{"strata": GROUPS, "values": np.repeat(r["values"][:, :1], 3, axis=1)}
            for r in runs]
    copies = inference.hierarchical_copies(same, statistic, n_bootstrap=40, seed=1,
                                           strata="strata")
    assert np.all(copies.draws == copies.draws[..., :1])
    assert np.ptp(copies.draws[..., 0]) > 0  # but resampled between copies
    with pytest.raises(ValueError, match="one entry per row of weights"):
        inference.hierarchical_copies(runs, lambda run, w: np.zeros(3), n_bootstrap=40,
                                      strata="strata")


@pytest.mark.parametrize("field, value, message", [
    ("accuracy_margin", 0.0, "accuracy_margin must be a number > 0"),
    ("disparity_margin", -0.1, "disparity_margin must be a number > 0"),
    ("alpha", 0.5, "alpha must be in \\(0, 0.5\\)"),
    ("plateau_window", 0, "plateau_window must be an integer >= 1"),
    ("plateau_window", 2.5, "plateau_window must be an integer >= 1"),
    ("plateau_tolerance", 0.0, "plateau_tolerance must be a number > 0"),
    ("weights", "best", "weights must be one of \\('raw', 'ema'\\)"),
    ("n_bootstrap", 0, "n_bootstrap must be an integer >= 1"),
])
def test_bad_verdict_options_are_refused_with_a_reason(field, value, message):
    with pytest.raises(ValueError, match=message):
        verdicts_lib.VerdictOptions(**{field: value})


@pytest.mark.parametrize("flag, message", [
    ("--accuracy_margin=0", "accuracy_margin must be a number > 0"),
    ("--alpha=0.7", "alpha must be in (0, 0.5)"),
    ("--plateau_window=0", "plateau_window must be an integer >= 1"),
])
def test_report_refuses_bad_verdict_flags(flag, message, tmp_path):
    flags.FLAGS(["report.py", f"--sweep_dir={tmp_path}", flag])
    try:
        with pytest.raises(app.UsageError, match=message.replace("(", "\\(").replace(
                ")", "\\)")):
            report.main(["report.py"])
    finally:
        flags.FLAGS.unparse_flags()


@pytest.mark.slow  # four tiny runs, about a minute and a half here
def test_a_tiny_sweep_with_validation_and_dense_checkpoints_gets_its_verdicts(tmp_path):
    # Multi-label data (mean AUC). Multi-class sweeps over seeds with a
    # test subset fail the explorable's figures (each seed draws other test
    # examples), which the verdicts do not need.
    from sklearn.metrics import roc_auc_score
    from experiment_fixtures import TINY
    from tf_dpfair.experiments import sweep_lib

    base = {**TINY, "steps": 4, "steps_per_epoch": 2, "checkpoint_every_updates": 1,
            "validation_fraction": 0.2, "public_validation": True}
    sweep = tmp_path / "sweep"
    sweep_lib.run_sweep(str(sweep), base=base, grid={"epsilon": [2.0, math.inf],
                                                     "seed": [0, 1]}, verbose=0)
    paths = report_lib.write_sweep_report(
        str(sweep), str(tmp_path / "report"), n_bootstrap=10,
        verdicts=verdicts_lib.VerdictOptions(n_bootstrap=100, plateau_window=1))
    frame = pd.read_csv(paths["verdicts"])
    assert frame["claim"][0] == "AUC gap"
    assert set(frame["claim"][1:]) == {"excess disparity at matched AUC (sex)",
                                       "excess disparity at matched AUC (age)"}
    assert set(frame["seeds per arm"]) == {"2 / 2"}
    # The AUC gap from the saved predictions, by scikit-learn.
    auc = {}
    for run in ("epsilon=2__seed=0", "epsilon=2__seed=1", "epsilon=inf__seed=0",
                "epsilon=inf__seed=1"):
        saved = np.load(sweep / run / "predictions.npz")
        auc[run] = np.mean([roc_auc_score(saved["labels"][:, j], saved["scores_raw"][:, j])
                            for j in range(saved["labels"].shape[1])])
    assert frame["estimate"][0] == pytest.approx(
        (auc["epsilon=inf__seed=0"] + auc["epsilon=inf__seed=1"]
         - auc["epsilon=2__seed=0"] - auc["epsilon=2__seed=1"]) / 2, abs=1e-9)
    # Validation curves were saved (4 checkpoints): the plateau was checked.
    assert not any(verdicts_lib.NO_PLATEAU_CHECK in r for r in frame["reason"])
    assert len(claims_lib.validation_curve(str(sweep / "epsilon=inf__seed=0"), True)) == 4
    text = open(paths["report"]).read()
    assert "## Verdicts" in text and text.count("Split: test.") >= 5
    assert "the one to read (`verdicts.md`)" in open(paths["matched_md"]).read()


def test_plateau_window_may_be_a_share_of_each_runs_checkpoints():
    assert verdicts_lib.plateau_checkpoints(3, 100) == 3
    assert verdicts_lib.plateau_checkpoints(3.0, 100) == 3
    assert verdicts_lib.plateau_checkpoints(0.25, 245) == 62  # ceil(61.25)
    assert verdicts_lib.plateau_checkpoints(0.25, 2) == 1
    verdicts_lib.VerdictOptions(plateau_window=0.25)
    verdicts_lib.VerdictOptions(plateau_window=4.0)
    with pytest.raises(ValueError, match="or a share in"):
        verdicts_lib.VerdictOptions(plateau_window=1.5)


def test_a_clip_only_arm_is_described_not_judged(two_arms):
    """Clipping without noise (epsilon inf) has no DP guarantee: no claim, a note."""
    sweep, _ = two_arms
    for seed in (0, 1):
        write_run(sweep, f"epsilon=clip__seed={seed}", private=True, seed=seed,
                  final=(0.85, 0.7), settings={"noise_multiplier": 0.0, "epsilon": None})
        path = sweep / f"epsilon=clip__seed={seed}" / "result.json"
        result = json.loads(path.read_text())
        result["privacy"]["epsilon"] = "inf"
        path.write_text(json.dumps(result))
    frame, _, notes = _judge(sweep)
    assert len(frame) == 2  # the epsilon-2 arm's two claims only
    assert any("clipped without noise" in n for n in notes), notes


def test_tuned_settings_let_an_arm_meet_a_counterpart_tuned_apart(tmp_path):
    """A batch chosen per arm on a pilot: compared only when the report is told so."""
    for seed in (0, 1):
        write_run(tmp_path, f"epsilon=2__seed={seed}", private=True, seed=seed,
                  final=(0.8, 0.6), settings={"batch_size": 4096, "ema_decay": 0.98})
        write_run(tmp_path, f"epsilon=inf__seed={seed}", private=False, seed=seed,
                  final=(0.9, 0.86), checkpoints=CURVE,
                  settings={"batch_size": 1024, "ema_decay": 0.0})
    write_axes(tmp_path, ["epsilon", "batch_size", "ema_decay", "seed"])
    frame, _, notes = _judge(tmp_path)
    assert frame.empty and any("no non-private runs with the same settings" in n
                               for n in notes), notes
    frame, _, notes = _judge(tmp_path, tuned=("batch_size", "ema_decay"))
    assert len(frame) == 2 and frame["counterpart"].str.contains("batch_size=1024").all()
    assert any("tuned for each arm apart" in n and "batch_size, ema_decay" in n
               for n in notes), notes


def _mechanism_sweep(sweep, mode_finals):
    """Non-private curve, standard clipping and one clipping mode at epsilon 2, 2 seeds."""
    finals = {}
    for seed in (0, 1):
        finals[("standard", seed)] = write_run(
            sweep, f"epsilon=2__mode=standard__seed={seed}", private=True, seed=seed,
            final=[(0.8, 0.6), (0.78, 0.62)][seed], learning_rate=0.5)
        finals[("mode", seed)] = write_run(
            sweep, f"epsilon=2__mode=global_adapt__seed={seed}", private=True, seed=seed,
            final=mode_finals[seed], learning_rate=0.3,
            settings={"adaptive_clipping": "global_adapt", "target_quantile": 0.9})
        finals[("non-private", seed)] = write_run(
            sweep, f"epsilon=inf__seed={seed}", private=False, seed=seed,
            final=(0.9, 0.86), checkpoints=CURVE, learning_rate=0.1)
    write_axes(sweep, ["epsilon", "adaptive_clipping", "seed"])
    return finals


def _hand_excess(sweep, finals, arm):
    curves = [_hand_curve(sweep / f"epsilon=inf__seed={s}") for s in (0, 1)]
    excess = []
    for seed in (0, 1):
        accuracy, gap = _accuracy(finals[(arm, seed)])
        readings = []
        for points in curves:
            order = np.argsort(points[:, 0])
            readings.append(np.interp(accuracy, points[order, 0], points[order, 1]))
        excess.append(gap - np.mean(readings))
    return np.mean(excess)


def test_a_clipping_mode_is_judged_against_standard_clipping_at_its_epsilon(tmp_path):
    from tf_dpfair.experiments import mechanisms_lib
    finals = _mechanism_sweep(tmp_path, [(0.79, 0.7), (0.77, 0.71)])
    table, keys = report_lib.load_sweep(str(tmp_path))
    options = verdicts_lib.VerdictOptions(n_bootstrap=300)
    entries, notes = mechanisms_lib.judge_mechanisms(str(tmp_path), table, keys, options)
    frame = mechanisms_lib.mechanism_table(entries)
    assert frame["claim"].tolist() == ["accuracy cost", "excess disparity difference (sex)"]
    assert frame["mode arm"].str.contains("global_adapt").all()
    assert frame["standard arm"].str.contains("adaptive_clipping=nan").all()
    assert set(frame["non-private arm"]) == {"epsilon=inf, adaptive_clipping=nan"}
    assert frame["kind"].tolist() == ["no_larger_than", "differs"]
    assert frame["margin"].tolist() == [0.01, 0.0]
    # By numpy: standard accuracy minus the mode's; excess (mode) - excess (standard).
    standard = np.mean([finals[("standard", s)].mean() for s in (0, 1)])
    mode = np.mean([finals[("mode", s)].mean() for s in (0, 1)])
    assert frame["estimate"][0] == pytest.approx(standard - mode, abs=1e-12)
    assert frame["estimate"][1] == pytest.approx(
        _hand_excess(tmp_path, finals, "mode") - _hand_excess(tmp_path, finals, "standard"),
        abs=1e-12)
    assert frame["estimate"][1] < -0.05  # the mode's gap is far smaller by construction
    assert set(frame["verdict"]) <= {"holds", "fails", "inconclusive", "lower", "higher",
                                     "no difference detected"}
    # Holm over this family of two: each adjusted p is at most twice its own.
    for p, holm in zip(frame["p"], frame["Holm p"]):
        assert p <= holm <= min(1.0, 2 * p) + 1e-12
    # The mode arm also meets its non-private counterpart in verdicts.md.
    verdict_frame, _, _ = _judge(tmp_path)
    assert verdict_frame["private arm"].str.contains("global_adapt").sum() == 2
    assert not notes


def test_mechanism_verdicts_files_name_their_split_and_need_a_standard_arm(tmp_path):
    from tf_dpfair.experiments import mechanisms_lib
    sweep = tmp_path / "sweep"
    _mechanism_sweep(sweep, [(0.79, 0.7), (0.77, 0.71)])
    out = tmp_path / "out"
    out.mkdir()
    table, keys = report_lib.load_sweep(str(sweep))
    paths, lines = mechanisms_lib.write_mechanism_verdicts(
        str(sweep), table, keys, str(out), verdicts_lib.VerdictOptions(n_bootstrap=50))
    text = (out / "mechanisms.md").read_text()
    assert "Split: test" in text and "Holm across these 2 tested claims" in text
    assert pd.read_csv(paths["mechanisms"])["split"].eq("test").all()
    assert lines[0] == "## Clipping modes against standard DP-SGD"
    # Without a standard-clipping arm of that epsilon: a note, no claim.
    for seed in (0, 1):
        for path in (sweep / f"epsilon=2__mode=standard__seed={seed}").rglob("*"):
            if path.is_file():
                path.unlink()
    table, keys = report_lib.load_sweep(str(sweep))
    entries, notes = mechanisms_lib.judge_mechanisms(
        str(sweep), table, keys, verdicts_lib.VerdictOptions(n_bootstrap=50))
    assert not entries and any("no standard-clipping arm" in n for n in notes), notes
    # A sweep without clipping modes writes nothing.
    plain = tmp_path / "plain"
    for seed in (0, 1):
        write_run(plain, f"epsilon=2__seed={seed}", private=True, seed=seed, final=(0.8, 0.6))
    write_axes(plain, ["epsilon", "seed"])
    table, keys = report_lib.load_sweep(str(plain))
    assert mechanisms_lib.write_mechanism_verdicts(str(plain), table, keys, str(out)) == ({}, [])
