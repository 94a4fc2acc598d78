"""Augmentation multiplicity: K augmented views of each example.

With augmult K the model sees x of shape `[B, K, H, W, C]` and averages the
per-example loss over the K views before taking the example's gradient, so
clipping and sensitivity stay per example. K=1 is the plain path `[B, H, W, C]`.

Augmentations act on one example at a time (never mixing examples, which
would break per-example sensitivity) and use stateless random ops seeded by
`(run seed, update index, example index)`, so runs reproduce and resume.

An augmentation function has the signature
`fn(image: float32 [H, W, C], seed: int64 [2]) -> float32 [H, W, C]`.
"""

import functools

import tensorflow as tf

_ALG = "philox"
DEFAULT_CROP_PADDING = 4


def random_crop_flip(image, seed, padding=DEFAULT_CROP_PADDING):
    """Random crop of the reflect-padded image, then a random horizontal flip.

    Args:
        image: float `[H, W, C]` with static shape.
        seed: int64 `[2]` stateless seed.
        padding: pixels of reflect padding on each side (0 <= padding < H, W).

    Returns:
        float `[H, W, C]`.

    Raises:
        ValueError: the image shape is not static or `padding` is out of range.
    """
    height, width, channels = _static_hwc(image)
    if not 0 <= padding < min(height, width):
        raise ValueError(
                f"padding must be in [0, min(H, W)) = [0, {min(height, width)}) for "
                f"reflect padding; got {padding}.")
    crop_seed, flip_seed = tf.unstack(
            tf.random.experimental.stateless_split(seed, num=2, alg=_ALG))
    padded = tf.pad(image, [[padding, padding], [padding, padding], [0, 0]],
                    mode="REFLECT")
    offset = tf.random.stateless_uniform(
            [2], crop_seed, minval=0, maxval=2 * padding + 1, dtype=tf.int32, alg=_ALG)
    cropped = tf.slice(padded, [offset[0], offset[1], 0], [height, width, channels])
    flip = tf.random.stateless_uniform([], flip_seed, alg=_ALG) < 0.5
    out = tf.where(flip, tf.reverse(cropped, axis=[1]), cropped)
    out.set_shape([height, width, channels])
    return out


def make_random_crop_flip(padding=DEFAULT_CROP_PADDING):
    """`random_crop_flip` with another padding, as an augment function.

    Args:
        padding: pixels of reflect padding on each side.

    Returns:
        `fn(image, seed) -> image`, for `make_train_dataset(augment_fn=...)`.
    """
    return functools.partial(random_crop_flip, padding=padding)


def augment_views(image, seed, augmult, augment_fn):
    """Applies `augment_fn` to `augmult` independently seeded copies of one image.

    Args:
        image: float `[H, W, C]`, one example.
        seed: int64 `[2]` seed of this example at this update.
        augmult: K >= 1.
        augment_fn: `fn(image, seed) -> image` of the same shape.

    Returns:
        float `[K, H, W, C]` if K > 1, else `[H, W, C]` (the plain path).

    Raises:
        ValueError: `augmult` < 1, or `augment_fn` changes the image shape.
    """
    if int(augmult) != augmult or augmult < 1:
        raise ValueError(f"augmult must be an integer >= 1; got {augmult!r}.")
    shape = _static_hwc(image)
    if augmult == 1:
        return _checked(augment_fn(image, seed), shape)
    seeds = tf.random.experimental.stateless_split(seed, num=augmult, alg=_ALG)
    return tf.stack([_checked(augment_fn(image, seeds[k]), shape)
                     for k in range(augmult)])


def _checked(view, shape):
    if not view.shape.is_compatible_with(shape):
        raise ValueError(
                f"The augment function must keep the image shape {list(shape)}; it "
                f"returned {view.shape}.")
    view.set_shape(shape)
    return view


def _static_hwc(image):
    if image.shape.rank != 3 or not image.shape.is_fully_defined():
        raise ValueError(
                f"Expected one image of static shape [H, W, C]; got {image.shape}.")
    return tuple(image.shape)
