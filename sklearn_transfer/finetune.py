"""End-to-end fine-tuning of a pretrained CNN as a scikit-learn classifier, built on skorch.

:class:`FineTunedClassifier` *is* a :class:`skorch.NeuralNetClassifier`:
callbacks, ``history_``, routed parameters (``optimizer__weight_decay``,
``iterator_train__num_workers``, ``callbacks__early_stopping__patience``) and
the printed epoch table work as skorch users know them. What it adds:

* the network: a :class:`~sklearn_transfer.Backbone` whose ImageNet classifier
  is replaced by a fresh head for the classes of ``y`` (:class:`FineTuneModule`);
* ``freeze_depth``: the first stages get no gradients, are never handed to
  the optimizer and keep their BatchNorm statistics (evaluation mode, re-applied
  after every ``module.train()`` call);
* images in (paths, PIL, arrays, tensors, as :class:`CNNFeatureTransformer`),
  augmented for training and plainly resized for validation and prediction with
  the backbone's own preprocessing;
* any labels scikit-learn accepts, a default recipe that works out of the box
  (AdamW, smaller learning rate for pretrained layers, cosine schedule, early
  stopping with the best validation weights restored), ``random_state`` and
  ``device="auto"``.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import inspect
import numbers
import os
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator
from sklearn.preprocessing import LabelEncoder
from sklearn.utils.class_weight import compute_class_weight
from sklearn.utils.multiclass import type_of_target
from sklearn.utils.validation import column_or_1d
from skorch import NeuralNetClassifier
from skorch.callbacks import (
    EarlyStopping,
    EpochScoring,
    EpochTimer,
    LRScheduler,
    PassthroughScoring,
    PrintLog,
)
from skorch.dataset import ValidSplit, unpack_data
from skorch.utils import TeeGenerator, is_dataset
from torch import nn
from torch.utils.data import DataLoader, Subset

from sklearn_transfer.backbones import Backbone, get_backbone
from sklearn_transfer.preprocessing import DataConfig
from sklearn_transfer.batches import ImageDataset, collate_images, iterate_batches
from sklearn_transfer.checkpoint import FitCheckpoint
from sklearn_transfer.images import as_image_source
from sklearn_transfer.runtime import (
    Runtime,
    actionable_oom,
    resolve_device,
    seed_everything,
    seed_worker,
)

__all__ = ["FineTuneModule", "FineTunedClassifier", "resolve_freeze_depth"]

LR_SCHEDULES = ("cosine", "step", None)
DEFAULT_AUGMENT = {"scale": (0.25, 1.0)}


# ----------------------------------------------------------------------- the network


def resolve_freeze_depth(freeze_depth: int | str, backbone: Backbone) -> int:
    """Number of leading stages of ``backbone`` that ``freeze_depth`` freezes.

    Parameters
    ----------
    freeze_depth : int or "all"
        ``0`` freezes nothing, ``k`` the first ``k`` stages, ``"all"`` (or the
        number of stages) the whole backbone; a negative ``-k`` leaves the last
        ``k`` stages trainable.
    backbone : Backbone

    Returns
    -------
    int

    Examples
    --------
    >>> from torch import nn
    >>> from sklearn_transfer.backbones import Backbone, DataConfig
    >>> from sklearn_transfer.finetune import resolve_freeze_depth
    >>> net = Backbone([("a", nn.Conv2d(3, 4, 3)), ("b", nn.Conv2d(4, 4, 3))], DataConfig(32))
    >>> resolve_freeze_depth("all", net), resolve_freeze_depth(-1, net)
    (2, 1)
    """
    n = backbone.num_stages
    if isinstance(freeze_depth, str) and freeze_depth == "all":
        return n
    if isinstance(freeze_depth, numbers.Integral) and not isinstance(freeze_depth, bool):
        depth = int(freeze_depth)
        if -n <= depth <= n:
            return depth % n if depth < 0 else depth
    raise ValueError(
        f"freeze_depth={freeze_depth!r} is not valid for backbone {backbone.name}, which has "
        f"{n} stages {backbone.stage_names}: use an int from 0 (train everything) to {n} "
        f"(freeze every stage), a negative int down to -{n} (-k keeps the last k stages "
        "trainable) or 'all' (train the new head only)"
    )


class FineTuneModule(nn.Module):
    """A backbone with a new classification head, its first stages frozen.

    Frozen stages have ``requires_grad=False`` and stay in evaluation mode
    (BatchNorm running statistics untouched, dropout off) even when the module
    is switched to training mode, as skorch does every epoch.

    Parameters
    ----------
    backbone : Backbone
        Its ImageNet ``classifier`` is dropped: the new ``head`` replaces it.
    n_classes : int
    freeze_depth : int
        Number of leading stages frozen (already resolved).
    head_hidden : int or None
        Width of an optional hidden layer (ReLU) in the head.
    head_dropout : float
        Dropout before each linear layer of the head.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from sklearn_transfer.backbones import Backbone, DataConfig
    >>> from sklearn_transfer.finetune import FineTuneModule
    >>> net = Backbone([("a", nn.Conv2d(3, 4, 3)), ("b", nn.BatchNorm2d(4))], DataConfig(32))
    >>> module = FineTuneModule(net, n_classes=3, freeze_depth=1).train()
    >>> module(torch.zeros(2, 3, 32, 32, dtype=torch.uint8)).shape
    torch.Size([2, 3])
    >>> net.stages[0].weight.requires_grad, net.stages[1].training
    (False, True)
    """

    def __init__(
        self,
        backbone: Backbone,
        n_classes: int,
        freeze_depth: int = 0,
        head_hidden: int | None = None,
        head_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        width = backbone.widths[-1]
        backbone.classifier = None  # the ImageNet head is replaced, not trained
        self.backbone = backbone
        layers: list[nn.Module] = []
        if head_hidden:
            layers += [nn.Dropout(head_dropout), nn.Linear(width, head_hidden), nn.ReLU()]
            width = head_hidden
        layers += [nn.Dropout(head_dropout), nn.Linear(width, n_classes)]
        self.head = nn.Sequential(*layers)
        self.freeze_depth = int(freeze_depth)
        for stage in self.frozen_stages():
            for param in stage.parameters():
                param.requires_grad_(False)
        self.train(self.training)

    def frozen_stages(self) -> list[nn.Module]:
        return list(self.backbone.stages[: self.freeze_depth])

    def train(self, mode: bool = True) -> FineTuneModule:
        super().train(mode)
        # frozen stages are a fixed function: their BatchNorm must neither use
        # batch statistics nor update its running ones
        for stage in self.frozen_stages():
            stage.train(False)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.backbone.forward_features(x)
        return self.head(self.backbone.forward_head(features, pre_logits=True))


# ------------------------------------------------------------------------ helpers


class _CheckedLoader:
    """A DataLoader whose iteration raises a worker's image error in the caller."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def __iter__(self) -> Iterator:
        return iterate_batches(self.loader)

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        if name == "loader":  # not yet set (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.loader, name)


@contextlib.contextmanager
def _seeded(random_state: Any) -> Iterator[None]:
    """Seed every RNG for the block, then give the caller back its own states."""
    if random_state is None:
        yield
        return
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state())  # noqa: NPY002
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    seed_everything(random_state)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])  # noqa: NPY002
        torch.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def _augment_kwargs(augment: Any) -> dict[str, Any] | None:
    """``augment`` -> keyword arguments of ``DataConfig.train_transform`` (None: off)."""
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


class _ValidSplit(ValidSplit):
    """skorch's ``ValidSplit`` with a repr that shows its settings (short estimator reprs)."""

    def __repr__(self) -> str:
        return (f"ValidSplit({self.cv!r}, stratified={self.stratified!r}, "
                f"random_state={self.random_state!r})")


# one shared default instance, as skorch's own (a split holds no fitted state)
DEFAULT_TRAIN_SPLIT = _ValidSplit(0.2, stratified=True)


# -------------------------------------------------------------------- the estimator


class FineTunedClassifier(NeuralNetClassifier):
    """Fine-tune a pretrained CNN on images: a skorch ``NeuralNetClassifier``.

    The backbone's ImageNet classifier is replaced by a freshly initialised
    head for the classes of ``y``; the first ``freeze_depth`` stages stay
    frozen (the generic edges and textures), the later ones are trained with
    a smaller learning rate than the head. Every ``fit`` starts again from the
    pretrained weights (unless ``warm_start=True``), so ``clone`` and
    ``GridSearchCV`` give each candidate and fold a fresh network.

    Parameters
    ----------
    backbone : str, nn.Module or Backbone, default="efficientnet_lite0"
        See :func:`sklearn_transfer.get_backbone`. A module you pass is copied
        at each ``fit``, never trained in place.
    weights : "pretrained", None or path, default="pretrained"
        As in :func:`~sklearn_transfer.get_backbone` (ignored for modules).
    freeze_depth : int or "all", default=-2
        Stages, counted from the input, that stay frozen: ``0`` trains
        everything, ``"all"`` the head only, ``-k`` all but the last ``k``
        stages. The default trains the last two stages: for
        ``efficientnet_lite0`` (stages ``stem, blocks.0 … blocks.6, head``)
        that is ``blocks.6`` and ``head`` (1.0M of the 3.4M backbone weights,
        at 7x7 resolution), so an epoch costs about what inference does and
        small data sets cannot wash out what the network knew. On
        ``hymenoptera_data`` it beat training the last three stages (0.948
        vs 0.935). Frozen stages get no gradients, are not given to the
        optimizer, and keep their BatchNorm layers in evaluation mode.
    head_hidden : int or None, default=None
        Width of an optional hidden layer (ReLU) in the new head.
    head_dropout : float, default=0.2
        Dropout before each linear layer of the head.
    backbone_lr_mult : float, default=0.1
        Learning rate of the pretrained (unfrozen) layers relative to ``lr``,
        which the new head uses; small values keep what the network knew
        (no catastrophic forgetting).
    lr : float, default=3e-3
        Learning rate of the head (``optimizer__lr`` overrides it).
    optimizer : torch optimizer class, default=torch.optim.AdamW
        With its default weight decay of 0.01; route options as
        ``optimizer__weight_decay=0.05``.
    max_epochs : int, default=5
        A short cosine schedule: the pretrained features need adapting, not learning.
    batch_size : int, default=32
    patience : int or None, default=3
        Early stopping on the validation loss, after which the weights of the
        best validation epoch are restored (skorch ``EarlyStopping(load_best=True)``).
        ``None`` trains for ``max_epochs`` (the best weights are still restored
        when there is a validation split).
    lr_schedule : {"cosine", "step", None}, default="cosine"
        Per-epoch schedule through skorch's ``LRScheduler``: cosine annealing
        over ``max_epochs``, or a step decay by 10 every third of them.
    augment : bool or dict, default=True
        Training augmentation from the backbone's preprocessing
        (:meth:`DataConfig.train_transform`): random resized crop of 25% to
        100% of the image (milder than the 8% of ImageNet training from
        scratch: small data sets cannot afford crops that lose the object)
        and horizontal flip; a dict passes options such as ``{"rotation": 15,
        "translate": 0.1, "zoom": 0.1, "scale": (0.08, 1.0)}``. ``False``
        uses the evaluation transform. Validation and prediction always use the
        plain resize and centre crop.
    class_weight : None, "balanced" or dict, default=None
        Weights of the classes in the loss, as in scikit-learn.
    classes : array-like or None, default=None
        All labels, if ``y`` may lack some (e.g. for ``partial_fit``).
    train_split : callable or None, default=ValidSplit(0.2, stratified=True)
        skorch's internal validation split (for the epoch table, early
        stopping and the best weights); ``None`` trains on everything.
    random_state : int, RandomState or None, default=None
        Seeds the head, the validation split, shuffling and augmentation; two
        CPU fits with the same value predict identically. The caller's global
        random states are restored afterwards.
    checkpoint_dir : str, path-like or None, default=None
        Makes ``fit`` survive a crash. At the end of every epoch the complete
        training state (module, optimizer, history, learning-rate schedule,
        early-stopping state and best weights, and the random states of
        Python, NumPy and torch) is written to one file in this directory,
        atomically (a temporary file renamed over the previous checkpoint).
        A later ``fit`` *of the same run* (same parameters, apart from
        ``verbose`` and ``checkpoint_dir``, and the same ``X`` and ``y``)
        finds it and resumes after the last completed epoch; on the CPU it
        ends with exactly the weights and predictions of an uninterrupted
        fit. The file is named after a SHA-256 of parameters and data, so
        different runs (the folds and candidates of a grid search) can share
        the directory without resuming each other's. It is deleted when
        ``fit`` completes, and kept when it is interrupted (an exception,
        ``KeyboardInterrupt``, a killed process). Checkpoints are read with
        ``torch.load(weights_only=True)``: a file holding pickled objects is
        refused. Files are identified by path, size and modification time.
        Only ``fit`` from scratch checkpoints; ``partial_fit`` and
        ``warm_start`` continuations do not. With ``num_workers > 0`` the
        training workers are restarted every epoch (``persistent_workers``
        defaults to False) so that their random streams can be replayed.
        Custom callbacks' own state is not saved.
    device : str, default="auto"
        ``"auto"``: CUDA if present (float16 autocast with a gradient scaler,
        pinned memory), else the CPU. The network runs ``channels_last``.
    criterion : torch loss class, default=torch.nn.CrossEntropyLoss
        Options are routed: ``criterion__label_smoothing=0.1``.
    callbacks : list of (name, callback) or None, default=None
        Extra skorch callbacks; the defaults (``epoch_timer``, ``train_loss``,
        ``valid_loss``, ``valid_acc``, ``lr_scheduler``, ``early_stopping``,
        ``print_log``) can be tuned as ``callbacks__early_stopping__threshold``
        or disabled with ``callbacks__lr_scheduler=None``.
    verbose : int, default=1
        1 prints skorch's epoch table.
    warm_start, iterator_train, iterator_valid, predict_nonlinearity, compile, \
use_caching, torch_load_kwargs
        As in skorch. The iterators get ``collate_images`` (channels_last
        uint8 batches), pinned memory on CUDA and, for training, shuffling,
        unless routed parameters say otherwise.
    **kwargs
        Any other skorch parameter, e.g. ``iterator_train__num_workers=4``
        (decoding and augmentation in DataLoader worker processes; pays on a
        GPU machine, hardly on a two-core CPU), ``warm_start``, ``compile``.

    Attributes
    ----------
    classes_ : ndarray
        The labels, in the order of ``predict_proba``'s columns.
    module_ : FineTuneModule
        The network after training (with the best validation weights).
    history_ : skorch.History
        Per-epoch and per-batch records, as in skorch.
    freeze_depth_ : int
        The resolved number of frozen stages.
    label_encoder_ : LabelEncoder
    class_weight_ : ndarray or None

    Notes
    -----
    Callbacks see the targets encoded as indices into ``classes_`` (what the
    loss needs); ``predict`` on a torch ``Dataset`` (skorch's validation
    subsets) therefore returns indices, so skorch scorers such as
    ``EpochScoring("f1_macro")`` compare like with like. On images it returns
    the original labels.

    Grid search: ``GridSearchCV(..., n_jobs=1)`` is the safe choice with one
    GPU (parallel candidates on one GPU fight over its memory). With several
    GPUs, split the grid and run one search per GPU, each process started
    with its own ``CUDA_VISIBLE_DEVICES=i``, or run a Dask/Ray joblib
    backend whose workers each see one GPU.

    Notes
    -----
    Fitted estimators pickle (and ``joblib.dump``); loading a pickle can run
    arbitrary code, so load such files only from sources you trust. To share
    a model, use :func:`sklearn_transfer.persistence.dump` / ``load`` (skops
    and safetensors, no pickle). A CUDA out-of-memory error in a training or
    prediction step is re-raised naming the batch-size parameter to lower.

    Examples
    --------
    >>> import numpy as np
    >>> from torch import nn
    >>> from sklearn_transfer import FineTunedClassifier
    >>> from sklearn_transfer.backbones import Backbone, DataConfig
    >>> net = Backbone([("conv", nn.Conv2d(3, 8, 3)), ("bn", nn.BatchNorm2d(8))],
    ...                DataConfig(input_size=16, crop_pct=1.0))
    >>> rng = np.random.RandomState(0)
    >>> X = rng.randint(0, 256, (20, 16, 16, 3), dtype=np.uint8)
    >>> y = np.array(["cat", "dog"] * 10)
    >>> clf = FineTunedClassifier(net, freeze_depth=1, max_epochs=2, random_state=0,
    ...                           verbose=0).fit(X, y)
    >>> clf.classes_
    array(['cat', 'dog'], dtype='<U3')
    >>> clf.predict(X[:3]).shape, clf.predict_proba(X[:3]).sum(axis=1).round(5)
    ((3,), array([1., 1., 1.], dtype=float32))

    With ``checkpoint_dir``, a fit killed half-way is finished by running it again:

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     resumable = FineTunedClassifier(net, freeze_depth=1, max_epochs=2, random_state=0,
    ...                                     verbose=0, checkpoint_dir=tmp).fit(X, y)
    >>> bool((resumable.predict_proba(X) == clf.predict_proba(X)).all())
    True
    """

    def __init__(
        self,
        backbone: str | nn.Module | Backbone = "efficientnet_lite0",
        weights: str | None = "pretrained",
        freeze_depth: int | str = -2,
        head_hidden: int | None = None,
        head_dropout: float = 0.2,
        backbone_lr_mult: float = 0.1,
        lr: float = 3e-3,
        optimizer: type[torch.optim.Optimizer] = torch.optim.AdamW,
        max_epochs: int = 5,
        batch_size: int = 32,
        patience: int | None = 3,
        lr_schedule: str | None = "cosine",
        augment: bool | dict = True,
        class_weight: str | dict | None = None,
        classes: Any = None,
        train_split: Any = DEFAULT_TRAIN_SPLIT,
        random_state: int | np.random.RandomState | None = None,
        device: str = "auto",
        criterion: type[nn.Module] = nn.CrossEntropyLoss,
        callbacks: list | None = None,
        verbose: int = 1,
        warm_start: bool = False,
        iterator_train: Any = DataLoader,
        iterator_valid: Any = DataLoader,
        predict_nonlinearity: Any = "auto",
        compile: bool = False,
        use_caching: bool | str = "auto",
        torch_load_kwargs: dict | None = None,
        checkpoint_dir: str | os.PathLike | None = None,
        **kwargs: Any,
    ) -> None:
        self.backbone = backbone
        self.weights = weights
        self.freeze_depth = freeze_depth
        self.head_hidden = head_hidden
        self.head_dropout = head_dropout
        self.backbone_lr_mult = backbone_lr_mult
        self.patience = patience
        self.lr_schedule = lr_schedule
        self.augment = augment
        self.class_weight = class_weight
        self.random_state = random_state
        self.checkpoint_dir = checkpoint_dir
        super().__init__(
            FineTuneModule,
            criterion=criterion,
            optimizer=optimizer,
            lr=lr,
            max_epochs=max_epochs,
            batch_size=batch_size,
            train_split=train_split,
            classes=classes,
            callbacks=callbacks,
            verbose=verbose,
            device=device,
            warm_start=warm_start,
            iterator_train=iterator_train,
            iterator_valid=iterator_valid,
            predict_nonlinearity=predict_nonlinearity,
            compile=compile,
            use_caching=use_caching,
            torch_load_kwargs=torch_load_kwargs,
            **kwargs,
        )

    # ------------------------------------------------ scikit-learn surface

    # ``device`` keeps what the user passed ("auto"), while skorch's internals,
    # which read ``self.device`` to move modules and tensors, get a real device.
    @property
    def device(self) -> str | None:
        requested = self.__dict__.get("device", "auto")
        if isinstance(requested, str) and requested == "auto":
            return str(resolve_device("auto"))
        return requested

    @device.setter
    def device(self, value: Any) -> None:
        self.__dict__["device"] = value

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "backbone":
            # a user's module is a parameter (copied at fit), not one of skorch's
            # initialised components: plain assignment, so set_params works too
            object.__setattr__(self, name, value)
            return
        super().__setattr__(name, value)

    def _get_param_names(self) -> list[str]:
        # the module class and skorch's dataset are fixed internals here, and
        # private bookkeeping is no constructor argument
        return sorted(k for k in super()._get_param_names()
                      if not k.startswith("_") and k not in ("module", "dataset"))

    def get_params(self, deep: bool = True, **kwargs: Any) -> dict[str, Any]:
        params = super().get_params(deep=deep, **kwargs)
        params["device"] = self.__dict__.get("device", "auto")
        return params

    def __repr__(self) -> str:
        return BaseEstimator.__repr__(self)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.input_tags.three_d_array = True
        tags.input_tags.string = True
        tags.non_deterministic = self.random_state is None
        return tags

    @property
    def classes_(self) -> np.ndarray:
        encoder = self.__dict__.get("label_encoder_")
        if encoder is None:
            raise AttributeError(f"{type(self).__name__} has no classes_ before fit")
        return encoder.classes_

    # -------------------------------------------------------- validation

    def _check_hyperparameters(self) -> None:
        def positive_int(name: str, allow_none: bool = False) -> None:
            value = getattr(self, name)
            if allow_none and value is None:
                return
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
                extra = " or None" if allow_none else ""
                raise ValueError(f"{name}={value!r} must be a positive integer{extra}")

        positive_int("max_epochs")
        positive_int("patience", allow_none=True)
        positive_int("head_hidden", allow_none=True)
        if not (isinstance(self.batch_size, numbers.Integral) and (
                self.batch_size >= 1 or self.batch_size == -1)):
            raise ValueError(f"batch_size={self.batch_size!r} must be a positive integer or -1")
        if not isinstance(self.head_dropout, numbers.Real) or not 0 <= self.head_dropout < 1:
            raise ValueError(f"head_dropout={self.head_dropout!r} must be in [0, 1)")
        if not isinstance(self.backbone_lr_mult, numbers.Real) or self.backbone_lr_mult < 0:
            raise ValueError(f"backbone_lr_mult={self.backbone_lr_mult!r} must be a number >= 0")
        if not isinstance(self.lr, numbers.Real) or self.lr <= 0:
            raise ValueError(f"lr={self.lr!r} must be a positive number")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule={self.lr_schedule!r} must be one of {LR_SCHEDULES}")
        _augment_kwargs(self.augment)
        if not (self.class_weight is None or self.class_weight == "balanced"
                or isinstance(self.class_weight, dict)):
            raise ValueError(
                f"class_weight={self.class_weight!r} must be None, 'balanced' or a dict "
                "{label: weight}"
            )
        if not (isinstance(self.freeze_depth, numbers.Integral) or self.freeze_depth == "all") \
                or isinstance(self.freeze_depth, bool):
            raise ValueError(
                f"freeze_depth={self.freeze_depth!r} must be an int (stages frozen from the "
                "input; 0 trains everything, negative -k keeps the last k stages trainable) "
                "or 'all' (train the new head only)"
            )
        resolve_device(self.__dict__.get("device", "auto"))  # raises naming the device

    def _set_targets(self, y: Any, classes: Any = None) -> None:
        """Learn the label encoding and class weights from ``y`` (or ``classes``)."""
        y = self._check_y(y)
        target_type = type_of_target(y, input_name="y")
        if target_type not in ("binary", "multiclass"):
            raise ValueError(
                f"y must hold class labels (binary or multiclass), but its type is "
                f"{target_type!r}; FineTunedClassifier is a classifier"
            )
        labels = y if classes is None else column_or_1d(np.asarray(classes))
        encoder = LabelEncoder().fit(labels)
        if len(encoder.classes_) < 2:
            raise ValueError(
                f"y holds a single class ({encoder.classes_[0]!r}); a classifier needs at "
                "least two"
            )
        self.label_encoder_ = encoder
        y_enc = self._encode(y)
        weight = None
        if self.class_weight is not None:
            cw = self.class_weight
            if isinstance(cw, dict):
                unknown = [k for k in cw if k not in set(encoder.classes_.tolist())]
                if unknown:
                    raise ValueError(
                        f"class_weight names label(s) {unknown} that are not classes of y "
                        f"({encoder.classes_.tolist()})"
                    )
                cw = {int(encoder.transform([k])[0]): float(v) for k, v in cw.items()}
            present = np.unique(y_enc)
            weight = np.ones(len(encoder.classes_), dtype=np.float32)
            weight[present] = compute_class_weight(cw, classes=present, y=y_enc)
        self.class_weight_ = weight

    @staticmethod
    def _check_y(y: Any) -> np.ndarray:
        if y is None:
            raise ValueError("FineTunedClassifier.fit needs y (the class of each image)")
        return column_or_1d(y, warn=True)

    def _encode(self, y: Any) -> np.ndarray:
        y = self._check_y(y)
        known = self.label_encoder_.classes_
        unseen = np.setdiff1d(np.unique(y), known)
        if len(unseen):
            raise ValueError(
                f"y contains label(s) {unseen.tolist()[:5]} that were not in the classes seen "
                f"at the first fit ({known.tolist()}); pass classes=[...] to declare them"
            )
        return self.label_encoder_.transform(y).astype(np.int64)

    # ------------------------------------------------------------ fitting

    def fit(self, X: Any, y: Any, **fit_params: Any) -> FineTunedClassifier:
        """Fine-tune from the pretrained weights on images ``X`` with labels ``y``.

        Parameters
        ----------
        X : images
            Paths, PIL images, arrays or tensors; see :mod:`sklearn_transfer.images`.
        y : array-like of shape (n_samples,)
            Labels of any kind scikit-learn accepts.
        **fit_params
            Passed to skorch (e.g. to ``train_split``).

        Returns
        -------
        self
        """
        self._check_hyperparameters()
        run = None
        with _seeded(self.random_state):
            if not self.warm_start or not self.initialized_:
                self._set_targets(y, self.classes)
                if self.checkpoint_dir is not None:
                    # before initialize(): a resumed fit rewinds the RNGs to where the
                    # interrupted one started, so the head and validation split match
                    run = FitCheckpoint.open(self.checkpoint_dir, self, as_image_source(X),
                                             self._check_y(y))
                self.initialize()
            self._checkpoint_run = run
            try:
                self._partial_fit(X, y, _routing_method="fit", **fit_params)
            finally:
                self.__dict__.pop("_checkpoint_run", None)
        if run is not None and self._training_completed(run):
            run.remove()
        return self

    def _training_completed(self, run: FitCheckpoint) -> bool:
        """All epochs ran, or early stopping ended the fit (not a user's Ctrl-C)."""
        if len(self.history) >= self.max_epochs:
            return True
        return any(isinstance(cb, EarlyStopping) and cb.misses_ >= cb.patience
                   for _, cb in self.callbacks_)

    def fit_loop(self, X: Any, y: Any = None, epochs: int | None = None,
                 **fit_params: Any) -> FineTunedClassifier:
        if epochs is None and self.__dict__.get("_checkpoint_run") is not None:
            # a resumed fit runs the epochs the interrupted one did not complete
            epochs = max(self.max_epochs - len(self.history), 0)
        return super().fit_loop(X, y, epochs=epochs, **fit_params)

    def notify(self, method_name: str, **cb_kwargs: Any) -> None:
        run = self.__dict__.get("_checkpoint_run")
        if run is None:
            super().notify(method_name, **cb_kwargs)
            return
        if method_name == "on_train_begin":
            # the history first: LRScheduler and scoring callbacks rebuild from it
            run.load_before_callbacks(self)
        super().notify(method_name, **cb_kwargs)
        if method_name == "on_train_begin":
            run.load_after_callbacks(self)
        elif method_name == "on_epoch_begin":
            run.on_epoch_begin()
        elif method_name == "on_epoch_end":
            # after every callback has recorded its epoch (early stopping's raise skips this:
            # the resumed fit repeats that epoch and stops again, identically)
            run.save(self)

    def partial_fit(self, X: Any, y: Any = None, classes: Any = None,
                    **fit_params: Any) -> FineTunedClassifier:
        """Train for ``max_epochs`` more, initialising first if needed (skorch semantics).

        ``classes`` (or the ``classes`` parameter) declares every label when
        the first batch of data lacks some.
        """
        if not self.initialized_:
            self._check_hyperparameters()
            with _seeded(self.random_state):
                self._set_targets(y, classes if classes is not None else self.classes)
                self.initialize()
        return self._partial_fit(X, y, **fit_params)

    def _partial_fit(self, X: Any, y: Any, **fit_params: Any) -> FineTunedClassifier:
        source = as_image_source(X)
        y_enc = self._encode(y)
        if len(y_enc) != len(source):
            raise ValueError(f"X holds {len(source)} images but y has {len(y_enc)} labels")
        routing = fit_params.pop("_routing_method", "partial_fit")
        try:
            NeuralNetClassifier.partial_fit(
                self, source, y_enc, _routing_method=routing, **fit_params)
        finally:
            # the scaler is a training-time helper; never keep it in the model
            self.__dict__.pop("grad_scaler_", None)
        return self

    def check_data(self, X: Any, y: Any = None) -> None:
        # labels are validated and encoded before skorch sees them
        pass

    # ------------------------------------------------------ initialisation

    def initialize_module(self) -> FineTunedClassifier:
        if "label_encoder_" not in self.__dict__:
            raise ValueError(
                "FineTunedClassifier learns its number of classes from y: call fit(X, y) "
                "instead of initialize()"
            )
        backbone = self.backbone
        if isinstance(backbone, nn.Module):
            # the user's module is the pristine starting point of every fit
            backbone = copy.deepcopy(backbone)
        net = get_backbone(backbone, weights=self.weights)
        self.freeze_depth_ = resolve_freeze_depth(self.freeze_depth, net)
        module = FineTuneModule(
            net,
            n_classes=len(self.classes_),
            freeze_depth=self.freeze_depth_,
            head_hidden=self.head_hidden,
            head_dropout=float(self.head_dropout),
        )
        self.module_ = module.to(memory_format=torch.channels_last)
        return self

    def initialize_criterion(self) -> FineTunedClassifier:
        kwargs = self.get_params_for("criterion")
        weight = self.__dict__.get("class_weight_")
        if weight is not None and "weight" not in kwargs:
            kwargs["weight"] = torch.as_tensor(weight, dtype=torch.float32)
        self.criterion_ = self.initialized_instance(self.criterion, kwargs)
        return self

    def initialize_optimizer(self, triggered_directly: Any = None) -> FineTunedClassifier:
        """The optimizer over trainable parameters only: frozen ones are never given to it.

        Parameters matching ``optimizer__param_groups`` patterns go to those
        groups; then the head trains at ``lr`` (the first group, whose rate
        skorch's epoch table shows) and the remaining pretrained parameters at
        ``lr * backbone_lr_mult``.
        """
        kwargs = self.get_params_for("optimizer")
        user_groups = kwargs.pop("param_groups", [])
        lr = kwargs.setdefault("lr", self.lr)
        named = [(n, p) for n, p in self.module_.named_parameters() if p.requires_grad]
        groups = []
        for pattern, options in user_groups:
            matched = [p for n, p in named if fnmatch.fnmatch(n, pattern)]
            named = [(n, p) for n, p in named if not fnmatch.fnmatch(n, pattern)]
            if matched:
                groups.append({"params": matched, **options})
        pretrained = [p for n, p in named if n.startswith("backbone.")]
        new = [p for n, p in named if not n.startswith("backbone.")]
        # the head first: skorch's LRScheduler reports group 0 as the table's lr column
        if new:
            groups.append({"params": new})
        if pretrained:
            groups.append({"params": pretrained, "lr": lr * float(self.backbone_lr_mult)})
        self.optimizer_ = self.optimizer(groups, **kwargs)
        return self

    @property
    def _default_callbacks(self) -> list[tuple[str, Any]]:
        validate = bool(self.train_split)
        callbacks: list[tuple[str, Any]] = [
            ("epoch_timer", EpochTimer()),
            ("train_loss", PassthroughScoring(name="train_loss", on_train=True)),
        ]
        if validate:
            callbacks += [
                ("valid_loss", PassthroughScoring(name="valid_loss")),
                # predict on the validation subset returns class indices, as its targets
                ("valid_acc", EpochScoring("accuracy", name="valid_acc", lower_is_better=False)),
            ]
        epochs = max(int(self.max_epochs), 1)
        if self.lr_schedule == "cosine":
            callbacks.append(("lr_scheduler", LRScheduler(
                torch.optim.lr_scheduler.CosineAnnealingLR, T_max=epochs)))
        elif self.lr_schedule == "step":
            callbacks.append(("lr_scheduler", LRScheduler(
                torch.optim.lr_scheduler.StepLR, step_size=max(epochs // 3, 1), gamma=0.1)))
        if validate:
            # without patience, stop never but still restore the best epoch
            patience = self.patience if self.patience is not None else epochs + 1
            callbacks.append(("early_stopping", EarlyStopping(
                monitor="valid_loss", patience=patience, load_best=True)))
        callbacks.append(("print_log", PrintLog()))
        return callbacks

    # -------------------------------------------------------------- data

    def _data_config(self) -> DataConfig:
        return self.module_.backbone.data_config

    def get_dataset(self, X: Any, y: Any = None) -> Any:
        """Images -> a dataset with the evaluation transform (validation, prediction)."""
        if is_dataset(X):
            return X
        return ImageDataset(X, self._data_config(), targets=y)

    def get_split_datasets(self, X: Any, y: Any = None, **fit_params: Any) -> tuple[Any, Any]:
        """Training data augmented; the validation split with the evaluation transform."""
        config = self._data_config()
        source = as_image_source(X)
        train = ImageDataset(source, config, targets=y, augment=self.augment)
        if not self.train_split:
            return train, None
        try:
            ds_train, ds_valid = self.train_split(train, y, **fit_params)
        except ValueError as exc:
            raise ValueError(
                f"the internal validation split (train_split={self.train_split!r}) failed on "
                f"{len(source)} images: {exc}. Give more images per class, or pass "
                "train_split=None to train without validation"
            ) from None
        if isinstance(ds_valid, Subset) and ds_valid.dataset is train:
            plain = ImageDataset(source, config, targets=y)
            ds_valid = Subset(plain, ds_valid.indices)
        return ds_train, ds_valid

    def get_iterator(self, dataset: Any, training: bool = False) -> Any:
        prefix = "iterator_train" if training else "iterator_valid"
        iterator = self.iterator_train if training else self.iterator_valid
        kwargs = self.get_params_for(prefix)
        kwargs.setdefault("batch_size", self.batch_size)
        if kwargs["batch_size"] == -1:
            kwargs["batch_size"] = len(dataset)
        if isinstance(iterator, type) and issubclass(iterator, DataLoader):
            runtime = Runtime.from_device(self.device)
            kwargs.setdefault("collate_fn", collate_images)
            kwargs.setdefault("pin_memory", runtime.pin_memory)
            if training:
                kwargs.setdefault("shuffle", True)
            if kwargs.get("num_workers", 0) > 0:
                kwargs.setdefault("worker_init_fn", seed_worker)
                # the training loader is iterated once per epoch: keep its workers, unless
                # checkpointing: fresh workers seeded from the main RNG each epoch are what
                # a resumed fit can replay
                checkpointing = self.__dict__.get("_checkpoint_run") is not None
                kwargs.setdefault("persistent_workers", training and not checkpointing)
        return _CheckedLoader(iterator(dataset, **kwargs))

    # ----------------------------------------------------- training steps

    def _runtime(self) -> Runtime:
        return Runtime.from_device(self.device)

    def infer(self, x: Any, **fit_params: Any) -> torch.Tensor:
        runtime = self._runtime()
        if isinstance(x, torch.Tensor):
            x = runtime.to_device(x)
        with runtime.autocast():
            out = self.module_(x, **fit_params)
        return out.float()

    def _batch_size_param(self, prefix: str) -> tuple[int, str]:
        """The batch size a loader uses, and the parameter that sets it."""
        routed = self.get_params_for(prefix)
        if "batch_size" in routed:
            return routed["batch_size"], f"{prefix}__batch_size"
        return self.batch_size, "batch_size"

    def _oom_hint(self, training: bool) -> Any:
        size, name = self._batch_size_param("iterator_train" if training else "iterator_valid")
        advice = ", or freeze more stages (freeze_depth)" if training else ""
        return actionable_oom(size, name, advice)

    def train_step(self, batch: Any, **fit_params: Any) -> dict[str, Any]:
        """One optimisation step; a CUDA out-of-memory error names ``batch_size``."""
        with self._oom_hint(training=True):
            return self._train_step(batch, **fit_params)

    def validation_step(self, batch: Any, **fit_params: Any) -> dict[str, Any]:
        with self._oom_hint(training=False):
            return super().validation_step(batch, **fit_params)

    def evaluation_step(self, batch: Any, training: bool = False) -> torch.Tensor:
        with self._oom_hint(training=False):
            return super().evaluation_step(batch, training=training)

    def _train_step(self, batch: Any, **fit_params: Any) -> dict[str, Any]:
        """skorch's step on the CPU; on CUDA with float16 autocast, a gradient scaler."""
        runtime = self._runtime()
        if runtime.amp_dtype != torch.float16:
            return super().train_step(batch, **fit_params)
        scaler = self.__dict__.get("grad_scaler_")
        if scaler is None:
            scaler = self.grad_scaler_ = torch.amp.GradScaler(runtime.device.type)
        optimizers = [getattr(self, name + "_") for name in self._optimizers]
        self._zero_grad_optimizer()
        self._set_training(True)
        Xi, yi = unpack_data(batch)
        y_pred = self.infer(Xi, **fit_params)
        loss = self.get_loss(y_pred, yi, X=Xi, training=True)
        scaler.scale(loss).backward()
        for optimizer in optimizers:
            scaler.unscale_(optimizer)  # callbacks (gradient clipping) see true gradients
        self.notify("on_grad_computed", batch=batch, training=True,
                    named_parameters=TeeGenerator(self.get_all_learnable_params()))
        for optimizer in optimizers:
            scaler.step(optimizer)
        scaler.update()
        return {"loss": loss, "y_pred": y_pred}

    # ---------------------------------------------------------- prediction

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities, columns in the order of ``classes_``.

        Parameters
        ----------
        X : images

        Returns
        -------
        ndarray of float32, shape (n_samples, n_classes)
        """
        self.check_is_fitted()
        return super().predict_proba(X)

    def predict(self, X: Any) -> np.ndarray:
        """Predicted labels, of the type of ``y`` at fit.

        On a torch ``Dataset`` (skorch's internal validation subsets), class
        indices instead, which is what callbacks compare with.
        """
        index = self.predict_proba(X).argmax(axis=1)
        if is_dataset(X):
            return index
        return self.label_encoder_.inverse_transform(index)

    # --------------------------------------------------------- persistence

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.pop("grad_scaler_", None)
        return state

    def __setstate__(self, state: dict) -> None:
        requested = state.get("device")
        if isinstance(requested, str) and requested == "auto":
            # load onto what "auto" means on this machine (the CPU without CUDA)
            state = {**state, "device": str(resolve_device("auto"))}
        super().__setstate__(state)
        if isinstance(requested, str) and requested == "auto":
            self.__dict__["device"] = "auto"

    def _check_device(self, requested_device: Any, map_device: Any) -> Any:
        # skorch's load_params writes this back to self.device: keep "auto"
        if self.__dict__.get("device") == "auto":
            return "auto"
        return super()._check_device(requested_device, map_device)
