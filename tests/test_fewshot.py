"""Few-shot: CNN codes + NearestCentroid / KNeighborsClassifier from k real images per class."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.neighbors import KNeighborsClassifier, NearestCentroid
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import Normalizer

from sklearn_transfer import CNNFeatureTransformer, load_image_folder

from .conftest import real_dataset


def per_class(y: np.ndarray, k: int, rng: np.random.RandomState) -> np.ndarray:
    return np.concatenate([rng.choice(np.flatnonzero(y == c), k, replace=False)
                           for c in np.unique(y)])


@pytest.mark.data
@pytest.mark.weights
def test_k_shot_flowers_from_codes_is_far_above_chance():
    root = real_dataset("oxford_flowers17_subset12")
    X_train, y_train = load_image_folder(root / "train")
    X_val, y_val = load_image_folder(root / "val")
    # codes of only what the draws use: a pool of 10 train images per class, and all of val
    pool = per_class(y_train, 10, np.random.RandomState(0))
    codes = CNNFeatureTransformer(progress=False).fit()
    codes_pool, y_pool = codes.transform(X_train[pool]), y_train[pool]
    codes_val = codes.transform(X_val)
    assert len(np.unique(y_val)) == 12 and len(y_val) == 240

    heads = {"centroid": lambda: make_pipeline(Normalizer(), NearestCentroid()),
             "1-nn": lambda: make_pipeline(Normalizer(), KNeighborsClassifier(n_neighbors=1))}
    mean = {}
    for name, make_head in heads.items():
        for k in (1, 5, 10):
            scores = []
            for seed in range(5):  # (the 10-shot support is the whole pool every time)
                support = per_class(y_pool, k, np.random.RandomState(seed))
                with warnings.catch_warnings():
                    # NearestCentroid warns that one image per class has no spread
                    warnings.simplefilter("ignore", (RuntimeWarning, UserWarning))
                    head = make_head().fit(codes_pool[support], y_pool[support])
                assert list(head.classes_) == sorted(set(y_train))
                scores.append(head.score(codes_val, y_val))
            mean[name, k] = float(np.mean(scores))
    print({f"{name} {k}-shot": round(acc, 3) for (name, k), acc in mean.items()})
    # measured over 20 draws of the whole train set (examples/few_shot.py): 5-shot centroid
    # 0.89 ± 0.03, 1-shot 0.70 ± 0.04
    assert mean["centroid", 5] >= 0.75  # chance is 1/12 = 0.083
    assert mean["1-nn", 5] >= 0.7
    for name in heads:
        assert mean[name, 1] >= 0.45
        assert mean[name, 1] < mean[name, 5] <= mean[name, 10] + 0.02  # more shots help
    # one image per class: the centroid is that image, so both heads predict alike
    assert mean["centroid", 1] == pytest.approx(mean["1-nn", 1])
