"""Grid searches on a real Dask cluster through joblib's "dask" backend, as on one machine."""

from __future__ import annotations

import os

import joblib
import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import Pipeline

from sklearn_transfer import CNNFeatureTransformer, FeatureCache, FineTunedClassifier
from tests.conftest import colour_images, make_tiny_backbone

pytest.importorskip("distributed")




def labelled_pngs(folder, n: int = 24):
    folder.mkdir()
    paths = []
    for i, arr in enumerate(colour_images(n, size=32)):
        paths.append(str(folder / f"img{i:02d}.png"))
        Image.fromarray(arr).save(paths[-1])
    # the red channel decides the class: something a linear head on codes can learn
    y = np.array([int(arr[..., 0].mean() > 127) for arr in colour_images(n, size=32)])
    return np.array(paths), y


def scores(search: GridSearchCV) -> tuple[list, np.ndarray]:
    return ([sorted(p.items()) for p in map(str_values, search.cv_results_["params"])],
            search.cv_results_["mean_test_score"])


def str_values(params: dict) -> dict:
    return {k: repr(v) for k, v in params.items()}


def test_a_cached_pipeline_search_on_dask_matches_the_local_one(dask_client, tmp_path,
                                                                one_torch_thread):
    X, y = labelled_pngs(tmp_path / "images")
    assert dask_client.run(torch.get_num_threads) == dict.fromkeys(dask_client.run(os.getpid), 1)

    def search(cache) -> GridSearchCV:
        pipe = Pipeline([
            ("codes", CNNFeatureTransformer(make_tiny_backbone(), engine="torch", batch_size=8,
                                            progress=False, memory=cache)),
            ("head", LogisticRegression(max_iter=500)),
        ])
        grid = {"codes__stage": [-1, [1, 2]], "head__C": [0.1, 10.0]}
        # log-loss: a continuous score, equal only if every probability is
        return GridSearchCV(pipe, grid, cv=StratifiedKFold(3), scoring="neg_log_loss")

    local = search(None).fit(X, y)
    cache = FeatureCache(tmp_path / "cache")  # on the workers' machine: this one
    with joblib.parallel_backend("dask"):
        on_dask = search(cache).fit(X, y)
    assert scores(on_dask)[0] == scores(local)[0]
    np.testing.assert_array_equal(scores(on_dask)[1], scores(local)[1])
    # the workers filled the cache: one entry per image and stage choice
    assert cache.info().entries == 2 * len(X)
    # and a second search on the cluster reads it back, with the same results
    with joblib.parallel_backend("dask"):
        again = search(cache).fit(X, y)
    np.testing.assert_array_equal(scores(again)[1], scores(local)[1])
    assert cache.info().entries == 2 * len(X)
    np.testing.assert_array_equal(on_dask.predict(X), local.predict(X))


def test_a_fine_tuning_search_on_dask_matches_the_local_one(dask_client, one_torch_thread):
    X = colour_images(24, size=32, seed=1)
    y = np.array(["red" if arr[..., 0].mean() > 127 else "other" for arr in X])

    def search() -> GridSearchCV:
        clf = FineTunedClassifier(make_tiny_backbone(), max_epochs=2, batch_size=8, lr=1e-2,
                                  verbose=0, random_state=0, train_split=None)
        return GridSearchCV(clf, {"freeze_depth": [0, 2], "lr": [1e-2, 3e-2]},
                            cv=StratifiedKFold(2), scoring="neg_log_loss")

    local = search().fit(X, y)
    with joblib.parallel_backend("dask"):
        on_dask = search().fit(X, y)
    assert scores(on_dask)[0] == scores(local)[0]
    np.testing.assert_array_equal(scores(on_dask)[1], scores(local)[1])
    np.testing.assert_array_equal(on_dask.predict_proba(X), local.predict_proba(X))
