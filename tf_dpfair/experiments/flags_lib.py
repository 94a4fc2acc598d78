"""absl flags generated from a settings dataclass, so flags and settings never drift.

Each field becomes a flag of its name with the field's help; a flag counts
as an override only when it is given on the command line (`present`), so
named configs keep their values unless a flag says otherwise. `run_binary`
runs a binary's `main` so that `--help` shows its docstring and flags when it
is an installed console command too.
"""

import dataclasses
import json
import logging
import sys

from absl import app
from absl import flags


class _DropAccountantNoise(logging.Filter):
    """Drops dp_accounting's per-order convergence warnings (one per RDP order)."""

    def filter(self, record):
        return "failed to converge" not in record.getMessage()


def quiet_accountant():
    """Hides dp_accounting's repeated convergence warnings (orders it excludes)."""
    logging.getLogger("absl").addFilter(_DropAccountantNoise())


def _define(field, flag_values):
    default = (field.default_factory() if field.default is dataclasses.MISSING
               else field.default)
    help_text = field.metadata.get("help", field.name)
    kind = field.type
    if kind is dict:
        flags.DEFINE_string(field.name, json.dumps(default), help_text + " (JSON)",
                            flag_values=flag_values)
    elif kind is bool:
        flags.DEFINE_boolean(field.name, default, help_text, flag_values=flag_values)
    elif kind is int:
        flags.DEFINE_integer(field.name, default, help_text, flag_values=flag_values)
    elif kind is float:
        flags.DEFINE_float(field.name, default, help_text, flag_values=flag_values)
    else:
        flags.DEFINE_string(field.name, default, help_text, flag_values=flag_values)


def define_settings_flags(settings_class, flag_values=flags.FLAGS):
    """Defines one flag per field of `settings_class` (a dataclass).

    Args:
        settings_class: dataclass whose fields have int, float, bool, str or
            dict types and a "help" metadata entry.
        flag_values: the `FlagValues` to define them in.
    """
    for field in dataclasses.fields(settings_class):
        _define(field, flag_values)


def given_settings(settings_class, flag_values=flags.FLAGS):
    """The fields whose flags were given on the command line, parsed.

    Args:
        settings_class: the dataclass of `define_settings_flags`.
        flag_values: parsed `FlagValues`.

    Returns:
        dict field name -> value (JSON flags decoded).

    Raises:
        ValueError: a JSON flag does not hold a JSON object.
    """
    values = {}
    for field in dataclasses.fields(settings_class):
        flag = flag_values[field.name]
        if not flag.present:
            continue
        value = flag.value
        if field.type is dict:
            value = json.loads(value)
            if not isinstance(value, dict):
                raise ValueError(f"--{field.name} must be a JSON object; got {flag.value!r}.")
        values[field.name] = value
    return values


def run_binary(main, module_name, flag_values=flags.FLAGS):
    """Runs an absl binary's `main`, as a console command or as `python -m`.

    absl's `--help` prints the docstring of `__main__` and the flags that
    belong to the module named by `sys.argv[0]`. An installed console command
    runs as `__main__` the small wrapper that pip writes (no docstring, no
    flags of its own; `sys.argv[0]` is the command's path), so `--help` would
    show neither; the binary's docstring and key flags are lent to it first.
    Under `python -m` the binary is `__main__` itself and nothing is lent.

    Args:
        main: the binary's `main(argv)`.
        module_name: the binary's `__name__`.
        flag_values: the `FlagValues` its flags are defined in.

    Returns:
        Nothing: `absl.app.run` exits the process with `main`'s status.
    """
    binary = sys.modules[module_name]
    wrapper = sys.modules["__main__"]
    if wrapper is not binary:
        wrapper.__doc__ = binary.__doc__
        for flag in flag_values.get_key_flags_for_module(module_name):
            flag_values.register_key_flag_for_module(sys.argv[0], flag)
    app.run(main)
