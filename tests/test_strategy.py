"""StrategySearchCV: strategies cross-validated cheapest first, within a time budget."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.utils._param_validation import InvalidParameterError
from torch import nn

from sklearn_transfer import (
    Backbone,
    CNNFeatureTransformer,
    DataConfig,
    FeatureCache,
    FineTunedClassifier,
    StrategySearchCV,
)

from .conftest import colour_images

matplotlib.use("Agg")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def five_stages() -> Backbone:
    """Tiny, with the 5 stages the "auto" strategies need (stages -4 and freeze_depth=-4)."""
    torch.manual_seed(0)
    widths = [8, 12, 16, 20, 24]
    stages, prev = [], 3
    for i, w in enumerate(widths):
        stages.append((f"s{i}", nn.Sequential(nn.Conv2d(prev, w, 3, stride=1 + (i < 3),
                                                        padding=1),
                                              nn.BatchNorm2d(w), nn.ReLU())))
        prev = w
    return Backbone(stages, DataConfig(input_size=32, crop_pct=1.0), name="five",
                    weights_id="five-seed0")


@pytest.fixture
def images(tmp_path):
    X = colour_images(24, size=32)
    paths = []
    for i, arr in enumerate(X):
        paths.append(str(tmp_path / f"{i:02d}.png"))
        Image.fromarray(arr).save(paths[-1])
    return np.array(paths), np.array(["red", "green"] * 12)


def test_auto_cross_validates_every_strategy_with_one_extraction_per_stage_choice(
        images, tmp_path):
    X, y = images
    cache = FeatureCache(tmp_path / "cache")
    search = StrategySearchCV(backbone=five_stages(), cv=2, memory=cache, random_state=0)
    search.fit(X, y)
    res = search.cv_results_
    assert len({len(v) for v in res.values()}) == 1  # a table: pandas.DataFrame(res)
    assert list(dict.fromkeys(res["strategy"])) == [
        "codes", "codes_stages", "finetune_head", "finetune_last", "finetune_more"]
    assert len(res["params"]) == 4 + 4 + 3 and set(res["status"]) == {"done"}
    assert np.all((res["mean_test_score"] >= 0) & (res["mean_test_score"] <= 1))
    assert sorted(res["rank_test_score"]) == list(range(1, 12))
    nets = np.array([s.startswith("finetune") for s in res["strategy"]])
    assert np.all(res["estimated_seconds"][nets] > 0)
    assert np.all(np.isnan(res["estimated_seconds"][~nets]))
    assert np.all(res["images_per_s"] > 0)
    # the heads shared the codes: one cache entry per image and stage choice
    assert cache.info().entries == 2 * len(X)
    assert search.best_score_ == res["mean_test_score"].max()
    assert search.predict(X).shape == (24,) and set(search.classes_) == {"green", "red"}
    assert search.score(X, y) == search.best_estimator_.score(X, y)
    ax = search.plot()
    assert ax.get_xlabel().startswith("seconds")
    (chosen,) = [line for line in ax.get_lines() if line.get_label() == "chosen"]
    assert chosen.get_ydata()[0] == search.best_score_
    labels = {t.get_text() for t in ax.get_legend().get_texts()}
    assert {"codes", "codes_stages", "chosen"} <= labels


def test_a_codes_strategy_scores_as_grid_search_does(images):
    X, y = images
    pipe = make_pipeline(CNNFeatureTransformer(five_stages(), engine="torch", progress=False),
                         LogisticRegression(max_iter=500))
    grid = {"logisticregression__C": [0.01, 1.0]}
    cv = StratifiedKFold(3)
    search = StrategySearchCV({"mine": (pipe, grid)}, cv=cv, scoring="neg_log_loss").fit(X, y)
    reference = GridSearchCV(pipe, grid, cv=cv, scoring="neg_log_loss").fit(X, y)
    np.testing.assert_array_equal(search.cv_results_["mean_test_score"],
                                  reference.cv_results_["mean_test_score"])
    assert search.best_params_ == reference.best_params_
    np.testing.assert_array_equal(search.predict_proba(X), reference.predict_proba(X))


def test_an_expensive_fine_tuning_is_skipped_with_its_estimate(images):
    X, y = images
    codes = make_pipeline(CNNFeatureTransformer(five_stages(), engine="torch", progress=False),
                          LogisticRegression())
    # listed first, run last: cheap strategies go first
    slow = FineTunedClassifier(five_stages(), max_epochs=10**8, verbose=0)
    search = StrategySearchCV({"slow": slow, "codes": codes}, cv=2, time_budget=600,
                              verbose=1).fit(X, y)
    res = search.cv_results_
    assert res["strategy"].tolist() == ["codes", "slow"]
    assert res["status"].tolist() == ["done", "skipped"]
    assert res["estimated_seconds"][1] > 600  # 10⁸ epochs of 12 images: far more
    assert np.isnan(res["mean_test_score"][1]) and res["rank_test_score"].tolist() == [1, 2]
    assert search.best_strategy_ == "codes"


def test_bad_strategies_are_named():
    X, y = colour_images(8, size=32), np.array([0, 1] * 4)
    with pytest.raises(TypeError, match=r"strategies\['oops'\] is a str, not an estimator"):
        StrategySearchCV({"oops": "LogisticRegression"}).fit(X, y)
    with pytest.raises(TypeError, match=r"strategies\['lr'\]: bad param_grid"):
        StrategySearchCV({"lr": (LogisticRegression(), {"C": 1.0})}).fit(X, y)
    with pytest.raises(InvalidParameterError, match="time_budget"):
        StrategySearchCV(time_budget=0).fit(X, y)
    with pytest.raises(ValueError, match="no strategy"):
        StrategySearchCV({}).fit(X, y)


def _codes_search(**params) -> StrategySearchCV:
    codes = make_pipeline(CNNFeatureTransformer(five_stages(), engine="torch", progress=False),
                          LogisticRegression())
    return StrategySearchCV({"codes": codes}, cv=2, **params)


def test_labels_are_checked_before_any_work(images):
    X, y = images
    mixed = [0 if label == "red" else "green" for label in y]
    with pytest.raises(ValueError, match="Mix of label input types"):
        _codes_search().fit(X, mixed)
    with pytest.raises(ValueError, match=r"y holds a single class \('red'\)"):
        _codes_search().fit(X, ["red"] * len(X))
    with pytest.raises(ValueError, match="X has 24 images but y has 23 labels"):
        _codes_search().fit(X, y[:-1])


def test_a_bad_image_is_named_by_its_index_in_the_users_X(images, tmp_path):
    X, y = images
    X = list(X)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    X[6] = str(tmp_path / "broken.png")
    with pytest.raises(ValueError, match=r"broken.png' \(index 6 of X\)"):
        _codes_search().fit(X, y)
    X[7] = str(tmp_path / "missing.png")
    X[6] = X[5]
    with pytest.raises(FileNotFoundError, match=r"missing.png' \(index 7 of X\) does not exist"):
        _codes_search().fit(X, y)


def test_refit_false_and_an_endless_budget_say_what_they_mean(images):
    X, y = images
    search = _codes_search(refit=False, time_budget=float("inf")).fit(X, y)
    assert search.best_strategy_ == "codes" and not hasattr(search, "best_estimator_")
    with pytest.raises(NotFittedError, match="initialized with refit=False"):
        search.predict(X)
    with pytest.raises(AttributeError) as err:  # as scikit-learn's searches: the cause says why
        search.predict_proba(X)
    assert "initialized with refit=False" in str(err.value.__cause__)
    with pytest.raises(NotFittedError, match="initialized with refit=False"):
        search.score(X, y)
