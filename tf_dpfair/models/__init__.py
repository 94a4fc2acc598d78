"""Models and model converters for DP fine-tuning."""

from tf_dpfair.models.batchnorm import training_batchnorm_layers
