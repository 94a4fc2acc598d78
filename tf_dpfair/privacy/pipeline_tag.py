"""The tag that marks a dataset as built by the package's own pipeline.

`tf_dpfair.data.make_train_dataset` sets it on the dataset it
returns (`tag_pipeline`), and `fit` reads it back (`pipeline_tag`) to learn
the `SamplingSpec` the batches were really drawn with, where the pipeline
starts, and how long it is; `tf_dpfair.privacy.input_sampling` decides from
it how the fit call is accounted. Plain Python: the tag is an attribute.
"""

import dataclasses

# The attribute `make_train_dataset` sets on its dataset.
_TAG = "_tf_dpfair_pipeline"


@dataclasses.dataclass(frozen=True)
class PipelineTag:
    """What the package's pipeline knows about the dataset it built.

    Attributes:
      spec: the `sampling.SamplingSpec` the batches were drawn with.
      start_step: the pipeline index of the dataset's first batch.
      num_steps: batches in the dataset, or None for endless.
      seed_digest: `tf_dpfair.workers.seed_digest` of the sampling seed
        (never the seed), which workers compare before a multi-worker fit;
        None if unknown.
    """

    spec: object
    start_step: int
    num_steps: int | None
    seed_digest: str | None = dataclasses.field(default=None, repr=False)


def tag_pipeline(dataset, spec, start_step, num_steps, seed_digest=None):
    """Marks `dataset` as drawn by the package's pipeline; returns it."""
    setattr(dataset, _TAG, PipelineTag(spec, int(start_step),
                                       None if num_steps is None else int(num_steps),
                                       seed_digest))
    return dataset


def pipeline_tag(dataset):
    """The `PipelineTag` of a dataset built by `make_train_dataset`, or None."""
    return getattr(dataset, _TAG, None)
