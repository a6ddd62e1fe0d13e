"""CNN codes + a linear head on a real labelled image set that ships with scikit-learn.

scikit-learn's handwritten digits (8x8 grayscale scans) are far from
ImageNet, which makes them a fair test of "fixed features + linear head":
the pretrained EfficientNet-Lite0 has never seen a digit. No network and no
dataset download are needed.

Run::

    python examples/digits_pipeline.py
"""

import time

from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline

from sklearn_transfer import CNNFeatureTransformer

digits = load_digits()
images = digits.images[:600] / 16.0  # (n, 8, 8) floats in [0, 1]: grayscale images
X_train, X_test, y_train, y_test = train_test_split(
    images, digits.target[:600], test_size=0.5, stratify=digits.target[:600], random_state=0
)

for stage in (-1, "blocks.4"):  # the penultimate codes, then a mid-level stage
    start = time.perf_counter()
    clf = make_pipeline(
        CNNFeatureTransformer("efficientnet_lite0", stage=stage),
        LogisticRegression(max_iter=3000),
    )
    clf.fit(X_train, y_train)
    accuracy = clf.score(X_test, y_test)
    print(f"stage={stage!r:11}: accuracy {accuracy:.3f} on {len(X_test)} held-out digits "
          f"({time.perf_counter() - start:.0f} s)")
