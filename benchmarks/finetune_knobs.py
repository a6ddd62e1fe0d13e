"""Does a fine-tuning knob help? 3-fold CV on hymenoptera ``train``, or once on ``val``.

Every configuration is ``FineTunedClassifier(random_state=0)`` with its
defaults plus the knobs named; the folds are the same for all
(``StratifiedKFold(3, shuffle=True, random_state=0)``). Each fitted model is
scored twice, without and with ``tta`` (a prediction-time knob: the same
weights), by accuracy and log loss on the held-out fold.

With ``--val DATASET ...`` each configuration is instead fitted once on the
whole ``train`` of each dataset and scored on its ``val``: what the knob did
at a fixed seed, reported after the choice of defaults (which used CV only).

    python benchmarks/finetune_knobs.py                       # default, mixup=0.2, ema=0.9
    python benchmarks/finetune_knobs.py --configs default mixup=0.2 \\
        --json benchmarks/results/finetune_knobs.json
    python benchmarks/finetune_knobs.py --val hymenoptera_data oxford_flowers17_subset12 \\
        --configs default criterion__label_smoothing=0.1 mixup=0.2 layer_decay=0.75 \\
        warmup_epochs=1 ema=0.9 --json benchmarks/results/finetune_knobs_val.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
from machine import describe
from sklearn.metrics import accuracy_score, log_loss
from sklearn.model_selection import StratifiedKFold

from sklearn_transfer import FineTunedClassifier, load_image_folder

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SKLEARN_TRANSFER_DATA", ROOT.parent / "shared" / "data"))


def parse_config(text: str) -> dict:
    """``"default"`` or ``"name=value,name=value"`` (values as JSON, else strings)."""
    if text == "default":
        return {}
    params = {}
    for item in text.split(","):
        name, value = item.split("=", 1)
        try:
            params[name] = json.loads(value)
        except json.JSONDecodeError:
            params[name] = value
    return params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["default", "mixup=0.2", "ema=0.9"])
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--val", nargs="+", metavar="DATASET",
                        help="fit on each DATASET/train and score on its val instead of CV")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    args.machine = describe()
    print(args.machine, flush=True)
    if args.val:
        return on_val(args)

    X, y = load_image_folder(DATA / "hymenoptera_data" / "train")
    X, y = np.asarray(X, dtype=object), np.asarray(y)
    folds = list(StratifiedKFold(args.folds, shuffle=True, random_state=0).split(X, y))
    rows = []
    for config in args.configs:
        params = parse_config(config)
        for fold, (train, test) in enumerate(folds):
            start = time.perf_counter()
            clf = FineTunedClassifier(random_state=0, verbose=0, **params)
            clf.fit(list(X[train]), y[train])
            seconds = time.perf_counter() - start
            for tta in (False, True):
                proba = clf.set_params(tta=tta).predict_proba(list(X[test]))
                pred = clf.classes_[proba.argmax(1)]
                row = {"config": config, "fold": fold, "tta": tta,
                       "accuracy": float(accuracy_score(y[test], pred)),
                       "log_loss": float(log_loss(y[test], proba, labels=clf.classes_)),
                       "epochs": len(clf.history_), "fit_seconds": round(seconds, 1)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(f"\n{'config':<24} {'tta':<5} {'accuracy (folds)':<28} {'mean':>6} {'log loss':>9}")
    for config in args.configs:
        for tta in (False, True):
            sel = [r for r in rows if r["config"] == config and r["tta"] == tta]
            accs = [r["accuracy"] for r in sel]
            print(f"{config:<24} {tta!s:<5} {' '.join(f'{a:.3f}' for a in accs):<28} "
                  f"{np.mean(accs):6.3f} {np.mean([r['log_loss'] for r in sel]):9.3f}")
    if args.json:
        args.json.write_text(json.dumps(
            {"folds": args.folds, "n_images": len(y), "machine": args.machine,
             "load_average_end": os.getloadavg(), "rows": rows}, indent=1) + "\n")


def on_val(args: argparse.Namespace) -> None:
    rows = []
    for name in args.val:
        X, y = load_image_folder(DATA / name / "train")
        X_val, y_val = load_image_folder(DATA / name / "val")
        for config in args.configs:
            start = time.perf_counter()
            clf = FineTunedClassifier(random_state=0, verbose=0, **parse_config(config))
            clf.fit(X, y)
            seconds = time.perf_counter() - start
            row = {"dataset": name, "config": config, "n_train": len(y), "n_val": len(y_val),
                   "epochs": len(clf.history_), "fit_seconds": round(seconds, 1)}
            for tta in (False, True):
                proba = clf.set_params(tta=tta).predict_proba(X_val)
                key = "tta" if tta else "plain"
                row[f"val_accuracy_{key}"] = float(accuracy_score(
                    y_val, clf.classes_[proba.argmax(1)]))
                row[f"val_log_loss_{key}"] = float(log_loss(y_val, proba, labels=clf.classes_))
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.json:
                args.json.write_text(json.dumps({"machine": args.machine, "rows": rows},
                                                indent=1) + "\n")
    print(f"\n{'dataset':<28} {'config':<30} {'val acc':>8} {'with tta':>9} {'log loss':>9}")
    for r in rows:
        print(f"{r['dataset']:<28} {r['config']:<30} {r['val_accuracy_plain']:8.3f} "
              f"{r['val_accuracy_tta']:9.3f} {r['val_log_loss_plain']:9.3f}")


if __name__ == "__main__":
    main()
