"""absl flags generated from a settings dataclass, so flags and settings never drift.

Each field becomes a flag of its name with the field's help; a flag counts
as an override only when it is given on the command line (`present`), so
named configs keep their values unless a flag says otherwise.
"""

import dataclasses
import json
import logging

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
