"""The estimators pass scikit-learn's API checks that need no 2-D numeric data."""

from __future__ import annotations

import inspect

import pytest
from sklearn.utils.estimator_checks import (
    check_do_not_raise_errors_in_init_or_set_params,
    check_estimator_cloneable,
    check_estimator_repr,
    check_get_params_invariance,
    check_no_attributes_set_in_init,
    check_parameters_default_constructible,
    check_set_params,
)

from sklearn_transfer import CNNFeatureTransformer, FineTunedClassifier, StrategySearchCV

from .conftest import make_tiny_backbone

CHECKS = [check_set_params, check_do_not_raise_errors_in_init_or_set_params,
          check_get_params_invariance, check_parameters_default_constructible,
          check_estimator_repr, check_estimator_cloneable]


# ------------------------------------------------------------------- the transformer


@pytest.mark.parametrize("check", CHECKS, ids=[c.__name__ for c in CHECKS])
@pytest.mark.parametrize("estimator", [
    CNNFeatureTransformer(),
    CNNFeatureTransformer(make_tiny_backbone(), stage=[0, -1], memory="cache"),
], ids=["default", "module"])
def test_cnn_feature_transformer_passes_sklearn_api_checks(estimator, check):
    check(type(estimator).__name__, estimator)


def test_the_transformer_sets_no_attribute_in_init():
    for estimator in (CNNFeatureTransformer(), CNNFeatureTransformer(make_tiny_backbone())):
        check_no_attributes_set_in_init(type(estimator).__name__, estimator)


# -------------------------------------------------------------------- the classifier

# check_no_attributes_set_in_init is the documented exception: the classifier is
# skorch's, whose __init__ sets history_, initialized_, virtual_params_ and the
# bookkeeping of routed names, which is how skorch works.
# skorch's set_params builds the callbacks at once (after setting the plain parameters),
# so once check_set_params has set callbacks=-inf every later set_params raises TypeError
# half-way; the check allows it, and warns.
@pytest.mark.filterwarnings("ignore:TypeError occurred during set_params:UserWarning")
@pytest.mark.filterwarnings("ignore:Estimator's parameters changed after set_params raised")
@pytest.mark.parametrize("check", CHECKS, ids=[c.__name__ for c in CHECKS])
@pytest.mark.parametrize("estimator", [
    FineTunedClassifier(),  # not fitted by any check: no weights are read
    FineTunedClassifier(make_tiny_backbone(), freeze_depth=1, checkpoint_dir="ckpt",
                        module__head_dropout=0.5, optimizer__weight_decay=0.1),
    FineTunedClassifier(mixup={"cutmix_alpha": 1.0}, layer_decay=0.75, warmup_epochs=1,
                        ema=0.99, tta=True, criterion__label_smoothing=0.1),
], ids=["default", "routed", "recipe-knobs"])
def test_fine_tuned_classifier_passes_sklearn_api_checks(estimator, check):
    check(type(estimator).__name__, estimator)


# ------------------------------------------------------------------ the strategy search


@pytest.mark.parametrize("check", [*CHECKS, check_no_attributes_set_in_init],
                         ids=[c.__name__ for c in [*CHECKS, check_no_attributes_set_in_init]])
@pytest.mark.parametrize("estimator", [
    StrategySearchCV(),
    StrategySearchCV({"mine": (CNNFeatureTransformer(), {"stage": [-1, -2]})}, cv=5,
                     time_budget=60, memory="cache"),
], ids=["auto", "own"])
def test_strategy_search_passes_sklearn_api_checks(estimator, check):
    check(type(estimator).__name__, estimator)


def test_all_declare_parameter_constraints_for_every_own_parameter():
    for cls in (CNNFeatureTransformer, FineTunedClassifier, StrategySearchCV):
        own = [p for p in inspect.signature(cls.__init__).parameters
               if p not in ("self", "kwargs", "module", "criterion", "optimizer",
                            "train_split")]
        assert set(own) <= set(cls._parameter_constraints), cls
