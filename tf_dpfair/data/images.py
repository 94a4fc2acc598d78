"""Images of examples: decoding files, resizing, and the float32 the model sees."""

import tensorflow as tf


def decode_image(contents, image_size, channels):
    """Decodes an encoded image (JPEG, PNG, ...) and resizes it.

    Args:
        contents: string scalar tensor, the file contents.
        image_size: `(height, width)`.
        channels: 1 or 3.

    Returns:
        uint8 `[height, width, channels]`.
    """
    image = tf.io.decode_image(contents, channels=channels, expand_animations=False)
    return resize_image(image, image_size)


def resize_image(image, image_size):
    """Resizes one image `[H, W, C]` (any size) to uint8 `[height, width, C]`.

    Args:
        image: uint8 or float tensor `[H, W, C]` with a static channel count.
        image_size: `(height, width)`.

    Returns:
        uint8 `[height, width, C]`, antialiased bilinear, rounded.
    """
    height, width = image_size
    channels = image.shape[-1]
    image = tf.image.resize(image, (height, width), antialias=True)
    image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
    image.set_shape([height, width, channels])
    return image


def image_to_float(image):
    """Converts images to float32 in [0, 1].

    Args:
        image: uint8 (scaled by 1/255) or float (only cast) tensor, any shape.

    Returns:
        float32 tensor of the same shape.
    """
    if image.dtype == tf.uint8:
        return tf.cast(image, tf.float32) / 255.0
    return tf.cast(image, tf.float32)
