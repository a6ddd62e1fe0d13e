"""Fitted estimators saved and loaded without pickle (skops + safetensors)."""

from __future__ import annotations

import argparse
import zipfile

import numpy as np
import pytest
import skops.io as sio
import torch

from sklearn_transfer import CNNFeatureTransformer, FineTunedClassifier
from sklearn_transfer.persistence import dump, load

from .conftest import colour_images, make_tiny_backbone


class MyAdamW(torch.optim.AdamW):
    """A user's optimizer class: code that load() must not import unasked."""


def fitted_classifier(**params) -> FineTunedClassifier:
    X = colour_images(16, size=40)
    y = np.array(["red", "green"] * 8)
    defaults = dict(freeze_depth=1, max_epochs=2, batch_size=8, random_state=0, verbose=0,
                    class_weight="balanced", module__head_hidden=6)
    return FineTunedClassifier(make_tiny_backbone(), **{**defaults, **params}).fit(X, y)


def test_fine_tuned_classifier_round_trip(tmp_path):
    X = colour_images(10, size=40, seed=1)
    clf = fitted_classifier()
    dump(clf, tmp_path / "clf.zip")
    with zipfile.ZipFile(tmp_path / "clf.zip") as zf:  # no pickle inside
        assert sorted(zf.namelist()) == ["estimator.skops", "format.json",
                                         "weights.safetensors"]
    # the architecture comes from the caller (other random weights: the file's replace them)
    loaded = load(tmp_path / "clf.zip", backbone=make_tiny_backbone(seed=5))
    np.testing.assert_array_equal(loaded.predict_proba(X), clf.predict_proba(X))
    np.testing.assert_array_equal(loaded.predict(X), clf.predict(X))
    assert loaded.classes_.tolist() == ["green", "red"]
    np.testing.assert_array_equal(loaded.class_weight_, clf.class_weight_)
    assert loaded.get_params()["module__head_hidden"] == 6 and loaded.weights == "pretrained"
    with pytest.raises(ValueError, match="pass backbone="):
        load(tmp_path / "clf.zip")
    with pytest.raises(ValueError, match="do not fit the backbone"):
        load(tmp_path / "clf.zip", backbone=torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3)))


def test_feature_transformer_round_trip(tmp_path):
    X = colour_images(6, size=40, seed=2)
    tf = CNNFeatureTransformer(make_tiny_backbone(), stage=[0, -1], pooling="catavgmax",
                               progress=False).fit()
    dump(tf, tmp_path / "tf.zip")
    loaded = load(tmp_path / "tf.zip", backbone=make_tiny_backbone(seed=3))
    np.testing.assert_array_equal(loaded.transform(X), tf.transform(X))
    assert loaded.stages_ == tf.stages_ and loaded.n_features_out_ == tf.n_features_out_


def test_a_file_holding_an_untrusted_type_is_refused(tmp_path):
    clf = fitted_classifier(optimizer=MyAdamW)
    dump(clf, tmp_path / "clf.zip")
    with pytest.raises(ValueError, match=r"not trusted: \['tests.test_persistence.MyAdamW'\]"):
        load(tmp_path / "clf.zip", backbone=make_tiny_backbone())
    # trusted explicitly by the user, it loads
    loaded = load(tmp_path / "clf.zip", backbone=make_tiny_backbone(),
                  trusted=["tests.test_persistence.MyAdamW"])
    assert loaded.optimizer is MyAdamW
    # a tampered file carrying some other object is refused before anything is built
    with zipfile.ZipFile(tmp_path / "clf.zip") as zf:
        weights = zf.read("weights.safetensors")
    with zipfile.ZipFile(tmp_path / "evil.zip", "w") as zf:
        evil = {"format": "x", "obj": argparse.Namespace(cmd="rm -rf ~")}
        zf.writestr("estimator.skops", sio.dumps(evil))
        zf.writestr("weights.safetensors", weights)
    with pytest.raises(ValueError, match=r"not trusted: \[.argparse.Namespace.\]"):
        load(tmp_path / "evil.zip")
    (tmp_path / "plain.pkl").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(ValueError, match="not a file written by"):
        load(tmp_path / "plain.pkl")
