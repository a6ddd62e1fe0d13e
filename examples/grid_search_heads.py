"""
Grid search over heads on cached CNN codes
==========================================

A grid search over linear heads on CNN codes, each image's codes computed
once. A 5-fold ``GridSearchCV`` over 6 head settings fits the pipeline 31 times;
without a cache the CNN would run over every image 31 times. With
``CNNFeatureTransformer(memory=...)`` the first fold computes the codes and
stores them on disk, keyed by each image's content; every later fold, every
other candidate, and every later run of this script reads them back. The
grid also swaps the head step itself (``LinearSVC`` vs ``LogisticRegression``).

The images are scikit-learn's handwritten digits (8x8 scans shipped with
scikit-learn, no download), made into 32x32 RGB uint8 images.

Run::

    python examples/grid_search_heads.py      # run it twice: the second is much faster
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
from sklearn.svm import LinearSVC
from threadpoolctl import threadpool_limits

from sklearn_transfer import CNNFeatureTransformer, FeatureCache

digits = load_digits()
n = 200
images = np.stack([
    np.asarray(Image.fromarray(np.uint8(im * 255 / 16)).resize((32, 32), Image.BICUBIC)
               .convert("RGB"))
    for im in digits.images[:n]
])  # (200, 32, 32, 3) uint8
y = digits.target[:n]

# a persistent directory: a second run of this script finds the codes there
cache_dir = Path(tempfile.gettempdir()) / "sklearn_transfer_examples_cache"

pipe = Pipeline([
    ("codes", CNNFeatureTransformer("efficientnet_lite0", memory=cache_dir)),
    ("head", LinearSVC()),
])
param_grid = [
    {"head": [LinearSVC(random_state=0)], "head__C": [0.01, 0.1, 1.0]},
    {"head": [LogisticRegression(max_iter=3000)], "head__C": [0.1, 1.0, 10.0]},
]
search = GridSearchCV(pipe, param_grid, cv=5)

start = time.perf_counter()
# One BLAS thread for the head fits: they are tiny, and on a busy machine OpenBLAS's
# threads wait for each other far longer than the fits take (seen: 0.1 s -> 7 s a fit).
with threadpool_limits(limits=1, user_api="blas"):
    search.fit(images, y)
seconds = time.perf_counter() - start

print(f"5-fold search over 6 heads on {n} digits: {seconds:.0f} s")
for params, score in zip(search.cv_results_["params"], search.cv_results_["mean_test_score"],
                         strict=True):
    print(f"  {type(params['head']).__name__:18} C={params['head__C']:<5} accuracy {score:.3f}")
print(f"best: {type(search.best_params_['head']).__name__} C={search.best_params_['head__C']}, "
      f"cross-validated accuracy {search.best_score_:.3f}")
print(FeatureCache(cache_dir).info())  # one entry per image, though the pipeline was fit 31 times
print(f"(clear it with: FeatureCache({str(cache_dir)!r}).clear())")

labels = [f"{type(p['head']).__name__}\nC={p['head__C']}" for p in search.cv_results_["params"]]
fig, ax = plt.subplots(figsize=(9, 4))
ax.bar(labels, search.cv_results_["mean_test_score"], yerr=search.cv_results_["std_test_score"],
       capsize=3)
ax.set(ylabel="5-fold CV accuracy", ylim=(0.5, 1), title=f"heads on the codes of {n} digits")
ax.tick_params(axis="x", labelsize="small")
fig.tight_layout()
plt.show()
