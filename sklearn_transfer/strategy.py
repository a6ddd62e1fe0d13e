"""Which transfer strategy for these images? :class:`StrategySearchCV` measures it.

CNN codes with a linear head, codes of several stages, head-only and
partial fine-tuning: which one wins depends on the data (how far from
ImageNet photos, how many images) and on the time one can spend.
:class:`StrategySearchCV` cross-validates them on the training data, cheapest
first, with the codes computed once for all the heads (a feature cache), and
skips the fine-tunings whose estimated cost would break a time budget.
"""

from __future__ import annotations

import numbers
import os
import tempfile
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, MetaEstimatorMixin, clone
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import ParameterGrid, check_cv, cross_validate
from sklearn.pipeline import Pipeline
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.metaestimators import available_if
from sklearn.utils.multiclass import check_classification_targets, unique_labels
from sklearn.utils.validation import check_is_fitted, column_or_1d
from skorch import NeuralNet

from sklearn_transfer.features import CNNFeatureTransformer
from sklearn_transfer.finetune import FineTunedClassifier
from sklearn_transfer.images import ImageLoadError

__all__ = ["AUTO_STRATEGIES", "StrategySearchCV", "auto_strategies", "plot_cv_results"]

#: What ``strategies="auto"`` tries, cheapest first (see :func:`auto_strategies`).
AUTO_STRATEGIES = ("codes", "codes_stages", "finetune_head", "finetune_last", "finetune_more")
C_GRID = [0.01, 0.1, 1.0, 10.0]


def auto_strategies(backbone: Any = "efficientnet_lite0", memory: Any = None,
                    random_state: Any = None) -> dict[str, tuple[Any, dict]]:
    """The strategies ``StrategySearchCV(strategies="auto")`` cross-validates.

    * ``codes``: the last stage's codes + ``LogisticRegression``, C searched;
    * ``codes_stages``: codes of stages -4, -2 and -1 concatenated (earlier
      layers, for images far from ImageNet photos) + the same head;
    * ``finetune_head``: :class:`~sklearn_transfer.FineTunedClassifier` with
      the whole backbone frozen (``freeze_depth="all"``);
    * ``finetune_last``: the last two stages trained (``freeze_depth=-2``);
    * ``finetune_more``: the last four (``freeze_depth=-4``).

    Parameters
    ----------
    backbone : str, nn.Module or Backbone, default="efficientnet_lite0"
    memory : path-like or FeatureCache, optional
        The codes strategies' feature cache.
    random_state : int, optional
        For the fine-tunings.

    Returns
    -------
    dict
        Name -> ``(estimator, param_grid)``.

    Examples
    --------
    >>> from sklearn_transfer.strategy import auto_strategies
    >>> list(auto_strategies())
    ['codes', 'codes_stages', 'finetune_head', 'finetune_last', 'finetune_more']
    """
    def codes(stage: Any) -> Pipeline:
        return Pipeline([
            ("codes", CNNFeatureTransformer(backbone, stage=stage, memory=memory,
                                            progress=False)),
            ("head", LogisticRegression(max_iter=2000)),
        ])

    def finetune(depth: Any) -> FineTunedClassifier:
        return FineTunedClassifier(backbone, freeze_depth=depth, random_state=random_state,
                                   verbose=0)

    heads = {"head__C": C_GRID}
    return {
        "codes": (codes(-1), heads),
        "codes_stages": (codes([-4, -2, -1]), heads),
        "finetune_head": (finetune("all"), {}),
        "finetune_last": (finetune(-2), {}),
        "finetune_more": (finetune(-4), {}),
    }


def _is_net(estimator: Any) -> bool:
    """A skorch net: its cost grows with ``max_epochs`` and can be probed by two short epochs."""
    return isinstance(estimator, NeuralNet)


def _best_has(name: str):
    """For ``available_if``: whether the best estimator has the method ``name``."""
    def check(search: StrategySearchCV) -> bool:
        # BaseSearchCV's own refit=False check (private; its _search_estimator_has calls it)
        search._check_refitted(name)
        return hasattr(search.best_estimator_, name)
    return check


def _check_labels(y: Any, n_images: int) -> np.ndarray:
    """``y`` as a 1-D array of class labels of one type, at least two classes, one per image."""
    unique_labels(y)  # refuses a mix of strings and numbers, which an array would stringify
    y = column_or_1d(y)
    check_classification_targets(y)
    if len(y) != n_images:
        raise ValueError(f"X has {n_images} images but y has {len(y)} labels")
    classes = np.unique(y)
    if len(classes) < 2:
        raise ValueError(f"y holds a single class ({classes[0].item()!r}); the strategies are "
                         "classifiers, which need at least two")
    return y


def _in_user_terms(exc: Exception, X: Any) -> Exception:
    """An image error from inside a fold, naming the image's index in the user's ``X``."""
    item, index = getattr(exc, "item", None), getattr(exc, "index", None)
    if not isinstance(item, (str, os.PathLike)) or index is None:
        return exc
    matches = [i for i, x in enumerate(X) if isinstance(x, (str, os.PathLike))
               and os.fspath(x) == os.fspath(item)]
    if not matches:
        return exc
    text = str(exc).replace(f"(index {index})", f"(index {matches[0]} of X)")
    return ImageLoadError(text, matches[0], item) if isinstance(exc, ImageLoadError) \
        else type(exc)(text)


def _probe_subset(y: np.ndarray, n: int) -> np.ndarray:
    """``n`` indices taking the classes in turn, so that every class is in the probe."""
    by_class = [np.flatnonzero(y == c) for c in np.unique(y)]
    order = [idx[i] for i in range(max(map(len, by_class))) for idx in by_class if i < len(idx)]
    return np.asarray(order[:n])


class StrategySearchCV(MetaEstimatorMixin, ClassifierMixin, BaseEstimator):
    """Cross-validate transfer strategies on the training data and keep the best.

    The candidates of every strategy (a strategy and one setting of its grid)
    are cross-validated in turn, cheapest first: the codes strategies, whose
    heads share one extraction through a feature cache, then the fine-tunings
    (skorch nets), in the order given (``"auto"``: the fewer stages trained,
    the earlier). A fine-tuning (any skorch net) is estimated
    before it runs, from two training epochs on a few batches (its measured
    images/s); when the time spent so far plus the estimate would exceed
    ``time_budget``, it is skipped and reported with its estimated cost.

    Parameters
    ----------
    strategies : "auto" or dict, default="auto"
        ``"auto"``: see :func:`auto_strategies` (built on ``backbone``). A dict
        maps names to estimators on images (a pipeline, a
        ``FineTunedClassifier``...) or to ``(estimator, param_grid)``.
    cv : int or cross-validation splitter, default=3
        As in ``GridSearchCV`` (an int: stratified folds, not shuffled).
    time_budget : float, optional
        Seconds the cross-validation may take (the final refit comes on
        top). ``None`` (or ``inf``): run every candidate.
    memory : path-like or FeatureCache, optional
        The feature cache of the ``"auto"`` codes strategies; ``None`` uses a
        temporary one for the duration of ``fit``.
    scoring : str or callable, optional
        As in ``GridSearchCV``; default: the estimators' ``score`` (accuracy).
    refit : bool, default=True
        Fit the best candidate on all of ``X, y`` as ``best_estimator_``.
    random_state : int, optional
        Seed of the ``"auto"`` fine-tunings.
    n_jobs : int, optional
        Folds fitted in parallel (joblib; ``joblib.parallel_backend("dask")``
        sends them to a Dask cluster).
    backbone : str, nn.Module or Backbone, default="efficientnet_lite0"
        The network of the ``"auto"`` strategies.
    verbose : int, default=0
        1 prints one line per candidate.

    Attributes
    ----------
    cv_results_ : dict of arrays
        One row per candidate: ``strategy``, ``params``, ``status`` (``"done"``
        or ``"skipped"``), ``mean_test_score``, ``std_test_score``,
        ``split{k}_test_score``, ``rank_test_score``, ``mean_fit_time``,
        ``mean_score_time``, ``total_seconds`` (its whole cross-validation,
        probe included), ``estimated_seconds`` (skorch nets; else NaN) and
        ``images_per_s`` (images a fit went through, every epoch counted, over
        the mean fit time).
        ``pandas.DataFrame(search.cv_results_)`` shows it as a table.
    best_index_ : int
    best_strategy_ : str
    best_params_ : dict
    best_score_ : float
    best_estimator_ : estimator
        Only with ``refit=True``.
    refit_time_ : float
    classes_ : ndarray
    n_splits_ : int

    Examples
    --------
    >>> import numpy as np
    >>> from torch import nn
    >>> from sklearn_transfer import (Backbone, CNNFeatureTransformer, DataConfig,
    ...                               StrategySearchCV)
    >>> from sklearn.linear_model import LogisticRegression
    >>> from sklearn.pipeline import make_pipeline
    >>> rng = np.random.RandomState(0)
    >>> X = rng.randint(0, 90, (12, 32, 32, 3)).astype(np.uint8)
    >>> X[::2, ..., 0] += 150
    >>> y = np.array(["red", "green"] * 6)
    >>> net = Backbone([("conv", nn.Conv2d(3, 8, 3))], DataConfig(input_size=32))
    >>> codes = make_pipeline(CNNFeatureTransformer(net, engine="torch", progress=False),
    ...                       LogisticRegression())
    >>> search = StrategySearchCV({"codes": (codes, {"logisticregression__C": [0.1, 10]})},
    ...                           cv=2).fit(X, y)
    >>> search.best_strategy_, search.best_params_, search.best_score_  # ties: the first
    ('codes', {'logisticregression__C': 0.1}, 1.0)
    >>> search.cv_results_["status"].tolist()
    ['done', 'done']
    """

    _parameter_constraints: dict = {
        "strategies": [StrOptions({"auto"}), Mapping],
        "cv": ["cv_object"],
        "time_budget": [Interval(numbers.Real, 0, None, closed="right"), None],
        "memory": "no_validation",  # CNNFeatureTransformer checks it
        "scoring": [str, callable, None],
        "refit": ["boolean"],
        "random_state": ["random_state"],
        "n_jobs": [numbers.Integral, None],
        "backbone": "no_validation",  # CNNFeatureTransformer and FineTunedClassifier check it
        "verbose": ["verbose"],
    }

    def __init__(self, strategies: str | Mapping = "auto", cv: Any = 3,
                 time_budget: float | None = None, memory: Any = None, scoring: Any = None,
                 refit: bool = True, random_state: Any = None, n_jobs: int | None = None,
                 backbone: Any = "efficientnet_lite0", verbose: int = 0) -> None:
        self.strategies = strategies
        self.cv = cv
        self.time_budget = time_budget
        self.memory = memory
        self.scoring = scoring
        self.refit = refit
        self.random_state = random_state
        self.n_jobs = n_jobs
        self.backbone = backbone
        self.verbose = verbose

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.input_tags.three_d_array = True
        tags.input_tags.string = True
        return tags

    def _candidates(self, memory: Any) -> list[tuple[str, Any, dict]]:
        if isinstance(self.strategies, str):
            strategies = auto_strategies(self.backbone, memory, self.random_state)
        else:
            strategies = self.strategies
        candidates = []
        for name, value in strategies.items():
            estimator, grid = value if isinstance(value, tuple) else (value, {})
            if not hasattr(estimator, "fit"):
                raise TypeError(f"strategies[{name!r}] is a {type(estimator).__name__}, not an "
                                "estimator (or an (estimator, param_grid) pair)")
            try:
                settings = list(ParameterGrid(grid))
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"strategies[{name!r}]: bad param_grid: {exc}") from None
            candidates += [(name, estimator, params) for params in settings]
        if not candidates:
            raise ValueError("strategies holds no strategy; give at least one")
        # the cheap ones first: what a budget cuts is the expensive tail
        return sorted(candidates, key=lambda c: _is_net(c[1]))

    def fit(self, X: Any, y: Any) -> StrategySearchCV:
        """Cross-validate every candidate that fits the budget, then refit the best.

        Parameters
        ----------
        X : images
            Paths (best: they are small to copy and cache well), arrays or PIL images.
        y : array-like of shape (n_samples,)

        Returns
        -------
        self
        """
        self._validate_params()
        y = _check_labels(y, len(X))
        cv = check_cv(self.cv, y, classifier=True)
        self.n_splits_ = cv.get_n_splits(X, y)
        with tempfile.TemporaryDirectory(prefix="strategy-codes-") as tmp:
            memory = tmp if self.memory is None else self.memory
            candidates = self._candidates(memory)
            try:
                rows = self._run(candidates, X, y, cv)
            except (ImageLoadError, FileNotFoundError) as exc:
                raise _in_user_terms(exc, X) from None
            self.cv_results_ = self._results(rows)
            done = np.flatnonzero(self.cv_results_["status"] == "done")
            if len(done) == 0:
                raise ValueError(
                    f"time_budget={self.time_budget} s was spent before any candidate ran; "
                    "raise it (cv_results_ lists the estimated costs)")
            scores = self.cv_results_["mean_test_score"][done]
            self.best_index_ = int(done[np.argmax(scores)])  # ties: the cheaper one
            name, estimator, params = candidates[self.best_index_]
            self.best_strategy_ = name
            self.best_params_ = params
            self.best_score_ = float(self.cv_results_["mean_test_score"][self.best_index_])
            if self.refit:
                started = time.perf_counter()
                self.best_estimator_ = clone(estimator).set_params(**params).fit(X, y)
                self.refit_time_ = time.perf_counter() - started
                if self.memory is None and isinstance(self.strategies, str) \
                        and name.startswith("codes"):
                    # the temporary cache goes away with this block
                    self.best_estimator_.set_params(codes__memory=None)
        if self.refit:
            self.classes_ = self.best_estimator_.classes_
        return self

    def _run(self, candidates: list, X: Any, y: np.ndarray, cv: Any) -> list[dict]:
        started = time.perf_counter()
        n_train = len(y) * (self.n_splits_ - 1) / self.n_splits_
        rows = []
        for name, estimator, params in candidates:
            candidate = clone(estimator).set_params(**params)
            t0 = time.perf_counter()
            budget = np.inf if self.time_budget is None else self.time_budget
            estimate = np.nan
            if _is_net(candidate) and t0 - started < budget:
                estimate = self._estimate(candidate, X, y, n_train)
            spent = time.perf_counter() - started
            row = {"strategy": name, "params": params, "estimated_seconds": estimate}
            if spent >= budget or spent + np.nan_to_num(estimate) > budget:
                row["status"] = "skipped"
                rows.append(row)
                cost = "" if np.isnan(estimate) else f", estimated {estimate:.0f} s"
                self._say(f"{name} {params}: skipped{cost}, {spent:.0f} of "
                          f"{self.time_budget:.0f} s spent")
                continue
            if not np.isnan(estimate):
                self._say(f"{name} {params}: estimated {estimate:.0f} s, running")
            result = cross_validate(candidate, X, y, cv=cv, scoring=self.scoring,
                                    n_jobs=self.n_jobs, error_score="raise")
            row.update(status="done", test_scores=result["test_score"],
                       fit_times=result["fit_time"], score_times=result["score_time"],
                       total_seconds=time.perf_counter() - t0)
            epochs = candidate.max_epochs if _is_net(candidate) else 1
            row["images_per_s"] = n_train * epochs / float(np.mean(result["fit_time"]))
            rows.append(row)
            self._say(f"{name} {params}: {np.mean(result['test_score']):.4f} in "
                      f"{row['total_seconds']:.1f} s")
        return rows

    def _estimate(self, net: Any, X: Any, y: np.ndarray, n_train: float) -> float:
        """Seconds of ``net``'s cross-validation, from two epochs and two predictions on two
        batches.

        A fold costs: building the network and compiling its predictions (the
        probe's first prediction less its second), ``max_epochs`` times
        (training on what ``train_split`` leaves, evaluating the rest), then
        predicting the test fold; the probe itself is counted too. The second
        epoch and prediction are the per-image rates: the first ones also
        convert what the engine runs once (the frozen stages: once per search).
        """
        batch = net.batch_size if net.batch_size > 0 else 32
        idx = _probe_subset(y, min(len(y), 2 * batch))
        X_probe = [X[i] for i in idx]  # a list of paths, arrays, PIL images or tensors
        probe = clone(net).set_params(max_epochs=2, train_split=None)
        t0 = time.perf_counter()
        probe.fit(X_probe, y[idx])
        t1 = time.perf_counter()
        probe.predict_proba(X_probe)
        t2 = time.perf_counter()
        probe.predict_proba(X_probe)
        t3 = time.perf_counter()
        epochs = probe.history_[:, "dur"]
        per_train, per_eval = epochs[-1] / len(idx), (t3 - t2) / len(idx)
        # building the network, and compiling the fitted one for its predictions
        overhead = max(t1 - t0 - sum(epochs), 0.0) + max((t2 - t1) - (t3 - t2), 0.0)
        split = getattr(net.train_split, "cv", 0.2) if net.train_split is not None else 0.0
        valid = split if isinstance(split, float) else 1 / split
        epoch = n_train * ((1 - valid) * per_train + valid * per_eval)
        n_test = len(y) / self.n_splits_
        fold = overhead + net.max_epochs * epoch + n_test * per_eval
        return (t3 - t0) + self.n_splits_ * fold

    def _say(self, text: str) -> None:
        if self.verbose:
            print(f"[StrategySearchCV] {text}", flush=True)

    def _results(self, rows: list[dict]) -> dict[str, np.ndarray]:
        n, k = len(rows), self.n_splits_
        nan = np.full(n, np.nan)
        results: dict[str, Any] = {
            "strategy": np.array([r["strategy"] for r in rows], dtype=object),
            "params": [r["params"] for r in rows],
            "status": np.array([r["status"] for r in rows], dtype=object),
        }
        splits = np.full((n, k), np.nan)
        fit_times, score_times = nan.copy(), nan.copy()
        for i, r in enumerate(rows):
            if r["status"] == "done":
                splits[i] = r["test_scores"]
                fit_times[i] = np.mean(r["fit_times"])
                score_times[i] = np.mean(r["score_times"])
        for j in range(k):
            results[f"split{j}_test_score"] = splits[:, j]
        results["mean_test_score"] = splits.mean(axis=1)
        results["std_test_score"] = splits.std(axis=1)
        order = np.argsort(-np.nan_to_num(results["mean_test_score"], nan=-np.inf),
                           kind="stable")
        rank = np.empty(n, dtype=np.int32)
        rank[order] = np.arange(1, n + 1)
        results["rank_test_score"] = rank
        results["mean_fit_time"] = fit_times
        results["mean_score_time"] = score_times
        results["total_seconds"] = np.array([r.get("total_seconds", np.nan) for r in rows])
        results["estimated_seconds"] = np.array([r["estimated_seconds"] for r in rows])
        results["images_per_s"] = np.array([r.get("images_per_s", np.nan) for r in rows])
        return results

    def plot(self, ax: Any = None) -> Any:
        """Score against cost, one colour per strategy; skipped ones at their estimate.

        See :func:`plot_cv_results`.

        Parameters
        ----------
        ax : matplotlib Axes, optional

        Returns
        -------
        matplotlib Axes
        """
        check_is_fitted(self, "cv_results_")
        return plot_cv_results(self.cv_results_, self.time_budget,
                               self.scoring or "accuracy", ax)

    def _check_refitted(self, method: str) -> None:
        # scikit-learn's searches name refit=False rather than saying "call fit"
        if not self.refit and hasattr(self, "cv_results_"):
            raise NotFittedError(
                f"This {type(self).__name__} instance was initialized with refit=False: "
                f"{method} is available only after refitting on the best strategy; fit "
                "again with refit=True, or fit best_strategy_ with best_params_ yourself")
        check_is_fitted(self, "best_estimator_")

    def predict(self, X: Any) -> np.ndarray:
        """Labels from ``best_estimator_``."""
        self._check_refitted("predict")
        return self.best_estimator_.predict(X)

    @available_if(_best_has("predict_proba"))
    def predict_proba(self, X: Any) -> np.ndarray:
        """Probabilities from ``best_estimator_``."""
        return self.best_estimator_.predict_proba(X)

    def score(self, X: Any, y: Any) -> float:
        """``scoring`` (default: accuracy) of ``best_estimator_`` on ``X, y``."""
        self._check_refitted("score")
        if self.scoring is None:
            return self.best_estimator_.score(X, y)
        from sklearn.metrics import check_scoring

        return check_scoring(self.best_estimator_, self.scoring)(self.best_estimator_, X, y)


def plot_cv_results(cv_results: Mapping[str, Any], time_budget: float | None = None,
                    scoring: str = "accuracy", ax: Any = None) -> Any:
    """Plot a :class:`StrategySearchCV`'s ``cv_results_``: mean CV score against seconds.

    One colour per strategy, in their order in ``cv_results`` (so the same
    colours for ``strategies="auto"`` on any data); error bars are the
    standard deviation over folds; a skipped strategy is a dotted line at its
    estimated cost; the best-ranked candidate is starred; the legend sits
    beside the axes, off the data.

    Parameters
    ----------
    cv_results : mapping
        ``cv_results_``, or the same columns read back from a file.
    time_budget : float, optional
        Drawn as a dashed line.
    scoring : str, default="accuracy"
        The score's name, for the axis label.
    ax : matplotlib Axes, optional

    Returns
    -------
    matplotlib Axes

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> from sklearn_transfer.strategy import plot_cv_results
    >>> nan = float("nan")
    >>> ax = plot_cv_results({
    ...     "strategy": ["codes", "codes", "finetune_head"],
    ...     "status": ["done", "done", "skipped"],
    ...     "mean_test_score": [0.90, 0.95, nan], "std_test_score": [0.02, 0.01, nan],
    ...     "rank_test_score": [2, 1, 3], "total_seconds": [6.0, 0.4, nan],
    ...     "estimated_seconds": [nan, nan, 420.0]}, time_budget=300)
    >>> [t.get_text() for t in ax.get_legend().get_texts()]
    ['finetune_head (skipped, estimated)', 'chosen', 'time budget', 'codes']
    """
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(8.5, 4.5))
    res = {k: np.asarray(v, dtype=object if k in ("strategy", "status") else float)
           for k, v in cv_results.items() if k != "params"}
    for i, name in enumerate(dict.fromkeys(res["strategy"])):
        colour = f"C{i}"
        rows = res["strategy"] == name
        done = rows & (res["status"] == "done")
        if done.any():
            ax.errorbar(res["total_seconds"][done], res["mean_test_score"][done],
                        yerr=res["std_test_score"][done], fmt="o", color=colour,
                        label=name, capsize=3)
        skipped = rows & (res["status"] == "skipped")
        for j, seconds in enumerate(res["estimated_seconds"][skipped]):
            if not np.isnan(seconds):
                ax.axvline(seconds, color=colour, linestyle=":",
                           label=None if j else f"{name} (skipped, estimated)")
    best = int(np.argmin(res["rank_test_score"]))
    ax.plot(res["total_seconds"][best], res["mean_test_score"][best], marker="*",
            markersize=16, linestyle="none", markerfacecolor="none", markeredgecolor="k",
            label="chosen")
    if time_budget is not None:
        ax.axvline(time_budget, color="k", linestyle="--", label="time budget")
    ax.set_xscale("log")
    ax.set_xlabel("seconds of cross-validation (log)")
    ax.set_ylabel(f"mean CV {scoring}")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
    return ax
