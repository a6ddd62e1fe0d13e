"""Both estimators pass scikit-learn's API checks that need no 2-D numeric data."""

from __future__ import annotations

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

from sklearn_transfer import CNNFeatureTransformer, FineTunedClassifier

from .conftest import make_tiny_backbone

CHECKS = [check_set_params, check_do_not_raise_errors_in_init_or_set_params,
          check_get_params_invariance, check_parameters_default_constructible,
          check_estimator_repr, check_estimator_cloneable]


def estimators():
    yield CNNFeatureTransformer()
    yield CNNFeatureTransformer(make_tiny_backbone(), stage=[0, -1], memory="cache")
    yield FineTunedClassifier()
    yield FineTunedClassifier(make_tiny_backbone(), freeze_depth=1, checkpoint_dir="ckpt",
                              module__head_dropout=0.5, optimizer__weight_decay=0.1)


@pytest.mark.parametrize("check", CHECKS, ids=[c.__name__ for c in CHECKS])
@pytest.mark.parametrize("estimator", list(estimators()),
                         ids=["transformer", "transformer_module", "classifier",
                              "classifier_routed"])
def test_scikit_learn_api_checks(estimator, check):
    check(type(estimator).__name__, estimator)


def test_the_transformer_sets_no_attribute_in_init():
    # (the classifier is skorch's: its __init__ sets history_, initialized_ and
    # virtual_params_, which is how skorch works and the one documented exception)
    for estimator in (CNNFeatureTransformer(), CNNFeatureTransformer(make_tiny_backbone())):
        check_no_attributes_set_in_init(type(estimator).__name__, estimator)


def test_both_declare_parameter_constraints_for_every_own_parameter():
    import inspect

    for cls in (CNNFeatureTransformer, FineTunedClassifier):
        own = [p for p in inspect.signature(cls.__init__).parameters
               if p not in ("self", "kwargs", "module", "criterion", "optimizer",
                            "train_split")]
        assert set(own) <= set(cls._parameter_constraints), cls
