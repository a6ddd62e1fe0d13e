"""
CNN codes + a linear head on scikit-learn's digits
==================================================

scikit-learn's handwritten digits (8x8 grayscale scans) are far from
ImageNet, which makes them a fair test of "fixed features + linear head":
the pretrained EfficientNet-Lite0 has never seen a digit. No network and no
dataset download are needed.

The penultimate codes (``stage=-1``) are compared with the codes of a
mid-level stage (``stage="blocks.4"``), which are less specific to ImageNet's
classes; the confusion matrices show which digits each one mixes up.

Run::

    python examples/digits_pipeline.py
"""

import time

import matplotlib.pyplot as plt
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import ConfusionMatrixDisplay
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline

from sklearn_transfer import CNNFeatureTransformer

digits = load_digits()
images = digits.images[:600] / 16.0  # (n, 8, 8) floats in [0, 1]: grayscale images
X_train, X_test, y_train, y_test = train_test_split(
    images, digits.target[:600], test_size=0.5, stratify=digits.target[:600], random_state=0
)

fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
for stage, ax in zip((-1, "blocks.4"), axes, strict=True):  # penultimate, then mid-level
    start = time.perf_counter()
    clf = make_pipeline(
        CNNFeatureTransformer("efficientnet_lite0", stage=stage),
        LogisticRegression(max_iter=3000),
    )
    clf.fit(X_train, y_train)
    predicted = clf.predict(X_test)
    accuracy = (predicted == y_test).mean()
    print(f"stage={stage!r:11}: accuracy {accuracy:.3f} on {len(X_test)} held-out digits "
          f"({time.perf_counter() - start:.0f} s)")
    ConfusionMatrixDisplay.from_predictions(y_test, predicted, ax=ax, colorbar=False)
    ax.set_title(f"stage={stage!r}: accuracy {accuracy:.3f}")
fig.tight_layout()
plt.show()
