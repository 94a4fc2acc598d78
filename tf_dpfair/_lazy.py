"""Lazy attributes of a package: submodules and names imported on first use.

`import tf_dpfair` must not import TensorFlow, so that the privacy
calculator (`tf-dpfair-privacy`) starts in a fraction of a second; each
package therefore lists its public names and where they live, and imports
them only when they are first read, as Keras' `keras/api` separates public
names from the file layout.
"""

import importlib


def attach(package, *, submodules=(), names=None):
    """Returns `(__getattr__, __dir__, __all__)` for a package's namespace.

    Args:
      package: the package's `__name__`.
      submodules: names of submodules to import on first attribute access.
      names: dict public name -> submodule (relative to `package`) that
        defines it.

    Returns:
      A module-level `__getattr__` (PEP 562), a `__dir__` and `__all__`.
    """
    names = dict(names or {})
    submodules = tuple(submodules)

    def __getattr__(name):
        if name in names:
            module = importlib.import_module(f"{package}.{names[name]}")
            return getattr(module, name)
        if name in submodules:
            return importlib.import_module(f"{package}.{name}")
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    public = sorted(set(submodules) | set(names))

    def __dir__():
        return public

    return __getattr__, __dir__, public
