"""End-to-end fine-tuning of a pretrained CNN as a scikit-learn classifier, built on skorch.

:class:`FineTunedClassifier` *is* a :class:`skorch.NeuralNetClassifier`:
callbacks, ``history_``, routed parameters (``module__head_dropout``,
``optimizer__weight_decay``, ``iterator_train__num_workers``,
``callbacks__early_stopping__patience``) and the printed epoch table work as
skorch users know them. It plugs into skorch's extension points: the network
is :class:`~sklearn_transfer.network.FineTuneModule`, the data go through
:class:`~sklearn_transfer.batches.ImageDataset` and
:class:`~sklearn_transfer.batches.ImageLoader`, and the recipe's behaviour
lives in callbacks (:mod:`sklearn_transfer.callbacks`,
:class:`~sklearn_transfer.checkpoint.TrainingCheckpoint`). What this module
adds is the estimator: labels of any kind (or a multi-label indicator
matrix), ``freeze_depth``, the default recipe and its knobs as parameters.
"""

from __future__ import annotations

import copy
import inspect
import numbers
import os
import warnings
from fnmatch import fnmatch
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.base import BaseEstimator
from sklearn.exceptions import NotFittedError
from sklearn.preprocessing import LabelBinarizer, LabelEncoder
from sklearn.utils._param_validation import (
    Interval,
    Options,
    StrOptions,
    validate_parameter_constraints,
)
from sklearn.utils.class_weight import compute_class_weight
from sklearn.utils.multiclass import type_of_target, unique_labels
from sklearn.utils.validation import check_array, column_or_1d
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
from skorch.utils import TeeGenerator, is_dataset, to_numpy
from torch import nn
from torch.utils.data import Subset

from sklearn_transfer.backbones import Backbone, get_backbone
from sklearn_transfer.batches import (
    ImageDataset,
    ImageLoader,
    LoadFailure,
    MixBatch,
    collate_images,
)
from sklearn_transfer.callbacks import FiniteLoss, WeightEMA, warmup_schedule
from sklearn_transfer.checkpoint import TrainingCheckpoint
from sklearn_transfer.codes import image_batches, run_engine
from sklearn_transfer.engines import (
    ENGINES,
    EngineUnavailableError,
    engine_for,
    resolve_engine,
)
from sklearn_transfer.network import FineTuneModule, Predictor, resolve_freeze_depth
from sklearn_transfer.preprocessing import augment_options, tta_views
from sklearn_transfer.runtime import PRECISIONS, Runtime, actionable_oom, seeded

__all__ = ["DEFAULT_DEVICE", "FineTunedClassifier"]

#: CUDA when a GPU is visible, else the CPU: the classifier's default device. skorch moves
#: the network, criterion, batches and loaded parameters to ``device`` itself, so it is a
#: plain device rather than ``"auto"``.
DEFAULT_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


# timm's Mixup options the classifier sets itself: from y, and from criterion__label_smoothing
_MIXUP_OWN = {"num_classes": "the number of classes or labels of y",
              "multi_label": "the type of y",
              "label_smoothing": "criterion__label_smoothing, which smooths the mixed targets "
                                 "as well"}


def _mixup_options(mixup: float | dict) -> dict[str, Any]:
    """``mixup`` as keyword arguments of timm's ``Mixup`` (a float: MixUp's alpha)."""
    if isinstance(mixup, dict):
        return dict(mixup)
    return {"mixup_alpha": float(mixup), "cutmix_alpha": 0.0}


def _check_mixup(mixup: Any) -> None:
    if not isinstance(mixup, dict):
        return
    from timm.data import Mixup

    allowed = set(inspect.signature(Mixup).parameters) - {"self"}
    for key in mixup:
        if key in _MIXUP_OWN:
            raise ValueError(f"mixup={mixup!r}: {key!r} is set from {_MIXUP_OWN[key]}; leave "
                             "it out of the dict")
        if key not in allowed:
            raise ValueError(f"mixup={mixup!r}: {key!r} is not an option of timm's Mixup "
                             f"({sorted(allowed - set(_MIXUP_OWN))})")
    options = {**{k: v.default for k, v in inspect.signature(Mixup).parameters.items()
                  if k != "self"}, **mixup}
    if not (options["mixup_alpha"] > 0 or options["cutmix_alpha"] > 0
            or options["cutmix_minmax"] is not None):
        raise ValueError(f"mixup={mixup!r} mixes nothing: give mixup_alpha > 0, cutmix_alpha "
                         "> 0 or cutmix_minmax, or mixup=None")
    if options["mode"] not in ("batch", "pair", "elem"):
        raise ValueError(f"mixup={mixup!r}: mode must be 'batch', 'pair' or 'elem'")


def _target_type_error(target_type: str) -> ValueError:
    return ValueError(
        f"y must hold class labels (binary or multiclass) or be a 0/1 indicator matrix of "
        f"shape (n_samples, n_labels) (multi-label), but its type is {target_type!r}; "
        "FineTunedClassifier is a classifier")


class _ValidSplit(ValidSplit):
    """skorch's ``ValidSplit`` with a repr that shows its settings (short estimator reprs)."""

    def __repr__(self) -> str:
        return (f"ValidSplit({self.cv!r}, stratified={self.stratified!r}, "
                f"random_state={self.random_state!r})")


# one shared default instance, as skorch's own (a split holds no fitted state)
DEFAULT_TRAIN_SPLIT = _ValidSplit(0.2, stratified=True)


def _check_class_weight(class_weight: Any) -> None:
    """A dict of class weights holds finite positive numbers (NaN would train on NaN)."""
    if not isinstance(class_weight, dict):
        return
    for label, weight in class_weight.items():
        if not isinstance(weight, numbers.Real) or not np.isfinite(weight) or weight <= 0:
            raise ValueError(f"class_weight[{label!r}]={weight!r}: a class weight must be a "
                             "finite positive number")


class _Views(torch.utils.data.Dataset):
    """A dataset's images batched with their test-time augmentation views, view by view."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index]

    def collate(self, batch: list) -> Any:
        collated = collate_images(batch)
        if isinstance(collated, LoadFailure):
            return collated
        x, y = collated
        return torch.cat(tta_views(x)), y  # one forward pass of every view


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
        stages. The default trains the last two stages (for
        ``efficientnet_lite0``, ``blocks.6`` and ``head``): an epoch then
        costs little more than inference, and small data sets cannot wash out
        what the network knew. Frozen stages get no gradients, are not given
        to the optimizer, and keep their BatchNorm layers in evaluation mode.
    backbone_lr_mult : float, default=0.1
        Learning rate of the pretrained (unfrozen) layers relative to ``lr``,
        which the new head uses. Both are default ``optimizer__param_groups``
        entries, matched by skorch after your own groups (which therefore
        take precedence): ``("head.*", {})``, then ``("backbone.*", {"lr": lr *
        backbone_lr_mult})``. Without groups of your own the head is group 0,
        whose rate skorch's ``LRScheduler`` records as ``event_lr``.
    augment : bool or dict, default=True
        Training augmentation from the backbone's preprocessing (see
        :func:`~sklearn_transfer.preprocessing.augment_options`): random
        resized crop of 25% to 100% of the image and horizontal flip; a dict
        passes options such as ``{"rotation": 15, "translate": 0.1, "zoom":
        0.1, "scale": (0.08, 1.0)}``. ``False`` uses the evaluation transform.
        Validation and prediction always use the plain resize and centre crop.
    class_weight : None, "balanced" or dict, default=None
        Weights of the classes in the loss, as in scikit-learn. For a
        multi-label ``Y``, ``"balanced"`` weighs each label's positives by
        its ``n_negative / n_positive`` (``BCEWithLogitsLoss``'s
        ``pos_weight``); a dict is refused (pass ``criterion__pos_weight``).
    patience : int or None, default=3
        Early stopping on the validation loss, after which the weights of the
        best validation epoch are restored (skorch ``EarlyStopping(load_best=True)``,
        the ``early_stopping`` callback). ``None`` trains for ``max_epochs``
        (the best weights are still restored when there is a validation split).
    lr_schedule : {"cosine", None}, default="cosine"
        Cosine annealing over ``max_epochs`` through skorch's ``LRScheduler``
        (the ``lr_scheduler`` callback), or a constant learning rate.
    random_state : int, RandomState or None, default=None
        Seeds the head, the validation split, shuffling and augmentation; two
        CPU fits with the same value predict identically. The caller's global
        random states are restored afterwards.
    checkpoint_dir : str, path-like or None, default=None
        Makes ``fit`` survive a crash, through the
        :class:`~sklearn_transfer.checkpoint.TrainingCheckpoint` callback
        (``checkpoint``): after every epoch the complete training state is
        written to one file in this directory, atomically, and a later
        ``fit`` *of the same run* (same parameters apart from ``verbose`` and
        ``checkpoint_dir``, same ``X`` and ``y``; image files count by path,
        size and modification time) resumes after the last completed epoch,
        ending on the CPU exactly as an uninterrupted fit. Folds and
        candidates of a grid search can share the directory. The file is
        deleted when the fit completes; files of other runs untouched for 7
        days are deleted (``callbacks__checkpoint__max_age_days``). Only fits
        from scratch checkpoint. A callback of your own is saved with its
        fitted attributes (names ending in ``_``) that are numbers, tensors or
        have a ``state_dict()``.
    precision : {"auto", "float32", "bfloat16", "float16"}, default="auto"
        Autocast precision of the forward passes (losses and weights stay
        float32). ``"auto"`` is what the device computes natively
        (:func:`~sklearn_transfer.runtime.native_precision`): float16 with a
        gradient scaler on CUDA, bfloat16 on CPUs with bfloat16 instructions
        (no scaler needed), float32 elsewhere.
    engine : {"auto", "torch", "openvino"}, default="auto"
        What runs the frozen stages while training (see
        :mod:`sklearn_transfer.engines`): ``"auto"`` is OpenVINO on the CPU at
        the training precision where it is installed, torch otherwise (and on
        CUDA). The frozen stages are a fixed function (no gradients,
        BatchNorm in evaluation mode), converted once per process, fed the
        augmented batches, and followed by the trainable stages and the head
        in torch. A network OpenVINO cannot convert trains in torch, with one
        warning. ``engine_`` says what ran.
    module : nn.Module class, default=FineTuneModule
        skorch's module: built at ``fit`` from the backbone, the number of
        classes and ``freeze_depth``; its own options are routed, e.g.
        ``module__head_dropout=0.5`` or ``module__head_hidden=256``.
    criterion : torch loss class, default=torch.nn.CrossEntropyLoss
        Options are routed. Label smoothing is CrossEntropyLoss's own
        ``criterion__label_smoothing=0.1`` (the target is ``(1 - eps)`` on the
        class and ``eps / n_classes`` everywhere; the validation loss is
        smoothed too); a multi-label ``Y`` (``BCEWithLogitsLoss``, which has no
        such option) refuses it.
    optimizer : torch optimizer class, default=torch.optim.AdamW
        With its default weight decay of 0.01; route options as
        ``optimizer__weight_decay=0.05``.
    lr : float, default=3e-3
        Learning rate of the head (``optimizer__lr`` overrides it).
    max_epochs : int, default=5
        A short cosine schedule: the pretrained features need adapting, not learning.
    batch_size : int, default=32
    train_split : callable or None, default=ValidSplit(0.2, stratified=True)
        skorch's internal validation split (for the epoch table, early
        stopping and the best weights); ``None`` trains on everything. The
        validation part sees the images with the evaluation transform.
    device : str or torch.device, default="cuda" if a GPU is visible, else "cpu"
        Where skorch moves the network: a plain device, decided when the
        library is imported (skorch reads ``device`` wherever it moves a
        network, a batch or loaded weights, so ``"auto"`` is refused). A model pickled on a
        GPU machine loads on one without (skorch maps it to the CPU, with a
        warning). On CUDA: pinned memory. The network runs ``channels_last``.
    **kwargs
        Any other skorch parameter: ``callbacks``, ``verbose`` (1 prints the
        epoch table), ``classes`` (all labels, if ``y`` may lack some),
        ``warm_start``, ``iterator_train__num_workers=4`` (decoding and
        augmentation in DataLoader worker processes), routed
        ``callbacks__early_stopping__threshold`` or ``callbacks__lr_scheduler=None``.
        The iterators are :class:`~sklearn_transfer.batches.ImageLoader`
        (channels_last uint8 batches, seeded workers, pinned memory on CUDA
        and, for training, shuffling), unless routed parameters say otherwise.
    mixup : None, float or dict, default=None
        MixUp/CutMix of the training batches, by timm's
        :class:`timm.data.Mixup`: a float is MixUp's ``mixup_alpha`` (each
        batch is blended with its reverse, ``lam ~ Beta(alpha, alpha)``); a
        dict passes timm's options, e.g. ``{"mixup_alpha": 0.0,
        "cutmix_alpha": 1.0}`` (CutMix) or ``{"mixup_alpha": 0.8,
        "cutmix_alpha": 1.0, "prob": 0.5, "mode": "elem"}``. The loss is then
        computed on the mixed, soft targets: the default ``CrossEntropyLoss``
        with probabilities (timm's ``SoftTargetCrossEntropy``, with the class
        weights of ``class_weight`` and ``criterion__label_smoothing`` applied
        to the mixed target; weighted, it is the mean over the batch, where
        hard targets divide by the sum of their weights), ``BCEWithLogitsLoss``
        on mixed 0/1 labels for a multi-label ``Y``; a criterion of your own
        must accept such targets.
        Only training is mixed: ``train_loss`` is the mixed loss, while
        ``valid_loss``, ``valid_acc`` and prediction see the images as they
        are. The number of classes, multi-label mode and label smoothing are
        not options of the dict (they come from ``y`` and ``criterion``). An
        odd batch's last image is left unmixed (timm mixes pairs). Random
        draws come from NumPy's global RNG, which ``random_state`` seeds and
        a checkpoint saves.
    layer_decay : float in (0, 1] or None, default=None
        Layer-wise learning-rate decay over the backbone's stages, as timm's
        ``param_groups_layer_decay``: the head trains at ``lr``, the stage
        ``k`` places from the top (``k = 1`` for the last) at ``lr *
        backbone_lr_mult * layer_decay ** k``. ``backbone_lr_mult=1`` is
        timm's recipe. One ``optimizer__param_groups`` entry per stage,
        after your own groups; frozen stages have no parameter in the
        optimizer, and the head stays group 0.
    warmup_epochs : int, default=0
        Linear learning-rate warm-up: epoch ``e <= warmup_epochs`` trains at
        ``e / (warmup_epochs + 1)`` of every group's rate, then the cosine
        schedule runs over the remaining epochs (or the rate stays constant
        with ``lr_schedule=None``); torch's ``LinearLR`` and ``SequentialLR``
        in skorch's ``LRScheduler``
        (:func:`~sklearn_transfer.callbacks.warmup_schedule`). Must be less
        than ``max_epochs``.
    ema : float in (0, 1) or None, default=None
        Keep an exponential moving average of the weights with this decay
        per training step (timm's ``ModelEmaV3``, the
        :class:`~sklearn_transfer.callbacks.WeightEMA` callback ``ema``);
        when training ends the average replaces the
        weights and is what ``predict`` uses. The validation scores of each
        epoch (and early stopping, which then restores no best epoch: the
        average is kept) are those of the trained weights, not of the
        average. The average spans about ``1 / (1 - ema)`` steps: keep that
        well below the number of steps (``max_epochs * n_train /
        batch_size``).
    tta : bool, default=False
        Test-time augmentation: ``predict_proba`` (so ``predict`` and
        ``score``) averages the probabilities of each image given and its
        mirror image, the views of ``CNNFeatureTransformer(tta=True)``
        (:func:`~sklearn_transfer.preprocessing.tta_views`); twice the
        prediction compute. Training, ``valid_loss`` and ``valid_acc`` are
        unchanged: the same ``random_state`` trains the same weights with and
        without it.

    Attributes
    ----------
    classes_ : ndarray
        The labels, in the order of ``predict_proba``'s columns; for a
        multi-label ``Y``, the column indices ``0 .. n_labels - 1`` (as
        scikit-learn's ``MLPClassifier``).
    module_ : ~sklearn_transfer.network.FineTuneModule
        The network after training (with the best validation weights).
    history_ : skorch.History
        Per-epoch and per-batch records, as in skorch.
    freeze_depth_ : int
        The resolved number of frozen stages.
    engine_ : {"torch", "openvino"}
        What runs the frozen stages (``engine`` resolved).
    label_encoder_ : LabelEncoder or LabelBinarizer
        A ``LabelBinarizer`` after a multi-label fit.
    class_weight_ : ndarray or None
        Per class, or per label the ``pos_weight`` of a multi-label fit.

    Notes
    -----
    Callbacks see the targets encoded as indices into ``classes_`` (what the
    loss needs); ``predict`` on a torch ``Dataset`` (skorch's validation
    subsets) therefore returns indices, so skorch scorers such as
    ``EpochScoring("f1_macro")`` compare like with like. On images it returns
    the original labels.

    Multi-label fits, grid searches on GPUs and sharing a fitted model are
    described in the user guide's fine-tuning page.

    Examples
    --------
    >>> import numpy as np
    >>> from torch import nn
    >>> from sklearn_transfer import Backbone, DataConfig, FineTunedClassifier
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

    A multi-label ``Y`` (here two labels) gives one probability per label:

    >>> Y = np.stack([np.arange(20) % 2, np.arange(20) // 10], axis=1)
    >>> multi = FineTunedClassifier(net, freeze_depth=1, max_epochs=1, random_state=0,
    ...                             verbose=0).fit(X, Y)
    >>> multi.classes_, multi.predict(X[:3]).shape, multi.predict_proba(X[:3]).shape
    (array([0, 1]), (3, 2), (3, 2))

    With ``checkpoint_dir``, a fit killed half-way is finished by running it again:

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     resumable = FineTunedClassifier(net, freeze_depth=1, max_epochs=2, random_state=0,
    ...                                     verbose=0, checkpoint_dir=tmp).fit(X, y)
    >>> bool((resumable.predict_proba(X) == clf.predict_proba(X)).all())
    True
    """

    # backbone may hold a module: as a component prefix, skorch's __setattr__ lets
    # set_params assign one (grid searches over networks) as it does for `module`
    prefixes_ = [*NeuralNetClassifier.prefixes_, "backbone"]
    # skorch maps these to the CPU when a net pickled on a GPU is loaded without one: the
    # callbacks hold device tensors too (early stopping's best weights, the schedulers'
    # optimizer), pickled with the module and optimizer they refer to
    cuda_dependent_attributes_ = ["callbacks_"]

    _parameter_constraints: dict = {
        "backbone": [str, nn.Module],
        "weights": [str, os.PathLike, None],
        "freeze_depth": [Interval(numbers.Integral, None, None, closed="neither"),
                         StrOptions({"all"})],
        "backbone_lr_mult": [Interval(numbers.Real, 0, np.inf, closed="left")],
        "augment": ["boolean", dict],
        "class_weight": [StrOptions({"balanced"}), dict, None],
        "patience": [Interval(numbers.Integral, 1, None, closed="left"), None],
        "lr_schedule": [StrOptions({"cosine"}), None],
        "random_state": ["random_state"],
        "checkpoint_dir": [str, os.PathLike, None],
        "precision": [StrOptions(set(PRECISIONS))],
        "engine": [StrOptions(set(ENGINES))],
        "lr": [Interval(numbers.Real, 0, np.inf, closed="neither")],
        "max_epochs": [Interval(numbers.Integral, 1, None, closed="left")],
        "batch_size": [Interval(numbers.Integral, 1, None, closed="left"),
                       Options(numbers.Integral, {-1})],
        "device": [str, torch.device],
        "mixup": [Interval(numbers.Real, 0, None, closed="neither"), dict, None],
        "layer_decay": [Interval(numbers.Real, 0, 1, closed="right"), None],
        "warmup_epochs": [Interval(numbers.Integral, 0, None, closed="left")],
        "ema": [Interval(numbers.Real, 0, 1, closed="neither"), None],
        "tta": ["boolean"],
        "iterator_train": [callable],
        "iterator_valid": [callable],
    }

    def __init__(
        self,
        backbone: str | nn.Module | Backbone = "efficientnet_lite0",
        weights: str | os.PathLike | None = "pretrained",
        freeze_depth: int | str = -2,
        backbone_lr_mult: float = 0.1,
        augment: bool | dict = True,
        class_weight: str | dict | None = None,
        patience: int | None = 3,
        lr_schedule: str | None = "cosine",
        random_state: int | np.random.RandomState | None = None,
        checkpoint_dir: str | os.PathLike | None = None,
        precision: str = "auto",
        engine: str = "auto",
        *,
        module: type[nn.Module] = FineTuneModule,
        criterion: type[nn.Module] = nn.CrossEntropyLoss,
        optimizer: type[torch.optim.Optimizer] = torch.optim.AdamW,
        lr: float = 3e-3,
        max_epochs: int = 5,
        batch_size: int = 32,
        train_split: Any = DEFAULT_TRAIN_SPLIT,
        iterator_train: type = ImageLoader,
        iterator_valid: type = ImageLoader,
        device: str | torch.device = DEFAULT_DEVICE,
        mixup: float | dict | None = None,
        layer_decay: float | None = None,
        warmup_epochs: int = 0,
        ema: float | None = None,
        tta: bool = False,
        **kwargs: Any,
    ) -> None:
        self.backbone = backbone
        self.weights = weights
        self.freeze_depth = freeze_depth
        self.backbone_lr_mult = backbone_lr_mult
        self.augment = augment
        self.class_weight = class_weight
        self.patience = patience
        self.lr_schedule = lr_schedule
        self.random_state = random_state
        self.checkpoint_dir = checkpoint_dir
        self.precision = precision
        self.engine = engine
        self.mixup = mixup
        self.layer_decay = layer_decay
        self.warmup_epochs = warmup_epochs
        self.ema = ema
        self.tta = tta
        super().__init__(module, criterion=criterion, optimizer=optimizer, lr=lr,
                         max_epochs=max_epochs, batch_size=batch_size,
                         train_split=train_split, iterator_train=iterator_train,
                         iterator_valid=iterator_valid, device=device, **kwargs)

    # skorch keeps its bookkeeping of routed names in `_params_to_validate` (a private
    # attribute), which its _get_param_names would list as a constructor parameter
    # (scikit-learn's check_set_params then sets it to a float): kept under a fitted-state name
    @property
    def _params_to_validate(self) -> set:
        return self.__dict__["params_to_validate_"]

    @_params_to_validate.setter
    def _params_to_validate(self, value: set) -> None:
        self.__dict__["params_to_validate_"] = value

    def __repr__(self) -> str:  # scikit-learn's: the parameters that differ from the defaults
        return BaseEstimator.__repr__(self)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.input_tags.three_d_array = True
        tags.input_tags.string = True
        tags.non_deterministic = self.random_state is None
        tags.classifier_tags.multi_label = True  # a 0/1 indicator matrix Y, as MLPClassifier
        return tags

    @property
    def classes_(self) -> np.ndarray:
        # the label encoder's: any labels, or a multi-label Y's column indices
        encoder = self.__dict__.get("label_encoder_")
        if encoder is None:
            raise AttributeError(f"{type(self).__name__} has no classes_ before fit")
        return encoder.classes_

    # -------------------------------------------------------- validation

    def _check_params(self) -> None:
        # skorch's own _validate_params checks routed names; these are the values
        validate_parameter_constraints(
            self._parameter_constraints,
            {name: getattr(self, name) for name in self._parameter_constraints},
            caller_name=type(self).__name__,
        )
        augment_options(self.augment)  # names an unknown augmentation option
        _check_mixup(self.mixup)
        if isinstance(self.device, str) and self.device == "auto":
            raise ValueError(
                "device='auto' is not a device skorch can move a network to; "
                f"FineTunedClassifier's default already is this machine's ({DEFAULT_DEVICE!r})")
        if self.warmup_epochs >= self.max_epochs:
            raise ValueError(
                f"warmup_epochs={self.warmup_epochs} leaves no epoch at the full learning rate "
                f"of max_epochs={self.max_epochs}: use fewer warm-up epochs or more epochs")
        _check_class_weight(self.class_weight)
        self._runtime()  # names a device torch does not know or cannot use

    def _runtime(self) -> Runtime:
        return Runtime.from_device(self.device, self.precision)

    def _set_targets(self, y: Any, classes: Any = None) -> None:
        """Learn the label encoding and class weights from ``y`` (or ``classes``)."""
        y = self._check_y(y)
        target_type = type_of_target(y, input_name="y")
        if target_type == "multilabel-indicator":
            self._set_multilabel_targets(y, classes)
            return
        if target_type not in ("binary", "multiclass"):
            raise _target_type_error(target_type)
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

    def _set_multilabel_targets(self, Y: np.ndarray, classes: Any = None) -> None:
        """Multi-label ``Y``: one sigmoid output per column, ``pos_weight`` for "balanced"."""
        if classes is not None:
            raise ValueError(
                "classes declares the labels of a 1-D y; the labels of a multi-label Y are "
                f"its {Y.shape[1]} columns: leave classes=None")
        cw = self.class_weight
        if cw is not None and not (isinstance(cw, str) and cw == "balanced"):
            raise ValueError(
                f"class_weight={cw!r} is for the classes of a 1-D y; a multi-label Y takes "
                "class_weight='balanced' (each label's positives weighted by n_negative / "
                "n_positive, BCEWithLogitsLoss's pos_weight) or per-label positive weights "
                "as criterion__pos_weight=torch.tensor([...])")
        # as MLPClassifier: a LabelBinarizer, whose classes_ are the column indices
        self.label_encoder_ = LabelBinarizer().fit(Y)
        weight = None
        if cw is not None:
            n_pos = Y.sum(axis=0).astype(np.float64)
            n_neg = len(Y) - n_pos
            weight = np.ones(Y.shape[1], dtype=np.float32)
            both = (n_pos > 0) & (n_neg > 0)  # a constant label has no ratio: weight 1
            weight[both] = n_neg[both] / n_pos[both]
        self.class_weight_ = weight

    def _is_multilabel(self) -> bool:
        return isinstance(self.__dict__.get("label_encoder_"), LabelBinarizer)

    @staticmethod
    def _check_y(y: Any) -> np.ndarray:
        if y is None:
            raise ValueError("FineTunedClassifier.fit needs y (the class of each image)")
        if sp.issparse(y):
            y = y.toarray()
        target_type = type_of_target(y, input_name="y")
        if target_type.endswith("-multioutput"):
            raise _target_type_error(target_type)
        if target_type in ("binary", "multiclass"):
            unique_labels(y)  # refuses a mix of strings and numbers (an array stringifies it)
        if target_type == "multilabel-indicator":
            y = check_array(y, dtype=None, input_name="y")
            values = np.unique(y)
            # scikit-learn calls any two-valued integer matrix an indicator matrix
            if not np.isin(values, (0, 1)).all():
                raise ValueError(
                    f"a multi-label Y must be a 0/1 indicator matrix, but it holds the values "
                    f"{values.tolist()}; mark each image's labels with 1, the others with 0")
            return y
        return column_or_1d(y, warn=True)

    def _encode(self, y: Any) -> np.ndarray:
        y = self._check_y(y)
        n_labels = len(self.classes_)
        if self._is_multilabel():
            if y.ndim != 2 or y.shape[1] != n_labels:
                raise ValueError(
                    f"this classifier was fit on a multi-label Y of {n_labels} columns; got y "
                    f"of shape {y.shape}")
            return y.astype(np.float32)  # the targets of BCEWithLogitsLoss
        if y.ndim != 1:
            raise ValueError(f"this classifier was fit on a 1-D y of class labels; got a "
                             f"multi-label Y of shape {y.shape}")
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
        y : array-like of shape (n_samples,), or (n_samples, n_labels)
            Labels of any kind scikit-learn accepts, or a 0/1 indicator matrix
            (dense or sparse) for multi-label classification.
        **fit_params
            Passed to skorch (e.g. to ``train_split``).

        Returns
        -------
        self
        """
        # the labels are learnt first: the head's width and the class weights come from them
        self._check_params()
        if "sample_weight" in fit_params:
            raise TypeError(
                "FineTunedClassifier.fit takes no sample_weight; weigh classes with "
                "class_weight='balanced' or class_weight={label: weight}")
        y = self._check_y(y)
        with seeded(self.random_state), self._oom_hint(training=True):
            if not self.warm_start or not self.initialized_:
                self._set_targets(y, self.classes)
            try:
                super().fit(X, y, **fit_params)
            finally:  # a training-time helper, never part of the model
                self.__dict__.pop("grad_scaler_", None)
        return self

    def _oom_hint(self, training: bool) -> Any:
        """One CUDA out-of-memory message, for fit or for prediction: the size to lower."""
        prefix = "iterator_train" if training else "iterator_valid"
        routed = self.get_params_for(prefix)
        size, name = ((routed["batch_size"], f"{prefix}__batch_size")
                      if "batch_size" in routed else (self.batch_size, "batch_size"))
        return actionable_oom(size, name, ", or freeze more stages (freeze_depth)"
                              if training else "")

    # ------------------------------------------------------ initialisation

    def initialize_module(self) -> FineTunedClassifier:
        # the head's width comes from the labels, the backbone from its name or the user's
        # module (copied: it is the pristine starting point of every fit)
        if "label_encoder_" not in self.__dict__:
            if self.classes is None:
                raise ValueError(
                    "FineTunedClassifier learns its classes from y: call fit(X, y) first, or "
                    "pass classes=[...] to start with partial_fit")
            self._set_targets(np.asarray(self.classes), self.classes)
        backbone = self.backbone
        if isinstance(backbone, nn.Module):
            backbone = copy.deepcopy(backbone)
        net = get_backbone(backbone, weights=self.weights)
        self.freeze_depth_ = resolve_freeze_depth(self.freeze_depth, net)
        runtime = self._runtime()
        self.engine_ = resolve_engine(self.engine, runtime) if self.freeze_depth_ else "torch"
        kwargs = {"backbone": net, "n_classes": len(self.classes_),
                  "freeze_depth": self.freeze_depth_, "precision": runtime.precision,
                  "engine": self.engine_, **self.get_params_for("module")}
        module = self.initialized_instance(self.module, kwargs)
        self.module_ = module.to(memory_format=torch.channels_last)  # skorch moves it
        if self.engine_ == "openvino":  # converted now: a network it cannot take trains in torch
            size = net.data_config.input_size
            try:
                module.frozen_features(torch.zeros(1, 3, size, size))
            except EngineUnavailableError as exc:
                warnings.warn(f"{exc}; training the frozen stages in torch instead",
                              RuntimeWarning, stacklevel=4)
                self.engine_ = module.engine = "torch"
        return self

    def initialize_criterion(self) -> FineTunedClassifier:
        # class weights are learnt from y at fit, as in scikit-learn
        kwargs = self.get_params_for("criterion")
        criterion, weight_name = self.criterion, "weight"
        if self._is_multilabel():
            weight_name = "pos_weight"
            if criterion is nn.CrossEntropyLoss:
                # the default loss, in its per-label form: one sigmoid per label
                criterion = nn.BCEWithLogitsLoss
                if "label_smoothing" in kwargs:
                    raise ValueError(
                        "criterion__label_smoothing is an option of CrossEntropyLoss, but a "
                        "multi-label Y trains with BCEWithLogitsLoss, which has none: drop "
                        "it, or pass a criterion of your own that smooths 0/1 targets")
        weight = self.__dict__.get("class_weight_")
        if weight is not None and weight_name not in kwargs:
            kwargs[weight_name] = torch.as_tensor(weight, dtype=torch.float32)
        self.criterion_ = self.initialized_instance(criterion, kwargs)
        return self

    def get_params_for_optimizer(self, prefix: str, named_parameters: Any) -> Any:
        # frozen stages are never handed to the optimizer; the parameters no group of the
        # user's takes go to the recipe's groups: the head at lr (group 0 when the user has
        # none), the pretrained layers at lr * backbone_lr_mult, decayed per stage down from
        # the top with layer_decay
        trainable = [(n, p) for n, p in named_parameters if p.requires_grad]
        (groups,), kwargs = super().get_params_for_optimizer(prefix, trainable)
        patterns = [pattern for pattern, _ in self.get_params_for(prefix).get("param_groups", [])]
        free = [(n, p) for n, p in trainable if not any(fnmatch(n, pat) for pat in patterns)]
        if free:  # skorch put them in one last group of their own: split it
            groups = groups[:-1]
        backbone_lr = kwargs["lr"] * self.backbone_lr_mult
        n = len(self.module_.backbone.stages)
        mine: dict[tuple, list] = {}  # (order, lr or None for lr): parameters
        for name, param in free:
            part = name.split(".")
            if part[0] == "head":
                key: tuple = (0, None)
            elif self.layer_decay is not None and part[:2] == ["backbone", "stages"]:
                stage = int(part[2])
                key = (1 + stage, backbone_lr * self.layer_decay ** (n - stage))
            else:
                key = (n + 1, backbone_lr)
            mine.setdefault(key, []).append(param)
        for (_, lr), params in sorted(mine.items(), key=lambda kv: kv[0][0]):
            groups.append({"params": params} if lr is None else {"params": params, "lr": lr})
        return (groups,), kwargs

    def get_default_callbacks(self) -> list[tuple[str, Any]]:
        # skorch's hook for a net's own callbacks; parameters are read as they are (validated
        # at fit, not here)
        callbacks: list[tuple[str, Any]] = []
        if self.checkpoint_dir is not None:
            # first: it restores the history the scoring callbacks read when resuming
            callbacks.append(("checkpoint", TrainingCheckpoint(self.checkpoint_dir)))
        callbacks += [
            ("epoch_timer", EpochTimer()),
            ("train_loss", PassthroughScoring(name="train_loss", on_train=True)),
        ]
        validate = self.train_split is not None
        if validate:
            callbacks += [
                ("valid_loss", PassthroughScoring(name="valid_loss")),
                # predict on the validation subset returns class indices, as its targets (a
                # multi-label indicator matrix: subset accuracy, as score)
                ("valid_acc", EpochScoring("accuracy", name="valid_acc", lower_is_better=False)),
            ]
        cosine = isinstance(self.lr_schedule, str) and self.lr_schedule == "cosine"
        warmup = self.warmup_epochs if isinstance(self.warmup_epochs, numbers.Integral) else 0
        if warmup > 0:
            callbacks.append(("lr_scheduler", LRScheduler(
                warmup_schedule, warmup_epochs=int(warmup), max_epochs=self.max_epochs,
                cosine=cosine)))
        elif cosine:
            callbacks.append(("lr_scheduler", LRScheduler(
                torch.optim.lr_scheduler.CosineAnnealingLR, T_max=self.max_epochs)))
        if validate:
            # patience=None never stops, and still restores the best epoch's weights, unless
            # the weight average replaces them at the end (no use keeping copies of them)
            callbacks.append(("early_stopping", EarlyStopping(
                monitor="valid_loss", patience=self.patience, load_best=self.ema is None)))
        if self.ema is not None:
            # after early stopping: its on_train_end loads the average last
            callbacks.append(("ema", WeightEMA(self.ema)))
        callbacks.append(("finite_loss", FiniteLoss()))
        callbacks.append(("print_log", PrintLog()))
        return callbacks

    # -------------------------------------------------------------- data

    def get_split_datasets(self, X: Any, y: Any = None, **fit_params: Any) -> tuple[Any, Any]:
        # training images augmented (and mixed); any split's validation part plain
        config = self.module_.backbone.data_config
        targets = self._encode(y)
        mix = None if self.mixup is None else MixBatch(
            _mixup_options(self.mixup), len(self.classes_), self._is_multilabel())
        train = ImageDataset(X, config, targets=targets, augment=self.augment, mix=mix)
        if len(targets) != len(train):
            raise ValueError(f"X holds {len(train)} images but y has {len(targets)} labels")
        split = self.train_split
        if split is None:
            return train, None
        if np.ndim(targets) == 2 and isinstance(split, ValidSplit) and split.stratified:
            # stratifying a multi-label Y would stratify its label combinations, most of them
            # too rare to split: the same split, shuffled without strata
            split = _ValidSplit(split.cv, stratified=False, random_state=split.random_state)
        try:
            ds_train, ds_valid = split(train, targets, **fit_params)
        except ValueError as exc:
            raise ValueError(
                f"the internal validation split (train_split={split!r}) failed on "
                f"{len(train)} images: {exc}. Give more images per class, or pass "
                "train_split=None to train without validation") from None
        if isinstance(ds_valid, Subset) and ds_valid.dataset is train:
            ds_valid = Subset(train.evaluation(), ds_valid.indices)
        return ds_train, ds_valid

    # ----------------------------------------------------- training steps

    def train_step(self, batch: Any, **fit_params: Any) -> dict[str, Any]:
        # float16 needs a gradient scaler, which skorch leaves to accelerate
        if self.module_.precision != "float16":
            return super().train_step(batch, **fit_params)
        scaler = self.__dict__.get("grad_scaler_")
        if scaler is None:
            scaler = self.grad_scaler_ = torch.amp.GradScaler(self._runtime().device.type)
        optimizer = self.optimizer_  # the one optimizer initialize_optimizer builds
        optimizer.zero_grad()
        self.module_.train()
        self.criterion_.train()
        Xi, yi = unpack_data(batch)
        y_pred = self.infer(Xi, **fit_params)
        loss = self.get_loss(y_pred, yi, X=Xi, training=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)  # callbacks (gradient clipping) see true gradients
        self.notify("on_grad_computed", batch=batch, training=True,
                    named_parameters=TeeGenerator(self.get_all_learnable_params()))
        scaler.step(optimizer)
        scaler.update()
        return {"loss": loss, "y_pred": y_pred}

    # ---------------------------------------------------------- prediction

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities, columns in the order of ``classes_``.

        For a multi-label fit, the probability of each label (one sigmoid per
        column of ``Y``; the rows do not sum to 1).

        Parameters
        ----------
        X : images

        Returns
        -------
        ndarray of float32, shape (n_samples, n_classes) or (n_samples, n_labels)
        """
        # skorch's forward_iter, with scikit-learn's NotFittedError, the labels' own
        # nonlinearity and the TTA views of each batch averaged
        if not self.__dict__.get("initialized_", False):
            raise NotFittedError(f"This {type(self).__name__} instance is not fitted yet. "
                                 "Call 'fit' with appropriate arguments before using it.")
        self._check_params()  # set_params after fit is checked where it is used
        if not is_dataset(X) and self.engine_ == "openvino":
            try:
                return self._engine_proba(X)
            except EngineUnavailableError as exc:  # a head OpenVINO cannot take: in torch
                warnings.warn(f"{exc}; predicting in torch instead", RuntimeWarning,
                              stacklevel=2)
        # TTA views of the images given; skorch's own subsets (scored from the outputs cached
        # while validating) as they are
        views = 2 if self.tta and not is_dataset(X) else 1
        dataset = X if is_dataset(X) else ImageDataset(X, self.module_.backbone.data_config)
        if views > 1:
            dataset = _Views(dataset)
        nonlin = torch.sigmoid if self._is_multilabel() else (lambda t: torch.softmax(t, -1))
        probas = []
        # a loader draws its seed from torch's RNG: predicting (valid_acc with TTA, each
        # epoch) must leave training's random stream as it is
        with self._oom_hint(training=False), torch.random.fork_rng(devices=[]):
            for out in self.forward_iter(dataset, training=False):
                probas.append(to_numpy(nonlin(out).unflatten(0, (views, -1)).mean(0)))
        return np.concatenate(probas, 0)

    def _engine_proba(self, X: Any) -> np.ndarray:
        """Probabilities of images from the whole fitted network compiled by the engine."""
        predictor = Predictor.of(self.module_, self._is_multilabel(), self.tta)
        engine = engine_for(predictor, "cpu", network=self.module_)
        routed = self.get_params_for("iterator_valid")
        size = routed.get("batch_size", self.batch_size)
        batches = image_batches(ImageDataset(X, self.module_.backbone.data_config),
                                self._runtime(), size, routed.get("num_workers", 0))
        with self._oom_hint(training=False):
            return np.concatenate([p for p, _ in run_engine(engine, batches, size)])

    def predict(self, X: Any) -> np.ndarray:
        """Predicted labels, of the type of ``y`` at fit.

        On a torch ``Dataset`` (skorch's internal validation subsets), class
        indices instead, which is what callbacks compare with. For a
        multi-label fit, the 0/1 indicator matrix of the labels whose
        probability exceeds 0.5, shape (n_samples, n_labels), on images and
        datasets alike.
        """
        if self._is_multilabel():
            return self.label_encoder_.inverse_transform(self.predict_proba(X), threshold=0.5)
        index = self.predict_proba(X).argmax(axis=1)
        if is_dataset(X):
            return index
        return self.label_encoder_.inverse_transform(index)
