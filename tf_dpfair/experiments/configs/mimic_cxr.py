"""MIMIC-CXR-JPG with the paper's DP settings (groups sex, age, race, insurance).

Needs MIMIC-CXR-JPG (`--data_dir`) and the MIMIC-IV patients and admissions
tables (`--dataset_options={"mimic_iv_dir": "..."}`); nothing is downloaded.
Paper settings: clip norm 0.001, delta = 1/N, EMA decay 0.9999, very large
logical batches built from micro-batches, epsilon in {0.5, 1, 2, 4, 8}, and
an ImageNet-pretrained normalizer-free network fine-tuned end to end. The
paper's NFNet checkpoints are not available offline here; the pretrained
network we ship is EfficientNet-Lite0 (ImageNet, BatchNorm frozen). To use
your own pretrained NF-ResNet instead:
`--model=nf_resnet --pretrained=/path/to/weights.weights.h5`.

  tf-dpfair-train --config=mimic_cxr --data_dir=/data/mimic-cxr-jpg \
      --epsilon=8 --work_dir=/runs/mimic_cxr/eps8
  tf-dpfair-sweep --config=mimic_cxr --set=data_dir=... \
      --work_dir=/runs/mimic_cxr_sweep   # epsilons 0.5-8 and non-private
"""

from tf_dpfair.experiments.configs import chexpert

# The chest X-ray settings of the paper, shared with CheXpert; only the data
# differ (MIMIC-CXR images are frontal-only here, as in the paper's setup).
SETTINGS = dict(chexpert.SETTINGS, dataset="mimic_cxr",
                dataset_options={"uncertain": "zeros", "frontal_only": True})

SWEEP = chexpert.SWEEP
