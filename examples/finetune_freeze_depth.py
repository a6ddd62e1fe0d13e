"""
Fine-tuning: grid-search how deep to freeze a pretrained CNN
============================================================

Fine-tune a pretrained CNN and grid-search how deep to freeze it, offline, in
seconds. Runs anywhere, without a network or the project's data folder:

* the data are scikit-learn's handwritten digits (8x8 grey levels shipped
  with scikit-learn) upscaled to 16x16 RGB uint8 images;
* the "pretrained" network is a small CNN cut into three stages, first
  trained on the digits 4-9 (the source task), then fine-tuned on a few
  examples of the digits 0-3 (the target task) with a new head. That is
  transfer learning in miniature; with the real ImageNet backbone
  (``backbone="efficientnet_lite0"``, the default) the code is the same, only
  slower.

The plots show the fine-tuning's learning curves (skorch's ``history_``) and
the cross-validated accuracy of each frozen depth and learning rate. Run::

    python examples/finetune_freeze_depth.py
"""

from __future__ import annotations

import time

import matplotlib.pyplot as plt
import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import GridSearchCV, train_test_split
from torch import nn

from sklearn_transfer import Backbone, DataConfig, FineTunedClassifier

NAMES = np.array(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
                  "nine"])
# digits must not be flipped; small shifts and rotations are fine
AUGMENT = {"hflip": False, "scale": (0.7, 1.0), "rotation": 10}


def digits_as_images() -> tuple[np.ndarray, np.ndarray]:
    digits = load_digits()
    grey = (digits.images / 16.0 * 255).astype(np.uint8).repeat(2, axis=1).repeat(2, axis=2)
    return np.stack([grey] * 3, axis=-1), NAMES[digits.target]  # (n, 16, 16, 3) uint8


def small_cnn() -> Backbone:
    """Three stages, as real backbones are cut: stem, block, head."""
    torch.manual_seed(0)
    stages = [
        ("stem", nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())),
        ("block", nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32),
                                nn.ReLU())),
        ("head", nn.Sequential(nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64),
                               nn.ReLU())),
    ]
    return Backbone(stages, DataConfig(input_size=16, crop_pct=1.0), name="small-cnn")


def main() -> None:
    # A network this small gains nothing from several threads per operation
    # (synchronising them costs more than the work) and on a busy machine
    # loses a lot; real backbones keep torch's default.
    torch.set_num_threads(1)
    X, y = digits_as_images()
    source = np.isin(y, NAMES[4:])

    # 1. "pretraining" on the digits 4-9: everything trained (freeze_depth=0)
    start = time.perf_counter()
    pretrain = FineTunedClassifier(small_cnn(), freeze_depth=0, backbone_lr_mult=1.0, lr=1e-2,
                                   max_epochs=4, augment=AUGMENT, random_state=0, verbose=0)
    pretrain.fit(X[source], y[source])
    backbone = pretrain.module_.backbone  # its head is dropped; FineTunedClassifier copies it
    print(f"pretrained on {source.sum()} images of 4-9 in {time.perf_counter() - start:.0f} s, "
          f"validation accuracy {pretrain.history_[-1, 'valid_acc']:.3f}")

    # 2. the target task: 0-3, with only 120 training images
    X_train, X_test, y_train, y_test = train_test_split(
        X[~source], y[~source], train_size=120, stratify=y[~source], random_state=0)
    clf = FineTunedClassifier(backbone, freeze_depth=2, max_epochs=10, batch_size=16,
                              lr=1e-2, augment=AUGMENT, random_state=0)
    start = time.perf_counter()
    clf.fit(X_train, y_train)  # prints skorch's epoch table
    print(f"fine-tuned in {time.perf_counter() - start:.0f} s: test accuracy "
          f"{clf.score(X_test, y_test):.3f}, classes {clf.classes_.tolist()}")
    print("predictions:", clf.predict(X_test[:5]).tolist(), "truth:", y_test[:5].tolist())

    # 3. how deep to freeze, chosen by cross-validation. Every candidate and fold
    #    starts from the pretrained weights, never from a previous fold's.
    search = GridSearchCV(clf.set_params(verbose=0),
                          {"freeze_depth": [0, 1, 2, "all"], "lr": [3e-3, 3e-2]}, cv=3)
    start = time.perf_counter()
    search.fit(X_train, y_train)
    print(f"grid search (8 candidates x 3 folds) in {time.perf_counter() - start:.0f} s")
    results = search.cv_results_
    for params, score in zip(results["params"], results["mean_test_score"], strict=True):
        print(f"  freeze_depth={params['freeze_depth']!s:4} lr={params['lr']:<6} "
              f"cv accuracy {score:.3f}")
    print(f"best {search.best_params_}: test accuracy {search.score(X_test, y_test):.3f}")

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    epochs = clf.history_[:, "epoch"]
    left.plot(epochs, clf.history_[:, "train_loss"], marker="o", label="train loss")
    left.plot(epochs, clf.history_[:, "valid_loss"], marker="o", label="validation loss")
    left.set(xlabel="epoch", ylabel="loss", title="fine-tuning with freeze_depth=2")
    left.legend()
    depths = [str(depth) for depth in search.param_grid["freeze_depth"]]
    for offset, lr in zip((-0.2, 0.2), search.param_grid["lr"], strict=True):
        scores = [score for params, score in zip(results["params"], results["mean_test_score"],
                                                 strict=True) if params["lr"] == lr]
        right.bar(np.arange(len(depths)) + offset, scores, width=0.4, label=f"lr={lr}")
    right.set(xticks=range(len(depths)), xticklabels=depths, xlabel="freeze_depth",
              ylabel="CV accuracy", ylim=(0.5, 1), title="3-fold grid search")
    right.legend()
    fig.tight_layout()
    plt.show()


if __name__ == "__main__":
    main()
