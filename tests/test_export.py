"""export / load_exported: one OpenVINO network that needs only its runtime, NumPy and Pillow."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from sklearn.decomposition import PCA
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LogisticRegression, RidgeClassifier, SGDClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import Normalizer, StandardScaler
from sklearn.svm import LinearSVC

from sklearn_transfer import (
    CNNFeatureTransformer,
    FineTunedClassifier,
    export,
    load_exported,
    load_image_folder,
)
from sklearn_transfer.batches import ImageDataset
from sklearn_transfer.exported import _rgb_image, resize_center_crop
from sklearn_transfer.files import FormatError
from sklearn_transfer.preprocessing import DataConfig

from .conftest import colour_images, make_tiny_backbone, real_dataset, run_python, skip_without

skip_without("openvino", "an export is an OpenVINO network")

#: a fresh interpreter in which torch, scikit-learn, skorch (and what needs them) cannot load
BLOCKED = """
import importlib.abc, json, sys
BLOCKED = {"torch", "torchvision", "timm", "sklearn", "skorch", "scipy", "simplejpeg"}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked in this test")
sys.meta_path.insert(0, Block())
"""


@pytest.fixture(scope="module")
def hymenoptera():
    root = real_dataset("hymenoptera_data")
    X, y = load_image_folder(root / "train")
    X_val, _ = load_image_folder(root / "val")
    train = np.r_[np.flatnonzero(y == "ants")[:20], np.flatnonzero(y == "bees")[:20]]
    return X[train], y[train], X_val[::8][:20]


def test_the_pixels_are_the_estimators_on_real_images():
    # decoding (JPEG at a reduced scale), EXIF orientation and torch's uint8 resampling,
    # reproduced without torch: identical pixels, on photos and on CIFAR's upscaled 32x32s
    files = [str(p) for name in ("hymenoptera_data", "cifar10_subset")
             for p in sorted(real_dataset(name).rglob("*.*"))
             if p.suffix.lower() in (".jpg", ".jpeg", ".png")][::40][:30]
    for interpolation in ("bilinear", "bicubic"):
        config = DataConfig(224, interpolation, 0.875)
        dataset = ImageDataset(files, config)
        for i, path in enumerate(files):
            ours = resize_center_crop(_rgb_image(path, i, config.resize_size),
                                      config.resize_size, 224, interpolation)
            np.testing.assert_array_equal(ours, dataset[i][0].permute(2, 0, 1).numpy(), path)


def predict_without_the_training_stack(folder, paths) -> dict:
    """``load_exported(folder)``'s outputs on ``paths``, in a process without torch & co."""
    out = run_python(BLOCKED + f"""
from sklearn_transfer import load_exported
model = load_exported({str(folder)!r}, precision="float32")
proba = model.predict_proba({[str(p) for p in paths]!r})
labels = model.predict({[str(p) for p in paths]!r})
loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
print(json.dumps({{"proba": proba.tolist(), "labels": labels.tolist(), "loaded": loaded}}))
""")
    assert out["loaded"] == []
    return out


def test_codes_pipeline_runs_without_torch_sklearn_or_skorch(hymenoptera, tmp_path):
    X, y, X_val = hymenoptera
    clf = make_pipeline(CNNFeatureTransformer(precision="float32"), StandardScaler(),
                        LogisticRegression(max_iter=1000)).fit(X, y)
    folder = export(clf, tmp_path / "model")
    meta = json.loads((folder / "model.json").read_text())
    assert meta["classes"] == ["ants", "bees"] and meta["input_size"] == 224
    out = predict_without_the_training_stack(folder, X_val)
    assert np.abs(np.array(out["proba"]) - clf.predict_proba(X_val)).max() < 1e-4
    assert out["labels"] == clf.predict(X_val).tolist()


def test_fine_tuned_classifier_exports_its_whole_network(hymenoptera, tmp_path):
    X, y, X_val = hymenoptera
    clf = FineTunedClassifier(max_epochs=1, batch_size=8, precision="float32", tta=True,
                              train_split=None, random_state=0, verbose=0).fit(X, y)
    out = predict_without_the_training_stack(export(clf, tmp_path / "model"), X_val)
    assert np.abs(np.array(out["proba"]) - clf.predict_proba(X_val)).max() < 1e-4
    assert out["labels"] == clf.predict(X_val).tolist()


@pytest.mark.parametrize("steps", [
    [Normalizer(), LinearSVC()],  # binary: one decision score per image
    [StandardScaler(with_mean=False), RidgeClassifier()],
    [SGDClassifier(loss="modified_huber", random_state=0)],
    [SGDClassifier(loss="log_loss", random_state=0)],
    [LogisticRegression()],
])
def test_linear_heads_give_their_own_outputs(steps, tmp_path):
    images = colour_images(12, size=36)
    y = np.arange(12) % (2 if isinstance(steps[-1], LinearSVC) else 3)
    clf = make_pipeline(CNNFeatureTransformer(make_tiny_backbone(), precision="float32",
                                              engine="torch"), *steps).fit(images, y)
    model = load_exported(export(clf, tmp_path / "model"))
    method = "predict_proba" if hasattr(clf, "predict_proba") else "decision_function"
    np.testing.assert_allclose(getattr(model, method)(images), getattr(clf, method)(images),
                               atol=1e-5)
    assert (model.predict(list(images)) == clf.predict(images)).all()
    other = "decision_function" if method == "predict_proba" else "predict_proba"
    assert hasattr(model, method) and not hasattr(model, other)  # as the pipeline
    with pytest.raises(AttributeError, match=f"use {method}"):
        getattr(model, other)(images)


def test_what_export_refuses_names_the_step(tmp_path):
    images, y = colour_images(8, size=36), np.arange(8) % 2
    transformer = CNNFeatureTransformer(make_tiny_backbone(), engine="torch")
    with pytest.raises(NotFittedError):
        export(make_pipeline(transformer, LogisticRegression()), tmp_path / "a")
    with pytest.raises(TypeError, match="step 'pca' is a PCA"):
        export(make_pipeline(transformer, PCA(2), LogisticRegression()).fit(images, y),
               tmp_path / "b")
    with pytest.raises(TypeError, match="first step 'logisticregression'"):
        export(make_pipeline(LogisticRegression()).fit(images.reshape(8, -1), y),
               tmp_path / "c")
    with pytest.raises(TypeError, match="got LogisticRegression"):
        export(LogisticRegression(), tmp_path / "d")
    (tmp_path / "e").mkdir()
    with pytest.raises(FileExistsError, match="'.*e' exists"):
        export(make_pipeline(transformer, LogisticRegression()).fit(images, y), tmp_path / "e")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e"]  # nothing left half-written


def test_a_changed_or_foreign_folder_is_refused_and_bad_images_are_named(tmp_path):
    images, y = colour_images(8, size=36), np.arange(8) % 2
    clf = make_pipeline(CNNFeatureTransformer(make_tiny_backbone(), engine="torch"),
                        LogisticRegression()).fit(images, y)
    folder = export(clf, tmp_path / "model")
    model = load_exported(folder)
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"broken.jpg' \(index 1\) could not be read"):
        model.predict([images[0], str(tmp_path / "broken.jpg")])
    with pytest.raises(TypeError, match="image 0 is a list"):
        model.predict([[1, 2, 3]])
    Image.fromarray(images[0]).save(tmp_path / "ok.png")
    assert model.predict([str(tmp_path / "ok.png")])[0] == clf.predict(images[:1])[0]

    data = bytearray((folder / "model.bin").read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte flipped
    (folder / "model.bin").write_bytes(bytes(data))
    with pytest.raises(FormatError, match="model.bin' is missing or not the file exported"):
        load_exported(folder)
    meta = json.loads((folder / "model.json").read_text())
    meta["format"] = "sklearn_transfer.exported-model/99"
    (folder / "model.json").write_text(json.dumps(meta))
    with pytest.raises(FormatError, match="exported-model/99"):
        load_exported(folder)
