"""Examples with group attributes, and the input pipelines that feed a DP model.

- `pipeline`: `ExampleSource` and the training / evaluation pipelines.
- `sampler`: the logical batches of each update, drawn in TensorFlow.
- `batch`: the structure of a batch (`x`, `y` with groups, weights).
- `groups`: what the group ids mean (`GroupSpec`).
- `augment`: augmentation multiplicity.
"""

from tf_dpfair import _lazy

__getattr__, __dir__, __all__ = _lazy.attach(
        __name__,
        submodules=("augment", "batch", "groups", "pipeline", "sampler"),
        names={
            "ExampleSource": "pipeline",
            "decode_image": "pipeline",
            "resize_image": "pipeline",
            "image_to_float": "pipeline",
            "to_keras_batch": "pipeline",
            "make_train_dataset": "pipeline",
            "make_eval_dataset": "pipeline",
            "GroupSpec": "groups",
        })
