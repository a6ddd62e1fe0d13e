"""Save and load fitted estimators without pickle: skops for the scikit-learn part, safetensors
for the weights.

``pickle``/``joblib`` files can run arbitrary code when loaded: load them only from
sources you trust. :func:`dump` writes one zip file holding

* ``estimator.skops``: the parameters and scikit-learn fitted state (the label
  encoder, class weights) through :mod:`skops.io`, whose loader only
  rebuilds the types it is told to trust;
* ``weights.safetensors``: the network's tensors, in a format that holds
  nothing but tensors.

:func:`load` trusts the few types the estimators' parameters use (the
optimizer, loss and DataLoader classes, the validation split) and refuses a
file holding any other, naming it. The network's *architecture* is code, not
data: a named backbone (``"efficientnet_lite0"``) is rebuilt by name, while an
estimator fitted on your own ``nn.Module`` is loaded by passing that module
(the same architecture) as ``backbone=``; only its weights come from the file.
"""

from __future__ import annotations

import copy
import json
import os
import zipfile

import skops.io as sio
from torch import nn

from sklearn_transfer.backbones import get_backbone
from sklearn_transfer.features import CNNFeatureTransformer
from sklearn_transfer.finetune import FineTunedClassifier

__all__ = ["TRUSTED_TYPES", "dump", "load"]

FORMAT = "sklearn_transfer.persistence/1"
_CLASSES = {"FineTunedClassifier": FineTunedClassifier,
            "CNNFeatureTransformer": CNNFeatureTransformer}
#: types the estimators' parameters hold, rebuilt by :func:`load` without asking
TRUSTED_TYPES = [
    "sklearn_transfer.finetune.FineTuneModule",
    "sklearn_transfer.finetune._ValidSplit",
    "skorch.dataset.Dataset",
    "skorch.dataset.ValidSplit",
    "torch.utils.data.dataloader.DataLoader",
    "torch.nn.modules.loss.CrossEntropyLoss",
    "torch.nn.modules.loss.NLLLoss",
    "torch.optim.adamw.AdamW",
    "torch.optim.adam.Adam",
    "torch.optim.sgd.SGD",
    "torch.optim.rmsprop.RMSprop",
]


def dump(estimator: FineTunedClassifier | CNNFeatureTransformer,
         path: str | os.PathLike) -> None:
    """Write a fitted estimator to ``path`` without pickle.

    Parameters
    ----------
    estimator : FineTunedClassifier or CNNFeatureTransformer
        Fitted. Custom ``callbacks`` (code) and a ``FeatureCache`` object as
        ``memory`` (pass its path instead) cannot be saved this way.
    path : path-like

    Examples
    --------
    >>> import tempfile, numpy as np
    >>> from sklearn_transfer import CNNFeatureTransformer
    >>> from sklearn_transfer.persistence import dump, load
    >>> tf = CNNFeatureTransformer("mobilenet_v2").fit()
    >>> X = np.zeros((1, 64, 64, 3), np.uint8)
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     dump(tf, tmp + "/codes.zip")
    ...     again = load(tmp + "/codes.zip")
    >>> bool((again.transform(X) == tf.transform(X)).all())
    True
    """
    name = type(estimator).__name__
    if name not in _CLASSES:
        raise TypeError(f"dump saves {sorted(_CLASSES)}, not {name}")
    params = estimator.get_params(deep=False)
    backbone = params.pop("backbone")
    if isinstance(estimator, FineTunedClassifier):
        estimator.check_is_fitted()
        if params.get("callbacks"):
            raise ValueError("callbacks are code and cannot be saved without pickle; set "
                             "callbacks=None before dump (they only matter for training)")
        fitted = {"label_encoder_": estimator.label_encoder_,
                  "class_weight_": estimator.class_weight_}
        module = estimator.module_
    else:
        if not hasattr(estimator, "computation_"):
            raise ValueError("the CNNFeatureTransformer is not fitted: call fit() before dump")
        memory = params.get("memory")
        if memory is not None and not isinstance(memory, (str, os.PathLike)):
            raise ValueError("memory must be None or a path to be saved; pass the cache's path")
        if isinstance(memory, os.PathLike):
            params["memory"] = os.fspath(memory)
        fitted = {}
        module = estimator.backbone_
    skeleton = {
        "format": FORMAT,
        "class": name,
        # a module's architecture is code: only its name travels, the caller supplies it
        "backbone": backbone if isinstance(backbone, str) else None,
        "backbone_type": type(backbone).__qualname__,
        "params": params,
        "fitted": fitted,
    }
    from safetensors.torch import save

    weights = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("estimator.skops", sio.dumps(skeleton))
        zf.writestr("weights.safetensors", save(weights))
        zf.writestr("format.json", json.dumps({"format": FORMAT, "class": name}))


def load(path: str | os.PathLike, backbone: nn.Module | None = None,
         trusted: list[str] | None = None) -> FineTunedClassifier | CNNFeatureTransformer:
    """Read an estimator :func:`dump` wrote, running no code from the file.

    Parameters
    ----------
    path : path-like
    backbone : nn.Module or Backbone, optional
        Required when the estimator was fitted on your own module: a module
        of the same architecture (its weights are replaced by the file's).
    trusted : list of str, optional
        Further type names to trust (e.g. your own optimizer class), in
        addition to :data:`TRUSTED_TYPES`.

    Returns
    -------
    FineTunedClassifier or CNNFeatureTransformer

    Raises
    ------
    ValueError
        If the file holds a type that is not trusted, or is not such a file.
    """
    try:
        with zipfile.ZipFile(path) as zf:
            data = zf.read("estimator.skops")
            weight_bytes = zf.read("weights.safetensors")
    except (zipfile.BadZipFile, KeyError) as exc:
        raise ValueError(f"{os.fspath(path)!r} is not a file written by "
                         f"sklearn_transfer.persistence.dump ({exc})") from None
    allowed = set(TRUSTED_TYPES) | set(trusted or ())
    untrusted = sio.get_untrusted_types(data=data)
    refused = sorted(set(untrusted) - allowed)
    if refused:
        raise ValueError(
            f"{os.fspath(path)!r} holds types that are not trusted: {refused}. Loading them "
            "could run code; if you trust the file's origin and these types, pass "
            "trusted=[...] naming them"
        )
    skeleton = sio.loads(data, trusted=untrusted)
    if not isinstance(skeleton, dict) or skeleton.get("format") != FORMAT:
        raise ValueError(f"{os.fspath(path)!r} is not a {FORMAT} file")
    cls = _CLASSES[skeleton["class"]]
    net = skeleton["backbone"] if skeleton["backbone"] is not None else backbone
    if net is None:
        raise ValueError(
            f"{os.fspath(path)!r} was fitted on a user-provided {skeleton['backbone_type']}: "
            "pass backbone=<a module of the same architecture> (architectures are code, which "
            "the file does not hold)"
        )
    from safetensors.torch import load as load_tensors

    weights = load_tensors(weight_bytes)
    params = dict(skeleton["params"])
    estimator = cls(backbone=net, **params)
    # the file's weights replace the starting ones: do not read (or need) those
    estimator.weights = None
    try:
        if isinstance(estimator, FineTunedClassifier):
            for key, value in skeleton["fitted"].items():
                setattr(estimator, key, value)
            estimator.initialize()
            _load_weights(estimator.module_, weights, path)
        else:
            # the network with the file's weights is what fit resolves the computation from;
            # a module passed here is the caller's: copied, not overwritten
            network = get_backbone(copy.deepcopy(net) if isinstance(net, nn.Module) else net,
                                   weights=None)
            _load_weights(network, weights, path)
            estimator.backbone = network
            estimator.fit()
    finally:
        estimator.backbone = net
        estimator.weights = params["weights"]
    return estimator


def _load_weights(module: nn.Module, weights: dict, path: str | os.PathLike) -> None:
    try:
        module.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        raise ValueError(
            f"the weights in {os.fspath(path)!r} do not fit the backbone: "
            + " ".join(str(exc).splitlines()[:3])
        ) from None

