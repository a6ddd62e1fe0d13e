"""CNN codes as a scikit-learn transformer: images in, pooled ReLU'd activations out.

Importing this module imports neither torch nor timm, and neither does
fitting a built-in backbone (its stages and widths come from
:mod:`sklearn_transfer.catalog`): the network is built on the first image
the feature cache cannot answer, so a rerun against a warm cache costs the
Python start-up, reading the files and the cache look-up. (With
``device="auto"`` on a machine with a CUDA driver, torch is still imported,
to learn whether it would compute in float16.)
"""

from __future__ import annotations

import contextlib
import copy
import numbers
import os
import sqlite3
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted

from sklearn_transfer.cache import (
    FeatureCache,
    as_feature_cache,
    describe_computation,
    image_keys,
)
from sklearn_transfer.catalog import BUILTIN, BuiltinSpec, resolve_stage
from sklearn_transfer.images import ImageSource, as_image_source
from sklearn_transfer.runtime import Runtime, actionable_oom, autocast_dtype

if TYPE_CHECKING:
    from torch import nn

    from sklearn_transfer.backbones import Backbone, CodesExtractor

__all__ = ["CNNFeatureTransformer"]

POOLINGS = ("avg", "max", "avgmax", "catavgmax")


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
        weights offline.
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
    batch_size : int, default=16
        Images per forward pass; on a CPU small batches stay in cache and run
        faster (16 beat 32 by ~40% here), on a GPU use more.
    device : str, default="auto"
        ``"auto"`` uses CUDA when present (pinned memory, non-blocking
        copies, float16 autocast), the CPU otherwise.
    num_workers : int, default=0
        DataLoader worker processes decoding images. ``0`` decodes in a
        background thread of this process, overlapping the forward pass
        (fastest on a machine with few cores); on a GPU machine use several.
    progress : bool or "auto", default="auto"
        A tqdm progress bar; ``"auto"`` shows it for more than 1,000 images.
    memory : str, path-like, FeatureCache or None, default=None
        A directory for a persistent cache of codes (see
        :mod:`sklearn_transfer.cache`): ``transform`` looks every image up by
        its content and by everything that changes its codes (network and
        weights, stages, pooling, ReLU, preprocessing) and runs the network
        on the missing images only, storing their codes batch by batch.
        Folds and candidates of a grid search, repeated runs and concurrent
        processes then compute each image's codes once. ``None`` caches
        nothing.

    Attributes
    ----------
    backbone_ : Backbone
        The network (on the CPU; moved to ``device`` when transforming). A
        built-in network is built when first needed: by this attribute, by a
        transform the cache cannot wholly answer, or by pickling.
    stages_ : list of int
        Resolved stage indices.
    n_features_out_ : int
        Width of the output.

    Notes
    -----
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

    def __init__(
        self,
        backbone: str | nn.Module | Backbone = "efficientnet_lite0",
        weights: str | None = "pretrained",
        stage: int | str | Sequence[int | str] = -1,
        pooling: str = "avg",
        relu: bool = True,
        batch_size: int = 16,
        device: str = "auto",
        num_workers: int = 0,
        progress: bool | str = "auto",
        memory: str | os.PathLike | FeatureCache | None = None,
    ) -> None:
        self.backbone = backbone
        self.weights = weights
        self.stage = stage
        self.pooling = pooling
        self.relu = relu
        self.batch_size = batch_size
        self.device = device
        self.num_workers = num_workers
        self.progress = progress
        self.memory = memory

    # ------------------------------------------------------------------ sklearn

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.input_tags.three_d_array = True
        tags.input_tags.string = True
        tags.requires_fit = True
        tags.transformer_tags.preserves_dtype = []
        return tags

    def _check_params(self) -> None:
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling={self.pooling!r} is not one of {POOLINGS}")
        for name in ("batch_size",):
            value = getattr(self, name)
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if not isinstance(self.num_workers, numbers.Integral) or self.num_workers < 0:
            raise ValueError(f"num_workers={self.num_workers!r} must be an integer >= 0")
        if self.progress not in (True, False, "auto"):
            raise ValueError(f"progress={self.progress!r} must be True, False or 'auto'")
        as_feature_cache(self.memory)  # TypeError naming memory

    def fit(self, X: Any = None, y: Any = None) -> CNNFeatureTransformer:
        """Prepare the network (no training): find the weights, resolve stages.

        A built-in backbone with ``weights="pretrained"`` is described by the
        catalogue and built later, when first needed; any other one is built
        (and its weights loaded) here. ``X`` and ``y`` are ignored; they are
        accepted for the pipeline API.
        """
        self._check_params()
        stages = self.stage if isinstance(self.stage, (list, tuple)) else [self.stage]
        if len(stages) == 0:
            raise ValueError("stage=[] selects no stage; give at least one")
        spec = self._builtin_spec()
        if spec is not None:
            spec.weights_path()  # a missing weights package is reported now, not at a miss
            net, name, names, widths = None, spec.name, spec.stage_names, spec.widths
        else:
            from torch import nn

            from sklearn_transfer.backbones import get_backbone

            backbone = self.backbone
            if isinstance(backbone, nn.Module):
                # the user's module must not be moved or mutated behind their back
                backbone = copy.deepcopy(backbone)
            net = get_backbone(backbone, weights=self.weights).eval()
            name, names, widths = net.name, net.stage_names, net.widths
        try:
            self.stages_ = [resolve_stage(s, names, name) for s in stages]
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"stage={self.stage!r}: {exc}") from None
        self._spec: BuiltinSpec | None = spec
        self._net: Backbone | None = net
        self._pristine: str | None = None  # fingerprint of the built-in network, once built
        # only what backbone_ handed out can change after fit (fit copied the user's module)
        self._exposed = False
        self._stage_names, self._widths = list(names), list(widths)
        # what fit saw is what transform computes (and what the cache keys say), even if
        # set_params changes them before the next fit
        self._pooling, self._relu = self.pooling, bool(self.relu)
        self._extractor = None
        self._computation = None
        cache = as_feature_cache(self.memory)
        if cache is not None:
            cache.check_writable()  # fail now, not after an hour of extraction
        factor = 2 if self._pooling == "catavgmax" else 1
        self.n_features_out_ = sum(self._widths[i] * factor for i in self.stages_)
        return self

    def _builtin_spec(self) -> BuiltinSpec | None:
        """The catalogue entry when the network is a built-in one with its own weights."""
        if (isinstance(self.backbone, str) and self.backbone in BUILTIN
                and isinstance(self.weights, str) and self.weights == "pretrained"):
            return BUILTIN[self.backbone]
        return None

    @property
    def backbone_(self) -> Backbone:
        net = self._network()
        # the caller may change it: from now on each transform checks it (see _state)
        self._exposed = True
        return net

    def _network(self) -> Backbone:
        """The fitted network, built now if it was not yet (not handed out)."""
        if "stages_" not in self.__dict__:
            raise AttributeError(
                "this CNNFeatureTransformer is not fitted yet, so it has no backbone_; call fit")
        if self._net is None:
            from sklearn_transfer.backbones import get_backbone, pristine_fingerprint

            self._net = get_backbone(self._spec.name).eval()
            # kept here, so that a pickle can tell without the weights package
            self._pristine = pristine_fingerprint(self._spec.name)
        return self._net

    def get_feature_names_out(self, input_features: Any = None) -> np.ndarray:
        """Names such as ``head_avg_0``: stage, pooling, channel."""
        check_is_fitted(self, "stages_")
        pools = ["avg", "max"] if self._pooling == "catavgmax" else [self._pooling]
        names = []
        for i in self.stages_:
            for pool in pools:
                names += [f"{self._stage_names[i]}_{pool}_{c}" for c in range(self._widths[i])]
        return np.asarray(names, dtype=object)

    # --------------------------------------------------------------- transform

    def transform(self, X: Any) -> np.ndarray:
        """Compute the codes of ``X``.

        Parameters
        ----------
        X : images
            Paths, PIL images, arrays or tensors; see :mod:`sklearn_transfer.images`.

        Returns
        -------
        ndarray of float32, shape (n_samples, n_features_out_)
        """
        check_is_fitted(self, "stages_")
        source = as_image_source(X)
        cache = as_feature_cache(self.memory)
        if cache is None:
            return self._extract(source, np.arange(len(source)))
        return self._transform_cached(source, cache)

    def _computation_key(self, state: tuple[str, str] | None) -> tuple[str, dict]:
        """The cache key of this transformer's computation (and its description).

        ``state`` is :meth:`_state`, taken once per transform.
        """
        amp = autocast_dtype(self.device)
        precision = "float32" if amp is None else f"autocast-{amp}"
        memo = self._computation
        if memo is None or memo[0] != precision or memo[1] != state:
            self._computation = memo = (precision, state, self._describe(state, precision))
        return memo[2]

    def _state(self) -> tuple[str, str] | None:
        """What a handed-out network is now: its tensors' fingerprint and its preprocessing.

        ``None`` while nothing was handed out (nothing else can reach the
        network). Fingerprinting reads every weight, ~20 ms for the built-in
        networks; cheaper summaries such as tensors' version counters miss
        changes made through ``.data`` or numpy views.
        """
        if not self._exposed or self._net is None:
            return None
        from sklearn_transfer.backbones import module_fingerprint

        return module_fingerprint(self._net), repr(self._net.data_config)

    def _key_network(self, state: tuple[str, str] | None) -> Backbone | BuiltinSpec:
        """What identifies the network in cache keys: its catalogue entry while that holds.

        A built-in network as its weights file gives it, with its own
        preprocessing, is keyed by the catalogue entry, whether it was named or
        passed as a Backbone; any other by its tensors (see
        :func:`~sklearn_transfer.cache.describe_computation`).
        """
        spec, net = self._spec, self._net
        if net is None or spec is not None and not self._exposed:
            return spec
        from sklearn_transfer.backbones import module_fingerprint, pristine_fingerprint
        from sklearn_transfer.catalog import WeightsUnavailableError

        if spec is None:
            spec = BUILTIN.get(net.name)
            if spec is None or net.weights_id != spec.sha256:
                return net
            try:  # the user's get_backbone("mobilenet_v2"), unchanged: the same codes
                pristine = pristine_fingerprint(spec.name)
            except WeightsUnavailableError:
                return net
        else:
            pristine = self._pristine
        if net.data_config != spec.data_config:
            return net
        fingerprint = state[0] if state is not None else module_fingerprint(net)
        return spec if fingerprint == pristine else net

    def _describe(self, state: tuple[str, str] | None, precision: str) -> tuple[str, dict]:
        network = self._key_network(state)
        return describe_computation(network, self.stages_, self._pooling, self._relu, precision,
                                    fingerprint=state[0] if state is not None else None)

    def _transform_cached(self, source: ImageSource, cache: FeatureCache) -> np.ndarray:
        """Codes from the cache where present; the rest computed, stored batch by batch."""
        keys = image_keys(source)
        state = self._state()  # fingerprinting reads every weight: once per transform
        # identical images (same content) are computed once
        first: dict[bytes, int] = {}
        for i, key in enumerate(keys):
            first.setdefault(key, i)
        unique = np.fromiter(first.values(), dtype=np.int64, count=len(first))
        out = np.empty((len(source), self.n_features_out_), dtype=np.float32)
        width = self.n_features_out_
        with cache._connect() as conn:
            while True:
                config, description = self._computation_key(state)
                found = cache.lookup(config, [keys[i] for i in unique], width, conn=conn)
                if len(found) == len(unique):
                    break
                # misses: the network runs, so torch decides the precision now; should
                # that differ from what was found without torch, look up again
                self._runtime_extractor(state)
                if self._computation_key(state)[0] == config:
                    break
            missing = np.asarray(
                [i for pos, i in enumerate(unique) if pos not in found], dtype=np.int64)
            for pos, codes in found.items():
                out[unique[pos]] = codes
            if len(missing):
                failed: list[Exception] = []

                def store(positions: np.ndarray, codes: np.ndarray) -> None:
                    if failed:
                        return
                    images = missing[positions]
                    # an image whose content changed since it was looked up (a file
                    # rewritten meanwhile) is not stored under the key of its old content
                    same = [j for j, i in enumerate(images) if _still(source, int(i), keys[i])]
                    if not same:
                        return
                    try:
                        cache.store(config, [keys[images[j]] for j in same], codes[same],
                                    description, conn=conn)
                    except sqlite3.Error as exc:
                        # a full disk must not throw away the codes computed so far
                        failed.append(exc)
                        warnings.warn(
                            f"could not store codes in the feature cache {str(cache.path)!r} "
                            f"({exc}); going on without storing them",
                            RuntimeWarning,
                            stacklevel=2,
                        )

                out[missing] = self._extract(source, missing, on_batch=store, state=state)
        if len(unique) < len(keys):
            out[:] = out[[first[key] for key in keys]]
        return out

    def _runtime_extractor(self, state: tuple[str, str] | None = None
                           ) -> tuple[Runtime, CodesExtractor]:
        """The extractor on the requested device, built once per device.

        On the CPU it runs the fitted network itself; elsewhere a copy, made
        again when a handed-out network changed (``state``, see :meth:`_state`).
        """
        import torch

        from sklearn_transfer.backbones import CodesExtractor

        runtime = Runtime.from_device(self.device)
        copied = runtime.device.type != "cpu"
        if copied and state is None:
            state = self._state()
        marker = state if copied else None
        cached = getattr(self, "_extractor", None)
        if cached is None or cached[0] != runtime.device or cached[1] != marker:
            module = CodesExtractor(self._network(), self.stages_, self._pooling, self._relu)
            self._extractor = (runtime.device, marker,
                               copy.deepcopy(module) if copied else module)
        # cheap when already there; on the CPU the network may have been moved meanwhile
        module = self._extractor[2].to(runtime.device, memory_format=torch.channels_last)
        return runtime, module

    def _extract(
        self,
        source: ImageSource,
        indices: np.ndarray,
        on_batch: Callable[[np.ndarray, np.ndarray], None] | None = None,
        state: tuple[str, str] | None = None,
    ) -> np.ndarray:
        """Codes for ``source[indices]``, batch by batch; only the output is kept.

        ``on_batch(positions, codes)`` is called after each batch with the
        batch's positions in ``indices`` (the cache stores them there, so a
        run stopped half-way keeps what it computed).
        """
        out = np.empty((len(indices), self.n_features_out_), dtype=np.float32)
        if len(indices) == 0:
            return out
        import torch
        from tqdm.auto import tqdm

        from sklearn_transfer.batches import ImageDataset, collate_images, iterate_batches

        runtime, module = self._runtime_extractor(state)
        config = self._network().data_config
        dataset = torch.utils.data.Subset(
            ImageDataset(source, config.eval_transform(), draft_size=config.resize_size),
            indices.tolist(),
        )
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            collate_fn=collate_images,
            pin_memory=runtime.pin_memory,
        )
        show = self.progress is True or (self.progress == "auto" and len(indices) > 1000)
        bar = tqdm(total=len(indices), unit="img", disable=not show, desc="CNN codes")
        pos = 0
        with torch.inference_mode(), runtime.autocast(), _eval_mode(module):
            prefetch = 2 if self.num_workers == 0 else 0
            for xb, _ in iterate_batches(loader, prefetch=prefetch):
                with actionable_oom(self.batch_size):
                    codes = module(runtime.to_device(xb))
                out[pos: pos + len(codes)] = codes.float().cpu().numpy()
                if on_batch is not None:
                    on_batch(np.arange(pos, pos + len(codes)), out[pos: pos + len(codes)])
                pos += len(codes)
                bar.update(len(codes))
        bar.close()
        return out

    def __getstate__(self) -> dict:
        if "stages_" in self.__dict__:
            self._network()  # a pickle carries the weights: loading it needs no weights package
        state = self.__dict__.copy()
        state.pop("_extractor", None)  # device copies are rebuilt where it is loaded
        return state

    def __setstate__(self, state: dict) -> None:
        if "backbone_" in state:  # pickled by sklearn_transfer before the lazy build
            net = state.pop("backbone_")
            state.update(_spec=None, _net=net, _pristine=None, _exposed=True,
                         _stage_names=list(net.stage_names), _widths=net.widths,
                         _computation=None)
        if "stages_" in state:  # fitted before pooling and relu were kept as at fit
            state.setdefault("_pooling", state["pooling"])
            state.setdefault("_relu", bool(state["relu"]))
        self.__dict__.update(state)


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Inference-mode activations (BatchNorm's running statistics), then the modes as they were.

    On the CPU the extractor runs the fitted network itself, which a caller
    fine-tuning ``backbone_`` may have left in training mode.
    """
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _still(source: ImageSource, index: int, key: bytes) -> bool:
    """Does file ``index`` still have content key ``key``? (A vanished one has not.)

    Only files can change behind the transformer's back; in-memory images pass.
    """
    if not isinstance(source.item(index), (str, os.PathLike)):
        return True
    try:
        return source.content_key(index) == key
    except (OSError, ValueError):
        return False
