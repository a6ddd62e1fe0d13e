"""Run an exported classifier with OpenVINO, NumPy and Pillow only.

:func:`sklearn_transfer.export` writes a fitted classifier to a folder:

* ``model.xml`` and ``model.bin``: one OpenVINO network, from a batch of
  uint8 images ``(n, 3, input_size, input_size)`` to probabilities (or
  decision scores, for a head without ``predict_proba``);
* ``model.json``: its format tag, the SHA-256 of both files, the
  preprocessing (the short side resized to ``resize_size`` with
  ``interpolation``, a centre crop of ``input_size``), the output, the class
  labels and the precision the estimator computed in.

:func:`load_exported` checks the folder and returns an
:class:`ExportedModel`, with the classifier's ``predict``, ``predict_proba``
(or ``decision_function``) and ``classes_``. Neither this module nor what it
imports needs torch, torchvision, timm, skorch or scikit-learn. Images are
decoded and resized as the estimators do them (JPEGs at a reduced scale
where that keeps the resize size; torch's antialiased uint8 resampling,
reproduced here in NumPy), so an exported model computes what its estimator
computes, within float32 rounding.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from sklearn_transfer.files import FormatError, check_format, sha256_file
from sklearn_transfer.openvino_runtime import INFERENCE_PRECISION, core

__all__ = ["FILES", "INTERPOLATIONS", "ExportedModel", "load_exported", "resize_center_crop"]

#: The network's files in an exported folder (``model.json`` says what they are)
FILES = ("model.xml", "model.bin")
#: Filters that torchvision applies with Pillow (as here), the others with torch's kernels
_PILLOW_FILTERS = {"lanczos": Image.Resampling.LANCZOS, "box": Image.Resampling.BOX,
                   "hamming": Image.Resampling.HAMMING}
#: The resize filters an exported model reproduces
INTERPOLATIONS = ("bilinear", "bicubic", *_PILLOW_FILTERS)


class ExportedModel:
    """An exported classifier, read by :func:`load_exported`.

    Attributes
    ----------
    classes_ : ndarray
        The class labels, in the order of the probability columns (for a
        multi-label classifier, the label columns' indices).
    metadata : dict
        ``model.json``: what the network expects and computes.
    precision : {"float32", "bfloat16"}
        What OpenVINO computes in.
    """

    def __init__(self, folder: Path, metadata: dict, compiled: Any, precision: str,
                 batch_size: int = 16) -> None:
        self.folder, self.metadata, self.precision = folder, metadata, precision
        self._compiled, self.batch_size = compiled, batch_size
        self.classes_ = np.asarray(metadata["classes"])

    def __repr__(self) -> str:
        return (f"ExportedModel({str(self.folder)!r}, {self.metadata['estimator']}, "
                f"{len(self.classes_)} classes, precision={self.precision!r})")

    # properties, so that hasattr() sees only the output the export has, as scikit-learn's
    # available_if shows a pipeline's (scikit-learn is not imported here)
    @property
    def predict_proba(self) -> Callable[[Iterable[Any]], np.ndarray]:
        """Class probabilities of images, columns in the order of ``classes_``:
        ``model.predict_proba(X)``.

        Absent when the exported head had no ``predict_proba`` (it outputs decision scores).
        """
        if self.metadata["output"] != "predict_proba":
            raise AttributeError(
                f"the exported {self.metadata['estimator']} has no predict_proba, as its head "
                "had none: its network outputs decision scores; use decision_function")
        return self._outputs

    @property
    def decision_function(self) -> Callable[[Iterable[Any]], np.ndarray]:
        """Decision scores of images, as the exported head's ``decision_function``:
        ``model.decision_function(X)``.

        Absent when the export outputs probabilities.
        """
        if self.metadata["output"] != "decision_function":
            raise AttributeError(
                f"the exported {self.metadata['estimator']} outputs probabilities: use "
                "predict_proba")
        return self._outputs

    def predict(self, X: Iterable[Any]) -> np.ndarray:
        """Predicted labels (for a multi-label classifier, the 0/1 indicator matrix)."""
        out = self._outputs(X)
        if self.metadata["multilabel"]:
            return (out > 0.5).astype(int)
        if out.ndim == 1:  # a binary head's one decision score
            return self.classes_[(out > 0).astype(int)]
        return self.classes_[out.argmax(axis=1)]

    def pixels(self, X: Iterable[Any]) -> Iterator[np.ndarray]:
        """The network's input: batches of uint8 images ``(n, 3, input_size, input_size)``.

        ``X`` holds image file paths, PIL images or uint8 ``(H, W, 3)`` arrays.
        Images are read and resized on one thread per core, a batch ahead of
        the one returned.
        """
        meta, items = self.metadata, enumerate(X)

        def one(index: int, item: Any) -> np.ndarray:
            im = _rgb_image(item, index, meta["resize_size"])
            return resize_center_crop(im, meta["resize_size"], meta["input_size"],
                                      meta["interpolation"])

        with ThreadPoolExecutor(os.cpu_count()) as pool:
            def submit() -> list:
                return [pool.submit(one, *pair) for pair in islice(items, self.batch_size)]

            pending = submit()
            while pending:
                ahead = submit()
                yield np.stack([future.result() for future in pending])
                pending = ahead

    def _outputs(self, X: Iterable[Any]) -> np.ndarray:
        outs = [self._compiled(images)[0] for images in self.pixels(X)]
        if not outs:
            raise ValueError("no images given")
        return np.concatenate(outs).astype(np.float32, copy=False)


def load_exported(path: str | os.PathLike, precision: str = "auto",
                  batch_size: int = 16) -> ExportedModel:
    """Read an exported classifier (see :func:`sklearn_transfer.export`).

    Parameters
    ----------
    path : path-like
        The folder ``export`` wrote.
    precision : {"auto", "float32", "bfloat16"}, default="auto"
        What OpenVINO computes in. ``"auto"`` is the estimator's precision
        where this CPU computes it natively, float32 otherwise; ``"float32"``
        gives the estimator's float32 outputs within 1e-4.
    batch_size : int, default=16
        Images per call of the network.

    Returns
    -------
    ExportedModel

    Raises
    ------
    FormatError
        The folder is not an exported model of this format, or a file of it
        was changed after export (its SHA-256 differs).

    Examples
    --------
    >>> from sklearn_transfer import load_exported
    >>> try:
    ...     load_exported("no/such/folder")
    ... except FileNotFoundError as exc:
    ...     print(exc)
    'no/such/folder/model.json' does not exist: give the folder that export wrote
    """
    folder = Path(path)
    meta_file = folder / "model.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"{str(meta_file)!r} does not exist: give the folder that "
                                "export wrote")
    try:
        meta = json.loads(meta_file.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise FormatError(f"{str(meta_file)!r} is not JSON ({exc}): export the model again") \
            from None
    check_format("exported-model", meta.get("format") if isinstance(meta, dict) else None,
                 folder, "export the model again with this version")
    for name in FILES:
        if not (folder / name).is_file() or sha256_file(folder / name) != meta["sha256"][name]:
            raise FormatError(f"{str(folder / name)!r} is missing or not the file exported (its "
                              "SHA-256 differs: damaged or edited); export the model again")
    if precision not in ("auto", *INFERENCE_PRECISION):
        raise ValueError(f"precision={precision!r}: use 'auto', 'float32' or 'bfloat16'")
    if precision == "auto":
        native = "BF16" in core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        precision = meta["precision"] if meta["precision"] == "float32" or native else "float32"
    compiled = core().compile_model(core().read_model(folder / "model.xml"), "CPU", {
        "INFERENCE_PRECISION_HINT": INFERENCE_PRECISION[precision]})
    return ExportedModel(folder, meta, compiled, precision, batch_size)


def _rgb_image(item: Any, index: int, draft_size: int) -> Image.Image:
    """An image of ``X`` as the estimators read it: RGB, EXIF-oriented, alpha over white."""
    try:
        if isinstance(item, (str, os.PathLike)):
            with Image.open(item) as im:
                im.draft("RGB", (draft_size, draft_size))  # JPEGs: libjpeg's reduced scale
                im = ImageOps.exif_transpose(im)
        elif isinstance(item, Image.Image):
            im = ImageOps.exif_transpose(item)
        elif isinstance(item, np.ndarray) and item.dtype == np.uint8 and item.ndim == 3 \
                and item.shape[2] == 3:
            im = Image.fromarray(item)
        else:
            raise TypeError(f"image {index} is a {type(item).__name__}; an exported model "
                            "takes file paths, PIL images or uint8 (H, W, 3) arrays")
        if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
            raise ValueError(f"it has {im.mode} pixels; convert it to 8-bit RGB")
        if im.mode == "P" and "transparency" in im.info:
            im = im.convert("RGBA")
        if im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
            background = Image.new("RGBA", im.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, im.convert("RGBA")).convert("RGB")
        return im.convert("RGB")
    except TypeError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        where = f"{os.fspath(item)!r} " if isinstance(item, (str, os.PathLike)) else ""
        raise ValueError(f"image {where}(index {index}) could not be read: {exc}") from None


def resize_center_crop(im: Image.Image, resize_size: int, crop_size: int,
                       interpolation: str) -> np.ndarray:
    """An RGB image -> ``(3, crop_size, crop_size)`` uint8, as the estimators' evaluation transform.

    The short side resized to ``resize_size`` (torchvision's antialiased
    ``Resize`` of a uint8 tensor), then the centre crop.

    Examples
    --------
    >>> from PIL import Image
    >>> from sklearn_transfer.exported import resize_center_crop
    >>> resize_center_crop(Image.new("RGB", (500, 375)), 256, 224, "bicubic").shape
    (3, 224, 224)
    """
    w, h = im.size
    size = ((resize_size, int(resize_size * h / w)) if w <= h
            else (int(resize_size * w / h), resize_size))
    top = int(round((size[1] - crop_size) / 2.0))
    left = int(round((size[0] - crop_size) / 2.0))
    if interpolation in _PILLOW_FILTERS:
        arr = np.asarray(im.resize(size, _PILLOW_FILTERS[interpolation]))
        arr = arr[top:top + crop_size, left:left + crop_size]
    else:  # only the pixels the crop keeps: each is computed on its own, as in the whole
        arr = _resample(np.asarray(im), size[0], 1, interpolation, left, crop_size)
        arr = _resample(arr, size[1], 0, interpolation, top, crop_size)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def _resample(arr: np.ndarray, n_out: int, axis: int, interpolation: str, start: int,
              count: int) -> np.ndarray:
    """Output pixels ``start`` to ``start + count`` of one separable pass of torch's
    antialiased uint8 resampling to ``n_out`` pixels along ``axis``.

    Its fixed-point arithmetic (integer weights at the highest precision an
    int16 holds, rounding, then a shift), so that pixels come out identical.
    """
    if arr.shape[axis] == n_out:
        return np.take(arr, np.arange(start, start + count), axis=axis)
    index, weights, precision = _weights(arr.shape[axis], n_out, interpolation)
    index, weights = index[start:start + count], weights[start:start + count]
    shape = [1] * arr.ndim
    shape[axis] = count
    acc = np.int32(1 << (precision - 1))  # int32 as torch's sums: 255 x 2**15 x taps fits
    for tap in range(index.shape[1]):  # a few taps: one whole-image product each
        acc = acc + np.take(arr, index[:, tap], axis=axis).astype(np.int32) \
            * weights[:, tap].reshape(shape)
    return np.clip(acc >> precision, 0, 255).astype(np.uint8)


@functools.lru_cache(maxsize=64)
def _weights(n_in: int, n_out: int, interpolation: str) -> tuple[np.ndarray, np.ndarray, int]:
    """Each output pixel's input pixels and integer weights ``(n_out, taps)``, and the
    weights' precision in bits."""
    if interpolation == "bilinear":
        half = 1.0

        def kernel(x: np.ndarray) -> np.ndarray:
            return np.maximum(0.0, 1.0 - np.abs(x))
    elif interpolation == "bicubic":
        half, a = 2.0, -0.5

        def kernel(x: np.ndarray) -> np.ndarray:
            x = np.abs(x)
            return np.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                            np.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0))
    else:
        raise ValueError(f"interpolation={interpolation!r} is not one an exported model runs")
    scale = n_in / n_out
    support = half * scale if scale >= 1 else half
    invscale = 1.0 / scale if scale >= 1 else 1.0  # a product, as torch: x / s may round apart
    taps = int(np.ceil(support)) * 2 + 1
    index = np.zeros((n_out, taps), dtype=np.intp)
    real = np.zeros((n_out, taps))
    for i in range(n_out):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), n_in, lo + taps)
        w = kernel((np.arange(lo, hi) - center + 0.5) * invscale)
        index[i, :hi - lo], real[i, :hi - lo] = np.arange(lo, hi), w / w.sum() if w.sum() else w
    largest = float(real.max())
    precision = next((p for p in range(22) if int(0.5 + largest * (1 << (p + 1))) >= 1 << 15), 22)
    weights = np.trunc(real * (1 << precision) + np.where(real < 0, -0.5, 0.5)).astype(np.int32)
    return index, weights, precision
