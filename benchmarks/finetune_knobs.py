"""Does a fine-tuning knob help? 3-fold CV on hymenoptera ``train`` (never ``val``).

Every configuration is ``FineTunedClassifier(random_state=0)`` with its
defaults plus the knobs named; the folds are the same for all
(``StratifiedKFold(3, shuffle=True, random_state=0)``). Each fitted model is
scored twice, without and with ``tta`` (a prediction-time knob: the same
weights), by accuracy and log loss on the held-out fold.

    python benchmarks/finetune_knobs.py                       # default, mixup=0.2, ema=0.9
    python benchmarks/finetune_knobs.py --configs default mixup=0.2 \\
        --json benchmarks/results/finetune_knobs.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
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
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

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
        args.json.write_text(json.dumps({"folds": args.folds, "n_images": len(y),
                                         "load_average": os.getloadavg(), "rows": rows},
                                        indent=1) + "\n")


if __name__ == "__main__":
    main()
