"""Examples with group attributes, and the input pipelines that feed a DP model.

- `source`: `ExampleSource`, N examples readable by index, and their structure.
- `images`: decoding, resizing and scaling images.
- `pipeline`: the training / evaluation pipelines (`make_train_dataset`).
- `sampler`: the logical batches of each update, drawn in TensorFlow.
- `batch`: the structure of a batch (`x`, `y` with groups, weights).
- `groups`: what the group ids mean (`GroupSpec`).
- `augment`: augmentation multiplicity.
"""

from tf_dpfair import _lazy

__getattr__, __dir__, __all__ = _lazy.attach(
        __name__,
        submodules=("augment", "batch", "groups", "images", "pipeline", "sampler",
                    "source"),
        names={
            "ExampleSource": "source",
            "decode_image": "images",
            "resize_image": "images",
            "image_to_float": "images",
            "to_keras_batch": "pipeline",
            "make_train_dataset": "pipeline",
            "make_eval_dataset": "pipeline",
            "GroupSpec": "groups",
        })
