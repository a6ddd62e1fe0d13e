"""Transfer learning on images as scikit-learn estimators.

* :class:`CNNFeatureTransformer`: images in, pretrained CNN codes out.
* :class:`FineTunedClassifier`: a pretrained CNN fine-tuned end to end (skorch).
* :func:`get_backbone`: pretrained networks cut into stages, with their
  preprocessing.
* :class:`FeatureCache`: the persistent cache of codes behind
  ``CNNFeatureTransformer(memory=...)``.
* :func:`load_image_folder`: an ImageFolder tree ``root/CLASS/*`` as ``X, y``.

``import sklearn_transfer`` does not import torch, timm or skorch: the names
that need them are imported on first use, so a script served by a warm
feature cache never pays for them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from sklearn_transfer.cache import FeatureCache
from sklearn_transfer.catalog import DataConfig, available_backbones
from sklearn_transfer.features import CNNFeatureTransformer
from sklearn_transfer.images import ImageLoadError, load_image_folder

if TYPE_CHECKING:
    from sklearn_transfer.backbones import Backbone, get_backbone
    from sklearn_transfer.finetune import FineTunedClassifier

# name -> module, imported when the name is first used (PEP 562)
_LAZY = {
    "Backbone": "sklearn_transfer.backbones",
    "get_backbone": "sklearn_transfer.backbones",
    "FineTunedClassifier": "sklearn_transfer.finetune",
}

__all__ = [
    "Backbone",
    "CNNFeatureTransformer",
    "DataConfig",
    "FeatureCache",
    "FineTunedClassifier",
    "ImageLoadError",
    "__version__",
    "available_backbones",
    "get_backbone",
    "load_image_folder",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sklearn_transfer' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
