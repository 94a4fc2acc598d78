"""The structure of a batch, defined once for training and evaluation.

A batch is what `keras.Model.fit` expects: `(x, y)` or `(x, y, sample_weight)`.

- `x`: images, `[B, H, W, C]`; with augmentation multiplicity K,
    `[B, K, H, W, C]` (see `DPConfig.augmult`).
- `y`: either the labels alone (`[B]` int class ids or `[B, L]` multi-label
    targets), or a dict `{"label": labels, "groups": {attribute: ids}}` where
    each `ids` is an int32 `[B]` tensor of group ids for that attribute (sex,
    age band, ...). Training ignores the groups; grouped metrics read them.
- `sample_weight`: float `[B]` in [0, 1]; 0 marks padding rows.
"""

LABEL_KEY = "label"
GROUPS_KEY = "groups"
LABEL_MASK_KEY = "label_mask"


def split_labels(y):
    """Splits `y` into `(labels, groups)`; `groups` is None when absent.

    Args:
        y: labels, or a dict with keys `"label"` and optionally `"groups"`.

    Returns:
        `(labels, groups)` where `groups` is a dict of attribute -> `[B]` ids.

    Raises:
        ValueError: `y` is a dict without a `"label"` key.
    """
    if isinstance(y, dict):
        if LABEL_KEY not in y:
            raise ValueError(
                    f"A dict of labels must have the key {LABEL_KEY!r} (and optionally "
                    f"{GROUPS_KEY!r}); got keys {sorted(y)}.")
        return y[LABEL_KEY], y.get(GROUPS_KEY)
    return y, None


def label_mask_of(y):
    """Returns the `[B, L]` label mask of `y`, or None when it has none."""
    if isinstance(y, dict):
        return y.get(LABEL_MASK_KEY)
    return None
