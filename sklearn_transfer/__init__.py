"""Transfer learning on images as scikit-learn estimators.

* :class:`CNNFeatureTransformer`: images in, pretrained CNN codes out.
* :class:`FineTunedClassifier`: a pretrained CNN fine-tuned end to end (skorch).
* :func:`get_backbone`: pretrained networks cut into stages, with their
  preprocessing (:class:`DataConfig`).
* :class:`FeatureCache`: the persistent cache of codes behind
  ``CNNFeatureTransformer(memory=...)``.
* :func:`load_image_folder`: an ImageFolder tree ``root/CLASS/*`` as ``X, y``.
* :func:`extract_codes`, :func:`read_codes`, :func:`iter_codes`: codes of
  large image collections to and from a resumable Parquet dataset, locally or
  on a Dask cluster.
* :class:`StrategySearchCV`: which strategy (codes, fine-tuning) for these
  images, cross-validated within a time budget.
* :class:`ErrorAnalysis`, :func:`label_issues`: what a fitted classifier gets
  wrong, and which training labels look wrong.
* :func:`export`, :func:`load_exported`: a fitted classifier as one OpenVINO
  network, and the loader that needs only OpenVINO, NumPy and Pillow.
"""

__version__ = "0.1.0"

import importlib
from typing import TYPE_CHECKING

# the public names, by module: imported at first use (PEP 562), so that the exported-model
# loader (sklearn_transfer.exported) runs where torch and scikit-learn are not installed
_MODULES = {
    "ErrorAnalysis": "analysis",
    "label_issues": "analysis",
    "Backbone": "backbones",
    "available_backbones": "backbones",
    "get_backbone": "backbones",
    "FeatureCache": "cache",
    "CodesComputation": "computation",
    "export": "exporting",
    "load_exported": "exported",
    "extract_codes": "extract",
    "iter_codes": "extract",
    "read_codes": "extract",
    "CNNFeatureTransformer": "features",
    "FineTunedClassifier": "finetune",
    "ImageLoadError": "images",
    "load_image_folder": "images",
    "DataConfig": "preprocessing",
    "StrategySearchCV": "strategy",
}

if TYPE_CHECKING:
    from sklearn_transfer.analysis import ErrorAnalysis, label_issues
    from sklearn_transfer.backbones import Backbone, available_backbones, get_backbone
    from sklearn_transfer.cache import FeatureCache
    from sklearn_transfer.computation import CodesComputation
    from sklearn_transfer.exported import load_exported
    from sklearn_transfer.exporting import export
    from sklearn_transfer.extract import extract_codes, iter_codes, read_codes
    from sklearn_transfer.features import CNNFeatureTransformer
    from sklearn_transfer.finetune import FineTunedClassifier
    from sklearn_transfer.images import ImageLoadError, load_image_folder
    from sklearn_transfer.preprocessing import DataConfig
    from sklearn_transfer.strategy import StrategySearchCV


def __getattr__(name: str):
    if name not in _MODULES:
        raise AttributeError(f"module 'sklearn_transfer' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"sklearn_transfer.{_MODULES[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = [
    "Backbone",
    "CNNFeatureTransformer",
    "CodesComputation",
    "DataConfig",
    "ErrorAnalysis",
    "FeatureCache",
    "FineTunedClassifier",
    "ImageLoadError",
    "StrategySearchCV",
    "__version__",
    "available_backbones",
    "export",
    "extract_codes",
    "get_backbone",
    "iter_codes",
    "label_issues",
    "load_exported",
    "load_image_folder",
    "read_codes",
]
