"""FineTunedClassifier on a multi-label 0/1 indicator matrix Y: one sigmoid per label."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from sklearn.base import clone
from sklearn.exceptions import DataConversionWarning
from sklearn.metrics import (
    accuracy_score,
    classification_report,
    f1_score,
    hamming_loss,
    roc_auc_score,
)
from sklearn.model_selection import GridSearchCV, ShuffleSplit
from skorch.dataset import ValidSplit
from torch import nn

from sklearn_transfer import FineTunedClassifier, load_image_folder
from sklearn_transfer.persistence import dump, load

from .conftest import make_tiny_backbone, real_dataset
from .test_finetune import tiny as finetune_tiny

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny(**params) -> FineTunedClassifier:
    params.setdefault("lr", 5e-2)  # a faster start than the multiclass tests need
    return finetune_tiny(**params)


def bright_channels(n: int, seed: int = 0, n_labels: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Images whose label j is "colour channel j is bright", each label drawn independently."""
    rng = np.random.RandomState(seed)
    Y = rng.randint(0, 2, (n, n_labels))
    X = rng.randint(0, 90, (n, 40, 40, 3)).astype(np.uint8)
    X[..., :n_labels] += (Y[:, None, None, :] * 150).astype(np.uint8)
    return X, Y


# ------------------------------------------------------------------ it learns


def test_learns_each_label_with_a_sigmoid_loss_and_predicts_indicator_matrices():
    X, Y = bright_channels(64)
    clf = tiny().fit(X, Y)
    assert isinstance(clf.criterion_, nn.BCEWithLogitsLoss)
    assert clf.criterion is nn.CrossEntropyLoss  # the parameter is untouched
    assert clf.__sklearn_tags__().classifier_tags.multi_label
    # as scikit-learn's multi-label classifiers (MLPClassifier): the column indices
    np.testing.assert_array_equal(clf.classes_, [0, 1, 2])
    losses = clf.history_[:, "train_loss"]
    assert losses[-1] < 0.6 * losses[0]

    X_new, Y_new = bright_channels(48, seed=1)
    proba = clf.predict_proba(X_new)
    assert proba.shape == (48, 3) and proba.dtype == np.float32
    assert ((proba >= 0) & (proba <= 1)).all()
    assert not np.allclose(proba.sum(axis=1), 1.0)  # one probability per label, not a softmax
    pred = clf.predict(X_new)
    assert pred.shape == (48, 3) and pred.dtype.kind == "i"
    np.testing.assert_array_equal(pred, (proba > 0.5).astype(int))
    # score is the subset accuracy (every label right), as ClassifierMixin.score gives
    assert clf.score(X_new, Y_new) == accuracy_score(Y_new, pred)
    assert clf.score(X_new, Y_new) >= 0.5  # chance: (1/2)**3 = 0.125
    # scikit-learn's multi-label metrics take the output as it is
    assert hamming_loss(Y_new, pred) <= 0.2
    assert f1_score(Y_new, pred, average="macro") >= 0.75
    assert roc_auc_score(Y_new, proba, average="macro") >= 0.9


def test_the_validation_split_is_not_stratified_and_valid_acc_is_subset_accuracy():
    X, Y = bright_channels(24, n_labels=3)
    Y[0] = [1, 1, 1]
    Y[1:] = np.where((Y[1:] == 1).all(axis=1, keepdims=True), [1, 1, 0], Y[1:])
    # skorch's stratified split fails on a label combination seen once ...
    split = ValidSplit(0.25, stratified=True, random_state=0)
    with pytest.raises(ValueError, match="least populated class"):
        split(np.arange(24), Y)
    # ... so fit splits the same fraction shuffled, without strata
    clf = tiny(train_split=split, patience=None).fit(X, Y)
    _, valid = next(ShuffleSplit(test_size=0.25, random_state=0).split(X))
    # the restored weights are those of the best validation epoch, whose valid_acc is the
    # subset accuracy of the final model on the validation images
    best = [row["valid_acc"] for row in clf.history_ if row["valid_loss_best"]][-1]
    assert best == pytest.approx(clf.score(X[valid], Y[valid]))


def test_balanced_class_weight_is_the_positive_weight_of_each_label():
    X, Y = bright_channels(40, n_labels=3)
    Y[:, 2] = 0
    Y[:4, 2] = 1  # a rare label: 4 positives, 36 negatives
    clf = tiny(class_weight="balanced", max_epochs=1).fit(X, Y)
    n_pos = Y.sum(axis=0)
    expected = (len(Y) - n_pos) / n_pos
    np.testing.assert_allclose(clf.criterion_.pos_weight.numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(clf.class_weight_, expected, rtol=1e-6)
    # the loss weighs a missed positive by n_neg / n_pos: BCEWithLogitsLoss's definition
    logits = torch.zeros(2, 3)
    target = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    per_label = np.log(2) * (np.asarray(expected) + 1) / 2  # both rows, averaged
    assert float(clf.criterion_(logits, target)) == pytest.approx(per_label.mean(), rel=1e-5)
    # a label that is always (or never) present has no ratio: weight 1
    Y[:, 0] = 1
    assert tiny(class_weight="balanced", max_epochs=1).fit(X, Y).class_weight_[0] == 1.0
    # your own pos_weight, routed to the loss, takes precedence
    own = torch.tensor([1.0, 2.0, 3.0])
    clf = tiny(class_weight="balanced", max_epochs=1, criterion__pos_weight=own).fit(X, Y)
    assert torch.equal(clf.criterion_.pos_weight, own)


def test_clone_grid_search_sparse_y_and_persistence(tmp_path):
    X, Y = bright_channels(32)
    clf = tiny(max_epochs=2, train_split=None)
    search = GridSearchCV(clf, {"lr": [1e-2, 5e-2]}, cv=2).fit(X, Y)
    # the search scores with the estimator's own score: subset accuracy
    assert 0 <= search.best_score_ <= 1
    assert search.best_estimator_.predict(X).shape == (32, 3)
    assert not hasattr(clone(search.best_estimator_), "module_")
    # a sparse indicator matrix is the same Y
    dense = clone(clf).fit(X, Y)
    np.testing.assert_array_equal(clone(clf).fit(X, sp.csr_matrix(Y)).predict_proba(X),
                                  dense.predict_proba(X))
    dump(dense, tmp_path / "ml.zip")
    again = load(tmp_path / "ml.zip", backbone=make_tiny_backbone())
    np.testing.assert_array_equal(again.predict(X), dense.predict(X))
    np.testing.assert_array_equal(again.classes_, [0, 1, 2])


# ------------------------------------------------------------------- bad Y


def test_bad_multilabel_targets_are_refused_clearly():
    X, Y = bright_channels(16)
    # scikit-learn's type_of_target calls a {0, 2} matrix an indicator matrix too
    with pytest.raises(ValueError, match=r"0/1 indicator matrix, but it holds the values \[0, 2\]"):
        tiny(max_epochs=1).fit(X, Y * 2)
    with pytest.raises(ValueError, match=r"0/1 indicator matrix.*'multiclass-multioutput'"):
        tiny(max_epochs=1).fit(X, Y + Y[:, ::-1])  # 0, 1 and 2
    with pytest.raises(ValueError, match=r"indicator matrix.*'continuous-multioutput'"):
        tiny(max_epochs=1).fit(X, Y * 0.5)
    with pytest.raises(ValueError, match="class_weight=.*multi-label Y takes.*balanced"):
        tiny(max_epochs=1, class_weight={0: 2.0}).fit(X, Y)
    with pytest.raises(ValueError, match="labels of a multi-label Y are its 3 columns"):
        tiny(max_epochs=1, classes=[0, 1, 2]).fit(X, Y)
    clf = tiny(max_epochs=1, train_split=None).fit(X, Y)
    with pytest.raises(ValueError, match=r"multi-label Y of 3 columns; got y of shape \(16, 2\)"):
        clf.partial_fit(X, Y[:, :2])
    with pytest.raises(ValueError, match=r"multi-label Y of 3 columns; got y of shape \(16,\)"):
        clf.partial_fit(X, Y[:, 0])
    multiclass = tiny(max_epochs=1, train_split=None).fit(X, Y[:, 0])
    with pytest.raises(ValueError, match=r"fit on a 1-D y of class labels; got a multi-label"):
        multiclass.partial_fit(X, Y)


def test_a_one_column_y_is_a_binary_problem_as_in_scikit_learn():
    X, Y = bright_channels(16, n_labels=1)
    with pytest.warns(DataConversionWarning):
        clf = tiny(max_epochs=1, train_split=None).fit(X, Y)
    assert isinstance(clf.criterion_, nn.CrossEntropyLoss)
    np.testing.assert_array_equal(clf.classes_, [0, 1])
    assert clf.predict(X).shape == (16,) and clf.predict_proba(X).shape == (16, 2)


# ------------------------------------------------------------------ real data


def two_flower_labels(root, split: str, per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """``per_class`` images of each of the 12 species, with two labels derived from the
    species: "one of the first six" and "an even-numbered one" (4 combinations, 3 species
    each)."""
    X, y = load_image_folder(root / split)
    rng = np.random.RandomState(0)
    take = np.concatenate([rng.choice(np.flatnonzero(y == c), per_class, replace=False)
                           for c in np.unique(y)])
    species = np.searchsorted(np.unique(y), y[take])
    return X[take], np.stack([species < 6, species % 2 == 0], axis=1).astype(int)


@pytest.mark.data
@pytest.mark.weights
def test_real_flowers_made_multi_label_reach_a_subset_accuracy_far_above_chance():
    root = real_dataset("oxford_flowers17_subset12")
    X_train, Y_train = two_flower_labels(root, "train", 5)
    X_val, Y_val = two_flower_labels(root, "val", 4)
    # the head only, three epochs on 60 images: what the suite can afford
    clf = FineTunedClassifier(freeze_depth="all", max_epochs=3, lr=3e-2, batch_size=20,
                              train_split=None, random_state=0, verbose=0).fit(X_train, Y_train)
    pred = clf.predict(X_val)
    accuracy = clf.score(X_val, Y_val)
    print(f"flowers, two labels: val subset accuracy {accuracy:.3f}, hamming loss "
          f"{hamming_loss(Y_val, pred):.3f}")
    assert accuracy >= 0.55  # chance: 0.25 (four balanced label combinations); 0.73 measured
    assert hamming_loss(Y_val, pred) <= 0.25
    report = classification_report(Y_val, pred, output_dict=True, zero_division=0)
    assert report["macro avg"]["f1-score"] >= 0.7
