"""Named settings for `--config=NAME` of `tf-dpfair-train` and `tf-dpfair-sweep`.

Each module here defines `SETTINGS`, a dict of `train_lib.Settings` fields
(flags given on the command line override them), and may define `SWEEP`, a
dict with "grid" (field -> list of values, crossed) for `tf-dpfair-sweep`.

- Paper settings, ready for a user who has the data: `chexpert`,
  `mimic_cxr`, `imagenet`, `places365`.
- Studies that run here on real Fashion-MNIST: `rotated_study` (the PAIR
  explorable's rotated subgroup), `subgroup_heatmap` (its heatmap: size x
  epsilon x rotated share), `pretrained_study` (DP fine-tuning of
  ImageNet-pretrained EfficientNet-Lite0, the head only) and
  `pretrained_finetune_study` (the same with every layer fine-tuned);
  Study 2 redone as pre-registered in docs/study2_redo/preregistration.md:
  `probe_study` (Stage A, a probe on cached features; `probe_study_final`
  its final runs, as chosen on validation) and `finetune_study`
  (Stage B, every layer trained); the remedy study of
  docs/remedy_study/preregistration.md: `remedy_study` (R2, a CNN from
  scratch, standard against group-aware clipping).
- `demo`: the short runs of `make demo`.
"""

import importlib

NAMES = ("chexpert", "mimic_cxr", "imagenet", "places365", "rotated_study",
         "pretrained_study", "pretrained_finetune_study", "subgroup_heatmap", "probe_study",
         "probe_study_final", "finetune_study", "remedy_study", "demo")


def load(name):
    """Returns the config module `name`.

    Args:
        name: one of `NAMES`.

    Returns:
        The module (with `SETTINGS`, and `SWEEP` for sweep configs).

    Raises:
        ValueError: unknown name.
    """
    if name not in NAMES:
        raise ValueError(f"Unknown config {name!r}; choose from {NAMES}.")
    return importlib.import_module(f"{__name__}.{name}")
