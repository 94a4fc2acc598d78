"""Examples with group attributes, readable by index: `ExampleSource`.

Element structure (one unbatched example), the same for every loader:

    {
        "image": uint8 [H, W, C], or float32 [H, W, C] in [0, 1],
        "label": int32 [] class id, or float32 [L] multi-label targets in {0, 1},
        "label_mask": float32 [L], only for datasets with ignorable labels
            (1 = label known, 0 = ignore it, e.g. an uncertain CheXpert label),
        "groups": {attribute: int32 []}, possibly empty,
    }

Group ids index the names in a `GroupSpec` kept alongside the examples (e.g.
`{"sex": ("male", "female", "unknown")}`); a missing demographic gets the
explicit group `"unknown"`, never a silent default.

`ExampleSource` holds N such examples, readable by index, from in-memory
arrays, image files, or any traceable `index -> element` function (TFDS
random-access sources), so sampling never loads every image. The pipelines
that batch them for `DPModel` are in `tf_dpfair.data.pipeline`.
"""

import numpy as np
import tensorflow as tf

from tf_dpfair.data import batch
from tf_dpfair.data.groups import GroupSpec
from tf_dpfair.data.images import decode_image

IMAGE = "image"
LABEL = batch.LABEL_KEY
LABEL_MASK = "label_mask"
GROUPS = batch.GROUPS_KEY


class ExampleSource:
    """N examples readable by index, with the group names they use.

    Args:
        num_examples: N > 0.
        load_fn: traceable `fn(index: int64 scalar tensor) -> element` returning
            the element structure of this module, with a static image shape.
        group_spec: `GroupSpec` (or mapping) of the `"groups"` in the elements.
        check_group_ids: add run-time checks that group ids are in range (set
            False only where the ids were validated already).
        features: the "image" of each element is a float32 feature array
            of any static shape (`from_features`), not an image.

    Attributes:
        num_examples: N.
        group_spec: the `GroupSpec`.
        element_spec: the `tf.TypeSpec` structure of one element.
        paths: numpy str `[N]`, the file of each index for file-backed
            sources, else None.
        load_many: for sources held in memory, a traceable
            `fn(indices: int64 [M]) -> elements batched [M, ...]` reading
            many examples in one gather (`from_arrays`, `from_features` and
            their subsets); None otherwise.

    Raises:
        ValueError: N is not positive, or the elements do not follow the
            element structure or do not match `group_spec`.
    """

    def __init__(self, num_examples, load_fn, group_spec=None, *, check_group_ids=True,
                 features=False):
        if int(num_examples) != num_examples or num_examples <= 0:
            raise ValueError(f"num_examples must be a positive integer; got {num_examples!r}.")
        self.num_examples = int(num_examples)
        self.group_spec = (group_spec if isinstance(group_spec, GroupSpec)
                           else GroupSpec(group_spec))
        self._load_fn = load_fn
        self._check_group_ids = check_group_ids
        # Which file each index reads, where examples are files (else None).
        self.paths = None
        self.load_many = None
        self.element_spec = tf.data.Dataset.range(1).map(load_fn).element_spec
        # Features (any static float32 shape) instead of images [H, W, C].
        self.features = bool(features)
        _check_element_spec(self.element_spec, self.group_spec, self.features)

    def load(self, index):
        """Reads one example.

        Args:
            index: int64 scalar tensor in [0, N).

        Returns:
            The element dict (see the module docstring).

        Raises:
            tf.errors.InvalidArgumentError: at run time, a group id is out of
                range (only when `check_group_ids`).
        """
        element = self._load_fn(index)
        if not self._check_group_ids:
            return element
        checks = []
        for attribute, ids in element.get(GROUPS, {}).items():
            checks.append(tf.debugging.assert_greater_equal(
                    ids, 0, message=f"Negative group id for attribute {attribute!r}"))
            checks.append(tf.debugging.assert_less(
                    ids, self.group_spec.num_groups(attribute),
                    message=f"Group id of attribute {attribute!r} out of range "
                            f"{self.group_spec.names(attribute)}"))
        with tf.control_dependencies(checks):
            return tf.nest.map_structure(tf.identity, element)

    def subset(self, indices):
        """The examples at `indices` of this source, as a source of their own.

        Reads through this source's `load`: nothing is copied, so a subset of
        files or of a TFDS source stays lazy.

        Args:
            indices: int sequence of distinct indices in [0, N); the new
                source's index j reads this source's `indices[j]`.

        Returns:
            An `ExampleSource` of `len(indices)` examples, same groups.

        Raises:
            ValueError: no indices, repeated ones, or one out of range.
        """
        indices = np.asarray(indices, np.int64).reshape(-1)
        if not len(indices):
            raise ValueError("A subset needs at least one index.")
        if len(np.unique(indices)) != len(indices):
            raise ValueError("A subset's indices must be distinct.")
        if indices.min() < 0 or indices.max() >= self.num_examples:
            raise ValueError(f"Subset indices must be in [0, {self.num_examples}).")
        table = tf.constant(indices)
        load_fn = self._load_fn
        part = ExampleSource(len(indices), lambda i: load_fn(tf.gather(table, i)),
                             self.group_spec, check_group_ids=self._check_group_ids,
                             features=self.features)
        if self.paths is not None:
            part.paths = np.asarray(self.paths)[indices]
        if self.load_many is not None:
            many = self.load_many
            part.load_many = lambda rows: many(tf.gather(table, rows))
        return part

    def split(self, fraction, seed):
        """Splits the examples in two by a seeded permutation of the indices.

        The split depends on N, `fraction` and `seed` only, never on the
        data: every example lands in exactly one part.

        Args:
            fraction: share of the examples in the second part, in (0, 1);
                the second part gets `round(fraction * N)` examples (at least
                1, and at least 1 left in the first).
            seed: integer seed of the permutation.

        Returns:
            `(first, second, first_indices, second_indices)`: two sources and
            the sorted indices of this source that each reads.

        Raises:
            ValueError: a fraction outside (0, 1), or N < 2.
        """
        if not 0 < fraction < 1:
            raise ValueError(f"The split fraction must be in (0, 1); got {fraction!r}.")
        if self.num_examples < 2:
            raise ValueError("Splitting needs at least 2 examples.")
        count = min(max(int(round(fraction * self.num_examples)), 1), self.num_examples - 1)
        order = np.random.default_rng([int(seed), 0x5B117]).permutation(self.num_examples)
        second, first = np.sort(order[:count]), np.sort(order[count:])
        return self.subset(first), self.subset(second), first, second

    def zeros(self):
        """An all-zero element of this source's structure (for padding rows).

        Returns:
            An element dict of zero tensors matching `element_spec`.
        """
        return tf.nest.map_structure(lambda s: tf.zeros(s.shape, s.dtype),
                                     self.element_spec)

    def elements(self):
        """All examples in index order, unbatched.

        Returns:
            A `tf.data.Dataset` of element dicts.
        """
        return tf.data.Dataset.range(self.num_examples).map(
                self.load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    @classmethod
    def from_arrays(cls, images, labels, *, groups=None, group_spec=None, label_mask=None):
        """Examples held in memory.

        Args:
            images: uint8 or float (in [0, 1]) array `[N, H, W, C]` or `[N, H, W]`.
            labels: int `[N]` class ids, or `[N, L]` multi-label targets.
            groups: mapping attribute -> int ids `[N]`, or None.
            group_spec: `GroupSpec` or mapping naming the ids in `groups`.
            label_mask: float `[N, L]` (1 = known, 0 = ignore), or None.

        Returns:
            An `ExampleSource`.

        Raises:
            ValueError: shapes disagree, group ids do not match `group_spec`, or
                float images or labels hold NaN or Inf.
        """
        images = np.asarray(images)
        if images.ndim == 3:
            images = images[..., np.newaxis]
        if images.ndim != 4:
            raise ValueError(f"images must be [N, H, W, C] or [N, H, W]; got {images.shape}.")
        if images.dtype != np.uint8:
            images = images.astype(np.float32)
            _check_finite(images, "images")
        num = len(images)
        columns = _label_columns(labels, label_mask, num)
        if columns[LABEL].dtype == np.float32:
            _check_finite(columns[LABEL], "labels")
        group_spec = group_spec if isinstance(group_spec, GroupSpec) else GroupSpec(group_spec)
        columns[GROUPS] = group_spec.check_ids(groups, num)
        columns[IMAGE] = images
        return _in_memory(cls, num, columns, group_spec, features=False)

    @classmethod
    def from_features(cls, features, labels, *, groups=None, group_spec=None,
                      label_mask=None):
        """Examples whose "image" is a float32 feature array of any static shape.

        For heads trained on a frozen backbone's features
        (`tf_dpfair.training.frozen_features`): `[N, F]`, or `[N, K, F]` for K
        views per example. The pipelines pass them through unchanged.

        Args:
            features: float array `[N, ...]` (at least one axis after N).
            labels, groups, group_spec, label_mask: as in `from_arrays`.

        Returns:
            An `ExampleSource`.

        Raises:
            ValueError: shapes disagree, or features, labels hold NaN or Inf.
        """
        features = np.asarray(features, np.float32)
        if features.ndim < 2:
            raise ValueError(f"features must be [N, ...] with at least one feature axis; "
                             f"got {features.shape}.")
        _check_finite(features, "features")
        columns = _label_columns(labels, label_mask, len(features))
        if columns[LABEL].dtype == np.float32:
            _check_finite(columns[LABEL], "labels")
        group_spec = group_spec if isinstance(group_spec, GroupSpec) else GroupSpec(group_spec)
        columns[GROUPS] = group_spec.check_ids(groups, len(features))
        columns[IMAGE] = features
        return _in_memory(cls, len(features), columns, group_spec, features=True)

    @classmethod
    def from_image_files(cls, paths, labels, *, image_size, channels=1, groups=None,
                         group_spec=None, label_mask=None):
        """Examples whose images are files (JPEG, PNG, ...), read when sampled.

        Args:
            paths: sequence of N image file paths.
            labels: int `[N]` class ids, or `[N, L]` multi-label targets.
            image_size: `(height, width)` every image is resized to.
            channels: 1 (grayscale) or 3 (RGB) channels to decode to.
            groups: mapping attribute -> int ids `[N]`, or None.
            group_spec: `GroupSpec` or mapping naming the ids in `groups`.
            label_mask: float `[N, L]` (1 = known, 0 = ignore), or None.

        Returns:
            An `ExampleSource` yielding uint8 `[height, width, channels]` images;
            its `paths` attribute lists the file of each index.

        Raises:
            ValueError: shapes disagree, bad `image_size`/`channels`, or group ids
                do not match `group_spec`.
        """
        paths = np.asarray([str(p) for p in paths])
        num = len(paths)
        height, width = _check_image_size(image_size)
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3; got {channels!r}.")
        columns = _label_columns(labels, label_mask, num)
        group_spec = group_spec if isinstance(group_spec, GroupSpec) else GroupSpec(group_spec)
        columns[GROUPS] = group_spec.check_ids(groups, num)
        tensors = tf.nest.map_structure(tf.constant, columns)
        path_tensor = tf.constant(paths)

        def load(index):
            element = tf.nest.map_structure(lambda t: tf.gather(t, index), tensors)
            element[IMAGE] = decode_image(tf.io.read_file(tf.gather(path_tensor, index)),
                                          (height, width), channels)
            return element

        source = cls(num, load, group_spec, check_group_ids=False)
        source.paths = paths
        return source


def _in_memory(cls, num, columns, group_spec, *, features):
    """A source over in-memory columns (ids already checked), with `load_many`."""
    tensors = tf.nest.map_structure(tf.constant, columns)

    def gather(indices):
        return tf.nest.map_structure(lambda t: tf.gather(t, indices), tensors)

    source = cls(num, gather, group_spec, check_group_ids=False, features=features)
    source.load_many = gather
    return source


def _check_image_size(image_size):
    try:
        height, width = (int(v) for v in image_size)
    except (TypeError, ValueError):
        raise ValueError(f"image_size must be (height, width); got {image_size!r}.") from None
    if height <= 0 or width <= 0:
        raise ValueError(f"image_size must be positive; got {image_size!r}.")
    return height, width


def _check_finite(array, name):
    # Caught here, where the example can be named; in training a NaN/Inf
    # example would only be dropped (zero contribution) and counted.
    bad = np.flatnonzero(~np.isfinite(array.reshape(len(array), -1)).all(axis=1))
    if len(bad):
        raise ValueError(
                f"The {name} of {len(bad)} examples contain NaN or Inf, e.g. example "
                f"{bad[0]}. Fix or drop those examples.")


def _label_columns(labels, label_mask, num):
    labels = np.asarray(labels)
    if len(labels) != num:
        raise ValueError(f"Got {len(labels)} labels for {num} examples.")
    if labels.ndim == 1:
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(
                    f"Labels of shape [N] must be integer class ids; got {labels.dtype}.")
        labels = labels.astype(np.int32)
    elif labels.ndim == 2:
        labels = labels.astype(np.float32)
    else:
        raise ValueError(f"labels must be [N] or [N, L]; got shape {labels.shape}.")
    columns = {LABEL: labels}
    if label_mask is not None:
        label_mask = np.asarray(label_mask, np.float32)
        if labels.ndim != 2 or label_mask.shape != labels.shape:
            raise ValueError(
                    f"label_mask must have the shape of multi-label labels {labels.shape}; "
                    f"got {label_mask.shape}.")
        columns[LABEL_MASK] = label_mask
    return columns


def _check_element_spec(spec, group_spec, features=False):
    if not isinstance(spec, dict) or not {IMAGE, LABEL} <= set(spec):
        raise ValueError(
                f"An element must be a dict with keys {IMAGE!r}, {LABEL!r} and "
                f"{GROUPS!r}; got {spec}.")
    unknown = set(spec) - {IMAGE, LABEL, LABEL_MASK, GROUPS}
    if unknown:
        raise ValueError(f"Unknown element keys {sorted(unknown)}.")
    image = spec[IMAGE]
    if features:
        if image.dtype != tf.float32 or not image.shape.rank or \
                not image.shape.is_fully_defined():
            raise ValueError(f"Element features must be float32 with a static shape; got "
                             f"{image.dtype.name} {image.shape}.")
    elif image.shape.rank != 3 or not image.shape.is_fully_defined():
        raise ValueError(f"Element images must have a static [H, W, C] shape; got {image.shape}.")
    if image.dtype not in (tf.uint8, tf.float32):
        raise ValueError(f"Element images must be uint8 or float32; got {image.dtype.name}.")
    groups = spec.get(GROUPS, {})
    if set(groups) != set(group_spec.attributes):
        raise ValueError(
                f"Element group attributes {sorted(groups)} do not match the GroupSpec "
                f"attributes {sorted(group_spec.attributes)}.")
    for attribute, ids in groups.items():
        if ids.dtype != tf.int32 or ids.shape.rank != 0:
            raise ValueError(
                    f"Group ids of {attribute!r} must be int32 scalars; got "
                    f"{ids.dtype.name} {ids.shape}.")
