"""Save and load fitted estimators without pickle: skops for the scikit-learn part, safetensors
for the weights.

``pickle``/``joblib`` files can run arbitrary code when loaded: load them only from
sources you trust. :func:`dump` saves a fitted
:class:`~sklearn_transfer.FineTunedClassifier`, a
:class:`~sklearn_transfer.CNNFeatureTransformer`, or a scikit-learn
:class:`~sklearn.pipeline.Pipeline` whose first step is a
``CNNFeatureTransformer`` followed by scikit-learn steps (a scaler, a linear
classifier...: what a :class:`~sklearn_transfer.StrategySearchCV` keeps as
``best_estimator_``), as one zip file holding

* ``estimator.skops``: the network estimator's parameters and scikit-learn
  fitted state (the label encoder, class weights) through :mod:`skops.io`,
  whose loader only rebuilds the types it is told to trust;
* ``weights.safetensors``: the network's tensors, in a format that holds
  nothing but tensors;
* ``pipeline.skops`` (pipelines only): the pipeline with its first step left
  out (``"passthrough"``), the scikit-learn steps fitted, through skops;
* ``format.json``: the file's format tag (:func:`~sklearn_transfer.files.format_tag`),
  the estimator's class and the SHA-256 of each member above, so that a member
  changed or swapped for another model's is refused, not loaded.

:func:`load` trusts the few types the estimators' parameters use (the
optimizer, loss and DataLoader classes, the validation split) and, in a
pipeline's steps, scikit-learn's own types; it refuses a file holding any
other, naming it (``trusted=`` adds names). The network's *architecture* is
code, not data: a named backbone (``"efficientnet_lite0"``) is rebuilt by
name, while an estimator fitted on your own ``nn.Module`` is loaded by passing
that module (the same architecture) as ``backbone=``; only its weights come
from the file.
"""

from __future__ import annotations

import copy
import json
import os
import zipfile
import zlib
from typing import Any

import skops.io as sio
from safetensors import SafetensorError
from sklearn.exceptions import NotFittedError
from sklearn.pipeline import Pipeline
from sklearn.utils.validation import check_is_fitted
from torch import nn

from sklearn_transfer.backbones import get_backbone
from sklearn_transfer.features import CNNFeatureTransformer
from sklearn_transfer.files import atomic_write, check_format, format_tag
from sklearn_transfer.finetune import FineTunedClassifier
from sklearn_transfer.identity import digest

__all__ = ["TRUSTED_TYPES", "dump", "load"]

_CLASSES = {"FineTunedClassifier": FineTunedClassifier,
            "CNNFeatureTransformer": CNNFeatureTransformer}
# the fitted state a file holds besides the weights, per class
_FITTED = {"FineTunedClassifier": ("label_encoder_", "class_weight_"),
           "CNNFeatureTransformer": ()}
_SKELETON_KEYS = ("class", "backbone", "backbone_type", "params", "fitted")
_MEMBERS = ("estimator.skops", "weights.safetensors")
_PIPELINE = "pipeline.skops"
#: types the estimators' parameters hold, rebuilt by :func:`load` without asking
TRUSTED_TYPES = [
    "sklearn_transfer.batches.ImageLoader",
    "sklearn_transfer.finetune._ValidSplit",
    "sklearn_transfer.network.FineTuneModule",
    "skorch.dataset.Dataset",
    "skorch.dataset.ValidSplit",
    "torch.utils.data.dataloader.DataLoader",
    "torch.nn.modules.loss.BCEWithLogitsLoss",
    "torch.nn.modules.loss.CrossEntropyLoss",
    "torch.nn.modules.loss.NLLLoss",
    "torch.optim.adamw.AdamW",
    "torch.optim.adam.Adam",
    "torch.optim.sgd.SGD",
    "torch.optim.rmsprop.RMSprop",
]
Saved = FineTunedClassifier | CNNFeatureTransformer | Pipeline


def dump(estimator: Saved, path: str | os.PathLike) -> None:
    """Write a fitted estimator to ``path`` without pickle.

    The file is written under a temporary name and renamed when complete: a
    process stopped midway leaves the previous file (or none), never half of one.

    Parameters
    ----------
    estimator : FineTunedClassifier, CNNFeatureTransformer or Pipeline
        Fitted. A pipeline's first step is a ``CNNFeatureTransformer``, its
        other steps scikit-learn estimators (other types are written, and
        :func:`load` asks for them in ``trusted=``). Custom ``callbacks``
        (code) and a ``FeatureCache`` object as ``memory`` (pass its path
        instead) cannot be saved this way.
    path : path-like

    Examples
    --------
    >>> import tempfile, numpy as np
    >>> from sklearn.linear_model import LogisticRegression
    >>> from sklearn.pipeline import make_pipeline
    >>> from sklearn_transfer import CNNFeatureTransformer
    >>> from sklearn_transfer.persistence import dump, load
    >>> X = np.random.RandomState(0).randint(0, 255, (4, 64, 64, 3)).astype(np.uint8)
    >>> model = make_pipeline(CNNFeatureTransformer("mobilenet_v2", progress=False),
    ...                       LogisticRegression()).fit(X, [0, 1, 0, 1])
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     dump(model, tmp + "/model.zip")
    ...     again = load(tmp + "/model.zip")
    >>> bool((again.predict_proba(X) == model.predict_proba(X)).all())
    True
    """
    name = type(estimator).__name__
    if isinstance(estimator, Pipeline):
        transformer = _check_pipeline(estimator)
        members = _network_members(transformer)
        # the network travels in the members above; the placeholder keeps the steps' names
        rest = copy.copy(estimator).set_params(**{estimator.steps[0][0]: "passthrough"})
        members[_PIPELINE] = sio.dumps(rest)
        name = "Pipeline"
    elif name in _CLASSES:
        members = _network_members(estimator)
    elif hasattr(estimator, "best_estimator_"):
        raise TypeError(f"dump saves a fitted model, not the {name} that chose it: "
                        "dump its best_estimator_")
    else:
        raise TypeError(f"dump saves {sorted(_CLASSES)} or a Pipeline starting with a "
                        f"CNNFeatureTransformer, not {name}")
    target = os.fspath(path)
    if not os.path.isdir(os.path.dirname(os.path.abspath(target))):
        raise FileNotFoundError(f"cannot write {target!r}: its folder does not exist")
    with atomic_write(target) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        for member, data in members.items():
            zf.writestr(member, data)
        zf.writestr("format.json", json.dumps({
            "format": format_tag("persistence"), "class": name,
            "sha256": {member: digest(data) for member, data in members.items()}}))


def _check_pipeline(pipeline: Pipeline) -> CNNFeatureTransformer:
    """The transformer first in a pipeline ``dump`` can write (shape checked, fitted)."""
    steps = pipeline.steps
    first = steps[0][1]
    if not isinstance(first, CNNFeatureTransformer):
        raise TypeError(f"dump saves a Pipeline whose first step is a CNNFeatureTransformer; "
                        f"its first step {steps[0][0]!r} is a {type(first).__name__}")
    for step, est in steps[1:]:
        if isinstance(est, (CNNFeatureTransformer, FineTunedClassifier, nn.Module)):
            raise TypeError(f"dump saves a Pipeline with one network, its first step; step "
                            f"{step!r} is a {type(est).__name__} too")
    try:
        check_is_fitted(pipeline)
    except NotFittedError:
        raise NotFittedError("the Pipeline is not fitted: call fit() before dump") from None
    return first


def _network_members(estimator: FineTunedClassifier | CNNFeatureTransformer) -> dict:
    """The ``estimator.skops`` and ``weights.safetensors`` members of a network estimator."""
    name = type(estimator).__name__
    params = estimator.get_params(deep=False)
    backbone = params.pop("backbone")
    if isinstance(estimator, FineTunedClassifier):
        if not getattr(estimator, "initialized_", False):
            raise NotFittedError(f"the {name} is not fitted: call fit() before dump")
        if params.get("callbacks"):
            raise ValueError("callbacks are code and cannot be saved without pickle; set "
                             "callbacks=None before dump (they only matter for training)")
        module = estimator.module_
    else:
        if not hasattr(estimator, "computation_"):
            raise NotFittedError(f"the {name} is not fitted: call fit() before dump")
        memory = params.get("memory")
        if memory is not None and not isinstance(memory, (str, os.PathLike)):
            raise ValueError("memory must be None or a path to be saved; pass the cache's path")
        if isinstance(memory, os.PathLike):
            params["memory"] = os.fspath(memory)
        module = estimator.backbone_
    skeleton = {
        "class": name,
        # a module's architecture is code: only its name travels, the caller supplies it
        "backbone": backbone if isinstance(backbone, str) else None,
        "backbone_type": type(backbone).__qualname__,
        "params": params,
        "fitted": {key: getattr(estimator, key) for key in _FITTED[name]},
    }
    from safetensors.torch import save

    weights = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    return dict(zip(_MEMBERS, [sio.dumps(skeleton), save(weights)], strict=True))


def load(path: str | os.PathLike, backbone: nn.Module | None = None,
         trusted: list[str] | None = None) -> Saved:
    """Read an estimator :func:`dump` wrote, running no code from the file.

    A transformer's ``memory=`` directory is not created while loading (but
    when ``transform`` first uses it); when it exists, the converted network
    kept there is reused (or kept there).

    Parameters
    ----------
    path : path-like
    backbone : nn.Module or Backbone, optional
        Required when the estimator was fitted on your own module: a module
        of the same architecture (its weights are replaced by the file's).
    trusted : list of str, optional
        Further type names to trust (e.g. your own optimizer class, or a
        pipeline step that is not scikit-learn's), in addition to
        :data:`TRUSTED_TYPES` and, in a pipeline's steps, scikit-learn's types.

    Returns
    -------
    FineTunedClassifier, CNNFeatureTransformer or Pipeline

    Raises
    ------
    FileNotFoundError
        If there is no file at ``path``.
    ValueError
        If the file holds a type that is not trusted, is not such a file, is
        damaged, or holds a class, parameters or fitted state this version does
        not know (or lacks some); the message names the file and the item.
    """
    name = os.fspath(path)
    kind, members = _read_members(path, name)
    allowed = set(TRUSTED_TYPES) | set(trusted or ())
    skeleton = _trusted_loads(members["estimator.skops"], allowed, name, "estimator.skops")
    cls = _check_skeleton(skeleton, name)
    if kind == "Pipeline":
        # a pipeline's steps may be any of scikit-learn's own types
        rest = _trusted_loads(members[_PIPELINE], set(trusted or ()), name, _PIPELINE,
                              library="sklearn")
        if cls is not CNNFeatureTransformer:
            raise ValueError(f"{name!r} is damaged: its pipeline's network is a {cls.__name__}, "
                             "not a CNNFeatureTransformer")
    estimator = _network_estimator(cls, skeleton, members["weights.safetensors"], backbone,
                                   name)
    return estimator if kind != "Pipeline" else _pipeline(rest, estimator, name)


def _pipeline(rest: Any, transformer: CNNFeatureTransformer, name: str) -> Pipeline:
    """The pipeline ``rest`` (as dumped) with ``transformer`` back as its first step."""
    if not isinstance(rest, Pipeline) or not rest.steps or \
            not isinstance(rest.steps[0][1], str) or rest.steps[0][1] != "passthrough":
        raise ValueError(f"{name!r} is damaged: its {_PIPELINE} member is not a pipeline "
                         "whose first step is left for the network")
    rest.set_params(**{rest.steps[0][0]: transformer})
    following = [(step, est) for step, est in rest.steps[1:]
                 if est is not None and not isinstance(est, str)]
    if following:
        step, est = following[0]
        expected = getattr(est, "n_features_in_", transformer.n_features_out_)
        if expected != transformer.n_features_out_:
            raise ValueError(f"{name!r} is damaged: step {step!r} was fitted on {expected} "
                             f"features, the network gives {transformer.n_features_out_}")
    return rest


def _network_estimator(cls: type, skeleton: dict, weight_bytes: bytes, backbone: Any,
                       name: str) -> FineTunedClassifier | CNNFeatureTransformer:
    """The estimator a file's description and weights make, fitted as it was dumped."""
    net = skeleton["backbone"] if skeleton["backbone"] is not None else backbone
    if net is None:
        raise ValueError(
            f"{name!r} was fitted on a user-provided {skeleton['backbone_type']}: "
            "pass backbone=<a module of the same architecture> (architectures are code, which "
            "the file does not hold)"
        )
    from safetensors.torch import load as load_tensors

    try:
        weights = load_tensors(weight_bytes)
    except SafetensorError as exc:
        raise ValueError(f"the weights in {name!r} (weights.safetensors) are damaged or "
                         f"truncated ({exc})") from None
    estimator = cls(backbone=net, **skeleton["params"])
    # set back after loading: the file's weights replace the starting ones (which are not
    # read), and the feature cache is not created before the model is used
    original = {"backbone": net, "weights": estimator.weights}
    estimator.weights = None
    try:
        if isinstance(estimator, FineTunedClassifier):
            for key, value in skeleton["fitted"].items():
                setattr(estimator, key, value)
            try:
                estimator.initialize()
            except ValueError as exc:  # e.g. a freeze_depth beyond the network's stages
                raise ValueError(f"{name!r} does not fit the backbone passed ({net!r}), which "
                                 f"is not the architecture it was saved from: {exc}") from None
            _load_weights(estimator.module_, weights, name)
        else:
            # the network with the file's weights is what fit resolves the computation from;
            # a module passed here is the caller's: copied, not overwritten
            network = get_backbone(copy.deepcopy(net) if isinstance(net, nn.Module) else net,
                                   weights=None)
            _load_weights(network, weights, name)
            original["memory"] = memory = estimator.memory
            # an existing cache serves its converted network; a missing one is not created
            estimator.backbone, estimator.memory = network, (
                memory if isinstance(memory, (str, os.PathLike)) and os.path.isdir(memory)
                else None)
            estimator.fit()
    finally:
        for key, value in original.items():
            setattr(estimator, key, value)
    return estimator


def _trusted_loads(data: bytes, allowed: set[str], name: str, member: str,
                   library: str | None = None) -> Any:
    """A skops member's object, once every type it holds is trusted (or of ``library``)."""
    try:
        untrusted = sio.get_untrusted_types(data=data)
    except Exception as exc:  # skops raises BadZipFile, KeyError, JSONDecodeError, ...
        raise ValueError(f"{name!r}: its {member} member is damaged or not a skops file "
                         f"({type(exc).__name__}: {exc})") from None
    refused = sorted(t for t in set(untrusted) - allowed if t.split(".")[0] != library)
    if refused:
        raise ValueError(
            f"{name!r} holds types that are not trusted: {refused}. Loading them "
            "could run code; if you trust the file's origin and these types, pass "
            "trusted=[...] naming them"
        )
    try:
        return sio.loads(data, trusted=untrusted)
    except Exception as exc:  # a trusted type whose state does not rebuild it
        raise ValueError(f"{name!r}: its {member} member is damaged "
                         f"({type(exc).__name__}: {exc})") from None


def _read_members(path: str | os.PathLike, name: str) -> tuple[str | None, dict[str, bytes]]:
    """The class and members of a :func:`dump` file, each checked against its digest."""
    try:
        with zipfile.ZipFile(path) as zf:
            meta = zf.read("format.json")
            try:
                meta = json.loads(meta)
            except ValueError:
                meta = None
            kind = meta.get("class") if isinstance(meta, dict) else None
            wanted = _MEMBERS + ((_PIPELINE,) if kind == "Pipeline" else ())
            members = {member: zf.read(member) for member in wanted}
    except FileNotFoundError:
        raise FileNotFoundError(f"model file {name!r} does not exist") from None
    except IsADirectoryError:
        raise ValueError(f"{name!r} is a folder, not a file written by "
                         "sklearn_transfer.persistence.dump") from None
    except (zipfile.BadZipFile, KeyError, zlib.error, EOFError) as exc:
        raise ValueError(f"{name!r} is not a file written by sklearn_transfer.persistence.dump, "
                         f"or it is damaged ({exc})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{name!r}: its format.json member is damaged")
    check_format("persistence", meta.get("format"), name,
                 "save the estimator again with this version (persistence.dump)")
    expected = meta.get("sha256") if isinstance(meta.get("sha256"), dict) else {}
    for member, data in members.items():
        if expected.get(member) != digest(data):
            raise ValueError(f"{name!r}: its {member} member is not the one written with this "
                             "file (changed, damaged or taken from another file); save the "
                             "estimator again")
    return kind, members


def _check_skeleton(skeleton: object, name: str) -> type:
    """The class of a file's estimator, once its description is complete and known."""
    if not isinstance(skeleton, dict):
        raise ValueError(f"{name!r} is not a file written by sklearn_transfer.persistence.dump")
    missing = [key for key in _SKELETON_KEYS if key not in skeleton]
    if missing:
        raise ValueError(f"{name!r} is damaged: it lacks {missing}")
    kind = skeleton["class"]
    if not isinstance(kind, str) or kind not in _CLASSES:
        raise ValueError(f"{name!r} holds a {kind!r}, a class this version of sklearn_transfer "
                         f"does not load (it loads {sorted(_CLASSES)})")
    cls = _CLASSES[kind]
    params, fitted = skeleton["params"], skeleton["fitted"]
    if not isinstance(params, dict) or not isinstance(fitted, dict):
        raise ValueError(f"{name!r} is damaged: its parameters or fitted state are not a dict")
    known = set(cls().get_params(deep=False))
    # skorch routes `prefix__name` to the component `prefix` (module__head_hidden)
    routed = issubclass(cls, FineTunedClassifier)
    unknown = sorted(key for key in params if key == "backbone" or key not in known
                     and not (routed and key.partition("__")[0] in known))
    if unknown:
        raise ValueError(f"{name!r} holds parameters that {kind} does not take: {unknown} "
                         "(written by another version of sklearn_transfer, or edited)")
    # an unknown key would be set as an attribute: refused, as unknown parameters are
    if sorted(fitted) != sorted(_FITTED[kind]):
        raise ValueError(f"{name!r} does not hold the fitted state of a {kind}: expected "
                         f"{sorted(_FITTED[kind])}, found {sorted(fitted)}")
    return cls


def _load_weights(module: nn.Module, weights: dict, name: str) -> None:
    try:
        module.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        raise ValueError(
            f"the weights in {name!r} do not fit the backbone: "
            + " ".join(str(exc).splitlines()[:3])
        ) from None

