"""
Look at the mistakes, find the wrong labels
===========================================

A fitted classifier's accuracy says how often it is wrong, not on what.
:class:`~sklearn_transfer.ErrorAnalysis` shows it: the confusion matrix
(scikit-learn's ``ConfusionMatrixDisplay``), the most confused class pairs and
the images of highest loss, with their file names.

The same analysis on *out-of-fold* probabilities of the training images
ranks them by how unlikely their own label is (what
:func:`~sklearn_transfer.label_issues` returns): mislabelled images come
first. Eight training labels are flipped on purpose here, to see them found.

The images are hymenoptera (ants and bees, the PyTorch transfer-learning
tutorial's data), read from ``$SKLEARN_TRANSFER_DATA/hymenoptera_data``
(default: ``../shared/data``, from the checkout's folder); without it, the example
says so and runs on scikit-learn's digits instead. The figures go to a new
temporary folder, whose path is printed. Run::

    python examples/plot_error_analysis.py
"""

# %%
# The images
# ----------
import os
import tempfile
from pathlib import Path

import matplotlib
import numpy as np
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_predict, train_test_split
from sklearn.pipeline import make_pipeline

from sklearn_transfer import CNNFeatureTransformer, ErrorAnalysis, load_image_folder

matplotlib.use("Agg")  # files only: the example also runs without a display

DATA = Path(os.environ.get("SKLEARN_TRANSFER_DATA", "../shared/data"))
ROOT = DATA / "hymenoptera_data"
if ROOT.is_dir():
    X_train, y_train = load_image_folder(ROOT / "train")
    X_val, y_val = load_image_folder(ROOT / "val")
else:
    print(f"hymenoptera_data not found in {DATA} (set SKLEARN_TRANSFER_DATA to the folder "
          "holding it); running on scikit-learn's digits instead")
    digits = load_digits()
    X_train, X_val, y_train, y_val = train_test_split(
        digits.images[:400] / 16.0, digits.target[:400], test_size=0.5, random_state=0,
        stratify=digits.target[:400])



def name(X, index):
    """The file name of image ``index`` of ``X``, or its index when it is an array."""
    return Path(X[index]).name if isinstance(X[index], str) else f"image {index}"


out = Path(tempfile.mkdtemp(prefix="sklearn_transfer_error_analysis_"))
print(f"{len(X_train)} training and {len(X_val)} validation images; figures in {out}")

# %%
# What the fitted classifier gets wrong
# -------------------------------------
# The default codes pipeline, with a feature cache: the cross-validation
# below reuses every image's codes instead of running the network again.
clf = make_pipeline(CNNFeatureTransformer(memory=out / "codes"),
                    LogisticRegression(max_iter=2000))
clf.fit(X_train, y_train)
analysis = ErrorAnalysis.from_estimator(clf, X_val, y_val)
print(analysis)

display = analysis.plot_confusion_matrix()
display.ax_.set_title("Validation images")
display.figure_.savefig(out / "confusion_matrix.png", dpi=100)

pairs = analysis.most_confused(5)
for label, predicted, count in zip(pairs["label"], pairs["predicted"], pairs["count"],
                                   strict=True):
    print(f"{count:3d} x {label} predicted as {predicted}")

# %%
# The table behind the grid: ``pandas.DataFrame(top)`` takes it as it is.
top = analysis.top_losses(12)
for index, label, predicted, p in zip(top["index"], top["label"], top["predicted"],
                                      top["p_predicted"], strict=True):
    print(f"{name(X_val, index):32} {label!s:>6} -> {predicted!s:6} ({p:.2f})")
fig = analysis.plot_top_losses(12)
fig.suptitle("Validation images of highest loss")
fig.savefig(out / "top_losses.png", dpi=100)

# %%
# Which training labels look wrong
# --------------------------------
# Flip 8 labels, then rank the training images by the out-of-fold probability
# of their (possibly wrong) label. ``label_issues(clf, X_train, noisy, cv=3)``
# returns this ranking in one call; the probabilities are kept here to plot it.
classes = np.unique(y_train)
flipped = np.random.RandomState(0).choice(len(y_train), 8, replace=False)
noisy = y_train.copy()
noisy[flipped] = classes[(np.searchsorted(classes, y_train[flipped]) + 1) % len(classes)]

proba = cross_val_predict(clf, X_train, noisy, cv=3, method="predict_proba")
suspects = ErrorAnalysis.from_predictions(noisy, proba, X=X_train)
issues = suspects.top_losses(20)
found = np.isin(issues["index"], flipped)
print(f"{found.sum()} of the 8 flipped labels are among the 20 most suspect")
for rank, (index, label, p, is_flipped) in enumerate(
        zip(issues["index"], issues["label"], issues["p_label"], found, strict=True), 1):
    print(f"{rank:2d}. {name(X_train, index):32} labelled {label!s:6} p={p:.3f}"
          f"{'  (flipped)' if is_flipped else ''}")
fig = suspects.plot_top_losses(12)
fig.suptitle("Training images whose label is least likely (out-of-fold)")
fig.savefig(out / "label_issues.png", dpi=100)
print(f"figures: {sorted(p.name for p in out.glob('*.png'))} in {out}")
