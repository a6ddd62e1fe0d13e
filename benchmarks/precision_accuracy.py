"""Accuracy of the default engine and precision against exact float32, on the real datasets.

Codes + logistic regression (C chosen by 3-fold CV on ``train``, scored on
``val``) on every dataset in the data folder, with the exact torch path
(``engine="torch", precision="float32"``) and with the defaults
(``engine="auto", precision="auto"``); then ``FineTunedClassifier`` with its
defaults and with ``precision="float32"`` (same seed and epochs) on
hymenoptera and cats/dogs. cifar10_subset is capped at its first 200 train
and 200 val images of each class (the exact path runs at a few dozen
images/s here). Writes a Markdown table and JSON::

    python benchmarks/precision_accuracy.py --out benchmarks/results/precision
    python benchmarks/precision_accuracy.py --skip-finetune     # codes only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold

from sklearn_transfer import CNNFeatureTransformer, FineTunedClassifier, load_image_folder

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SKLEARN_TRANSFER_DATA", ROOT.parent / "shared" / "data"))
CAP = {"cifar10_subset": 200}  # images per class, in train and in val
FINETUNE = ("hymenoptera_data", "cats_and_dogs_filtered")
EXACT = {"engine": "torch", "precision": "float32"}


def split(root: Path, name: str, part: str) -> tuple[np.ndarray, np.ndarray]:
    X, y = load_image_folder(root / name / part)
    if name in CAP:
        take = np.concatenate([np.flatnonzero(y == c)[: CAP[name]] for c in np.unique(y)])
        X, y = X[take], y[take]
    return X, y


def codes_accuracy(X_train, y_train, X_val, y_val, memory: str, **params) -> dict:
    tf = CNNFeatureTransformer(memory=memory, progress=False, **params).fit()
    start = time.perf_counter()
    train, val = tf.transform(X_train), tf.transform(X_val)
    seconds = time.perf_counter() - start
    search = GridSearchCV(LogisticRegression(max_iter=3000), {"C": [0.1, 1.0, 10.0]},
                          cv=StratifiedKFold(3, shuffle=True, random_state=0)).fit(train, y_train)
    return {"engine": tf.computation_.engine, "precision": tf.computation_.precision,
            "accuracy": float(search.score(val, y_val)), "C": search.best_params_["C"],
            "codes_seconds": seconds}


def finetune_accuracy(X_train, y_train, X_val, y_val, **params) -> dict:
    clf = FineTunedClassifier(random_state=0, **params)
    start = time.perf_counter()
    clf.fit(X_train, y_train)
    seconds = time.perf_counter() - start
    return {"precision": clf._runtime().precision, "accuracy": float(clf.score(X_val, y_val)),
            "fit_seconds": seconds, "epochs": len(clf.history_)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--out", help="folder for results.md and results.json")
    parser.add_argument("--skip-finetune", action="store_true")
    args = parser.parse_args()
    root = Path(args.data)
    names = sorted(p.name for p in root.iterdir()
                   if (p / "train").is_dir() and (p / "val").is_dir())
    if not names:
        raise SystemExit(f"no NAME/train, NAME/val folders in {root}")
    print(f"{platform.machine()}, {torch.get_num_threads()} torch threads, load average "
          f"{os.getloadavg()[0]:.2f}; datasets {names}")
    rows = []
    with tempfile.TemporaryDirectory() as memory:
        for name in names:
            data = (*split(root, name, "train"), *split(root, name, "val"))
            exact = codes_accuracy(*data, memory, **EXACT)
            default = codes_accuracy(*data, memory)
            rows.append({"dataset": name, "n_train": len(data[1]), "n_val": len(data[3]),
                         "strategy": "codes + LogisticRegression", "float32": exact,
                         "default": default})
            print(rows[-1], flush=True)
    if not args.skip_finetune:
        for name in FINETUNE:
            data = (*split(root, name, "train"), *split(root, name, "val"))
            exact = finetune_accuracy(*data, precision="float32")
            default = finetune_accuracy(*data)
            rows.append({"dataset": name, "n_train": len(data[1]), "n_val": len(data[3]),
                         "strategy": "FineTunedClassifier", "float32": exact,
                         "default": default})
            print(rows[-1], flush=True)
    lines = ["| dataset | strategy | float32 | default | default is | difference (points) "
             "| time float32 / default |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        f, d = r["float32"], r["default"]
        key = "codes_seconds" if "codes_seconds" in f else "fit_seconds"
        what = f"{d.get('engine', 'torch')} {d['precision']}"
        lines.append(f"| {r['dataset']} (train {r['n_train']}, val {r['n_val']}) | "
                     f"{r['strategy']} | {f['accuracy']:.4f} | {d['accuracy']:.4f} | {what} | "
                     f"{100 * (d['accuracy'] - f['accuracy']):+.2f} | "
                     f"{f[key]:.0f} s / {d[key]:.0f} s |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        command = "python benchmarks/precision_accuracy.py --out " + args.out
        (out / "results.md").write_text(f"Command: `{command}`\n\n{table}\n")
        (out / "results.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
