"""FineTunedClassifier with the default backbone and settings on cats_and_dogs_filtered.

Trains on the 2,000 ``train`` images (skorch's epoch table is printed),
evaluates on the 1,000 ``val`` images and prints the time and the accuracy
(target >= 0.985; fixed CNN codes + logistic regression reach about 0.99, so
fine-tuning must keep what the network knew).

    python benchmarks/finetune_cats_dogs.py
    SKLEARN_TRANSFER_DATA=/path/to/data python benchmarks/finetune_cats_dogs.py
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from sklearn_transfer import FineTunedClassifier, load_image_folder

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SKLEARN_TRANSFER_DATA", ROOT.parent / "shared" / "data"))


def main() -> None:
    root = DATA / "cats_and_dogs_filtered"
    if not root.is_dir():
        raise SystemExit(f"{root} not found: set SKLEARN_TRANSFER_DATA to the data folder")
    X_train, y_train = load_image_folder(root / "train")
    X_val, y_val = load_image_folder(root / "val")
    print(f"{len(X_train)} train / {len(X_val)} val images, torch threads "
          f"{torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f}", flush=True)
    clf = FineTunedClassifier(random_state=0)
    print(clf, flush=True)
    start = time.perf_counter()
    clf.fit(X_train, y_train)
    fit_time = time.perf_counter() - start
    start = time.perf_counter()
    accuracy = clf.score(X_val, y_val)
    predict_time = time.perf_counter() - start
    best = min(range(len(clf.history_)), key=lambda i: clf.history_[i, "valid_loss"])
    print(f"epochs run {len(clf.history_)}, best validation epoch {best + 1} (weights restored)")
    print(f"fit time {fit_time:.0f} s ({fit_time / len(clf.history_):.0f} s/epoch), "
          f"predict time {predict_time:.0f} s for {len(X_val)} images")
    print(f"val accuracy {accuracy:.4f} (target >= 0.985); load average now "
          f"{os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
