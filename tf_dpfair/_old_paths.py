"""Import paths of modules that moved, kept working with a warning each.

The package was once 37 flat modules (`tf_dpfair.accounting`,
`tf_dpfair.model`, ...). They now live in subpackages by concern (see the
README's layout). Code that imports an old path, and `.keras` files whose
configs name an old module, still work: the old name is an alias of the new
module, and its first use warns once (`FutureWarning`) with the new path.
"""

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

# Old module (relative to tf_dpfair) -> new module. `data`, `fairness` and
# `dashboards` were modules and are now packages of the same name; their
# old names are handled by the packages themselves (see their __init__).
MOVED = {
    "accounting": "privacy.accounting",
    "ledger": "privacy.ledger",
    "feeding": "privacy.input_sampling",
    "search_privacy": "privacy.search",
    "sampling": "privacy.sampling",
    "clipping": "dpsgd.clipping",
    "noise": "dpsgd.noise",
    "checks": "dpsgd.checks",
    "separability": "dpsgd.separability",
    "ghost": "dpsgd.ghost",
    "batch": "data.batch",
    "groups": "data.groups",
    "augment": "data.augment",
    "model": "training.model",
    "grouped": "training.non_private",
    "fitting": "training.fitting",
    "ledger_state": "training.ledger_state",
    "ema": "training.ema",
    "resume": "training.checkpoints",
    "diagnostics": "training.diagnostics",
    "cluster": "workers",
    "multiworker": "training.keras_multiworker",
    "error_rates": "fairness.rates",
    "calibration": "fairness.calibration",
    "thresholds": "fairness.thresholds",
    "metrics": "fairness.streaming_auc",
    "rate_metrics": "fairness.streaming_rates",
    "reports": "fairness.auc_report",
    "rate_reports": "fairness.rates_report",
    "dashboard_rates": "dashboards.rates",
    "dashboard_sweep": "dashboards.sweep",
}

_warned = set()


def warn_once(old, new):
    """Warns, once per process and old path, that `old` is now `new`."""
    if old in _warned:
        return
    _warned.add(old)
    warnings.warn(f"{old} moved to {new}; the old path is an alias that will "
                  f"be removed in a future version.", FutureWarning, stacklevel=3)


def new_path(fullname):
    """The new module path of an old full module name, or None."""
    prefix = "tf_dpfair."
    if not fullname.startswith(prefix):
        return None
    parts = fullname[len(prefix):].split(".")
    if parts[0] not in MOVED:
        return None
    return prefix + ".".join([MOVED[parts[0]]] + parts[1:])


def module(old_name):
    """The module that `tf_dpfair.<old_name>` now is, warning once."""
    new = new_path(f"tf_dpfair.{old_name}")
    warn_once(f"tf_dpfair.{old_name}", new)
    return importlib.import_module(new)


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports an old module path as the module it moved to."""

    def find_spec(self, fullname, path=None, target=None):
        if new_path(fullname) is None:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        new = new_path(spec.name)
        warn_once(spec.name, new)
        return importlib.import_module(new)

    def exec_module(self, module):
        pass  # the module it returns is already imported


def install():
    """Puts the finder first on `sys.meta_path` (once).

    First, because the path finder would otherwise load a submodule of an old
    package path (`tf_dpfair.ghost.plan`) from the new package's folder as a
    second copy of the module.
    """
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
