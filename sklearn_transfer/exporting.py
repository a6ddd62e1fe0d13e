"""Export a fitted classifier as one OpenVINO network that needs only its runtime.

:func:`export` takes

* a pipeline :class:`~sklearn_transfer.CNNFeatureTransformer` → optional
  ``StandardScaler`` / ``Normalizer`` steps → a linear classifier with
  ``coef_`` and ``intercept_`` (``LogisticRegression``, ``LinearSVC``,
  ``RidgeClassifier``, ``SGDClassifier``, ...), fused into one network from
  uint8 images to the head's probabilities (or its decision scores, where it
  has no ``predict_proba``);
* a fitted :class:`~sklearn_transfer.FineTunedClassifier` (its whole network,
  softmax or sigmoids, test-time augmentation included);
* a fitted search (``StrategySearchCV``, ``GridSearchCV``) of either: its
  ``best_estimator_``.

The network is converted by the engines' one conversion path (checked
against torch on an example batch) and written at float32 with a
``model.json`` saying what it expects; :func:`~sklearn_transfer.load_exported`
runs it with OpenVINO, NumPy and Pillow (see :mod:`sklearn_transfer.exported`).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression, SGDClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import LabelBinarizer, Normalizer, StandardScaler
from sklearn.utils.validation import check_is_fitted
from torch import nn

import sklearn_transfer
from sklearn_transfer.engines import convert, import_openvino
from sklearn_transfer.exported import FILES, INTERPOLATIONS
from sklearn_transfer.features import CNNFeatureTransformer
from sklearn_transfer.files import format_tag, sha256_file
from sklearn_transfer.finetune import FineTunedClassifier
from sklearn_transfer.network import Predictor
from sklearn_transfer.openvino_runtime import INFERENCE_PRECISION
from sklearn_transfer.preprocessing import DataConfig

__all__ = ["export"]

#: What ``export`` can fuse between the transformer and the head
_SCALERS = (StandardScaler, Normalizer)


def export(estimator: Any, path: str | os.PathLike) -> Path:
    """Write a fitted classifier on images as one OpenVINO network in folder ``path``.

    Parameters
    ----------
    estimator : Pipeline, FineTunedClassifier or a fitted search of them
        See :mod:`sklearn_transfer.exporting` for what it takes.
    path : path-like
        A folder that does not exist yet: ``model.xml``, ``model.bin`` and
        ``model.json`` are written there (all or nothing).

    Returns
    -------
    Path
        The folder, for :func:`~sklearn_transfer.load_exported`.

    Raises
    ------
    TypeError
        An estimator or pipeline step export does not take (named).
    FileExistsError
        ``path`` exists.
    ~sklearn_transfer.engines.EngineUnavailableError
        OpenVINO is missing or cannot convert the network.

    Examples
    --------
    >>> import numpy as np, tempfile
    >>> from sklearn.linear_model import LogisticRegression
    >>> from sklearn.pipeline import make_pipeline
    >>> from sklearn_transfer import CNNFeatureTransformer, export, load_exported
    >>> images = np.random.RandomState(0).randint(0, 256, (6, 64, 64, 3), dtype=np.uint8)
    >>> clf = make_pipeline(CNNFeatureTransformer(precision="float32"),
    ...                     LogisticRegression()).fit(images, [0, 1, 0, 1, 0, 1])
    >>> folder = export(clf, tempfile.mkdtemp() + "/model")
    >>> exported = load_exported(folder, precision="float32")
    >>> bool(np.abs(exported.predict_proba(images) - clf.predict_proba(images)).max() < 1e-4)
    True
    """
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{str(path)!r} exists: export writes a new folder; remove it or "
                              "choose another path")
    estimator = getattr(estimator, "best_estimator_", estimator)
    if isinstance(estimator, FineTunedClassifier):
        network, meta = _fine_tuned(estimator)
    elif isinstance(estimator, Pipeline):
        network, meta = _codes_pipeline(estimator)
    else:
        raise TypeError(
            f"export takes a fitted Pipeline (CNNFeatureTransformer, optional scalers, a linear "
            f"classifier), a fitted FineTunedClassifier or a fitted search of them; got "
            f"{type(estimator).__name__}")
    config: DataConfig = meta.pop("data_config")
    if config.interpolation not in INTERPOLATIONS:
        raise ValueError(f"export: the network resizes its images with "
                         f"{config.interpolation!r}, which the exported model's loader does not "
                         f"reproduce; it knows {list(INTERPOLATIONS)}")
    ov = import_openvino()
    model = convert(ov, _Network(meta["estimator"], config), network)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"  # mkdtemp's 0700 would stay
    tmp.mkdir()
    try:
        ov.save_model(model, tmp / FILES[0], compress_to_fp16=False)
        (tmp / "model.json").write_text(json.dumps({
            "format": format_tag("exported-model"),
            "sha256": {name: sha256_file(tmp / name) for name in FILES},
            **meta,
            "input_size": config.input_size,
            "resize_size": config.resize_size,
            "interpolation": config.interpolation,
            "sklearn_transfer": sklearn_transfer.__version__,
        }, indent=1))
        tmp.rename(path)  # the folder appears whole, or not at all
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


@dataclass(frozen=True)
class _Network:
    """What the engines' conversion needs of a computation: a name, the input size, the module."""

    name: str
    data_config: DataConfig

    def extractor(self, network: nn.Module) -> nn.Module:
        return network


def _fine_tuned(clf: FineTunedClassifier) -> tuple[nn.Module, dict]:
    check_is_fitted(clf, "module_")
    module = copy.deepcopy(clf.module_).cpu()  # a network trained on a GPU exports too
    multilabel = isinstance(clf.label_encoder_, LabelBinarizer)  # as MLPClassifier's
    network = Predictor.of(module, multilabel, clf.tta).extractor(module)
    return network, {
        "estimator": "FineTunedClassifier", "output": "predict_proba", "multilabel": multilabel,
        "classes": np.asarray(clf.classes_).tolist(), "precision": _precision(module.precision),
        "data_config": module.backbone.data_config}


def _codes_pipeline(pipe: Pipeline) -> tuple[nn.Module, dict]:
    first, transformer = pipe.steps[0]
    if not isinstance(transformer, CNNFeatureTransformer):
        raise TypeError(f"export: the pipeline's first step {first!r} is a "
                        f"{type(transformer).__name__}, not a CNNFeatureTransformer")
    rest = [(name, step) for name, step in pipe.steps[1:]
            if step is not None and not (isinstance(step, str) and step == "passthrough")]
    if not rest:
        raise TypeError("export: the pipeline has no classifier after its CNNFeatureTransformer")
    *middle, (last, head) = rest
    check_is_fitted(transformer)
    computation = transformer.computation_
    if computation.precision == "int8":
        raise ValueError("export: int8 codes exist in OpenVINO's quantized network only; "
                         "export a transformer fitted with precision 'float32' or 'bfloat16'")
    layers: list[nn.Module] = [computation.extractor(transformer.backbone_)]
    for name, step in middle:
        if not isinstance(step, _SCALERS):
            raise TypeError(f"export: step {name!r} is a {type(step).__name__}; between the "
                            "transformer and the head export takes StandardScaler and "
                            "Normalizer only")
        layers.append(_Scale(step))
    output = "predict_proba" if hasattr(head, "predict_proba") else "decision_function"
    layers.append(_LinearHead(head, last, output))
    network = nn.Sequential(*layers)
    _check_head(network, pipe[1:], output, computation.data_config.input_size)
    return network, {
        "estimator": f"Pipeline({type(transformer).__name__}, {type(head).__name__})",
        "output": output, "multilabel": False, "classes": np.asarray(head.classes_).tolist(),
        "precision": _precision(computation.precision), "data_config": computation.data_config}


def _precision(precision: str) -> str:
    """The estimator's precision as one OpenVINO computes on a CPU (float16 is CUDA's)."""
    return precision if precision in INFERENCE_PRECISION else "float32"


class _Scale(nn.Module):
    """A fitted ``StandardScaler`` or ``Normalizer``, as scikit-learn computes it."""

    def __init__(self, step: Any) -> None:
        super().__init__()
        check_is_fitted(step)
        scaler = isinstance(step, StandardScaler)
        self.norm = None if scaler else step.norm
        for name, used in (("mean", scaler and step.with_mean),
                           ("scale", scaler and step.with_std)):
            value = getattr(step, f"{name}_", None) if used else None
            self.register_buffer(name, None if value is None else
                                 torch.as_tensor(value, dtype=torch.float32))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.norm is not None:
            norms = {"l1": lambda: z.abs().sum(1), "l2": lambda: z.square().sum(1).sqrt(),
                     "max": lambda: z.abs().amax(1)}[self.norm]()
            return z / torch.where(norms == 0, torch.ones_like(norms), norms)[:, None]
        if self.mean is not None:
            z = z - self.mean
        return z if self.scale is None else z / self.scale


class _LinearHead(nn.Module):
    """A fitted linear classifier: its decision scores, or its ``predict_proba``."""

    def __init__(self, head: Any, name: str, output: str) -> None:
        super().__init__()
        if not (hasattr(head, "coef_") and hasattr(head, "intercept_")):
            raise TypeError(f"export: the head {name!r} ({type(head).__name__}) is not a fitted "
                            "linear classifier with coef_ and intercept_")
        if output == "predict_proba" and not isinstance(head, (LogisticRegression,
                                                               SGDClassifier)):
            raise TypeError(f"export: the head {name!r} is a {type(head).__name__}, whose "
                            "predict_proba export does not know; its linear heads with "
                            "probabilities are LogisticRegression and SGDClassifier")
        self.register_buffer("coef", torch.as_tensor(np.asarray(head.coef_), dtype=torch.float32))
        self.register_buffer("intercept", torch.as_tensor(
            np.atleast_1d(head.intercept_), dtype=torch.float32))
        self.binary = self.coef.shape[0] == 1  # one score: two classes
        # scikit-learn's link from scores to probabilities, per head
        self.link = ("scores" if output == "decision_function" else "softmax"
                     if isinstance(head, LogisticRegression) else
                     "modified_huber" if head.loss == "modified_huber" else "sigmoid")

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        scores = z @ self.coef.T + self.intercept
        if self.link == "scores":
            return scores[:, 0] if self.binary else scores
        if self.link == "softmax" and not self.binary:
            return torch.softmax(scores, 1)
        p = ((scores.clamp(-1, 1) + 1) / 2 if self.link == "modified_huber"
             else torch.sigmoid(scores))
        if self.binary:
            return torch.cat([1 - p, p], 1)
        total = p.sum(1, keepdim=True)
        # modified Huber: rows of all-zero scores are uniform, as scikit-learn's
        return torch.where(total == 0, 1 / p.shape[1], p / torch.where(total == 0, 1, total))


def _check_head(network: nn.Sequential, head: Pipeline, output: str, size: int) -> None:
    """The fused head computes what scikit-learn's steps compute, on codes of example images."""
    images = torch.randint(0, 256, (4, 3, size, size), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        extractor = network[0]
        was_training = extractor.training
        extractor.eval()
        codes = extractor(images).float()
        fused = network[1:](codes).numpy()
        extractor.train(was_training)
    expected = getattr(head, output)(codes.numpy().astype(np.float64))
    error = float(np.abs(fused - expected).max())
    if not error <= 1e-4:
        raise RuntimeError(f"export: the fused head differs from {head!r} by {error:.3g}; "
                           "please report this")
