"""The network a :class:`~sklearn_transfer.FineTunedClassifier` trains: a backbone, a new head.

:class:`FineTuneModule` is skorch's ``module``: the backbone's ImageNet
classifier replaced by a fresh head for the classes of ``y``, its first
stages frozen (:func:`resolve_freeze_depth` says how many), and the forward
pass autocast to the precision the device computes fastest.
"""

from __future__ import annotations

import contextlib
import numbers
from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.utils._param_validation import Interval, validate_parameter_constraints
from torch import nn

from sklearn_transfer.backbones import Backbone, resolve_stage
from sklearn_transfer.identity import digest, fingerprint
from sklearn_transfer.preprocessing import DataConfig, tta_views

__all__ = ["FineTuneModule", "FrozenPrefix", "Predictor", "resolve_freeze_depth"]


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


class _Prefix(nn.Module):
    """The normalisation and the first ``depth`` stages: images -> the last frozen feature map."""

    def __init__(self, backbone: Backbone, depth: int) -> None:
        super().__init__()
        self.normalize, self.stages = backbone.normalize, backbone.stages[:depth]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalize(x)
        for stage in self.stages:
            x = stage(x)
        return x


@dataclass(frozen=True)
class FrozenPrefix:
    """The frozen stages of a fine-tuning, as a computation an engine runs.

    What :func:`~sklearn_transfer.engines.engine_for` needs of a computation:
    a ``key`` (here: the frozen stages' fingerprint, their number and the
    precision), what runs it, the input size, and the module it converts.

    Attributes
    ----------
    name : str
    fingerprint : str
        Of the frozen stages' architecture and weights.
    depth : int
    precision : str
    engine : str
    data_config : DataConfig
    """

    name: str
    fingerprint: str
    depth: int
    precision: str
    engine: str
    data_config: DataConfig
    key: str = field(init=False, repr=False)
    backbone: None = field(default=None, init=False, repr=False)  # the caller passes it
    #: training batches are uint8, or [0, 255] floats once MixUp/CutMix blended them
    input_dtype: torch.dtype = field(default=torch.float32, init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", digest(
            "frozen-prefix", self.fingerprint, str(self.depth), self.precision, self.engine))

    @classmethod
    def of(cls, backbone: Backbone, depth: int, precision: str,
           engine: str = "openvino") -> FrozenPrefix:
        """The prefix of ``backbone``'s first ``depth`` stages (fingerprinted here)."""
        return cls(name=f"{backbone.name} (frozen stages 0-{depth - 1})",
                   fingerprint=fingerprint(_Prefix(backbone, depth)), depth=depth,
                   precision=precision, engine=engine, data_config=backbone.data_config)

    def extractor(self, network: Backbone) -> nn.Module:
        """The module to run: ``network``'s normalisation and frozen stages."""
        return _Prefix(network, self.depth)


class _Probabilities(nn.Module):
    """A fitted :class:`FineTuneModule` as one function: uint8 images -> probabilities.

    Softmax (or one sigmoid per label), averaged over the test-time
    augmentation views when ``tta``.
    """

    def __init__(self, module: FineTuneModule, multilabel: bool, tta: bool) -> None:
        super().__init__()
        self.module, self.multilabel, self.tta = module, multilabel, tta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        views = tta_views(x) if self.tta else [x]
        logits = self.module.logits(torch.cat(views))
        proba = torch.sigmoid(logits) if self.multilabel else torch.softmax(logits, -1)
        return proba.unflatten(0, (len(views), -1)).mean(0)


@dataclass(frozen=True)
class Predictor:
    """A fitted fine-tuned network, as a computation an engine runs: images -> probabilities.

    Its ``key`` is the trained weights' fingerprint with the precision, the
    output (softmax or sigmoids) and the test-time augmentation: predictions
    of the same model convert it once per process.
    """

    name: str
    fingerprint: str
    multilabel: bool
    tta: bool
    precision: str
    engine: str
    data_config: DataConfig
    key: str = field(init=False, repr=False)
    backbone: None = field(default=None, init=False, repr=False)  # the caller passes it

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", digest(
            "predictor", self.fingerprint, str(self.multilabel), str(self.tta),
            self.precision, self.engine))

    @classmethod
    def of(cls, module: FineTuneModule, multilabel: bool, tta: bool,
           engine: str = "openvino") -> Predictor:
        """The predictions of ``module`` as it is now (fingerprinted here)."""
        return cls(name=f"fine-tuned {module.backbone.name}", fingerprint=fingerprint(module),
                   multilabel=multilabel, tta=tta, precision=module.precision, engine=engine,
                   data_config=module.backbone.data_config)

    def extractor(self, network: FineTuneModule) -> nn.Module:
        return _Probabilities(network, self.multilabel, self.tta)


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
    engine : {"torch", "openvino"}, default="torch"
        What runs the frozen stages on the CPU (see :class:`FrozenPrefix`).

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
        engine: str = "torch",
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
        self.engine = engine
        self.prefix: FrozenPrefix | None = None  # fingerprinted when first run
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
        first, size = 0, self.backbone.data_config.input_size
        # the engine takes the batches the data pipeline makes: the input size, on the CPU
        if self.engine == "openvino" and self.freeze_depth and x.device.type == "cpu" \
                and tuple(x.shape[-2:]) == (size, size):
            x, first = self.frozen_features(x), self.freeze_depth
        with autocast:
            logits = self.logits(x, first)
        return logits.float()

    def logits(self, x: torch.Tensor, first: int = 0) -> torch.Tensor:
        """The network in torch, from stage ``first`` (0: images, else that stage's input)."""
        if first == 0:
            x = self.backbone.normalize(x)
        for stage in self.backbone.stages[first:]:
            x = stage(x)
        return self.head(self.backbone.forward_head(x, pre_logits=True))

    def frozen_features(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen stages' output of uint8 (or [0, 255] float) images, from the engine.

        The batch is split over the engine's streams, so that every core runs.

        Raises
        ------
        EngineUnavailableError
            When OpenVINO is missing or cannot convert the frozen stages.
        """
        from sklearn_transfer.engines import engine_for

        if self.prefix is None:
            self.prefix = FrozenPrefix.of(self.backbone, self.freeze_depth, self.precision)
        engine = engine_for(self.prefix, "cpu", network=self.backbone)
        parts = torch.tensor_split(x.detach().float(), min(engine.streams, len(x)))
        out = np.concatenate([z for z, _ in engine.map((p, None) for p in parts)])
        return torch.from_numpy(out).contiguous(memory_format=torch.channels_last)
