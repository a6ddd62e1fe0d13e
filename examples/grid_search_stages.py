"""
Grid search over the stage and the pooling of the codes
=======================================================

Which CNN codes to use: the stage and the pooling, searched with a cache.
Each (stage, pooling) pair is another computation, so the cache keeps its
codes apart; within one pair every image is still computed once for all
folds and head settings. Here: the last stage (the penultimate activations)
vs the stage before it, and average pooling vs average+max concatenated,
each with a LogisticRegression head of two strengths.

The images are scikit-learn's handwritten digits as 32x32 RGB uint8 images
(no download); the cache directory is shared with ``grid_search_heads.py``,
whose last-stage average-pooled codes are reused if it ran first.

Run::

    python examples/grid_search_stages.py
"""

import tempfile
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import Pipeline
from threadpoolctl import threadpool_limits

from sklearn_transfer import CNNFeatureTransformer, FeatureCache

digits = load_digits()
n = 150
images = np.stack([
    np.asarray(Image.fromarray(np.uint8(im * 255 / 16)).resize((32, 32), Image.BICUBIC)
               .convert("RGB"))
    for im in digits.images[:n]
])  # (150, 32, 32, 3) uint8
y = digits.target[:n]
cache_dir = Path(tempfile.gettempdir()) / "sklearn_transfer_examples_cache"

pipe = Pipeline([
    ("codes", CNNFeatureTransformer("efficientnet_lite0", memory=cache_dir)),
    ("head", LogisticRegression(max_iter=3000)),
])
param_grid = [
    # "blocks.6" is the stage before "head" in EfficientNet-Lite0 (320 channels at 7x7)
    {"codes__stage": [-1, "blocks.6"], "codes__pooling": ["avg"], "head__C": [0.1, 1.0]},
    {"codes__stage": [-1], "codes__pooling": ["catavgmax"], "head__C": [0.1, 1.0]},
]
search = GridSearchCV(pipe, param_grid, cv=5)

start = time.perf_counter()
# One BLAS thread for the head fits: they are tiny, and on a busy machine OpenBLAS's
# threads wait for each other far longer than the fits take (seen: 0.1 s -> 7 s a fit).
with threadpool_limits(limits=1, user_api="blas"):
    search.fit(images, y)
print(f"5-fold search over 3 kinds of codes x 2 heads on {n} digits: "
      f"{time.perf_counter() - start:.0f} s")
for params, score in zip(search.cv_results_["params"], search.cv_results_["mean_test_score"],
                         strict=True):
    print(f"  stage={params['codes__stage']!r:10} pooling={params['codes__pooling']:9} "
          f"C={params['head__C']:<4} accuracy {score:.3f}")
print(f"best: {search.best_params_}, cross-validated accuracy {search.best_score_:.3f}")
print(FeatureCache(cache_dir).info())

labels = [f"stage={p['codes__stage']!r}\n{p['codes__pooling']}, C={p['head__C']}"
          for p in search.cv_results_["params"]]
fig, ax = plt.subplots(figsize=(9, 4))
ax.bar(labels, search.cv_results_["mean_test_score"], yerr=search.cv_results_["std_test_score"],
       capsize=3)
ax.set(ylabel="5-fold CV accuracy", ylim=(0.5, 1), title=f"codes of {n} digits")
ax.tick_params(axis="x", labelsize="small")
fig.tight_layout()
plt.show()
