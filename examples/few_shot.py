"""
Few-shot classification: CNN codes + a nearest-centroid head
============================================================

With k labelled images per class (k-shot), there is nothing to fine-tune and
too little to cross-validate a linear head; the pretrained codes alone still
place images of one species close together. ``NearestCentroid`` on
L2-normalised codes (the mean code of each class, compared by cosine: the
"prototype" classifier of few-shot learning) and ``KNeighborsClassifier``
need no hyperparameter.

The codes of the train and val images are computed once; every draw of k
support images per class from ``train`` then costs a millisecond head fit,
scored on all of ``val``. Each k is drawn ``--draws`` times (seeds 0, 1, ...),
and the accuracies are reported as mean ± standard deviation over the draws.

The images are the 12-class Oxford flowers subset of the project's real
datasets (``../shared/data``, or ``$SKLEARN_TRANSFER_DATA``); without them the
example says so and stops. Run::

    python examples/few_shot.py --data ../shared/data/oxford_flowers17_subset12

(``--memory DIR`` keeps the codes in a feature cache, so a second run skips the CNN.)
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from sklearn.base import ClassifierMixin
from sklearn.neighbors import KNeighborsClassifier, NearestCentroid
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import Normalizer

from sklearn_transfer import CNNFeatureTransformer, load_image_folder

HEADS: dict[str, Callable[[], ClassifierMixin]] = {
    "NearestCentroid, L2-normalised codes": lambda: make_pipeline(Normalizer(),
                                                                  NearestCentroid()),
    "KNeighborsClassifier(1), L2-normalised codes": lambda: make_pipeline(
        Normalizer(), KNeighborsClassifier(n_neighbors=1)),
    "NearestCentroid, raw codes": NearestCentroid,
}


def k_shot_indices(y: np.ndarray, k: int, rng: np.random.RandomState) -> np.ndarray:
    """Indices of ``k`` images of every class of ``y``, drawn without replacement."""
    return np.concatenate([rng.choice(np.flatnonzero(y == c), k, replace=False)
                           for c in np.unique(y)])


def few_shot_accuracies(codes_train: np.ndarray, y_train: np.ndarray, codes_val: np.ndarray,
                        y_val: np.ndarray, make_head: Callable[[], ClassifierMixin], k: int,
                        draws: int) -> np.ndarray:
    """Val accuracy of ``make_head()`` fit on ``k`` codes per class, for seeds 0..draws-1."""
    scores = []
    for seed in range(draws):
        support = k_shot_indices(y_train, k, np.random.RandomState(seed))
        with warnings.catch_warnings():
            # 1-shot: NearestCentroid computes a within-class spread (used only by its
            # shrink_threshold, off here) from one image per class, and warns that it is zero
            warnings.simplefilter("ignore", (RuntimeWarning, UserWarning))
            head = make_head().fit(codes_train[support], y_train[support])
        scores.append(head.score(codes_val, y_val))
    return np.asarray(scores)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n")[0])
    data = Path(os.environ.get("SKLEARN_TRANSFER_DATA", "../shared/data"))
    parser.add_argument("--data", type=Path, default=data / "oxford_flowers17_subset12",
                        help="an ImageFolder dataset with train/ and val/")
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 5, 10])
    parser.add_argument("--draws", type=int, default=20, help="random support sets per k")
    parser.add_argument("--memory", default=None, help="a feature-cache directory")
    args = parser.parse_args()
    if not (args.data / "train").is_dir():
        print(f"skipped: no dataset at {args.data} (pass --data, or set SKLEARN_TRANSFER_DATA "
              "to the folder holding oxford_flowers17_subset12)")
        return

    X_train, y_train = load_image_folder(args.data / "train")
    X_val, y_val = load_image_folder(args.data / "val")
    n_classes = len(np.unique(y_train))

    start = time.perf_counter()
    codes = CNNFeatureTransformer(memory=args.memory).fit()
    codes_train, codes_val = codes.transform(X_train), codes.transform(X_val)
    seconds = time.perf_counter() - start
    print(f"{args.data.name}: {n_classes} classes, codes of {len(X_train)} train and "
          f"{len(X_val)} val images in {seconds:.0f} s ({codes.computation_.engine}, "
          f"{codes.computation_.precision})")
    print(f"val accuracy, mean ± std over {args.draws} draws of the support images "
          f"(chance {1 / n_classes:.3f}):\n")

    print("| head | " + " | ".join(f"{k}-shot" for k in args.shots)
          + f" | all {len(X_train)} train images |")
    print("|---" * (len(args.shots) + 2) + "|")
    start = time.perf_counter()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, make_head in HEADS.items():
        accs = [few_shot_accuracies(codes_train, y_train, codes_val, y_val, make_head, k,
                                    args.draws) for k in args.shots]
        full = make_head().fit(codes_train, y_train).score(codes_val, y_val)
        print(f"| {name} | " + " | ".join(f"{acc.mean():.3f} ± {acc.std():.3f}" for acc in accs)
              + f" | {full:.3f} |")
        line = ax.errorbar(args.shots, [acc.mean() for acc in accs],
                           yerr=[acc.std() for acc in accs], marker="o", capsize=3, label=name)
        ax.axhline(full, color=line.lines[0].get_color(), linestyle=":", linewidth=1)
    print(f"\n{len(HEADS) * len(args.shots) * args.draws} head fits in "
          f"{time.perf_counter() - start:.1f} s")
    ax.axhline(1 / n_classes, color="grey", linestyle="--", label="chance")
    ax.set(xlabel="labelled images per class (k)", ylabel="val accuracy",
           xticks=args.shots, title=f"{args.data.name}: mean ± std over {args.draws} draws\n"
                                   f"(dotted: all {len(X_train)} train images)")
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    plt.show()


if __name__ == "__main__":
    main()
