"""Keras can load saved models of the package as soon as Keras itself loads.

`keras.models.load_model` finds a custom class (`tf_dpfair>DPModel`,
`tf_dpfair>GroupedAUC`, ...) only if the module that registers it has been
imported; it never imports modules outside Keras itself. `import tf_dpfair`
imports no TensorFlow (so that the privacy calculator starts at once), so
it cannot import those modules eagerly. Instead:

- if Keras is already imported, the registering modules are imported now;
- otherwise they are imported right after Keras is, by a one-shot import
  hook on `keras`.

Either way `import tf_dpfair` followed by `keras.models.load_model(path)`
works as it did when the package imported everything up front.
"""

import importlib
import importlib.abc
import logging
import sys

# Every module with a `keras.saving.register_keras_serializable` class, in
# layer order (lowest first).
REGISTERING_MODULES = (
    "tf_dpfair.models",
    "tf_dpfair.training.model",
    "tf_dpfair.training.non_private",
    "tf_dpfair.fairness.streaming_auc",
    "tf_dpfair.fairness.streaming_rates",
)


def register():
    """Imports every registering module that can be imported now.

    A module that cannot (because Keras was imported from inside one of the
    package's own imports, half done) registers itself when that import
    completes, as any import of it would.
    """
    for name in REGISTERING_MODULES:
        try:
            importlib.import_module(name)
        except ImportError as error:  # a half-imported module: see above
            logging.getLogger(__name__).debug("%s not registered yet: %s", name, error)


class _Loader(importlib.abc.Loader):
    """Runs Keras' own loader, then `register`."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        register()


class _AfterKeras(importlib.abc.MetaPathFinder):
    """Finds `keras` as the other finders do, with a loader that registers."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "keras":
            return None
        sys.meta_path.remove(self)  # one shot, and not asked again below
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find else None
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _Loader(spec.loader)
                return spec
        return None


def install():
    """Registers now if Keras is loaded, else once Keras loads."""
    if "keras" in sys.modules:
        register()
    elif not any(isinstance(finder, _AfterKeras) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterKeras())
