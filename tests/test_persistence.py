"""Fitted estimators saved and loaded without pickle (skops + safetensors)."""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import zipfile

import numpy as np
import pytest
import skops.io as sio
import torch
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import FunctionTransformer, Normalizer, StandardScaler
from sklearn.svm import LinearSVC

from sklearn_transfer import (
    Backbone,
    CNNFeatureTransformer,
    DataConfig,
    FineTunedClassifier,
    StrategySearchCV,
)
from sklearn_transfer.files import format_tag
from sklearn_transfer.identity import digest
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


def test_the_recipe_knobs_round_trip(tmp_path):
    X = colour_images(10, size=40, seed=1)
    knobs = dict(mixup={"mixup_alpha": 0.4, "cutmix_alpha": 1.0}, layer_decay=0.8,
                 warmup_epochs=1, ema=0.8, tta=True)
    clf = fitted_classifier(**knobs)
    dump(clf, tmp_path / "clf.zip")
    loaded = load(tmp_path / "clf.zip", backbone=make_tiny_backbone())
    assert {k: loaded.get_params()[k] for k in knobs} == knobs
    np.testing.assert_array_equal(loaded.predict_proba(X), clf.predict_proba(X))  # with TTA


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
    # (with the digests of its members, which anyone can compute)
    evil = sio.dumps({"class": "x", "obj": argparse.Namespace(cmd="rm -rf ~")})
    with zipfile.ZipFile(tmp_path / "evil.zip", "w") as zf:
        zf.writestr("estimator.skops", evil)
        zf.writestr("weights.safetensors", weights)
        zf.writestr("format.json", json.dumps({
            "format": format_tag("persistence"),
            "sha256": {"estimator.skops": digest(evil), "weights.safetensors": digest(weights)}}))
    with pytest.raises(ValueError, match=r"not trusted: \[.argparse.Namespace.\]"):
        load(tmp_path / "evil.zip")
    (tmp_path / "plain.pkl").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(ValueError, match="not a file written by"):
        load(tmp_path / "plain.pkl")


# ------------------------------------------------------------------ damaged and foreign files


def with_members(src, dst, replaced: dict, restamp: bool = True) -> None:
    """Copy the zip ``src`` to ``dst`` with the bytes of some members replaced.

    With ``restamp`` the digests in ``format.json`` are those of the new
    members, as a deliberate edit would leave them: what ``load`` checks
    beyond the digests is then what is tested.
    """
    with zipfile.ZipFile(src) as zin:
        members = {info.filename: zin.read(info) for info in zin.infolist()}
    members.update(replaced)
    if restamp and "format.json" not in replaced:
        meta = json.loads(members["format.json"])
        meta["sha256"] = {m: digest(members[m]) for m in meta["sha256"]}
        members["format.json"] = json.dumps(meta).encode()
    with zipfile.ZipFile(dst, "w") as zout:
        for name, data in members.items():
            zout.writestr(name, data)


def with_skeleton(src, dst, edit) -> None:
    """Copy the file ``src`` to ``dst``, ``edit`` changing its description in place."""
    with zipfile.ZipFile(src) as zf:
        data = zf.read("estimator.skops")
    skeleton = sio.loads(data, trusted=sio.get_untrusted_types(data=data))
    edit(skeleton)
    with_members(src, dst, {"estimator.skops": sio.dumps(skeleton)})


@pytest.fixture(scope="module")
def transformer_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tf") / "tf.zip"
    dump(CNNFeatureTransformer(make_tiny_backbone(), progress=False).fit(), path)
    return path


@pytest.fixture(scope="module")
def classifier_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("clf") / "clf.zip"
    dump(fitted_classifier(max_epochs=1), path)
    return path


def test_an_unknown_class_or_format_is_named(tmp_path, transformer_file):
    bad = tmp_path / "bad.zip"
    with_skeleton(transformer_file, bad, lambda s: s.update({"class": "CNNCodes"}))
    with pytest.raises(ValueError, match=r"bad.zip' holds a 'CNNCodes', a class this version .* "
                       r"\(it loads \['CNNFeatureTransformer', 'FineTunedClassifier'\]\)"):
        load(bad, backbone=make_tiny_backbone())
    with zipfile.ZipFile(transformer_file) as zf:
        meta = json.loads(zf.read("format.json"))
    with_members(transformer_file, bad, {"format.json": json.dumps(
        {**meta, "format": "sklearn_transfer.persistence/1"})})
    with pytest.raises(ValueError, match=r"bad.zip' has format 'sklearn_transfer.persistence/1', "
                       "which this version .* does not read"):
        load(bad, backbone=make_tiny_backbone())
    with_skeleton(transformer_file, bad, lambda s: s.pop("params"))
    with pytest.raises(ValueError, match=r"bad.zip' is damaged: it lacks \['params'\]"):
        load(bad, backbone=make_tiny_backbone())


def test_unknown_parameters_and_the_other_estimators_file_are_refused(
        tmp_path, transformer_file, classifier_file):
    bad = tmp_path / "bad.zip"
    with_skeleton(transformer_file, bad, lambda s: s["params"].update(resize=64))
    with pytest.raises(ValueError, match=r"bad.zip' holds parameters that CNNFeatureTransformer "
                       r"does not take: \['resize'\]"):
        load(bad, backbone=make_tiny_backbone())
    # a routed name is a parameter of a FineTunedClassifier, an unknown plain one is not
    with_skeleton(classifier_file, bad,
                  lambda s: s["params"].update(module__head_dropout=0.5, head_size=3))
    with pytest.raises(ValueError, match=r"does not take: \['head_size'\]"):
        load(bad, backbone=make_tiny_backbone())
    # relabelled as the other estimator: its parameters give it away, whichever way round
    with_skeleton(transformer_file, bad, lambda s: s.update({"class": "FineTunedClassifier"}))
    # (tta is a parameter of both)
    with pytest.raises(ValueError, match=r"FineTunedClassifier does not take: \["
                       r"'memory', 'num_workers', 'pooling', 'progress', 'relu', 'stage'\]"):
        load(bad, backbone=make_tiny_backbone())
    with_skeleton(classifier_file, bad, lambda s: s.update({"class": "CNNFeatureTransformer"}))
    with pytest.raises(ValueError, match=r"CNNFeatureTransformer does not take: \['augment', "):
        load(bad, backbone=make_tiny_backbone())


def test_missing_or_unknown_fitted_state_is_refused(tmp_path, classifier_file):
    bad = tmp_path / "bad.zip"
    with_skeleton(classifier_file, bad, lambda s: s["fitted"].pop("label_encoder_"))
    with pytest.raises(ValueError, match=r"bad.zip' does not hold the fitted state of a "
                       r"FineTunedClassifier: expected \['class_weight_', 'label_encoder_'\], "
                       r"found \['class_weight_'\]"):
        load(bad, backbone=make_tiny_backbone())
    # anything else would be set on the estimator, here overriding a parameter
    with_skeleton(classifier_file, bad, lambda s: s["fitted"].update(lr=1e9))
    with pytest.raises(ValueError, match=r"found \['class_weight_', 'label_encoder_', 'lr'\]"):
        load(bad, backbone=make_tiny_backbone())


def test_damaged_weights_or_description_are_named(tmp_path, transformer_file):
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(transformer_file) as zf:
        weights = zf.read("weights.safetensors")
    for damaged in (b"garbage", weights[: len(weights) // 2]):
        with_members(transformer_file, bad, {"weights.safetensors": damaged})
        with pytest.raises(ValueError, match=r"the weights in '.*bad.zip' \(weights.safetensors\) "
                           "are damaged or truncated"):
            load(bad, backbone=make_tiny_backbone())
    with_members(transformer_file, bad, {"estimator.skops": b"garbage"})
    with pytest.raises(ValueError, match="bad.zip': its estimator.skops member is damaged"):
        load(bad, backbone=make_tiny_backbone())
    # bytes overwritten in place, and a download cut short: the zip's checks catch them
    raw = bytearray(transformer_file.read_bytes())
    raw[len(raw) // 2: len(raw) // 2 + 32] = bytes(32)
    bad.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="bad.zip' is not a file written by .*, or it is damaged"):
        load(bad, backbone=make_tiny_backbone())
    bad.write_bytes(transformer_file.read_bytes()[:1000])
    with pytest.raises(ValueError, match="bad.zip' is not a file written by .*, or it is damaged"):
        load(bad, backbone=make_tiny_backbone())


def test_load_creates_no_cache_directory_before_transform(tmp_path):
    X = colour_images(4, size=40, seed=4)
    tf = CNNFeatureTransformer(make_tiny_backbone(), memory=tmp_path / "codes",
                               progress=False).fit()
    expected = tf.transform(X)
    dump(tf, tmp_path / "tf.zip")
    shutil.rmtree(tmp_path / "codes")  # as on another machine
    loaded = load(tmp_path / "tf.zip", backbone=make_tiny_backbone())
    assert loaded.memory == str(tmp_path / "codes") and not (tmp_path / "codes").exists()
    np.testing.assert_array_equal(loaded.transform(X), expected)
    assert (tmp_path / "codes" / "sklearn_transfer_codes.sqlite3").is_file()
    # a directory that cannot be made is reported where the cache is used
    (tmp_path / "plain").write_text("")
    with_skeleton(tmp_path / "tf.zip", tmp_path / "elsewhere.zip",
                  lambda s: s["params"].update(memory=str(tmp_path / "plain" / "codes")))
    loaded = load(tmp_path / "elsewhere.zip", backbone=make_tiny_backbone())
    with pytest.raises(PermissionError, match="plain/codes' is not writable"):
        loaded.transform(X)


def test_a_member_changed_or_taken_from_another_model_is_refused(tmp_path, transformer_file):
    """The members are tied together by the digests written with them (issue: tampering)."""
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(transformer_file) as zf:
        weights = bytearray(zf.read("weights.safetensors"))
    weights[-8:] = bytes(b ^ 0xFF for b in weights[-8:])  # a weight's bytes, CRC recomputed
    with_members(transformer_file, bad, {"weights.safetensors": bytes(weights)}, restamp=False)
    with pytest.raises(ValueError, match="bad.zip': its weights.safetensors member is not the one "
                       "written with this file"):
        load(bad, backbone=make_tiny_backbone())
    # the weights of another model of the same architecture
    other = tmp_path / "other.zip"
    dump(CNNFeatureTransformer(make_tiny_backbone(seed=9), progress=False).fit(), other)
    with zipfile.ZipFile(other) as zf:
        foreign = zf.read("weights.safetensors")
    with_members(transformer_file, bad, {"weights.safetensors": foreign}, restamp=False)
    with pytest.raises(ValueError, match="its weights.safetensors member is not the one"):
        load(bad, backbone=make_tiny_backbone())
    # the format member removed, damaged, or naming an unknown version
    with zipfile.ZipFile(transformer_file) as zin, zipfile.ZipFile(bad, "w") as zout:
        for info in zin.infolist():
            if info.filename != "format.json":
                zout.writestr(info.filename, zin.read(info))
    with pytest.raises(ValueError, match="bad.zip' is not a file written by .*format.json"):
        load(bad, backbone=make_tiny_backbone())
    with_members(transformer_file, bad, {"format.json": b"{not json"})
    with pytest.raises(ValueError, match="bad.zip': its format.json member is damaged"):
        load(bad, backbone=make_tiny_backbone())
    with zipfile.ZipFile(transformer_file) as zf:
        meta = json.loads(zf.read("format.json"))
    with_members(transformer_file, bad, {"format.json": json.dumps(
        {**meta, "format": "sklearn_transfer.persistence/99"})})
    with pytest.raises(ValueError, match="has format 'sklearn_transfer.persistence/99'"):
        load(bad, backbone=make_tiny_backbone())


def test_an_unfitted_estimator_or_another_architecture_is_named(tmp_path, classifier_file):
    for estimator in (FineTunedClassifier(make_tiny_backbone()),
                      CNNFeatureTransformer(make_tiny_backbone())):
        with pytest.raises(NotFittedError, match=f"the {type(estimator).__name__} is not "
                           r"fitted: call fit\(\) before dump"):
            dump(estimator, tmp_path / "unfitted.zip")
    other = Backbone([("a", torch.nn.Conv2d(3, 4, 3))], DataConfig(input_size=32))
    with pytest.raises(ValueError, match="clf.zip' do not fit the backbone"):
        load(classifier_file, backbone=other)
    dump(fitted_classifier(freeze_depth=2, max_epochs=1), tmp_path / "deep.zip")
    with pytest.raises(ValueError, match=r"deep.zip' does not fit the backbone passed "
                       r"\(Backbone\(name='custom', stages=\['a'\]\)\), which is not the "
                       "architecture it was saved from: freeze_depth=2"):
        load(tmp_path / "deep.zip", backbone=other)


# ------------------------------------------------------------------ pipelines


class MyScaler(StandardScaler):
    """A user's step class: code that load() must not import unasked."""


def fitted_pipeline(*steps, seed: int = 0) -> Pipeline:
    X, y = colour_images(12, size=40, seed=seed), np.array(["red", "green"] * 6)
    tf = CNNFeatureTransformer(make_tiny_backbone(), stage=[1, 2], progress=False)
    return make_pipeline(tf, *steps).fit(X, y)


def test_a_codes_pipeline_round_trips(tmp_path):
    X = colour_images(8, size=40, seed=3)
    for head in (LogisticRegression(C=0.5), LinearSVC()):
        model = fitted_pipeline(StandardScaler(), Normalizer(), head)
        dump(model, tmp_path / "model.zip")
        with zipfile.ZipFile(tmp_path / "model.zip") as zf:  # no pickle inside
            assert sorted(zf.namelist()) == ["estimator.skops", "format.json",
                                             "pipeline.skops", "weights.safetensors"]
            assert json.loads(zf.read("format.json"))["class"] == "Pipeline"
        loaded = load(tmp_path / "model.zip", backbone=make_tiny_backbone(seed=4))
        assert isinstance(loaded, Pipeline) and list(loaded.named_steps) == list(
            model.named_steps)
        assert loaded.get_params()[f"{type(head).__name__.lower()}__C"] == head.C
        np.testing.assert_array_equal(loaded.decision_function(X), model.decision_function(X))
        np.testing.assert_array_equal(loaded.predict(X), model.predict(X))
        assert loaded.classes_.tolist() == ["green", "red"]
    # the model a strategy search keeps
    search = StrategySearchCV({"codes": fitted_pipeline(LogisticRegression())}, cv=2).fit(
        colour_images(12, size=40), np.array(["red", "green"] * 6))
    dump(search.best_estimator_, tmp_path / "best.zip")
    loaded = load(tmp_path / "best.zip", backbone=make_tiny_backbone())
    np.testing.assert_array_equal(loaded.predict_proba(X), search.predict_proba(X))
    with pytest.raises(TypeError, match="not the StrategySearchCV that chose it: dump its "
                       "best_estimator_"):
        dump(search, tmp_path / "search.zip")


def test_a_pipeline_step_that_is_not_scikit_learns_is_refused_by_name(tmp_path):
    X = colour_images(6, size=40, seed=5)
    model = fitted_pipeline(MyScaler(), LogisticRegression())
    dump(model, tmp_path / "model.zip")
    with pytest.raises(ValueError, match=r"model.zip' holds types that are not trusted: "
                       r"\['tests.test_persistence.MyScaler'\]"):
        load(tmp_path / "model.zip", backbone=make_tiny_backbone())
    loaded = load(tmp_path / "model.zip", backbone=make_tiny_backbone(),
                  trusted=["tests.test_persistence.MyScaler"])
    np.testing.assert_array_equal(loaded.predict_proba(X), model.predict_proba(X))
    # a function among the steps' parameters is a type too (skops names it)
    dump(fitted_pipeline(FunctionTransformer(copy.copy),
                         LogisticRegression()), tmp_path / "func.zip")
    with pytest.raises(ValueError, match=r"not trusted: \[.copy.copy.\]"):
        load(tmp_path / "func.zip", backbone=make_tiny_backbone())


def test_pipelines_dump_refuses_are_named(tmp_path):
    tf = CNNFeatureTransformer(make_tiny_backbone(), progress=False)
    X, y = colour_images(6, size=40), [0, 1] * 3
    with pytest.raises(TypeError, match="first step is a CNNFeatureTransformer; its first "
                       "step 'standardscaler' is a StandardScaler"):
        dump(make_pipeline(StandardScaler(), LogisticRegression()).fit(np.eye(6), y),
             tmp_path / "m.zip")
    with pytest.raises(TypeError, match="one network, its first step; step "
                       "'cnnfeaturetransformer-2' is a CNNFeatureTransformer too"):
        dump(make_pipeline(tf, CNNFeatureTransformer(make_tiny_backbone())), tmp_path / "m.zip")
    with pytest.raises(NotFittedError, match=r"the Pipeline is not fitted: call fit\(\)"):
        dump(make_pipeline(tf, LogisticRegression()), tmp_path / "m.zip")
    with pytest.raises(FileNotFoundError, match="cannot write '.*nowhere/m.zip': its folder "
                       "does not exist"):
        dump(make_pipeline(tf, LogisticRegression()).fit(X, y), tmp_path / "nowhere" / "m.zip")
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_a_pipelines_members_are_tied_and_checked(tmp_path):
    model_file, other_file = tmp_path / "model.zip", tmp_path / "other.zip"
    dump(fitted_pipeline(LogisticRegression()), model_file)
    dump(fitted_pipeline(LogisticRegression(), seed=1), other_file)
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(other_file) as zf:
        foreign = zf.read("pipeline.skops")
    # the head of another model of the same shape: the digests refuse it
    with_members(model_file, bad, {"pipeline.skops": foreign}, restamp=False)
    with pytest.raises(ValueError, match="bad.zip': its pipeline.skops member is not the one "
                       "written with this file"):
        load(bad, backbone=make_tiny_backbone())
    # a deliberate edit, digests recomputed: what load checks beyond the digests
    whole = make_pipeline(StandardScaler(), LogisticRegression()).fit(np.eye(4), [0, 1] * 2)
    with_members(model_file, bad, {"pipeline.skops": sio.dumps(whole)})
    with pytest.raises(ValueError, match="bad.zip' is damaged: its pipeline.skops member is not "
                       "a pipeline whose first step is left for the network"):
        load(bad, backbone=make_tiny_backbone())
    narrow = make_pipeline("passthrough", LogisticRegression()).fit(np.eye(4), [0, 1] * 2)
    with_members(model_file, bad, {"pipeline.skops": sio.dumps(narrow)})
    with pytest.raises(ValueError, match="bad.zip' is damaged: step 'logisticregression' was "
                       "fitted on 4 features, the network gives 40"):
        load(bad, backbone=make_tiny_backbone())
    with zipfile.ZipFile(model_file) as zin, zipfile.ZipFile(bad, "w") as zout:
        for info in zin.infolist():
            if info.filename != "pipeline.skops":
                zout.writestr(info.filename, zin.read(info))
    with pytest.raises(ValueError, match="bad.zip' is not a file written by .*pipeline.skops"):
        load(bad, backbone=make_tiny_backbone())


def test_a_missing_file_or_a_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="model file '.*absent.zip' does not exist"):
        load(tmp_path / "absent.zip")
    with pytest.raises(ValueError, match=f"'{tmp_path}' is a folder, not a file written by"):
        load(tmp_path)
