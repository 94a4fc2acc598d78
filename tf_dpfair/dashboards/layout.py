"""What TensorBoard shows of a run: the custom-scalars layout and the HParams.

- `dashboard_layout`: the custom-scalars page, one category "AUC by
  <attribute>" per attribute, optionally "error rates by <attribute>" and
  "training diagnostics by <attribute> (outside the DP guarantee)", then
  "privacy". Its charts match the tags of `summaries` by regex, in every
  run, so live and EMA weights show as separate lines.
- `run_hparams`: the HParams values of a run (privacy and training settings).
"""

import re

from tensorboard.plugins.custom_scalar import layout_pb2

from tf_dpfair.dashboards import summaries
from tf_dpfair.training import diagnostics


def dashboard_layout(groups, *, with_ci=False, confidence=0.95, rates=False,
                     rates_ci=False, diagnostics_groups=None):
    """The custom-scalars layout: one category per attribute, then privacy.

    Each attribute's category has a multiline chart of every group's AUC
    (tag regex `^auc/<attribute>/[^/]+$`), one of the worst group and the
    gap, and with `with_ci` margin charts of the `ci/` tags with their
    bootstrap bands. Regexes match in every run, so live and EMA weights
    show as separate lines.

    Args:
        groups: dict attribute -> list of group names.
        with_ci: add the margin charts of the `ci/` tags.
        confidence: confidence level named in the margin charts' titles.
        rates: add the "error rates by <attribute>" categories
            (`rate_categories`).
        rates_ci: with `rates`, their margin charts of the `ci/rates/` tags.
        diagnostics_groups: dict attribute -> group names of the opt-in
            training diagnostics, for their categories; None for none.

    Returns:
        A `layout_pb2.Layout`.

    Raises:
        ValueError: `groups` (and `diagnostics_groups`) are empty, or an
            attribute has no groups.
    """
    groups = groups or {}
    if not (groups or diagnostics_groups) or not all(groups.values()):
        raise ValueError(f"groups must map each attribute to its group names; got {groups!r}.")
    categories = auc_categories(groups, with_ci=with_ci, confidence=confidence)
    if rates:
        categories += rate_categories(groups, with_ci=rates_ci, confidence=confidence)
    categories += diagnostics_categories(diagnostics_groups or {})
    categories.append(privacy_category())
    return layout_pb2.Layout(category=categories)


def auc_categories(groups, *, with_ci=False, confidence=0.95):
    """Custom-scalars categories "AUC by <attribute>".

    Args:
        groups: dict attribute -> list of group names.
        with_ci: add margin charts of the exact `ci/` AUC tags.
        confidence: confidence level named in their titles.

    Returns:
        A list of `layout_pb2.Category`.
    """
    level = f"{100 * confidence:g}%"
    categories = []
    for attribute, names in groups.items():
        a = re.escape(attribute)
        charts = [
            _multiline(f"{attribute}: AUC of each group", rf"^auc/{a}/[^/]+$"),
            _multiline(f"{attribute}: worst-group AUC and gap (max - min)",
                       rf"^auc_(worst|gap)/{a}$"),
        ]
        if with_ci:
            charts.append(_margin(
                f"{attribute}: exact AUC of each group, {level} bootstrap band",
                [f"{summaries.CI_PREFIX}auc/{attribute}/{g}" for g in names]))
            charts.append(_margin(
                f"{attribute}: gap and worst group, {level} bootstrap band",
                [f"{summaries.CI_PREFIX}{name}/{attribute}" for name in ("auc_gap", "auc_worst")]))
        categories.append(layout_pb2.Category(title=f"AUC by {attribute}", chart=charts))
    return categories


def rate_categories(groups, *, with_ci=False, confidence=0.95):
    """Custom-scalars categories "error rates by <attribute>".

    Args:
        groups: dict attribute -> list of group names.
        with_ci: add margin charts of the exact `ci/rates/` tags.
        confidence: confidence level named in their titles.

    Returns:
        A list of `layout_pb2.Category`.
    """
    level = f"{100 * confidence:g}%"
    prefix = summaries.RATES_CI_PREFIX
    categories = []
    for attribute, names in groups.items():
        a = re.escape(attribute)
        charts = [
            _multiline(f"{attribute}: TPR of each group", rf"^tpr/{a}/[^/]+$"),
            _multiline(f"{attribute}: FPR of each group", rf"^fpr/{a}/[^/]+$"),
            _multiline(f"{attribute}: equal opportunity (TPR gap), FPR gap, equalized odds",
                       rf"^(tpr_gap|fpr_gap|equalized_odds)/{a}$"),
            _multiline(f"{attribute}: top-1 error of each group", rf"^top1_error/{a}/[^/]+$"),
        ]
        if with_ci:
            for figure, title in (("tpr", "TPR"), ("ece", "ECE")):
                charts.append(_margin(
                    f"{attribute}: exact {title} of each group, {level} bootstrap band",
                    [f"{prefix}{figure}/{attribute}/{g}" for g in names]))
            charts.append(_margin(
                f"{attribute}: equal opportunity, equalized odds and ECE gap, "
                f"{level} bootstrap band",
                [f"{prefix}{d}/{attribute}" for d in summaries.RATE_DIFFERENCES
                 if d != "error_gap"]))
        categories.append(layout_pb2.Category(title=f"error rates by {attribute}", chart=charts))
    return categories


def diagnostics_categories(diagnostics_groups):
    """Categories "training diagnostics by <attribute> (outside the DP guarantee)".

    Args:
        diagnostics_groups: dict attribute -> group names of the opt-in
            training diagnostics (only the attributes are used).

    Returns:
        A list of `layout_pb2.Category`, one per attribute.
    """
    categories = []
    for attribute in diagnostics_groups:
        tag = rf"^{re.escape(diagnostics.PREFIX)}{re.escape(attribute)}/[^/]+/"
        categories.append(layout_pb2.Category(
            title=f"training diagnostics by {attribute} (outside the DP guarantee)",
            chart=[
                _multiline(f"{attribute}: clip fraction of each group", tag + "clip_fraction$"),
                _multiline(f"{attribute}: median pre-clip gradient norm",
                           tag + "grad_norm_p50$"),
                _multiline(f"{attribute}: share of the clipped sum and of the examples",
                           tag + "(clipped_sum_share|example_share)$"),
                _multiline(f"{attribute}: cosine of the update with the group's gradient",
                           tag + "update_cosine$"),
                _multiline(f"{attribute}: training loss of each group", tag + "loss$"),
            ]))
    return categories


def privacy_category():
    """The category "privacy": epsilon, AUC against epsilon and step, noise."""
    return layout_pb2.Category(title="privacy", chart=[
        _multiline("epsilon spent vs step (optimizer updates)", f"^{summaries.EPSILON_TAG}$"),
        _multiline("overall AUC vs epsilon (x axis: epsilon x 1000)",
                   f"^{summaries.AUC_VS_EPSILON_TAG}$"),
        _multiline("overall AUC vs step", "^auc$"),
        _multiline("noise multiplier", f"^{summaries.NOISE_TAG}$"),
        _multiline("adaptive clipping: threshold T of each update, and the noisy share "
                   "of examples at or below it",
                   f"^({summaries.THRESHOLD_TAG}|{summaries.THRESHOLD_SHARE_TAG})$"),
    ])


def _multiline(title, regex):
    return layout_pb2.Chart(title=title, multiline=layout_pb2.MultilineChartContent(tag=[regex]))


def _margin(title, tags):
    """A margin chart of `tags`, each with its `/lower` and `/upper` band."""
    return layout_pb2.Chart(title=title, margin=layout_pb2.MarginChartContent(series=[
        layout_pb2.MarginChartContent.Series(value=tag, lower=tag + "/lower",
                                             upper=tag + "/upper")
        for tag in tags]))


def run_hparams(model, privacy_logger=None, extra=None):
    """The HParams values of a run: privacy and training settings.

    Args:
        model: the Keras model; a DPModel contributes its `DPConfig`.
        privacy_logger: optional `callbacks.PrivacyLogger`, for `delta` and
            `target_epsilon`.
        extra: optional dict of further values (bool, int, float or str),
            e.g. `{"learning_rate": 0.5}`; they override the ones above.

    Returns:
        dict name -> value: `private` (DP training with noise > 0),
        `noise_multiplier`, and for a DPModel `l2_norm_clip`,
        `expected_batch_size` (the logical batch), `augmult`, `ema_decay`
        (0.0 when EMA is off); with a logger, `delta` and `target_epsilon`
        (when set). Unknown settings are left out rather than invented.
    """
    config = getattr(model, "dp_config", None)
    values = {"private": bool(config is not None and config.noise_multiplier > 0),
              "noise_multiplier": float(config.noise_multiplier) if config else 0.0}
    if config is not None:
        values.update(l2_norm_clip=float(config.l2_norm_clip),
                      expected_batch_size=int(config.expected_batch_size),
                      augmult=int(config.augmult),
                      ema_decay=float(config.ema_decay or 0.0))
    if privacy_logger is not None:
        values["delta"] = float(privacy_logger.delta)
        if privacy_logger.target_epsilon is not None:
            values["target_epsilon"] = float(privacy_logger.target_epsilon)
    values.update(extra or {})
    return values
