"""The network a :class:`~sklearn_transfer.FineTunedClassifier` trains: a backbone, a new head.

:class:`FineTuneModule` is skorch's ``module``: the backbone's ImageNet
classifier replaced by a fresh head for the classes of ``y``, its first
stages frozen (:func:`resolve_freeze_depth` says how many), and the forward
pass autocast to the precision the device computes fastest.
"""

from __future__ import annotations

import contextlib
import numbers

import torch
from sklearn.utils._param_validation import Interval, validate_parameter_constraints
from torch import nn

from sklearn_transfer.backbones import Backbone, resolve_stage

__all__ = ["FineTuneModule", "resolve_freeze_depth"]


def resolve_freeze_depth(freeze_depth: int | str, backbone: Backbone) -> int:
    """Number of leading stages of ``backbone`` that ``freeze_depth`` freezes.

    Parameters
    ----------
    freeze_depth : int or "all"
        ``0`` freezes nothing, ``k`` the first ``k`` stages, ``"all"`` (or the
        number of stages) the whole backbone; a negative ``-k`` leaves the last
        ``k`` stages trainable: the stages before stage ``-k``, as
        :func:`~sklearn_transfer.backbones.resolve_stage` counts them.
    backbone : Backbone

    Returns
    -------
    int

    Examples
    --------
    >>> from torch import nn
    >>> from sklearn_transfer import Backbone, DataConfig
    >>> from sklearn_transfer.network import resolve_freeze_depth
    >>> net = Backbone([("a", nn.Conv2d(3, 4, 3)), ("b", nn.Conv2d(4, 4, 3))], DataConfig(32))
    >>> resolve_freeze_depth("all", net), resolve_freeze_depth(-1, net)
    (2, 1)
    """
    n = backbone.num_stages
    if (isinstance(freeze_depth, str) and freeze_depth == "all") or (
            isinstance(freeze_depth, numbers.Integral) and freeze_depth == n):
        return n
    try:
        return resolve_stage(freeze_depth, backbone.stage_names, backbone.name)
    except (TypeError, ValueError):
        raise ValueError(
            f"freeze_depth={freeze_depth!r} is not valid for backbone {backbone.name}, which "
            f"has {n} stages {backbone.stage_names}: use an int from 0 (train everything) to "
            f"{n} (freeze every stage), a negative int down to -{n} (-k keeps the last k "
            "stages trainable) or 'all' (train the new head only)") from None


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
    precision : {"float32", "bfloat16", "float16"}, default="float32"
        The forward pass is autocast to it (the logits are float32).

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from sklearn_transfer import Backbone, DataConfig
    >>> from sklearn_transfer.network import FineTuneModule
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
        precision: str = "float32",
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
        self.precision = precision
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
        autocast: contextlib.AbstractContextManager = contextlib.nullcontext()
        if self.precision != "float32":  # losses and weights stay float32
            autocast = torch.autocast(x.device.type, dtype=getattr(torch, self.precision))
        with autocast:
            features = self.backbone.forward_features(x)
            logits = self.head(self.backbone.forward_head(features, pre_logits=True))
        return logits.float()
