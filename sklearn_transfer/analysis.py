"""Error analysis: what a fitted classifier gets wrong, and which labels look wrong.

* :class:`ErrorAnalysis`, built from a fitted classifier and labelled images
  (:meth:`~ErrorAnalysis.from_estimator`) or from probabilities you already
  have (:meth:`~ErrorAnalysis.from_predictions`, e.g. the out-of-fold ones of
  :func:`~sklearn.model_selection.cross_val_predict`): the confusion matrix
  (scikit-learn's :class:`~sklearn.metrics.ConfusionMatrixDisplay`), the most
  confused class pairs, the images of highest loss as a table and as a grid
  of thumbnails.
* :func:`label_issues`: the training images ranked by how unlikely their own
  label is under cross-validated probabilities (self-confidence), to find
  the mislabelled ones.

Any classifier with ``predict_proba`` and ``classes_`` works: a pipeline of
:class:`~sklearn_transfer.CNNFeatureTransformer` and a head, a
:class:`~sklearn_transfer.FineTunedClassifier`, a
:class:`~sklearn_transfer.StrategySearchCV`. Single-label classification
only: a multi-label indicator matrix ``y`` is refused.

Tables are dicts of equal-length NumPy arrays, as scikit-learn's
``cv_results_``: ``pandas.DataFrame(table)`` takes them as they are.
Plotting needs matplotlib.
"""

from __future__ import annotations

import math
import numbers
import os
from typing import Any

import numpy as np
from sklearn.exceptions import NotFittedError
from sklearn.metrics import ConfusionMatrixDisplay, confusion_matrix
from sklearn.model_selection import cross_val_predict
from sklearn.utils.multiclass import type_of_target
from sklearn.utils.validation import check_is_fitted

from sklearn_transfer.images import as_image_source

__all__ = ["ErrorAnalysis", "label_issues"]

#: longest side of a thumbnail in pixels, and the JPEG decoding scale it allows
THUMBNAIL_PIXELS = 256
#: file names longer than this are shortened in the middle in the thumbnails' titles
TITLE_CHARS = 30


class ErrorAnalysis:
    """The mistakes of a classifier on labelled images.

    Build it with :meth:`from_estimator` (a fitted classifier and images) or
    :meth:`from_predictions` (labels and probabilities, e.g. out-of-fold),
    as scikit-learn's ``Display`` objects.

    Parameters
    ----------
    y_true : array-like of shape (n_samples,)
        The label of each image (the given label: it may be wrong).
    y_proba : array-like of shape (n_samples, n_classes)
        Predicted probabilities, one column per class of ``classes``.
    classes : array-like of shape (n_classes,)
        The label of each column of ``y_proba`` (``estimator.classes_``).
    X : images, default=None
        The images (file paths, PIL images, arrays; see
        :mod:`sklearn_transfer.images`), for the thumbnails and the ``path``
        column of the tables; ``None`` gives tables of indices only.

    Attributes
    ----------
    y_pred : ndarray of shape (n_samples,)
        The most probable class of each image.
    losses : ndarray of shape (n_samples,)
        The log loss of each image, ``-log p(y_true)``.

    See Also
    --------
    label_issues : Training images ranked by cross-validated self-confidence.

    Examples
    --------
    >>> from sklearn_transfer.analysis import ErrorAnalysis
    >>> y = ["ant", "bee", "bee", "wasp"]
    >>> proba = [[.8, .1, .1], [.6, .3, .1], [.2, .7, .1], [.1, .2, .7]]
    >>> analysis = ErrorAnalysis.from_predictions(y, proba)
    >>> analysis
    ErrorAnalysis(n_samples=4, classes=['ant', 'bee', 'wasp'], n_errors=1)
    >>> analysis.most_confused()
    {'label': array(['bee'], dtype='<U4'), 'predicted': array(['ant'], dtype='<U4'), \
'count': array([1])}
    >>> top = analysis.top_losses(2)
    >>> top["index"], top["predicted"], top["p_label"]
    (array([1, 2]), array(['ant', 'bee'], dtype='<U4'), array([0.3, 0.7]))
    """

    def __init__(self, y_true: Any, y_proba: Any, classes: Any, X: Any = None) -> None:
        y_true = _check_single_label(y_true, "y_true")
        self.classes = np.asarray(classes)
        if self.classes.ndim != 1 or len(self.classes) < 2:
            raise ValueError(f"classes must hold 2 labels or more; got {classes!r}")
        self.y_proba = np.asarray(y_proba, dtype=np.float64)
        if self.y_proba.ndim != 2 or self.y_proba.shape[1] != len(self.classes):
            raise ValueError(
                f"y_proba must be (n_samples, n_classes) = (n, {len(self.classes)}), one "
                f"column per class of {self.classes.tolist()}; got shape {self.y_proba.shape}")
        bad = ~np.isfinite(self.y_proba).all(axis=1)
        if bad.any():
            raise ValueError(f"y_proba holds NaN or infinite values in row "
                             f"{int(np.flatnonzero(bad)[0])}")
        _check_lengths(y_true=y_true, y_proba=self.y_proba, X=X)
        self.y_true, self.X = y_true, X
        self._label_columns = _columns_of(y_true, self.classes)
        self._pred_columns = self.y_proba.argmax(axis=1)
        self.y_pred = self.classes[self._pred_columns]
        rows = np.arange(len(y_true))
        self._p_label = self.y_proba[rows, self._label_columns]
        self.losses = -np.log(np.clip(self._p_label, np.finfo(np.float64).eps, 1.0))

    @classmethod
    def from_estimator(cls, estimator: Any, X: Any, y: Any) -> ErrorAnalysis:
        """Analyse a fitted classifier's predictions on images ``X`` labelled ``y``.

        Parameters
        ----------
        estimator : fitted classifier
            With ``predict_proba`` and ``classes_``.
        X : images
            What ``estimator.predict_proba`` takes: file paths, PIL images,
            arrays (see :mod:`sklearn_transfer.images`).
        y : array-like of shape (n_samples,)
            Their labels.

        Returns
        -------
        ErrorAnalysis

        Examples
        --------
        >>> import numpy as np
        >>> from sklearn.linear_model import LogisticRegression
        >>> from sklearn.pipeline import make_pipeline
        >>> from sklearn.preprocessing import FunctionTransformer
        >>> from sklearn_transfer.analysis import ErrorAnalysis
        >>> images = np.random.RandomState(0).randint(0, 256, (6, 8, 8, 3), dtype=np.uint8)
        >>> mean_colour = FunctionTransformer(lambda X: X.mean(axis=(1, 2)))
        >>> y = [0, 1, 0, 1, 0, 1]
        >>> clf = make_pipeline(mean_colour, LogisticRegression()).fit(images, y)
        >>> ErrorAnalysis.from_estimator(clf, images, y)
        ErrorAnalysis(n_samples=6, classes=[0, 1], n_errors=2)
        """
        y = _check_single_label(y, "y")
        _check_lengths(X=X, y=y)
        check_is_fitted(estimator)
        _check_has_predict_proba(estimator)
        return cls(y, estimator.predict_proba(X), estimator.classes_, X)

    @classmethod
    def from_predictions(cls, y_true: Any, y_proba: Any, *, classes: Any = None,
                         X: Any = None) -> ErrorAnalysis:
        """Analyse predicted probabilities, e.g. out-of-fold ones.

        Parameters
        ----------
        y_true : array-like of shape (n_samples,)
        y_proba : array-like of shape (n_samples, n_classes)
        classes : array-like of shape (n_classes,), default=None
            The label of each column; ``None`` is the sorted labels of
            ``y_true``, the order of
            ``cross_val_predict(..., method="predict_proba")``.
        X : images, default=None
            For the thumbnails and the ``path`` column.

        Returns
        -------
        ErrorAnalysis

        Examples
        --------
        >>> import numpy as np
        >>> from sklearn.linear_model import LogisticRegression
        >>> from sklearn.model_selection import cross_val_predict
        >>> from sklearn_transfer.analysis import ErrorAnalysis
        >>> codes = np.random.RandomState(0).rand(20, 4)
        >>> y = ["ant", "bee"] * 10
        >>> proba = cross_val_predict(LogisticRegression(), codes, y, cv=2,
        ...                           method="predict_proba")
        >>> ErrorAnalysis.from_predictions(y, proba).classes
        array(['ant', 'bee'], dtype='<U3')
        """
        if classes is None:
            classes = np.unique(_check_single_label(y_true, "y_true"))
        return cls(y_true, y_proba, classes, X)

    def __repr__(self) -> str:
        n_errors = int((self._pred_columns != self._label_columns).sum())
        return (f"{type(self).__name__}(n_samples={len(self.y_true)}, "
                f"classes={self.classes.tolist()}, n_errors={n_errors})")

    def top_losses(self, k: int | None = None) -> dict[str, np.ndarray]:
        """The images of highest loss (lowest probability of their label) first.

        Parameters
        ----------
        k : int, default=None
            How many rows; ``None`` gives all the images.

        Returns
        -------
        dict of str to ndarray
            ``index`` (position in ``X``), ``path`` (when ``X`` holds file
            paths or URLs; ``None`` for other items), ``label``,
            ``predicted``, ``p_label`` (the probability of the label),
            ``p_predicted``, ``loss``. Ties keep the order of ``X``.
        """
        order = np.argsort(self._p_label, kind="stable")[:_check_k(k)]
        table = {"index": order}
        paths = _paths(self.X)
        if paths is not None:
            table["path"] = paths[order]
        table.update(label=self.y_true[order], predicted=self.y_pred[order],
                     p_label=self._p_label[order],
                     p_predicted=self.y_proba[order, self._pred_columns[order]],
                     loss=self.losses[order])
        return table

    def most_confused(self, k: int | None = None) -> dict[str, np.ndarray]:
        """The pairs (label, predicted) of different classes, most frequent first.

        Parameters
        ----------
        k : int, default=None
            How many pairs; ``None`` gives every pair that occurs.

        Returns
        -------
        dict of str to ndarray
            ``label``, ``predicted`` and ``count`` (images of ``label``
            predicted as ``predicted``); ties in the order of ``classes``.
        """
        matrix = confusion_matrix(self._label_columns, self._pred_columns,
                                  labels=np.arange(len(self.classes)))
        np.fill_diagonal(matrix, 0)
        flat = np.argsort(-matrix, axis=None, kind="stable")
        flat = flat[matrix.flat[flat] > 0][:_check_k(k)]
        label, predicted = np.unravel_index(flat, matrix.shape)
        return {"label": self.classes[label], "predicted": self.classes[predicted],
                "count": matrix[label, predicted]}

    def plot_confusion_matrix(self, *, normalize: str | None = None, ax: Any = None,
                              **kwargs: Any) -> ConfusionMatrixDisplay:
        """Plot the confusion matrix with scikit-learn's ``ConfusionMatrixDisplay``.

        Parameters
        ----------
        normalize : {"true", "pred", "all"}, default=None
            As :func:`sklearn.metrics.confusion_matrix`.
        ax : matplotlib Axes, default=None
            Where to plot; ``None`` makes a new figure.
        **kwargs
            Passed to :meth:`ConfusionMatrixDisplay.from_predictions
            <sklearn.metrics.ConfusionMatrixDisplay.from_predictions>`
            (``cmap``, ``xticks_rotation``, ``values_format``...).

        Returns
        -------
        sklearn.metrics.ConfusionMatrixDisplay
            Its ``figure_`` can be saved.
        """
        _import_pyplot("plot_confusion_matrix")
        return ConfusionMatrixDisplay.from_predictions(
            self.y_true, self.y_pred, labels=self.classes, normalize=normalize, ax=ax,
            **kwargs)

    def plot_top_losses(self, k: int = 9, *, ncols: int | None = None, size: float = 2.4,
                        fig: Any = None) -> Any:
        """Thumbnails of the ``k`` images of highest loss, titled with what went wrong.

        Each title holds the file name (or the index in ``X``), the label
        with its probability and the prediction with its probability.

        Parameters
        ----------
        k : int, default=9
        ncols : int, default=None
            Thumbnails per row; ``None`` makes a square-ish grid.
        size : float, default=2.4
            Width of a thumbnail in inches.
        fig : matplotlib Figure or SubFigure, default=None
            Where to draw; ``None`` makes a new figure.

        Returns
        -------
        matplotlib Figure

        Examples
        --------
        >>> import matplotlib
        >>> matplotlib.use("Agg")
        >>> import numpy as np
        >>> from sklearn_transfer.analysis import ErrorAnalysis
        >>> images = np.zeros((3, 16, 16, 3), dtype=np.uint8)
        >>> analysis = ErrorAnalysis.from_predictions(
        ...     ["ant", "bee", "bee"], [[.9, .1], [.8, .2], [.4, .6]], X=images)
        >>> fig = analysis.plot_top_losses(2)
        >>> [ax.get_title() for ax in fig.axes]
        ['image 1\\nlabel: bee (0.20)\\npredicted: ant (0.80)', \
'image 2\\nlabel: bee (0.60)\\npredicted: bee (0.60)']
        """
        if self.X is None:
            raise ValueError("plot_top_losses needs the images: pass X= to "
                             "ErrorAnalysis.from_predictions (or use from_estimator)")
        plt = _import_pyplot("plot_top_losses")
        source = as_image_source(self.X)
        rows = self.top_losses(k)
        n = len(rows["index"])
        ncols = min(n, _check_k(ncols, "ncols") or math.ceil(math.sqrt(n)))
        nrows = math.ceil(n / ncols)
        if fig is None:
            # the title's three lines need room above each thumbnail
            fig = plt.figure(figsize=(ncols * size, nrows * (size + 0.55)), layout="constrained")
        axes = fig.subplots(nrows, ncols, squeeze=False)
        for ax in axes.flat:
            ax.set_axis_off()
        for pos, ax in enumerate(axes.flat[:n]):
            index = int(rows["index"][pos])
            image = source.load(index, draft_size=THUMBNAIL_PIXELS)
            image.thumbnail((THUMBNAIL_PIXELS, THUMBNAIL_PIXELS))
            ax.imshow(np.asarray(image))
            path = rows["path"][pos] if "path" in rows else None
            name = _short(os.path.basename(path)) if path is not None else f"image {index}"
            ax.set_title(f"{name}\nlabel: {rows['label'][pos]} ({rows['p_label'][pos]:.2f})\n"
                         f"predicted: {rows['predicted'][pos]} ({rows['p_predicted'][pos]:.2f})",
                         fontsize=8)
        return fig


def label_issues(estimator: Any, X: Any, y: Any, *, cv: Any = 5, groups: Any = None,
                 n_jobs: int | None = None) -> dict[str, np.ndarray]:
    """Rank images by how unlikely their label is under cross-validated probabilities.

    Each image's probabilities come from a clone of ``estimator`` fit on the
    other folds (:func:`~sklearn.model_selection.cross_val_predict` with
    ``method="predict_proba"``); the images whose given label gets the
    lowest probability (the self-confidence ranking) come first: the ones
    most likely mislabelled, or ambiguous, or not of any class at all.

    Parameters
    ----------
    estimator : classifier
        With ``predict_proba``; fitted or not (clones are fit).
    X : images
    y : array-like of shape (n_samples,)
        The given labels.
    cv : int, cross-validation generator or iterable, default=5
        As :func:`~sklearn.model_selection.cross_val_predict`.
    groups : array-like of shape (n_samples,), default=None
        Group labels for a group-aware ``cv``.
    n_jobs : int, default=None
        Folds fit in parallel.

    Returns
    -------
    dict of str to ndarray
        Every image, lowest probability of its label first, in the columns
        of :meth:`ErrorAnalysis.top_losses`: the same ranking as
        ``ErrorAnalysis.from_predictions(y, proba, X=X).top_losses()`` of the
        out-of-fold ``proba`` (which also plots them).

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn.linear_model import LogisticRegression
    >>> from sklearn.pipeline import make_pipeline
    >>> from sklearn.preprocessing import FunctionTransformer
    >>> from sklearn_transfer.analysis import label_issues
    >>> rng = np.random.RandomState(0)
    >>> y = np.array(["red", "green"] * 10)
    >>> images = rng.randint(0, 90, (20, 8, 8, 3)).astype(np.uint8)
    >>> images[y == "red", :, :, 0] += 150
    >>> images[y == "green", :, :, 1] += 150
    >>> y[3] = "red"  # a green image labelled red
    >>> mean_colour = FunctionTransformer(lambda X: X.mean(axis=(1, 2)))
    >>> issues = label_issues(make_pipeline(mean_colour, LogisticRegression()), images, y, cv=3)
    >>> int(issues["index"][0]), str(issues["label"][0]), str(issues["predicted"][0])
    (3, 'red', 'green')
    """
    y = _check_single_label(y, "y")
    _check_lengths(X=X, y=y)
    _check_has_predict_proba(estimator)
    proba = cross_val_predict(estimator, X, y, cv=cv, groups=groups, n_jobs=n_jobs,
                              method="predict_proba")
    return ErrorAnalysis.from_predictions(y, proba, X=X).top_losses()


# ------------------------------------------------------------------------- checks


def _check_single_label(y: Any, name: str) -> np.ndarray:
    """``y`` as a 1-D array of labels; a multi-label indicator matrix is refused."""
    if isinstance(y, str) or not hasattr(y, "__len__"):
        raise TypeError(f"{name} must be a sequence of labels; got {type(y).__name__}")
    y = np.asarray(y)
    if y.ndim == 2 and type_of_target(y) == "multilabel-indicator":
        raise ValueError(
            f"{name} is a multi-label indicator matrix of shape {y.shape}; the error analysis "
            "is for single-label classification. Analyse label j as a binary problem: "
            "ErrorAnalysis.from_predictions(Y[:, j], np.column_stack([1 - P[:, j], P[:, j]]))")
    if y.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one label per image); got shape {y.shape}")
    return y


def _check_lengths(**arrays: Any) -> None:
    """All the non-``None`` ``arrays`` hold as many rows; the error names them."""
    lengths = {name: len(a) for name, a in arrays.items() if a is not None}
    if len(set(lengths.values())) > 1:
        raise ValueError("inconsistent numbers of images: " + ", ".join(
            f"{name} has {n}" for name, n in lengths.items()))


def _check_has_predict_proba(estimator: Any) -> None:
    try:
        estimator.predict_proba  # noqa: B018 (the attribute may be conditional: available_if)
    except NotFittedError:
        return  # a search knows its methods once fitted: cross-validation fits it first
    except AttributeError:
        name = type(estimator).__name__
        if hasattr(estimator, "steps"):  # a Pipeline: its last step decides
            name += f" (last step {type(estimator.steps[-1][1]).__name__})"
        raise TypeError(
            f"{name} has no predict_proba; the error analysis needs "
            "probabilities: use a probabilistic head (LogisticRegression) or wrap the "
            "classifier in sklearn.calibration.CalibratedClassifierCV") from None


def _check_k(k: int | None, name: str = "k") -> int | None:
    if k is not None and (not isinstance(k, numbers.Integral) or k < 1):
        raise ValueError(f"{name} must be a positive integer or None; got {k!r}")
    return k


def _columns_of(y: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """The column of ``classes`` of each label; a label not in ``classes`` is an error."""
    column = {c: j for j, c in enumerate(classes.tolist())}
    labels = y.tolist()
    index = next((i for i, label in enumerate(labels) if label not in column), None)
    if index is not None:
        raise ValueError(f"the label of image {index}, {labels[index]!r}, is not one of the "
                         f"classes {classes.tolist()} (the columns of the probabilities)")
    return np.array([column[label] for label in labels], dtype=np.intp)


def _paths(X: Any) -> np.ndarray | None:
    """The file path or URL of each image as strings (``None`` for other items), or
    ``None`` when ``X`` holds no path (arrays, tensors, PIL images)."""
    if X is None or getattr(X, "ndim", 1) != 1 or (
            isinstance(X, np.ndarray) and X.dtype.kind not in "OUS"):
        return None
    paths = [os.fspath(x) if isinstance(x, (str, os.PathLike)) else None for x in X]
    return np.array(paths, dtype=object) if any(p is not None for p in paths) else None


def _short(name: str) -> str:
    if len(name) <= TITLE_CHARS:
        return name
    half = (TITLE_CHARS - 1) // 2
    return f"{name[:half]}…{name[-half:]}"


def _import_pyplot(what: str) -> Any:
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError(f"ErrorAnalysis.{what} needs matplotlib: pip install matplotlib") \
            from None
    return plt
