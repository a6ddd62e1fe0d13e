"""What decides a set of CNN codes, as one value: :class:`CodesComputation` and its key.

A fitted :class:`~sklearn_transfer.CNNFeatureTransformer` resolves, at
``fit``, everything that changes its codes into a :class:`CodesComputation`:
the network (its architecture and every weight, fingerprinted once), the
stages read, pooling, ReLU, the preprocessing, the engine that runs the
network and its numeric precision.
The value is immutable and picklable, and its :attr:`~CodesComputation.key`
names its codes in a :class:`~sklearn_transfer.FeatureCache`. Changing any
of it means ``set_params`` and a new ``fit``, as everywhere in scikit-learn.

:class:`CodesExtractor` is the module that carries a computation out:
uint8 images in, pooled codes out.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from sklearn_transfer.backbones import Backbone, get_backbone
from sklearn_transfer.identity import digest
from sklearn_transfer.identity import fingerprint as network_fingerprint
from sklearn_transfer.preprocessing import DataConfig, tta_views

__all__ = ["CODES_VERSION", "POOLINGS", "CodesComputation", "CodesExtractor"]

#: Bumped whenever sklearn_transfer changes how codes are computed, so old cache rows go unused.
CODES_VERSION = 4
POOLINGS = ("avg", "max", "avgmax", "catavgmax")


class CodesExtractor(nn.Module):
    """uint8 images -> concatenated pooled codes of some stages of a backbone.

    Parameters
    ----------
    backbone : Backbone
    stages : list of int
        Stage indices to read, in output order.
    pooling : {"avg", "max", "avgmax", "catavgmax"}
        timm's adaptive pooling: ``avgmax`` is the mean of both, ``catavgmax``
        their concatenation.
    relu : bool
        Apply ReLU before pooling; intermediate stages of inverted-residual
        networks end in a linear bottleneck, so their raw outputs are signed.
    tta : bool, default=False
        Test-time augmentation: the mean of the codes of each image and of
        its mirror image (twice the compute).

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from sklearn_transfer import Backbone, DataConfig
    >>> from sklearn_transfer.computation import CodesExtractor
    >>> net = Backbone([("conv", nn.Conv2d(3, 8, 3))], DataConfig(input_size=32))
    >>> CodesExtractor(net, [0], "catavgmax", relu=True)(
    ...     torch.zeros(2, 3, 32, 32, dtype=torch.uint8)).shape
    torch.Size([2, 16])
    """

    def __init__(self, backbone: Backbone, stages: Sequence[int], pooling: str, relu: bool,
                 tta: bool = False):
        super().__init__()
        from timm.layers import SelectAdaptivePool2d

        self.backbone = backbone
        self.stage_indices = list(stages)
        self.pool = SelectAdaptivePool2d(pool_type=pooling, flatten=True)
        self.relu = relu
        self.tta = tta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tta:  # one batch of every view: the network runs once
            views = tta_views(x)
            return self._codes(torch.cat(views)).unflatten(0, (len(views), -1)).mean(0)
        return self._codes(x)

    def _codes(self, x: torch.Tensor) -> torch.Tensor:
        outs = self.backbone.forward_stages(x, self.stage_indices)
        codes = []
        for out in outs:
            if self.relu:
                out = torch.relu(out)
            codes.append(self.pool(out) if out.ndim == 4 else out.flatten(1))
        return torch.cat(codes, dim=1) if len(codes) > 1 else codes[0]


@functools.cache  # the installed distributions do not change under a running process
def _distributions() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


_version = functools.cache(importlib.metadata.version)  # (reads files on every call)


def _defining_packages(network: nn.Module) -> dict[str, str]:
    """Versions of the installed packages whose classes make up ``network`` (timm, ...).

    Their code (padding rules, activations) decides the codes as much as the
    weights do. torch itself is left out, as its versions change codes by
    rounding at most, and so is code that is not an installed distribution
    (a script's or test's own classes, which the architecture fingerprint
    covers).
    """
    tops = {type(m).__module__.split(".")[0] for m in network.modules()} - {"torch"}
    versions = {}
    for top in sorted(tops):
        for dist in _distributions().get(top, []):
            versions[dist] = _version(dist)
    return versions


@dataclass(frozen=True, eq=False)
class CodesComputation:
    """One way of computing CNN codes, resolved: the network, stages, pooling, precision.

    Build it with :meth:`of`; a fitted transformer keeps it as
    ``computation_``. Two computations are equal when their keys are.

    Attributes
    ----------
    backbone : str or Backbone
        A name :func:`~sklearn_transfer.get_backbone` builds (with ``weights``),
        or the network itself.
    weights : str or None
        ``"pretrained"`` or a weights file, with a name; ``None`` with a network.
    stages : tuple of int
        Stage indices read, in output order.
    pooling : str
    relu : bool
    tta : bool
        Codes averaged with those of the mirror image.
    precision : {"float32", "bfloat16", "float16"}
        What the network computes in (autocast, or OpenVINO's inference
        precision); codes of the low precisions differ from float32 ones in
        the third digit or so, so they are kept apart.
    engine : {"torch", "openvino"}
        What runs the network (see :mod:`sklearn_transfer.engines`); their
        float32 codes agree within 1e-4 but not bit for bit, so they are kept
        apart too.
    name : str
        The network's readable name.
    stage_names : tuple of str
        Names of all the network's stages.
    widths : tuple of int
        Channels after each of the network's stages.
    data_config : DataConfig
        The preprocessing.
    fingerprint : str
        :func:`~sklearn_transfer.identity.fingerprint` of the network
        (architecture and every weight and buffer) at ``fit``.
    packages : dict of str to str
        Versions of the packages whose classes make up the network.
    key : str
        SHA-256 of all of the above but the display-only fields: what a
        :class:`~sklearn_transfer.FeatureCache` stores the codes under.

    Examples
    --------
    >>> from torch import nn
    >>> from sklearn_transfer import Backbone, DataConfig
    >>> from sklearn_transfer.computation import CodesComputation
    >>> net = Backbone([("conv", nn.Conv2d(3, 8, 3))], DataConfig(input_size=32), name="tiny")
    >>> c = CodesComputation.of(net, stages=[0], pooling="catavgmax")
    >>> c.n_features, c.feature_names()[:2], len(c.key)
    (16, ['conv_avg_0', 'conv_avg_1'], 64)
    """

    backbone: str | Backbone
    weights: str | None
    stages: tuple[int, ...]
    pooling: str
    relu: bool
    tta: bool
    precision: str
    engine: str
    name: str
    stage_names: tuple[str, ...]
    widths: tuple[int, ...]
    data_config: DataConfig
    fingerprint: str
    packages: dict[str, str]
    key: str = field(init=False, repr=False)

    def __post_init__(self) -> None:
        text = json.dumps(self.describe(), sort_keys=True)
        object.__setattr__(self, "key", digest(text))

    @classmethod
    def of(cls, network: Backbone, stages: Sequence[int], pooling: str = "avg",
           relu: bool = True, tta: bool = False, precision: str = "float32",
           engine: str = "torch", backbone: str | None = None,
           weights: str | None = None, fingerprint: str | None = None) -> CodesComputation:
        """The computation of ``network``'s codes as it is now.

        Parameters
        ----------
        network : Backbone
            Fingerprinted here (every weight is read once).
        stages : list of int
            Resolved stage indices.
        pooling, relu, tta, precision, engine
            See the class attributes.
        backbone, weights : str, optional
            The name and weights (``"pretrained"`` or a file) ``network`` was
            built from, if any: a worker given the computation can then build
            the network itself. Without them the computation holds ``network``.
        fingerprint : str, optional
            ``network``'s fingerprint when it is known already (a shared
            pretrained network's, see
            :func:`~sklearn_transfer.backbones.shared_pretrained`).
        """
        if pooling not in POOLINGS:
            raise ValueError(f"pooling={pooling!r} is not one of {POOLINGS}")
        return cls(
            backbone=network if backbone is None else backbone,
            weights=None if weights is None else str(weights),
            stages=tuple(int(i) for i in stages),
            pooling=pooling,
            relu=bool(relu),
            tta=bool(tta),
            precision=precision,
            engine=engine,
            name=network.name,
            stage_names=tuple(network.stage_names),
            widths=tuple(network.widths),
            data_config=network.data_config,
            fingerprint=fingerprint if fingerprint is not None else network_fingerprint(network),
            packages=_defining_packages(network),
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CodesComputation) and other.key == self.key

    def __hash__(self) -> int:
        return hash(self.key)

    def __repr__(self) -> str:
        stages = [self.stage_names[i] for i in self.stages]
        return (f"CodesComputation({self.name}, stages={stages}, pooling={self.pooling!r}, "
                f"relu={self.relu}, tta={self.tta}, precision={self.precision!r}, "
                f"engine={self.engine!r}, key={self.key[:12]}…)")

    @property
    def n_features(self) -> int:
        """Width of the codes."""
        factor = 2 if self.pooling == "catavgmax" else 1
        return sum(self.widths[i] for i in self.stages) * factor

    def feature_names(self) -> list[str]:
        """``"{stage}_{pool}_{channel}"`` for every column of the codes."""
        pools = ["avg", "max"] if self.pooling == "catavgmax" else [self.pooling]
        return [f"{self.stage_names[i]}_{pool}_{c}"
                for i in self.stages for pool in pools for c in range(self.widths[i])]

    def describe(self) -> dict:
        """What the key hashes, as plain JSON values (shown by ``FeatureCache.info``)."""
        return {
            "codes_version": CODES_VERSION,
            "backbone": self.name,
            "network": self.fingerprint,
            "packages": self.packages,
            "stages": list(self.stages),
            "stage_names": [self.stage_names[i] for i in self.stages],
            "pooling": self.pooling,
            "relu": self.relu,
            "tta": self.tta,
            "data_config": asdict(self.data_config),
            "precision": self.precision,
            "engine": self.engine,
        }

    def network(self) -> Backbone:
        """The network: built from its name (a worker's own copy), or the one held."""
        if isinstance(self.backbone, Backbone):
            return self.backbone
        return get_backbone(self.backbone, weights=self.weights)

    def extractor(self, network: Backbone | None = None) -> CodesExtractor:
        """The module computing these codes, on ``network`` (default: :meth:`network`)."""
        return CodesExtractor(self.network() if network is None else network,
                              self.stages, self.pooling, self.relu, self.tta)
