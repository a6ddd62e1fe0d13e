"""Accuracy of the default engine and precision, and of int8, against exact float32.

Codes + logistic regression (C chosen by 3-fold CV on ``train``, scored on
``val``) on every dataset in the data folder, with the exact torch path
(``engine="torch", precision="float32"``), with the defaults
(``engine="auto", precision="auto"``) and with ``precision="int8"``
(calibrated on each set's own training images); then ``FineTunedClassifier``
with ``engine="torch"`` and with its defaults (the frozen stages through
OpenVINO), same seed, precision and epochs, on hymenoptera and cats/dogs.
cifar10_subset is capped at its first 200 train and 200 val images of each
class (the exact path runs at a few dozen images/s). Writes a Markdown table and JSON::

    python benchmarks/precision_accuracy.py --out benchmarks/results/precision
    python benchmarks/precision_accuracy.py --skip-finetune     # codes only
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from machine import describe
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
    # int8 is calibrated on the training images, as a user would
    tf = CNNFeatureTransformer(memory=memory, progress=False, **params).fit(X_train)
    start = time.perf_counter()
    train, val = tf.transform(X_train), tf.transform(X_val)
    seconds = time.perf_counter() - start
    search = GridSearchCV(LogisticRegression(max_iter=3000), {"C": [0.1, 1.0, 10.0]},
                          cv=StratifiedKFold(3, shuffle=True, random_state=0)).fit(train, y_train)
    return {"ran": f"{tf.computation_.engine} {tf.computation_.precision}",
            "accuracy": float(search.score(val, y_val)), "C": search.best_params_["C"],
            "seconds": seconds}


def finetune_accuracy(X_train, y_train, X_val, y_val, **params) -> dict:
    clf = FineTunedClassifier(random_state=0, **params)
    start = time.perf_counter()
    clf.fit(X_train, y_train)
    seconds = time.perf_counter() - start
    return {"ran": f"{clf.engine_} {clf._runtime().precision}",
            "accuracy": float(clf.score(X_val, y_val)), "seconds": seconds,
            "epochs": len(clf.history_)}


CODES = {"float32": EXACT, "default": {}, "int8": {"precision": "int8"}}
FINETUNING = {"engine='torch'": {"engine": "torch"}, "default": {}}


def table(rows: list[dict]) -> str:
    lines = ["| dataset | strategy | variant | ran in | val accuracy | difference to the "
             "first (points) | seconds |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        first = next(iter(r["variants"].values()))["accuracy"]
        for variant, v in r["variants"].items():
            lines.append(f"| {r['dataset']} (train {r['n_train']}, val {r['n_val']}) | "
                         f"{r['strategy']} | {variant} | {v['ran']} | {v['accuracy']:.4f} | "
                         f"{100 * (v['accuracy'] - first):+.2f} | {v['seconds']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--out", help="folder for results.md and results.json")
    parser.add_argument("--skip-finetune", action="store_true")
    parser.add_argument("--skip-codes", action="store_true")
    args = parser.parse_args()
    root = Path(args.data)
    names = sorted(p.name for p in root.iterdir()
                   if (p / "train").is_dir() and (p / "val").is_dir())
    if not names:
        raise SystemExit(f"no NAME/train, NAME/val folders in {root}")
    print(f"{describe()}; datasets {names}")
    runs = ([] if args.skip_codes else [(n, "codes + LogisticRegression", CODES)
                                        for n in names])
    runs += [] if args.skip_finetune else [(n, "FineTunedClassifier", FINETUNING)
                                           for n in FINETUNE]
    rows = []
    with tempfile.TemporaryDirectory() as memory:
        for name, strategy, variants in runs:
            data = (*split(root, name, "train"), *split(root, name, "val"))
            measure = codes_accuracy if variants is CODES else finetune_accuracy
            extra = (memory,) if variants is CODES else ()
            rows.append({"dataset": name, "n_train": len(data[1]), "n_val": len(data[3]),
                         "strategy": strategy,
                         "variants": {k: measure(*data, *extra, **params)
                                      for k, params in variants.items()}})
            print(rows[-1], flush=True)
    text = table(rows)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        command = "python benchmarks/precision_accuracy.py --out " + args.out
        (out / "results.md").write_text(f"Command: `{command}`\n\n{text}\n")
        (out / "results.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
