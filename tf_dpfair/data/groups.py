"""Group attributes: the names behind the int32 group ids of each example.

Every example carries `groups`, a dict attribute -> int32 id (see
`tf_dpfair.data.pipeline`); a `GroupSpec` kept alongside the examples says what the ids
mean, e.g. `GroupSpec({"sex": ("male", "female", "unknown")})`. A missing
demographic gets the explicit group `UNKNOWN`, so it is counted, never folded
silently into another group.
"""

import types

import numpy as np

UNKNOWN = "unknown"


class GroupSpec:
    """The names of the groups of each attribute: `attribute -> (name of id 0, ...)`.

    Args:
        names: mapping from attribute (e.g. "sex") to the sequence of its group
            names; group id i means `names[attribute][i]`.

    Raises:
        ValueError: an attribute has no groups or repeats a name.
    """

    def __init__(self, names=None):
        frozen = {}
        for attribute, group_names in dict(names or {}).items():
            group_names = tuple(str(n) for n in group_names)
            if not group_names:
                raise ValueError(f"Attribute {attribute!r} has no group names.")
            if len(set(group_names)) != len(group_names):
                raise ValueError(
                        f"Attribute {attribute!r} repeats a group name: {group_names}.")
            frozen[str(attribute)] = group_names
        self._names = types.MappingProxyType(frozen)

    @property
    def attributes(self):
        """The attribute names, a tuple of str (empty when there are no groups)."""
        return tuple(self._names)

    def names(self, attribute):
        """The group names of `attribute`, indexed by group id.

        Args:
            attribute: an attribute name, e.g. "sex".

        Returns:
            A tuple of str; group id i is `names(attribute)[i]`.

        Raises:
            KeyError: unknown attribute.
        """
        self._check_attribute(attribute)
        return self._names[attribute]

    def num_groups(self, attribute):
        """The number of groups of `attribute` (ids are 0 .. num_groups - 1).

        Raises:
            KeyError: unknown attribute.
        """
        return len(self.names(attribute))

    def to_dict(self):
        """Returns `{attribute: [names]}`, JSON-serialisable."""
        return {a: list(n) for a, n in self._names.items()}

    def check_ids(self, groups, num_examples):
        """Validates group ids against this spec.

        Args:
            groups: mapping attribute -> integer ids `[num_examples]`.
            num_examples: expected length of every id array.

        Returns:
            A dict attribute -> int32 numpy `[num_examples]`.

        Raises:
            ValueError: an attribute is missing or unknown, an array has the
                wrong length or non-integer values, or an id is out of range.
        """
        groups = dict(groups or {})
        if set(groups) != set(self.attributes):
            raise ValueError(
                    f"Group attributes {sorted(groups)} do not match the GroupSpec "
                    f"attributes {sorted(self.attributes)}.")
        checked = {}
        for attribute, ids in groups.items():
            ids = np.asarray(ids)
            if ids.shape != (num_examples,):
                raise ValueError(
                        f"Group ids of {attribute!r} must have shape ({num_examples},); "
                        f"got {ids.shape}.")
            if ids.size and not np.issubdtype(ids.dtype, np.integer):
                raise ValueError(
                        f"Group ids of {attribute!r} must be integers; got {ids.dtype}.")
            bad = (ids < 0) | (ids >= self.num_groups(attribute))
            if bad.any():
                raise ValueError(
                        f"Group ids of {attribute!r} must be in [0, "
                        f"{self.num_groups(attribute)}) ({self.names(attribute)}); "
                        f"{bad.sum()} are not, e.g. {ids[bad][0]} at example "
                        f"{np.flatnonzero(bad)[0]}.")
            checked[attribute] = ids.astype(np.int32)
        return checked

    def _check_attribute(self, attribute):
        if attribute not in self._names:
            raise KeyError(
                    f"Unknown group attribute {attribute!r}; known: {self.attributes}.")

    def __eq__(self, other):
        return isinstance(other, GroupSpec) and dict(self._names) == dict(other._names)

    def __repr__(self):
        return f"GroupSpec({dict(self._names)!r})"
