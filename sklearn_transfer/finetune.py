"""End-to-end fine-tuning of a pretrained CNN as a scikit-learn classifier, built on skorch.

:class:`FineTunedClassifier` *is* a :class:`skorch.NeuralNetClassifier`:
callbacks, ``history_``, routed parameters (``module__head_dropout``,
``optimizer__weight_decay``, ``iterator_train__num_workers``,
``callbacks__early_stopping__patience``) and the printed epoch table work as
skorch users know them. What it adds:

* the network: a :class:`~sklearn_transfer.Backbone` whose ImageNet classifier
  is replaced by a fresh head for the classes of ``y`` (:class:`FineTuneModule`);
* ``freeze_depth``: the first stages get no gradients, are never handed to
  the optimizer and keep their BatchNorm statistics (evaluation mode, re-applied
  after every ``module.train()`` call);
* images in (paths, PIL, arrays, tensors, as :class:`CNNFeatureTransformer`),
  augmented for training and plainly resized for validation and prediction with
  the backbone's own preprocessing;
* any labels scikit-learn accepts, or a multi-label 0/1 indicator matrix
  (one sigmoid per label), a default recipe that works out of the box
  (AdamW, a smaller learning rate for pretrained layers, cosine schedule, early
  stopping with the best validation weights restored), ``random_state``, and
  crash-safe training (:class:`~sklearn_transfer.checkpoint.TrainingCheckpoint`);
* the knobs of the modern fine-tuning recipes, each off by default: label
  smoothing (``criterion__label_smoothing``), MixUp/CutMix (``mixup``, timm's),
  layer-wise learning-rate decay (``layer_decay``), a linear warm-up
  (``warmup_epochs``), an average of the weights (``ema``, timm's
  ``ModelEmaV3``) and test-time augmentation (``tta``).
"""

from __future__ import annotations

import copy
import inspect
import numbers
import os
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.base import BaseEstimator
from sklearn.preprocessing import LabelBinarizer, LabelEncoder
from sklearn.utils._param_validation import (
    Interval,
    Options,
    StrOptions,
    validate_parameter_constraints,
)
from sklearn.utils.class_weight import compute_class_weight
from sklearn.utils.multiclass import type_of_target
from sklearn.utils.validation import check_array, column_or_1d
from skorch import NeuralNetClassifier
from skorch.callbacks import (
    Callback,
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
from torch.utils.data import DataLoader, Subset

from sklearn_transfer.backbones import Backbone, get_backbone
from sklearn_transfer.batches import ImageDataset, collate_images, iterate_batches
from sklearn_transfer.checkpoint import TrainingCheckpoint
from sklearn_transfer.images import as_image_source
from sklearn_transfer.preprocessing import DataConfig, augment_options, tta_views
from sklearn_transfer.runtime import (
    PRECISIONS,
    Runtime,
    actionable_oom,
    resolve_device,
    seed_worker,
    seeded,
)

__all__ = ["DEFAULT_DEVICE", "FineTuneModule", "FineTunedClassifier", "FiniteLoss",
           "WeightEMA", "resolve_freeze_depth", "warmup_schedule"]

#: CUDA when a GPU is visible, else the CPU: the classifier's default device.
DEFAULT_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


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
    >>> from sklearn_transfer import Backbone, DataConfig
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
    head_hidden : int or None, default=None
        Width of an optional hidden layer (ReLU) in the head.
    head_dropout : float in [0, 1), default=0.2
        Dropout before each linear layer of the head.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from sklearn_transfer import Backbone, DataConfig
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
        head_dropout: float = 0.2,
    ) -> None:
        validate_parameter_constraints(
            {"head_hidden": [Interval(numbers.Integral, 1, None, closed="left"), None],
             "head_dropout": [Interval(numbers.Real, 0, 1, closed="left")]},
            {"head_hidden": head_hidden, "head_dropout": head_dropout},
            caller_name=type(self).__name__,
        )
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


class FiniteLoss(Callback):
    """Stop training when a training batch's loss is not finite, naming the epoch.

    A diverging fit (a learning rate too large for the network) otherwise
    goes on with NaN weights and ends as a model that predicts one class.
    """

    def on_batch_end(self, net: Any, batch: Any = None, training: bool = False,
                     loss: Any = None, **kwargs: Any) -> None:
        if training and loss is not None and not torch.isfinite(loss.detach()).all():
            raise FloatingPointError(
                f"the training loss became {float(loss.detach())} in epoch "
                f"{len(net.history)}: the fit diverged; use a smaller learning rate "
                f"(lr={net.lr!r}, backbone_lr_mult={getattr(net, 'backbone_lr_mult', None)!r})")


class WeightEMA(Callback):
    """An exponential moving average of the weights, which replaces them when training ends.

    After every training step, timm's :class:`timm.utils.ModelEmaV3` updates
    ``ema = decay * ema + (1 - decay) * weights`` over the module's
    parameters and floating-point buffers (BatchNorm statistics), starting
    from the weights training starts with. Training and the validation
    scores of each epoch use the trained weights; at the end of training
    (after early stopping, or ``max_epochs``) the average is loaded into the
    module, which ``predict`` then uses. The average averages over about
    ``1 / (1 - decay)`` steps: keep that well below the number of training
    steps (``max_epochs * n_train / batch_size``), or it stays close to
    the starting weights and their fresh head.

    :class:`~sklearn_transfer.checkpoint.TrainingCheckpoint` saves and
    restores the average (``checkpoint_state`` / ``load_checkpoint_state``),
    so a resumed fit ends with the same one.

    Parameters
    ----------
    decay : float in (0, 1), default=0.99
    """

    def __init__(self, decay: float = 0.99) -> None:
        self.decay = decay

    def initialize(self) -> WeightEMA:
        self.ema_: Any = None
        return self

    def on_train_begin(self, net: Any, **kwargs: Any) -> None:
        from timm.utils import ModelEmaV3

        self.ema_ = ModelEmaV3(net.module_, decay=self.decay)

    def on_batch_end(self, net: Any, training: bool = False, **kwargs: Any) -> None:
        if training and self.ema_ is not None:
            self.ema_.update(net.module_)

    def on_train_end(self, net: Any, **kwargs: Any) -> None:
        if self.ema_ is not None:
            net.module_.load_state_dict(self.ema_.module.state_dict())
        self.ema_ = None  # a training-time copy of the network: not kept in the model

    def checkpoint_state(self) -> dict[str, torch.Tensor] | None:
        return None if self.ema_ is None else self.ema_.module.state_dict()

    def load_checkpoint_state(self, state: dict[str, torch.Tensor] | None) -> None:
        if state is not None and self.ema_ is not None:
            self.ema_.module.load_state_dict(state)


def warmup_schedule(optimizer: torch.optim.Optimizer, warmup_epochs: int, max_epochs: int,
                    cosine: bool = True, last_epoch: int = -1) -> Any:
    """Linear learning-rate warm-up, then cosine annealing (or the full rate) per epoch.

    Epoch ``e <= warmup_epochs`` trains at ``e / (warmup_epochs + 1)`` of each
    group's rate (torch's ``LinearLR``), the next epochs at the full rate,
    annealed over the remaining ``max_epochs - warmup_epochs`` epochs by
    ``CosineAnnealingLR`` (joined with ``SequentialLR``) when ``cosine``.
    A policy for skorch's ``LRScheduler``, which passes ``last_epoch``.

    Examples
    --------
    >>> import torch
    >>> from sklearn_transfer.finetune import warmup_schedule
    >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    >>> schedule = warmup_schedule(opt, warmup_epochs=2, max_epochs=4)
    >>> lrs = []
    >>> for _ in range(4):
    ...     lrs.append(round(opt.param_groups[0]["lr"], 4))
    ...     opt.step()
    ...     schedule.step()
    >>> lrs
    [0.3333, 0.6667, 1.0, 0.5]
    """
    from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

    schedule: Any = LinearLR(optimizer, start_factor=1 / (warmup_epochs + 1), end_factor=1.0,
                             total_iters=warmup_epochs)
    if cosine:
        anneal = CosineAnnealingLR(optimizer, T_max=max_epochs - warmup_epochs)
        schedule = SequentialLR(optimizer, [schedule, anneal], milestones=[warmup_epochs])
    with warnings.catch_warnings():  # stepping before optimizer.step() is the point here
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(last_epoch + 1):  # training continued (partial_fit): where it was
            schedule.step()
    return schedule


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
        (``checkpoint``). After every epoch the complete training state
        (module, optimizer, history, the other callbacks' states and the
        random states) is written to one file in this directory, atomically.
        A later ``fit`` *of the same run* (same parameters, apart from
        ``verbose`` and ``checkpoint_dir``, and the same ``X`` and ``y``)
        finds it and resumes after the last completed epoch; on the CPU it
        ends with exactly the weights, history and predictions of an
        uninterrupted fit. The file is named after a SHA-256 of parameters and
        data, so the folds and candidates of a grid search can share the
        directory. It is deleted when ``fit`` completes, and kept when it is
        interrupted (an exception, ``KeyboardInterrupt``, a killed process);
        the files of other runs that no fit has written or resumed for 7 days
        (``callbacks__checkpoint__max_age_days``) are deleted when a run opens
        the directory. Image files in ``X`` are identified by path, size and
        modification time. Only ``fit``
        from scratch checkpoints; ``partial_fit`` and ``warm_start``
        continuations do not. With ``num_workers > 0`` the training workers
        are restarted every epoch (``persistent_workers`` defaults to False)
        so that their random streams can be replayed. Custom callbacks' own
        state is not saved, unless they have ``checkpoint_state()`` and
        ``load_checkpoint_state(state)`` methods (as :class:`WeightEMA`).
    precision : {"auto", "float32", "bfloat16", "float16"}, default="auto"
        Autocast precision of the forward passes (losses and weights stay
        float32). ``"auto"`` is what the device computes natively
        (:func:`~sklearn_transfer.runtime.native_precision`): float16 with a
        gradient scaler on CUDA, bfloat16 on CPUs with bfloat16 instructions
        (no scaler needed), float32 elsewhere.
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
        stopping and the best weights); ``None`` trains on everything.
    device : str or torch.device, default="cuda" if a GPU is visible, else "cpu"
        Where skorch moves the network (a plain device, as skorch takes it: the
        default is decided when the library is imported). A model pickled on a
        GPU machine loads on one without (skorch maps it to the CPU, with a
        warning). On CUDA: pinned memory. The network runs ``channels_last``.
    **kwargs
        Any other skorch parameter: ``callbacks``, ``verbose`` (1 prints the
        epoch table), ``classes`` (all labels, if ``y`` may lack some),
        ``warm_start``, ``iterator_train__num_workers=4`` (decoding and
        augmentation in DataLoader worker processes), routed
        ``callbacks__early_stopping__threshold`` or ``callbacks__lr_scheduler=None``.
        The iterators get ``collate_images`` (channels_last uint8 batches),
        pinned memory on CUDA and, for training, shuffling, unless routed
        parameters say otherwise.
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
        in skorch's ``LRScheduler`` (:func:`warmup_schedule`). Must be less
        than ``max_epochs``.
    ema : float in (0, 1) or None, default=None
        Keep an exponential moving average of the weights with this decay
        per training step (timm's ``ModelEmaV3``, the :class:`WeightEMA`
        callback ``ema``); when training ends the average replaces the
        weights and is what ``predict`` uses. The validation scores of each
        epoch (and early stopping, which then restores no best epoch: the
        average is kept) are those of the trained weights, not of the
        average. The average spans about ``1 / (1 - ema)`` steps: keep that
        well below the number of steps (``max_epochs * n_train /
        batch_size``).
    tta : bool, default=False
        Test-time augmentation: ``predict_proba`` (so ``predict``, ``score``
        and the ``valid_acc`` column) averages the probabilities of each
        image and its mirror image, the views of ``CNNFeatureTransformer(tta=True)``
        (:func:`~sklearn_transfer.preprocessing.tta_views`); twice the
        prediction compute. ``valid_loss`` and training are unchanged: the
        same ``random_state`` trains the same weights with and without it.

    Attributes
    ----------
    classes_ : ndarray
        The labels, in the order of ``predict_proba``'s columns; for a
        multi-label ``Y``, the column indices ``0 .. n_labels - 1`` (as
        scikit-learn's ``MLPClassifier``).
    module_ : FineTuneModule
        The network after training (with the best validation weights).
    history_ : skorch.History
        Per-epoch and per-batch records, as in skorch.
    freeze_depth_ : int
        The resolved number of frozen stages.
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

    Multi-label: ``fit(X, Y)`` with ``Y`` a 0/1 indicator matrix of shape
    ``(n_samples, n_labels)`` (dense or sparse) trains one sigmoid output per
    label: the default ``criterion``, ``CrossEntropyLoss``, then stands for its
    per-label form ``BCEWithLogitsLoss`` (another criterion you pass is used
    as it is). ``predict_proba`` gives each label's probability,
    ``predict`` the indicator matrix of those above 0.5, ``score`` (and the
    ``valid_acc`` column) the subset accuracy, every label of an image right,
    as scikit-learn's multi-label classifiers. A stratified ``ValidSplit``
    (the default) splits such a ``Y`` unstratified, with the same fraction
    and seed. A ``Y`` of one column is a binary ``y``, as in scikit-learn.
    The cheap alternative, often as good on photos: CNN codes and one linear
    model per label, ``make_pipeline(CNNFeatureTransformer(),
    OneVsRestClassifier(LogisticRegression()))`` (or ``MultiOutputClassifier``).

    Grid search: ``GridSearchCV(..., n_jobs=1)`` is the safe choice with one
    GPU (parallel candidates on one GPU fight over its memory). With several
    GPUs, split the grid and run one search per GPU, each process started
    with its own ``CUDA_VISIBLE_DEVICES=i``, or run a Dask/Ray joblib
    backend whose workers each see one GPU.

    Fitted estimators pickle (and ``joblib.dump``); loading a pickle can run
    arbitrary code, so load such files only from sources you trust. To share
    a model, use :func:`sklearn_transfer.persistence.dump` / ``load`` (skops
    and safetensors, no pickle). A CUDA out-of-memory error in a training or
    prediction step is re-raised naming the batch-size parameter to lower.

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
        *,
        module: type[nn.Module] = FineTuneModule,
        criterion: type[nn.Module] = nn.CrossEntropyLoss,
        optimizer: type[torch.optim.Optimizer] = torch.optim.AdamW,
        lr: float = 3e-3,
        max_epochs: int = 5,
        batch_size: int = 32,
        train_split: Any = DEFAULT_TRAIN_SPLIT,
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
        self.mixup = mixup
        self.layer_decay = layer_decay
        self.warmup_epochs = warmup_epochs
        self.ema = ema
        self.tta = tta
        super().__init__(module, criterion=criterion, optimizer=optimizer, lr=lr,
                         max_epochs=max_epochs, batch_size=batch_size,
                         train_split=train_split, device=device, **kwargs)

    # skorch keeps its bookkeeping of routed names in `_params_to_validate`, which its
    # _get_param_names would list as a constructor parameter (scikit-learn's
    # check_set_params then sets it to a float); kept under a fitted-state name instead
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
    def classes_(self) -> np.ndarray:  # any labels: what the label encoder learnt from y
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
        if self.warmup_epochs >= self.max_epochs:
            raise ValueError(
                f"warmup_epochs={self.warmup_epochs} leaves no epoch at the full learning rate "
                f"of max_epochs={self.max_epochs}: use fewer warm-up epochs or more epochs")
        if isinstance(self.device, str) and self.device == "auto":
            raise ValueError(
                "device='auto' is not a device skorch can move a network to; "
                f"FineTunedClassifier's default already is this machine's ({DEFAULT_DEVICE!r})")
        resolve_device(self.device)  # names a device torch does not know or cannot use

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
        self._check_params()
        if "sample_weight" in fit_params:
            raise TypeError(
                "FineTunedClassifier.fit takes no sample_weight; weigh classes with "
                "class_weight='balanced' or class_weight={label: weight}")
        epochs = None
        with seeded(self.random_state):
            if not self.warm_start or not self.initialized_:
                self._set_targets(y, self.classes)
                self.initialize()
                checkpoint = dict(self.callbacks_).get("checkpoint")  # fits from scratch only
                if isinstance(checkpoint, TrainingCheckpoint):
                    # skorch's own way to run fewer epochs (fit_loop's ``epochs``): those
                    # the interrupted fit did not complete
                    done = checkpoint.open(self, X, self._check_y(y))
                    epochs = max(self.max_epochs - done, 0)
            self._partial_fit(X, y, epochs=epochs, _routing_method="fit", **fit_params)
        return self

    def partial_fit(self, X: Any, y: Any = None, classes: Any = None,
                    **fit_params: Any) -> FineTunedClassifier:
        """Train for ``max_epochs`` more, initialising first if needed (skorch semantics).

        ``classes`` (or the ``classes`` parameter) declares every label when
        the first batch of data lacks some.
        """
        if not self.initialized_:
            self._check_params()
            with seeded(self.random_state):
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

    # ------------------------------------------------------ initialisation

    def initialize_module(self) -> FineTunedClassifier:
        # the head's width comes from y, and the backbone from its name or the user's module,
        # copied: it is the pristine starting point of every fit
        if "label_encoder_" not in self.__dict__:
            raise ValueError(
                "FineTunedClassifier learns its number of classes from y: call fit(X, y) "
                "instead of initialize()"
            )
        backbone = self.backbone
        if isinstance(backbone, nn.Module):
            backbone = copy.deepcopy(backbone)
        net = get_backbone(backbone, weights=self.weights)
        self.freeze_depth_ = resolve_freeze_depth(self.freeze_depth, net)
        kwargs = {"backbone": net, "n_classes": len(self.classes_),
                  "freeze_depth": self.freeze_depth_, **self.get_params_for("module")}
        module = self.initialized_instance(self.module, kwargs)
        self.module_ = module.to(memory_format=torch.channels_last)
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

    def get_params_for(self, prefix: str) -> dict[str, Any]:
        kwargs = super().get_params_for(prefix)
        if prefix == "optimizer":
            # skorch's get_params_for_optimizer matches these after (so beneath) the user's
            # own groups: the head first (group 0), then the pretrained layers' rate, decayed
            # per stage down from the top with layer_decay (frozen stages match no parameter)
            lr = kwargs.get("lr", self.lr) * self.backbone_lr_mult
            groups = [*kwargs.get("param_groups", []), ("head.*", {})]
            module = self.__dict__.get("module_")
            if self.layer_decay is not None and module is not None:
                n = len(module.backbone.stages)
                groups += [(f"backbone.stages.{i}.*", {"lr": lr * self.layer_decay ** (n - i)})
                           for i in range(n)]
            kwargs["param_groups"] = [*groups, ("backbone.*", {"lr": lr})]
        return kwargs

    def get_all_learnable_params(self) -> Any:
        # frozen stages are never handed to the optimizer
        return ((n, p) for n, p in super().get_all_learnable_params() if p.requires_grad)

    @property
    def _default_callbacks(self) -> list[tuple[str, Any]]:
        # parameters are read as they are: they are validated at fit, not here
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
        split = self.train_split
        if split is None:
            return train, None
        if np.ndim(y) == 2 and isinstance(split, ValidSplit) and split.stratified:
            # stratifying a multi-label Y would stratify its label combinations, most of them
            # too rare to split: the same split, shuffled without strata
            split = _ValidSplit(split.cv, stratified=False, random_state=split.random_state)
        try:
            ds_train, ds_valid = split(train, y, **fit_params)
        except ValueError as exc:
            raise ValueError(
                f"the internal validation split (train_split={split!r}) failed on "
                f"{len(source)} images: {exc}. Give more images per class, or pass "
                "train_split=None to train without validation"
            ) from None
        if isinstance(ds_valid, Subset) and ds_valid.dataset is train:
            plain = ImageDataset(source, config, targets=y)
            ds_valid = Subset(plain, ds_valid.indices)
        return ds_train, ds_valid

    def get_iterator(self, dataset: Any, training: bool = False) -> Any:
        # image batches (channels_last uint8), pinned memory on CUDA, seeded workers, and a
        # bad image raised in the caller's process
        prefix = "iterator_train" if training else "iterator_valid"
        iterator = self.iterator_train if training else self.iterator_valid
        kwargs = self.get_params_for(prefix)
        kwargs.setdefault("batch_size", self.batch_size)
        if kwargs["batch_size"] == -1:
            kwargs["batch_size"] = len(dataset)
        if isinstance(iterator, type) and issubclass(iterator, DataLoader):
            runtime = self._runtime()
            kwargs.setdefault("collate_fn", collate_images)
            kwargs.setdefault("pin_memory", runtime.pin_memory)
            if training:
                kwargs.setdefault("shuffle", True)
            if kwargs.get("num_workers", 0) > 0:
                kwargs.setdefault("worker_init_fn", seed_worker)
                # the training loader is iterated once per epoch: keep its workers, unless
                # checkpointing: fresh workers seeded from the main RNG each epoch are what
                # a resumed fit can replay
                kwargs.setdefault("persistent_workers",
                                  training and self.checkpoint_dir is None)
        return _CheckedLoader(iterator(dataset, **kwargs))

    # ----------------------------------------------------- training steps

    def _runtime(self) -> Runtime:
        return Runtime.from_device(self.device, self.precision)

    def infer(self, x: Any, **fit_params: Any) -> torch.Tensor:
        # autocast to the precision the device computes fastest; losses in float32
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
        # a CUDA out-of-memory error names batch_size; float16 needs a gradient scaler;
        # MixUp/CutMix mixes training batches only (validation and prediction see the images)
        if self.mixup is not None:
            batch = self._mixed(batch)
        with self._oom_hint(training=True):
            if self._runtime().precision != "float16":
                return super().train_step(batch, **fit_params)
            return self._scaled_train_step(batch, **fit_params)

    def _mixed(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """A training batch mixed by timm's ``Mixup``: blended or pasted images, soft targets."""
        from timm.data import Mixup
        from timm.data.mixup import mixup_target

        Xi, yi = unpack_data(batch)
        n_classes, multilabel = len(self.classes_), self._is_multilabel()
        x = Xi.float()  # [0, 255] floats: the network normalises them as it does uint8
        y = torch.as_tensor(yi)
        mixer = Mixup(**_mixup_options(self.mixup), label_smoothing=0.0,
                      num_classes=n_classes, multi_label=multilabel)
        # timm mixes a batch with its reverse and needs an even size: an odd batch's last
        # image stays as it is
        pairs = len(x) - len(x) % 2
        soft = mixup_target(y, n_classes, 1.0, 0.0, multilabel)
        if pairs:
            _, soft[:pairs] = mixer(x[:pairs], y[:pairs])  # mixes x[:pairs] in place
        return x, soft

    def validation_step(self, batch: Any, **fit_params: Any) -> dict[str, Any]:
        # a CUDA out-of-memory error names the batch-size parameter to lower
        with self._oom_hint(training=False):
            return super().validation_step(batch, **fit_params)

    def evaluation_step(self, batch: Any, training: bool = False) -> torch.Tensor:
        # a CUDA out-of-memory error names the batch-size parameter to lower
        with self._oom_hint(training=False):
            return super().evaluation_step(batch, training=training)

    def _scaled_train_step(self, batch: Any, **fit_params: Any) -> dict[str, Any]:
        """skorch's train step with float16 autocast and a gradient scaler (CUDA)."""
        runtime = self._runtime()
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

    def _get_predict_nonlinearity(self) -> Any:
        # skorch's "auto" for BCEWithLogitsLoss is binary (two columns from one logit);
        # multi-label logits need one sigmoid per label
        if self._is_multilabel() and isinstance(self.predict_nonlinearity, str) \
                and self.predict_nonlinearity == "auto":
            return torch.sigmoid
        return super()._get_predict_nonlinearity()

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
        self.check_is_fitted()  # scikit-learn's NotFittedError, not skorch's own error
        self._check_params()  # set_params after fit is checked where it is used
        if not self.tta:
            return super().predict_proba(X)
        # skorch's predict_proba loop, each batch's probabilities averaged over the views;
        # its loader's seed is drawn from a forked RNG: the valid_acc of each epoch (skorch
        # scores cached outputs without a loader) leaves training's random stream as it is
        nonlin = self._get_predict_nonlinearity()
        probas = []
        with torch.random.fork_rng(devices=[]):
            for batch in self.get_iterator(self.get_dataset(X), training=False):
                views = tta_views(unpack_data(batch)[0])
                out = self.evaluation_step((torch.cat(views), None))  # one pass of all views
                probas.append(to_numpy(nonlin(out).unflatten(0, (len(views), -1)).mean(0)))
        return np.concatenate(probas, 0)

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

    # --------------------------------------------------------- persistence

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.pop("grad_scaler_", None)  # a training-time helper, not part of the model
        return state
