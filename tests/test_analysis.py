"""Error analysis: confusion matrix, most-confused pairs, top losses, label issues."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from PIL import Image
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import ConfusionMatrixDisplay, confusion_matrix, log_loss
from sklearn.model_selection import cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.svm import LinearSVC

from sklearn_transfer import (
    CNNFeatureTransformer,
    ErrorAnalysis,
    FineTunedClassifier,
    StrategySearchCV,
    label_issues,
    load_image_folder,
)

from .conftest import colour_images, make_tiny_backbone, real_dataset

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 (after choosing the backend)

#: three classes; rows are the probabilities of (ant, bee, wasp)
Y3 = np.array(["ant", "ant", "bee", "bee", "bee", "wasp", "wasp"])
P3 = np.array([[.9, .05, .05], [.3, .6, .1], [.2, .7, .1], [.5, .4, .1], [.6, .2, .2],
               [.1, .8, .1], [.2, .2, .6]])


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


# ------------------------------------------------------------------------ tables


def test_top_losses_rank_by_the_probability_of_the_label():
    analysis = ErrorAnalysis.from_predictions(Y3, P3)
    table = analysis.top_losses()
    p_label = P3[np.arange(7), [0, 0, 1, 1, 1, 2, 2]]
    np.testing.assert_array_equal(table["index"], np.argsort(p_label, kind="stable"))
    assert list(table) == ["index", "label", "predicted", "p_label", "p_predicted", "loss"]
    assert table["index"][:3].tolist() == [5, 4, 1]  # p = 0.1, 0.2, 0.3
    assert table["label"][:3].tolist() == ["wasp", "bee", "ant"]
    assert table["predicted"][:3].tolist() == ["bee", "ant", "bee"]
    np.testing.assert_allclose(table["p_predicted"][:3], [.8, .6, .6])
    # the loss of each image is its log loss
    for i, loss in zip(table["index"], table["loss"], strict=True):
        assert loss == pytest.approx(log_loss([Y3[i]], [P3[i]], labels=["ant", "bee", "wasp"]))
    assert [len(v) for v in analysis.top_losses(2).values()] == [2] * 6
    np.testing.assert_array_equal(analysis.y_pred, ["ant", "bee", "bee", "ant", "ant", "bee",
                                                    "wasp"])
    assert repr(analysis) == "ErrorAnalysis(n_samples=7, classes=['ant', 'bee', 'wasp'], " \
                             "n_errors=4)"


def test_most_confused_pairs_are_the_off_diagonal_of_the_confusion_matrix():
    analysis = ErrorAnalysis.from_predictions(Y3, P3)
    pairs = analysis.most_confused()
    assert list(zip(pairs["label"], pairs["predicted"], pairs["count"], strict=True)) == [
        ("bee", "ant", 2), ("ant", "bee", 1), ("wasp", "bee", 1)]
    matrix = confusion_matrix(Y3, analysis.y_pred, labels=["ant", "bee", "wasp"])
    assert pairs["count"].sum() == matrix.sum() - np.trace(matrix)
    assert analysis.most_confused(1)["count"].tolist() == [2]
    perfect = ErrorAnalysis.from_predictions(["a", "b"], [[1, 0], [0, 1]]).most_confused()
    assert [len(v) for v in perfect.values()] == [0, 0, 0]


def test_tables_are_what_pandas_takes_as_they_are(image_files):
    pd = pytest.importorskip("pandas")
    y = ["red", "green"] * 4
    proba = np.linspace(0.05, 0.95, 8)[:, None] * [1, -1] + [0, 1]
    analysis = ErrorAnalysis.from_predictions(y, proba, X=image_files)
    frame = pd.DataFrame(analysis.top_losses(3))
    assert frame.shape == (3, 7)
    assert frame["path"].tolist() == [os.fspath(image_files[i]) for i in frame["index"]]
    assert pd.DataFrame(analysis.most_confused()).columns.tolist() == ["label", "predicted",
                                                                       "count"]


def test_the_path_column_holds_paths_and_urls_only():
    y, proba = ["a", "b", "a"], [[.2, .8], [.3, .7], [.6, .4]]
    mixed = [Path("x/1.jpg"), np.zeros((4, 4, 3), np.uint8), "s3://bucket/3.png"]
    table = ErrorAnalysis.from_predictions(y, proba, X=mixed).top_losses()
    assert dict(zip(table["index"], table["path"], strict=True)) == {
        0: "x/1.jpg", 1: None, 2: "s3://bucket/3.png"}
    array = np.zeros((3, 4, 4, 3), np.uint8)
    assert "path" not in ErrorAnalysis.from_predictions(y, proba, X=array).top_losses()
    assert "path" not in ErrorAnalysis.from_predictions(y, proba).top_losses()


# ----------------------------------------------------- the library's three classifiers


def tiny_codes_pipeline():
    return make_pipeline(CNNFeatureTransformer(make_tiny_backbone(), engine="torch",
                                               progress=False), LogisticRegression())


def tiny_fine_tuned():
    return FineTunedClassifier(make_tiny_backbone(), freeze_depth=1, max_epochs=2,
                               batch_size=8, verbose=0, random_state=0)


def tiny_search():
    return StrategySearchCV({"codes": tiny_codes_pipeline()}, cv=2)


@pytest.mark.parametrize("make", [tiny_codes_pipeline, tiny_fine_tuned, tiny_search],
                         ids=["pipeline", "FineTunedClassifier", "StrategySearchCV"])
def test_from_estimator_analyses_the_estimators_own_probabilities(make):
    X, y = colour_images(16, size=32), np.array(["red", "green"] * 8)
    estimator = make().fit(X[:12], y[:12])
    analysis = ErrorAnalysis.from_estimator(estimator, X[12:], y[12:])
    np.testing.assert_array_equal(analysis.classes, estimator.classes_)
    np.testing.assert_allclose(analysis.y_proba, estimator.predict_proba(X[12:]), rtol=1e-6)
    np.testing.assert_array_equal(analysis.y_pred, estimator.predict(X[12:]))
    with pytest.raises(NotFittedError):
        ErrorAnalysis.from_estimator(make(), X, y)


def test_label_issues_is_the_top_losses_of_out_of_fold_probabilities():
    X, y = colour_images(24, size=32), np.array(["red", "green"] * 12)
    noisy = y.copy()
    noisy[[3, 10]] = ["red", "green"]  # a green image labelled red, a red one green
    pipe = tiny_codes_pipeline()
    issues = label_issues(pipe, X, noisy, cv=3)
    assert sorted(issues["index"][:2].tolist()) == [3, 10]
    assert issues["label"][issues["index"] == 3] == ["red"]
    proba = cross_val_predict(pipe, X, noisy, cv=3, method="predict_proba")
    expected = ErrorAnalysis.from_predictions(noisy, proba).top_losses()
    for column in expected:
        np.testing.assert_array_equal(issues[column], expected[column])


# ------------------------------------------------------------------------- plots


def test_top_losses_grid_titles_name_the_files(image_files):
    y = np.array(["red", "green"] * 4)
    p_green = np.array([.3, .05, .4, .6, .2, .7, .1, .8])
    proba = np.column_stack([p_green, 1 - p_green])  # the columns of classes green, red
    fig = ErrorAnalysis.from_predictions(y, proba, X=image_files).plot_top_losses(5)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert len(titles) == 5 and len(fig.axes) == 6  # a 2 x 3 grid, the last cell empty
    names = {p.name for p in image_files}
    assert all(t.split("\n")[0] in names for t in titles)
    assert titles[0] == f"{image_files[1].name}\nlabel: green (0.05)\npredicted: red (0.95)"


def test_confusion_matrix_is_scikit_learns_display():
    display = ErrorAnalysis.from_predictions(Y3, P3).plot_confusion_matrix(normalize="true")
    assert isinstance(display, ConfusionMatrixDisplay)
    expected = confusion_matrix(Y3, ["ant", "bee", "bee", "ant", "ant", "bee", "wasp"],
                                normalize="true")
    np.testing.assert_allclose(display.confusion_matrix, expected)
    assert [t.get_text() for t in display.ax_.get_xticklabels()] == ["ant", "bee", "wasp"]


# ------------------------------------------------------------------------ errors


def test_bad_input_is_named():
    X, y = colour_images(6, size=16), np.array(["red", "green"] * 3)
    fitted = make_pipeline(tiny_codes_pipeline()[0], LogisticRegression()).fit(X, y)
    with pytest.raises(ValueError, match="inconsistent numbers of images: X has 6, y has 5"):
        ErrorAnalysis.from_estimator(fitted, X, y[:5])
    with pytest.raises(ValueError, match="y_true has 6, y_proba has 4"):
        ErrorAnalysis.from_predictions(y, np.full((4, 2), .5))
    with pytest.raises(ValueError, match=r"y_proba must be \(n_samples, n_classes\) = \(n, 2\)"):
        ErrorAnalysis.from_predictions(y, np.full((6, 3), .3))
    with pytest.raises(ValueError, match="the label of image 2, 'blue', is not one of the "
                                         r"classes \['green', 'red'\]"):
        ErrorAnalysis.from_estimator(fitted, X, ["red", "green", "blue", "red", "green", "red"])
    with pytest.raises(TypeError, match=r"Pipeline \(last step LinearSVC\) has no predict_proba"):
        label_issues(make_pipeline(tiny_codes_pipeline()[0], LinearSVC()), X, y, cv=2)
    with pytest.raises(ValueError, match="y_proba holds NaN or infinite values in row 1"):
        ErrorAnalysis.from_predictions(["a", "b"], [[.5, .5], [np.nan, .5]])
    with pytest.raises(ValueError, match="k must be a positive integer"):
        ErrorAnalysis.from_predictions(Y3, P3).top_losses(0)
    with pytest.raises(ValueError, match="ncols must be a positive integer"):
        ErrorAnalysis.from_predictions(Y3, P3, X=colour_images(7)).plot_top_losses(ncols=0)
    with pytest.raises(ValueError, match="plot_top_losses needs the images"):
        ErrorAnalysis.from_predictions(Y3, P3).plot_top_losses()


def test_multi_label_targets_are_refused_with_what_to_do():
    X = colour_images(6, size=16)
    Y = np.array([[1, 0], [0, 1], [1, 1]] * 2)
    with pytest.raises(ValueError, match="multi-label indicator matrix of shape \\(6, 2\\).*"
                                         "binary problem"):
        label_issues(tiny_codes_pipeline(), X, Y, cv=2)


# ------------------------------------------------------------- real data: hymenoptera

#: training images whose label the tests flip (drawn once with RandomState(0))
FLIPPED = np.random.RandomState(0).choice(245, 8, replace=False)


@pytest.fixture(scope="module")
def codes_cache(tmp_path_factory) -> Path:
    """One feature cache for the module: each image's codes are computed once."""
    return tmp_path_factory.mktemp("codes")


def default_pipeline(cache: Path):
    return make_pipeline(CNNFeatureTransformer(memory=cache), LogisticRegression(max_iter=2000))


@pytest.mark.data
@pytest.mark.weights
def test_hymenoptera_flipped_labels_rank_near_the_top(codes_cache):
    X, y = load_image_folder(real_dataset("hymenoptera_data") / "train")
    assert len(X) == 245  # with the placeholder GIF, as torchvision's ImageFolder counts
    noisy = y.copy()
    noisy[FLIPPED] = np.where(y[FLIPPED] == "ants", "bees", "ants")
    issues = label_issues(default_pipeline(codes_cache), X, noisy, cv=3)
    rank = {int(i): r + 1 for r, i in enumerate(issues["index"])}
    ranks = sorted(rank[int(i)] for i in FLIPPED)
    gif = int(np.flatnonzero([p.endswith("imageNotFound.gif") for p in X])[0])
    print(f"flipped labels' ranks: {ranks}; in the top 20: {sum(r <= 20 for r in ranks)}/8; "
          f"placeholder GIF: rank {rank[gif]}")
    assert sum(r <= 20 for r in ranks) >= 6
    assert set(issues["path"][:20]) <= set(X)


@pytest.mark.data
@pytest.mark.weights
def test_hymenoptera_plots_render_with_real_file_names(codes_cache, tmp_path):
    root = real_dataset("hymenoptera_data")
    X_train, y_train = load_image_folder(root / "train")
    X_val, y_val = load_image_folder(root / "val")
    clf = default_pipeline(codes_cache).fit(X_train, y_train)
    analysis = ErrorAnalysis.from_estimator(clf, X_val, y_val)

    display = analysis.plot_confusion_matrix()
    assert display.confusion_matrix.sum() == len(X_val)
    display.figure_.savefig(tmp_path / "confusion.png")
    fig = analysis.plot_top_losses(12)
    fig.savefig(tmp_path / "top_losses.png")
    sizes = {}
    for name, min_pixels in [("confusion.png", (400, 300)), ("top_losses.png", (600, 600))]:
        with Image.open(tmp_path / name) as png:
            assert png.size >= min_pixels and png.convert("L").getextrema() != (255, 255)
            sizes[name] = (png.size, (tmp_path / name).stat().st_size)
    print(f"PNGs (pixels, bytes): {sizes}")
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert len(titles) == 12
    for title, path in zip(titles, analysis.top_losses(12)["path"], strict=True):
        assert title.split("\n")[0] == Path(path).name and os.path.isfile(path)
