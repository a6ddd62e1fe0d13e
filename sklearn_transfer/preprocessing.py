"""The preprocessing that belongs to a set of weights, for evaluation and for training.

* :class:`DataConfig`: input size, interpolation, crop fraction, mean and
  std, as timm's ``pretrained_cfg`` and torchvision's weight transforms
  give them; it travels with every :class:`~sklearn_transfer.Backbone`.
* :class:`ResizeCenterCrop`: the evaluation resize and centre crop.
* :func:`augment_options`: what ``augment=True/False/{...}`` means for training.
* :func:`tta_views`: what ``tta=True`` means at prediction (the codes of
  :class:`~sklearn_transfer.CNNFeatureTransformer`, the probabilities of
  :class:`~sklearn_transfer.FineTunedClassifier`).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

__all__ = ["DEFAULT_AUGMENT", "DataConfig", "ResizeCenterCrop", "augment_options", "tta_views"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DataConfig:
    """Preprocessing that belongs to a set of weights.

    Evaluation images are resized so that their short side is
    ``round(input_size / crop_pct)`` with ``interpolation`` and centre-cropped
    to ``input_size``; pixels are then scaled to [0, 1] and normalised with
    ``mean`` and ``std``.

    Examples
    --------
    >>> from sklearn_transfer import DataConfig
    >>> DataConfig(input_size=224, crop_pct=0.875).resize_size
    256
    """

    input_size: int = 224
    interpolation: str = "bilinear"
    crop_pct: float = 0.875
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @property
    def resize_size(self) -> int:
        return int(round(self.input_size / self.crop_pct))

    def eval_transform(self) -> ResizeCenterCrop:
        """PIL -> ``(3, input_size, input_size)`` uint8 tensor: resize the short side to
        ``resize_size``, centre-crop ``input_size``."""
        return ResizeCenterCrop(self.resize_size, self.input_size, self.interpolation)

    def train_transform(
        self,
        scale: tuple[float, float] = (0.08, 1.0),
        hflip: bool = True,
        rotation: float = 0.0,
        translate: float = 0.0,
        zoom: float = 0.0,
    ) -> Any:
        """PIL -> ``(3, input_size, input_size)`` uint8 tensor, augmented: random resized
        crop and flip (plus optional rotation/shift/zoom as Keras' ``ImageDataGenerator``)."""
        from torchvision import transforms as T

        interp = T.InterpolationMode(self.interpolation)
        steps: list[Any] = []
        if rotation or translate or zoom:
            steps.append(T.RandomAffine(
                degrees=rotation,
                translate=(translate, translate) if translate else None,
                scale=(1 - zoom, 1 + zoom) if zoom else None,
                interpolation=T.InterpolationMode.BILINEAR,
            ))
        steps.append(T.RandomResizedCrop(self.input_size, scale=scale, interpolation=interp))
        if hflip:
            steps.append(T.RandomHorizontalFlip())
        steps.append(T.PILToTensor())
        return T.Compose(steps)

    @classmethod
    def from_timm(cls, cfg: dict[str, Any]) -> DataConfig:
        size = cfg.get("input_size", (3, 224, 224))
        return cls(
            input_size=int(size[-1]),
            interpolation=str(cfg.get("interpolation", "bilinear")),
            crop_pct=float(cfg.get("crop_pct", 0.875)),
            mean=tuple(float(v) for v in cfg.get("mean", IMAGENET_MEAN)),
            std=tuple(float(v) for v in cfg.get("std", IMAGENET_STD)),
        )

    @classmethod
    def from_torchvision(cls, weights: Any) -> DataConfig:
        tf = weights.transforms()
        crop = int(tf.crop_size[0])
        resize = int(tf.resize_size[0])
        return cls(
            input_size=crop,
            interpolation=tf.interpolation.value,
            crop_pct=crop / resize,
            mean=tuple(float(v) for v in tf.mean),
            std=tuple(float(v) for v in tf.std),
        )


class ResizeCenterCrop:
    """Resize the short side to ``resize_size``, centre-crop ``crop_size``: PIL -> uint8 tensor.

    torchvision's ``Resize`` (antialiased) then ``CenterCrop``, as timm's and
    torchvision's evaluation transforms do, run on a uint8 tensor: torch's
    uint8 resampling kernels compute what Pillow's do (at most 2 of 255 apart per
    pixel) at a fraction of the cost. Filters that only Pillow has
    (``"lanczos"``, ``"box"``, ``"hamming"``) resample the PIL image.

    Returns a ``(3, crop_size, crop_size)`` uint8 tensor, as torchvision's
    ``PILToTensor``.

    Examples
    --------
    >>> from PIL import Image
    >>> from sklearn_transfer.preprocessing import ResizeCenterCrop
    >>> ResizeCenterCrop(256, 224, "bicubic")(Image.new("RGB", (500, 375))).shape
    torch.Size([3, 224, 224])
    """

    def __init__(self, resize_size: int, crop_size: int, interpolation: str = "bilinear"):
        self.resize_size = resize_size
        self.crop_size = crop_size
        self.interpolation = interpolation

    def __repr__(self) -> str:
        return (f"ResizeCenterCrop(resize_size={self.resize_size}, crop_size={self.crop_size}, "
                f"interpolation={self.interpolation!r})")

    def __call__(self, im: Any) -> Any:
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.v2 import functional as F

        x = im if self.interpolation in _PIL_ONLY else F.pil_to_tensor(im)
        x = F.resize(x, [self.resize_size], InterpolationMode(self.interpolation),
                     antialias=True)
        x = F.center_crop(x, [self.crop_size])
        return F.pil_to_tensor(x) if self.interpolation in _PIL_ONLY else x


#: Resampling filters torchvision applies to PIL images only
_PIL_ONLY = ("lanczos", "box", "hamming")


#: What ``augment=True`` means: a random resized crop of 25% to 100% of the image (milder
#: than the 8% of ImageNet training from scratch: small data sets cannot afford crops that
#: lose the object) and a horizontal flip.
DEFAULT_AUGMENT: dict[str, Any] = {"scale": (0.25, 1.0)}


def augment_options(augment: bool | dict | None) -> dict[str, Any] | None:
    """``augment`` -> keyword arguments of :meth:`DataConfig.train_transform` (``None``: off).

    Examples
    --------
    >>> from sklearn_transfer.preprocessing import augment_options
    >>> augment_options(True), augment_options(False)
    ({'scale': (0.25, 1.0)}, None)
    >>> augment_options({"rotation": 15})
    {'scale': (0.25, 1.0), 'rotation': 15}
    """
    if augment is True:
        return dict(DEFAULT_AUGMENT)
    if augment is False or augment is None:
        return None
    if isinstance(augment, dict):
        allowed = [p for p in inspect.signature(DataConfig.train_transform).parameters
                   if p != "self"]
        unknown = sorted(set(augment) - set(allowed))
        if unknown:
            raise ValueError(
                f"augment={augment!r}: unknown option(s) {unknown}; the options are {allowed}"
            )
        return {**DEFAULT_AUGMENT, **augment}
    raise ValueError(
        f"augment={augment!r} must be True (random resized crop and flip), False, or a dict "
        "of DataConfig.train_transform options such as {'rotation': 15, 'zoom': 0.1}"
    )


def tta_views(x: Any) -> list[Any]:
    """The test-time augmentation views of a batch ``(N, C, H, W)``: itself and its mirror.

    ``tta=True`` averages, over these views, the codes of
    :class:`~sklearn_transfer.CNNFeatureTransformer` and the probabilities of
    :class:`~sklearn_transfer.FineTunedClassifier`; one definition, so that
    both mean the same thing.

    Examples
    --------
    >>> import torch
    >>> from sklearn_transfer.preprocessing import tta_views
    >>> x = torch.arange(4).reshape(1, 1, 1, 4)
    >>> [v.flatten().tolist() for v in tta_views(x)]
    [[0, 1, 2, 3], [3, 2, 1, 0]]
    """
    return [x, x.flip(3)]
