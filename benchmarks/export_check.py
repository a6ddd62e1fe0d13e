"""An exported model against its estimator, side by side in one run, on real images.

Fits the default codes pipeline (``CNNFeatureTransformer`` + ``LogisticRegression``)
and a ``FineTunedClassifier`` (a short fine-tuning) on hymenoptera's training
images, exports both, and predicts the validation images with each
estimator and with its export (``load_exported``: OpenVINO, NumPy and Pillow
only). Prints, per model and precision, the largest probability difference,
the predictions that differ, the accuracy and the images/s end to end (from
the JPEG files), the estimator and its export alternating over ``--rounds``
rounds so that a change in the machine's load hits both alike.

    python benchmarks/export_check.py
    python benchmarks/export_check.py --out benchmarks/results/export.md
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from machine import describe
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline

from sklearn_transfer import (
    CNNFeatureTransformer,
    FineTunedClassifier,
    export,
    load_exported,
    load_image_folder,
)

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SKLEARN_TRANSFER_DATA", ROOT.parent / "shared" / "data"))


def rate(predict, X, rounds: int) -> float:
    """Median images/s of ``predict(X)`` over ``rounds`` calls."""
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        predict(X)
        times.append(time.perf_counter() - start)
    return len(X) / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3, help="of the fine-tuning")
    parser.add_argument("--out", type=Path, help="also write the table (Markdown) here")
    args = parser.parse_args()
    root = DATA / "hymenoptera_data"
    X, y = load_image_folder(root / "train")
    X_val, y_val = load_image_folder(root / "val")
    machine = describe()
    rows = ["| model | precision | max abs Δ proba | predictions differing | accuracy "
            "(estimator / export) | estimator img/s | export img/s | ratio |",
            "|---|---|---|---|---|---|---|---|"]
    for precision in ("float32", "auto"):
        models = {
            "codes + LogisticRegression": make_pipeline(
                CNNFeatureTransformer(precision=precision, progress=False),
                LogisticRegression(max_iter=2000)),
            f"FineTunedClassifier ({args.epochs} epochs)": FineTunedClassifier(
                max_epochs=args.epochs, precision=precision, random_state=0, verbose=0),
        }
        for name, estimator in models.items():
            estimator.fit(X, y)
            with tempfile.TemporaryDirectory() as tmp:
                exported = load_exported(export(estimator, Path(tmp) / "model"))
                p_est, p_exp = estimator.predict_proba(X_val), exported.predict_proba(X_val)
                est_rate, exp_rate = [], []
                for _ in range(args.rounds):  # alternating: the same load for both
                    est_rate.append(rate(estimator.predict, X_val, 1))
                    exp_rate.append(rate(exported.predict, X_val, 1))
            a_est, a_exp = statistics.median(est_rate), statistics.median(exp_rate)
            acc = [np.mean(estimator.classes_[p.argmax(1)] == y_val) for p in (p_est, p_exp)]
            differ = int((p_est.argmax(1) != p_exp.argmax(1)).sum())
            rows.append(f"| {name} | {exported.precision} | {np.abs(p_est - p_exp).max():.2e} "
                        f"| {differ} of {len(X_val)} | {acc[0]:.3f} / {acc[1]:.3f} "
                        f"| {a_est:.0f} | {a_exp:.0f} | {a_exp / a_est:.2f} |")
            print(rows[-1], flush=True)
    text = "\n".join([
        f"Command: `{shlex.join(['python', 'benchmarks/export_check.py', *sys.argv[1:]])}`", "",
        f"hymenoptera: fit on {len(X)} training images, predicted {len(X_val)} validation "
        f"images; median of {args.rounds} alternating rounds; {machine}", "", *rows, ""])
    print("\n" + text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
