"""CNN codes as a scikit-learn transformer: images in, pooled ReLU'd activations out."""

from __future__ import annotations

import copy
import dataclasses
import errno
import numbers
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted
from torch import nn

from sklearn_transfer.backbones import (
    BUILTIN,
    Backbone,
    get_backbone,
    resolve_stage,
    shared_pretrained,
)
from sklearn_transfer.batches import ImageDataset
from sklearn_transfer.cache import FeatureCache, as_feature_cache
from sklearn_transfer.codes import image_batches, progress_bar, run_engine
from sklearn_transfer.computation import POOLINGS, CodesComputation
from sklearn_transfer.engines import ENGINES, EngineUnavailableError, engine_for, resolve_engine
from sklearn_transfer.images import as_image_source
from sklearn_transfer.runtime import PRECISIONS, Runtime

__all__ = ["CNNFeatureTransformer"]


class CNNFeatureTransformer(TransformerMixin, BaseEstimator):
    """Turn images into the ReLU'd, pooled activations of a pretrained CNN.

    The classic "CNN codes" recipe: run an ImageNet-pretrained network with
    its own preprocessing, read the activations of its last stage (the
    penultimate layer of the classifier) or of earlier stages, pool them
    globally and hand them to any scikit-learn estimator.

    Parameters
    ----------
    backbone : str, nn.Module or Backbone, default="efficientnet_lite0"
        See :func:`sklearn_transfer.get_backbone`. The default and
        ``efficientnet_lite1/2``, ``mobilenet_v2`` load genuine ImageNet
        weights offline. A module you pass is copied at ``fit``.
    weights : "pretrained", None or path, default="pretrained"
        ``None`` gives a randomly initialised network (a baseline).
    stage : int, str or list of them, default=-1
        Which stage(s) to read: ``-1`` is the last (the penultimate
        activations); earlier stages suit data far from ImageNet. A list
        concatenates the stages' pooled codes.
    pooling : {"avg", "max", "avgmax", "catavgmax"}, default="avg"
        Global pooling of each stage's feature map; ``catavgmax`` concatenates
        average and max pooling.
    relu : bool, default=True
        Apply ReLU before pooling.
    tta : bool, default=False
        Test-time augmentation: each image's codes are the mean of its own
        and its mirror image's (one forward pass of both views; twice the
        compute). Use it for the training and the test images alike.
    batch_size : int, default=16
        Images per forward pass; on a CPU small batches stay in the
        processor's cache, on a GPU use more.
    device : str, default="auto"
        ``"auto"`` uses CUDA when present (pinned memory, non-blocking
        copies), the CPU otherwise.
    engine : {"auto", "torch", "openvino"}, default="auto"
        What runs the network (see :mod:`sklearn_transfer.engines`).
        ``"auto"`` is OpenVINO on the CPU when it is installed (compiled
        once per process, or read from ``memory``), torch otherwise. An
        engine that is missing or cannot convert the network falls back to
        torch with a warning.
    precision : {"auto", "float32", "bfloat16", "float16"}, default="auto"
        ``"auto"`` is the fastest precision the device computes natively
        (:func:`~sklearn_transfer.runtime.native_precision`): float16 on
        CUDA, bfloat16 on CPUs with bfloat16 instructions, float32
        elsewhere. Low-precision codes differ from float32 ones in the third
        digit or so, which linear heads do not notice; for exact codes, ask
        for ``engine="torch", precision="float32"``.
    num_workers : int, default=0
        DataLoader worker processes decoding images. ``0`` decodes in a
        background thread of this process, overlapping the forward pass
        (no worker processes to start or feed); on a GPU machine use several.
    progress : bool or "auto", default="auto"
        A tqdm progress bar; ``"auto"`` shows it for more than 1,000 images.
    memory : str, path-like, FeatureCache or None, default=None
        A directory for a persistent cache of codes (see
        :mod:`sklearn_transfer.cache`): ``transform`` looks every image up by
        its content and by the key of ``computation_``, and runs the network
        on the missing images only, storing their codes batch by batch.
        Folds and candidates of a grid search, repeated runs and concurrent
        processes then compute each image's codes once. ``None`` caches
        nothing.

    Attributes
    ----------
    backbone_ : Backbone
        The network, on the CPU (a copy runs on ``device``). A built-in
        pretrained network is the process's one copy, shared by every
        transformer (:func:`~sklearn_transfer.backbones.shared_pretrained`):
        do not edit it in place.
    computation_ : CodesComputation
        Everything that decides the codes, resolved at ``fit``: network
        fingerprint, stages, pooling, ReLU, preprocessing, and the engine and
        precision ``"auto"`` chose (``computation_.engine``,
        ``computation_.precision``, also in its repr). Its ``key`` names the
        codes in the cache.
    stages_ : list of int
        Resolved stage indices.
    n_features_out_ : int
        Width of the output.

    Notes
    -----
    What ``fit`` resolved is what ``transform`` computes: after
    ``set_params``, or after editing ``backbone_`` in place, call ``fit``
    again (or pass the edited network as ``backbone=``), as with any
    scikit-learn estimator; the cache key would not see an in-place edit.

    Loading a pickle/joblib file can run arbitrary code: load them only from
    sources you trust, and share fitted transformers with
    :func:`sklearn_transfer.persistence.dump` / ``load`` (no pickle). A CUDA
    out-of-memory error is re-raised saying to lower ``batch_size``.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn_transfer import CNNFeatureTransformer
    >>> images = np.random.RandomState(0).randint(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    >>> codes = CNNFeatureTransformer().fit_transform(images)
    >>> codes.shape, codes.dtype, bool((codes >= 0).all())
    ((2, 1280), dtype('float32'), True)
    """

    _parameter_constraints: dict = {
        "backbone": [str, nn.Module],
        "weights": [str, os.PathLike, None],
        "stage": [numbers.Integral, str, list, tuple],
        "pooling": [StrOptions(set(POOLINGS))],
        "relu": ["boolean"],
        "tta": ["boolean"],
        "batch_size": [Interval(numbers.Integral, 1, None, closed="left")],
        "device": [str, torch.device],
        "engine": [StrOptions(set(ENGINES))],
        "precision": [StrOptions(set(PRECISIONS))],
        "num_workers": [Interval(numbers.Integral, 0, None, closed="left")],
        "progress": ["boolean", StrOptions({"auto"})],
        "memory": [str, os.PathLike, FeatureCache, None],
    }

    def __init__(
        self,
        backbone: str | nn.Module | Backbone = "efficientnet_lite0",
        weights: str | os.PathLike | None = "pretrained",
        stage: int | str | Sequence[int | str] = -1,
        pooling: str = "avg",
        relu: bool = True,
        tta: bool = False,
        batch_size: int = 16,
        device: str = "auto",
        engine: str = "auto",
        precision: str = "auto",
        num_workers: int = 0,
        progress: bool | str = "auto",
        memory: str | os.PathLike | FeatureCache | None = None,
    ) -> None:
        self.backbone = backbone
        self.weights = weights
        self.stage = stage
        self.pooling = pooling
        self.relu = relu
        self.tta = tta
        self.batch_size = batch_size
        self.device = device
        self.engine = engine
        self.precision = precision
        self.num_workers = num_workers
        self.progress = progress
        self.memory = memory

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.input_tags.three_d_array = True
        tags.input_tags.string = True
        tags.requires_fit = True
        tags.transformer_tags.preserves_dtype = []
        return tags

    def fit(self, X: Any = None, y: Any = None) -> CNNFeatureTransformer:
        """Build the network and resolve the computation (no training).

        ``X`` and ``y`` are ignored; they are accepted for the pipeline API.

        Returns
        -------
        self
        """
        self._validate_params()  # scikit-learn's check of _parameter_constraints
        stages = self.stage if isinstance(self.stage, (list, tuple)) else [self.stage]
        if len(stages) == 0:
            raise ValueError("stage=[] selects no stage; give at least one")
        backbone, known = self.backbone, None
        if isinstance(backbone, nn.Module):
            # the user's module must not be moved or mutated behind their back
            backbone = copy.deepcopy(backbone)
        if isinstance(backbone, str) and backbone in BUILTIN and isinstance(
                self.weights, str) and self.weights == "pretrained":
            # fixed, checksummed weights the codes never change: one network per process
            network, known = shared_pretrained(backbone)
        else:
            network = get_backbone(backbone, weights=self.weights).eval()
        try:
            resolved = [resolve_stage(s, network.stage_names, network.name) for s in stages]
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"stage={self.stage!r}: {exc}") from None
        cache = as_feature_cache(self.memory)
        if cache is not None:
            try:
                cache.check_writable()  # fail now, not after an hour of extraction
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                # a full disk is a passing state: transforms compute without storing
                warnings.warn(str(exc), RuntimeWarning, stacklevel=2)
        # a named network with fixed weights travels by name (workers build it themselves)
        named = isinstance(self.backbone, str) and self.weights is not None
        runtime = Runtime.from_device(self.device, self.precision)
        computation = CodesComputation.of(
            network, resolved, self.pooling, self.relu, tta=self.tta,
            precision=runtime.precision,
            engine=resolve_engine(self.engine, runtime),
            backbone=self.backbone if named else None,
            weights=os.fspath(self.weights) if named else None, fingerprint=known,
        )
        directory = None if cache is None else cache.directory
        try:
            engine_for(computation, runtime.device, network, directory)
        except EngineUnavailableError as exc:
            warnings.warn(f"{exc}; computing the codes with torch instead", RuntimeWarning,
                          stacklevel=2)
            computation = dataclasses.replace(computation, engine="torch")
        self.backbone_ = network
        self.computation_ = computation
        self.stages_ = resolved
        self.n_features_out_ = computation.n_features
        return self

    def get_feature_names_out(self, input_features: Any = None) -> np.ndarray:
        """Names such as ``head_avg_0``: stage, pooling, channel."""
        check_is_fitted(self)
        return np.asarray(self.computation_.feature_names(), dtype=object)

    def transform(self, X: Any) -> np.ndarray:
        """Compute the codes of ``X``.

        Parameters
        ----------
        X : images
            Paths, PIL images, arrays or tensors; see :mod:`sklearn_transfer.images`.

        Returns
        -------
        ndarray of float32, shape (n_samples, ``n_features_out_``)
        """
        check_is_fitted(self)
        self._validate_params()  # set_params after fit is checked where it is used
        source = as_image_source(X)
        cache = as_feature_cache(self.memory)

        def compute(indices: np.ndarray, on_batch: Callable | None = None) -> np.ndarray:
            return self._extract(source, indices, on_batch)

        if cache is None:
            return compute(np.arange(len(source)))
        return cache.codes(self.computation_, source, compute)

    def _extract(
        self,
        source: Any,
        indices: np.ndarray,
        on_batch: Callable[[np.ndarray, np.ndarray], None] | None = None,
    ) -> np.ndarray:
        """Codes of ``source[indices]`` by batches, calling ``on_batch(positions, codes)``."""
        out = np.empty((len(indices), self.n_features_out_), dtype=np.float32)
        if len(indices) == 0:
            return out
        runtime = Runtime.from_device(self.device, self.computation_.precision)
        cache = as_feature_cache(self.memory)
        try:
            engine = engine_for(self.computation_, runtime.device, self.backbone_,
                                None if cache is None else cache.directory)
        except EngineUnavailableError as exc:
            raise EngineUnavailableError(
                f"{exc}: this transformer was fitted with engine="
                f"{self.computation_.engine!r}; fit it again here (engine='auto' falls "
                "back to torch)") from None
        dataset = torch.utils.data.Subset(
            ImageDataset(source, self.computation_.data_config), indices.tolist())
        batches = image_batches(dataset, runtime, self.batch_size, self.num_workers)
        pos = 0
        with progress_bar(self.progress, len(indices)) as bar:
            for codes, _ in run_engine(engine, batches, self.batch_size, bar):
                out[pos: pos + len(codes)] = codes
                if on_batch is not None:
                    on_batch(np.arange(pos, pos + len(codes)), out[pos: pos + len(codes)])
                pos += len(codes)
        return out
