"""Scratch CNN vs CNN codes + linear heads vs fine-tuning, on every dataset found.

Each dataset is ``NAME/{train,val}/CLASS/*`` (or, with no data folder,
scikit-learn's digits). Every strategy fits on ``train`` only, choosing its
hyper-parameters by cross-validation on ``train``, and is scored once on
``val``. Results go to ``--out`` as JSON, a Markdown table and PNG plots.

Run::

    python -m benchmarks run                                  # digits -> results/latest
    python -m benchmarks run --quick                          # a smoke run -> results/quick
    python -m benchmarks run --data ../shared/data            # the full run -> results
    python -m benchmarks run --out benchmarks/results/digits  # the committed digits report

Without ``--out``, only the full, unfiltered ``--data`` run writes into a
folder git tracks (the report README quotes); every other default folder is
git-ignored, so the main job leaves ``git status`` clean. The committed digits
report is rewritten only when asked, with the ``--out`` above.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.svm import LinearSVC
from torch import nn

import sklearn_transfer
from benchmarks.machine import describe
from sklearn_transfer import (
    CNNFeatureTransformer,
    FeatureCache,
    FineTunedClassifier,
    load_image_folder,
)
from sklearn_transfer.backbones import Backbone, DataConfig

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
LATEST = RESULTS / "latest"  # the main job's default folder: git-ignored
SEED = 0
DIGITS = "sklearn_digits"
STRATEGIES = ("scratch_cnn", "codes_logreg", "codes_linearsvc", "finetune_head",
              "finetune_partial")


@dataclass
class Dataset:
    name: str
    X_train: Any
    y_train: np.ndarray
    X_val: Any
    y_val: np.ndarray
    note: str = ""

    @property
    def n_classes(self) -> int:
        return len(np.unique(self.y_train))


@dataclass
class Result:
    dataset: str
    strategy: str
    backbone: str
    accuracy: float
    f1_macro: float
    fit_s: float
    predict_s: float
    predict_images_per_s: float
    n_train: int
    n_val: int
    settings: dict[str, Any]
    curve: dict[str, list[float]] = field(default_factory=dict)
    grid: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------- datasets


def find_datasets(data: Path | None, quick: bool, names: list[str] | None) -> list[Dataset]:
    """Every ``NAME/{train,val}`` folder under ``data``; digits when there is none."""
    found = []
    if data is not None and data.is_dir():
        for folder in sorted(p for p in data.iterdir() if (p / "train").is_dir()
                             and (p / "val").is_dir()):
            if names and folder.name not in names:
                continue
            X_tr, y_tr = load_image_folder(folder / "train")
            X_va, y_va = load_image_folder(folder / "val")
            note = ""
            if folder.name.startswith("cifar10"):
                note = ("32 px images upscaled to the backbone's input size; 10,000 training "
                        "images, not the 50,000 of the published figures")
            found.append(Dataset(folder.name, X_tr, y_tr, X_va, y_va, note))
    if names and data is not None and data.is_dir():
        missing = sorted(set(names) - {d.name for d in found})
        if missing:
            available = sorted(p.name for p in data.iterdir() if (p / "train").is_dir())
            raise ValueError(f"--datasets {missing} not found under {data}; "
                             f"available: {available}")
    found.sort(key=lambda d: len(d.y_train))  # smallest first: early results come fast
    if not found:
        found.append(digits())
    if quick:
        found = [subsample(d, per_class_train=8, per_class_val=4) for d in found]
    return found


def digits() -> Dataset:
    """scikit-learn's handwritten digits, 8x8 grayscale scans, split 50/50 (stratified)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = np.round(bunch.images * (255 / 16)).astype(np.uint8)
    X_tr, X_va, y_tr, y_va = train_test_split(images, bunch.target, test_size=0.5,
                                              stratify=bunch.target, random_state=SEED)
    return Dataset(DIGITS, X_tr, y_tr, X_va, y_va,
                   "scikit-learn's load_digits, 8x8 scans upscaled; no data folder needed")


def subsample(d: Dataset, per_class_train: int, per_class_val: int) -> Dataset:
    def take(y: np.ndarray, k: int) -> np.ndarray:
        return np.concatenate([np.flatnonzero(y == c)[:k] for c in np.unique(y)])

    tr, va = take(d.y_train, per_class_train), take(d.y_val, per_class_val)
    return Dataset(d.name, d.X_train[tr], d.y_train[tr], d.X_val[va], d.y_val[va],
                   (d.note + "; " if d.note else "") + "quick subset")


# --------------------------------------------------------------------- strategies


def scratch_backbone(input_size: int = 128) -> Backbone:
    """The seeds' baseline: three conv + max-pool blocks (GAP and softmax come from the head)."""
    def block(c_in: int, c_out: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                             nn.BatchNorm2d(c_out), nn.ReLU(inplace=True), nn.MaxPool2d(2))

    torch.manual_seed(SEED)
    return Backbone([("conv1", block(3, 32)), ("conv2", block(32, 64)),
                     ("conv3", block(64, 128))],
                    DataConfig(input_size=input_size, crop_pct=1.0), name="scratch_cnn",
                    weights_id="random")


@dataclass
class Plan:
    """What a run does per dataset: budgets and grids, scaled to the data size."""

    epochs: int
    freeze_grid: list[Any] | None
    cv: int
    c_logreg: list[float]
    c_svc: list[float]
    batch_size: int = 32
    max_val: int | None = None  # score on this many val images (stratified), or all


def plan_for(d: Dataset, quick: bool) -> Plan:
    """Budgets that keep the full four-dataset run within an hour on a 2-core CPU.

    Fine-tuning trains at ~15-80 images/s here (the more stages frozen, the faster),
    so the freeze-depth grid (10 fits) runs only on the smallest sets, and the
    10,000-image set gets three epochs and a 2,000-image validation subset.
    """
    n = len(d.y_train)
    if quick:
        return Plan(epochs=1, freeze_grid=None, cv=2, c_logreg=[1.0], c_svc=[0.1], batch_size=16)
    c_svc = [0.001, 0.01, 0.1, 1.0]
    if d.name == DIGITS:  # the main job on a fresh machine: well under 5 minutes
        return Plan(epochs=3, freeze_grid=None, cv=3, c_logreg=[0.1, 1.0, 10.0],
                    c_svc=[0.01, 0.1, 1.0])
    if n <= 300:
        return Plan(epochs=5, freeze_grid=[-2, -3, -5], cv=5,
                    c_logreg=[0.01, 0.1, 1.0, 10.0], c_svc=c_svc)
    if n <= 3000:
        return Plan(epochs=5, freeze_grid=None, cv=5 if n <= 1000 else 3,
                    c_logreg=[0.01, 0.1, 1.0, 10.0], c_svc=c_svc)
    return Plan(epochs=3, freeze_grid=None, cv=3, c_logreg=[0.01, 0.1, 1.0], c_svc=c_svc,
                max_val=2000)


def cap_val(d: Dataset, max_val: int | None) -> Dataset:
    """The first ``max_val / n_classes`` val images of each class (deterministic)."""
    if max_val is None or len(d.y_val) <= max_val:
        return d
    per_class = max_val // len(np.unique(d.y_val))
    take = np.concatenate([np.flatnonzero(d.y_val == c)[:per_class] for c in np.unique(d.y_val)])
    note = f"scored on {len(take)} of the {len(d.y_val)} val images ({per_class} per class)"
    return Dataset(d.name, d.X_train, d.y_train, d.X_val[take], d.y_val[take],
                   (d.note + "; " if d.note else "") + note)


def build(strategy: str, backbone: str, plan: Plan, cache: Path, verbose: int):
    """(estimator, settings) for one strategy."""
    cv = StratifiedKFold(plan.cv, shuffle=True, random_state=SEED)
    codes = CNNFeatureTransformer(backbone, memory=str(cache), progress=False)
    if strategy == "codes_logreg":
        pipe = make_pipeline(codes, LogisticRegression(max_iter=3000))
        return GridSearchCV(pipe, {"logisticregression__C": plan.c_logreg}, cv=cv), {
            "grid": {"C": plan.c_logreg}, "cv": plan.cv}
    if strategy == "codes_linearsvc":
        pipe = make_pipeline(codes, LinearSVC(max_iter=20000))
        return GridSearchCV(pipe, {"linearsvc__C": plan.c_svc}, cv=cv), {
            "grid": {"C": plan.c_svc}, "cv": plan.cv}
    common = dict(max_epochs=plan.epochs, batch_size=plan.batch_size, random_state=SEED,
                  verbose=verbose)
    if strategy == "scratch_cnn":
        clf = FineTunedClassifier(scratch_backbone(), freeze_depth=0, backbone_lr_mult=1.0,
                                  lr=3e-3, patience=None, **common)
        return clf, {"architecture": "3x(conv3x3+BN+ReLU+maxpool) 32/64/128, GAP, linear",
                     "input_size": 128, "lr": 3e-3, **common}
    if strategy == "finetune_head":
        return FineTunedClassifier(backbone, freeze_depth="all", **common), {
            "freeze_depth": "all", **common}
    if strategy == "finetune_partial":
        clf = FineTunedClassifier(backbone, **common)
        if plan.freeze_grid:
            grid = GridSearchCV(clf, {"freeze_depth": plan.freeze_grid},
                                cv=StratifiedKFold(3, shuffle=True, random_state=SEED))
            return grid, {"freeze_depth_grid": plan.freeze_grid, "cv": 3, **common}
        return clf, {"freeze_depth": clf.freeze_depth, **common}
    raise ValueError(f"unknown strategy {strategy!r}; choose from {STRATEGIES}")


def evaluate(d: Dataset, strategy: str, backbone: str, plan: Plan, cache: Path,
             verbose: int) -> Result:
    est, settings = build(strategy, backbone, plan, cache, verbose)
    t0 = time.perf_counter()
    est.fit(d.X_train, d.y_train)
    fit_s = time.perf_counter() - t0
    entries = FeatureCache(cache).info().entries if strategy.startswith("codes_") else None
    t0 = time.perf_counter()
    pred = est.predict(d.X_val)
    predict_s = time.perf_counter() - t0
    if entries is not None:
        # the second codes strategy finds the val codes cached by the first
        settings["predict_codes_from_cache"] = FeatureCache(cache).info().entries == entries
    result = Result(
        dataset=d.name, strategy=strategy,
        backbone="scratch_cnn" if strategy == "scratch_cnn" else backbone,
        accuracy=float(accuracy_score(d.y_val, pred)),
        f1_macro=float(f1_score(d.y_val, pred, average="macro")),
        fit_s=fit_s, predict_s=predict_s, predict_images_per_s=len(pred) / predict_s,
        n_train=len(d.y_train), n_val=len(d.y_val), settings=settings,
    )
    best = getattr(est, "best_estimator_", est)
    if isinstance(est, GridSearchCV):
        result.settings["best_params"] = _jsonable(est.best_params_)
        result.grid = {
            "params": _jsonable(est.cv_results_["params"]),
            "mean_cv_accuracy": [float(v) for v in est.cv_results_["mean_test_score"]],
        }
    if isinstance(best, FineTunedClassifier):
        hist = best.history_
        result.curve = {key: [float(v) for v in hist[:, key]]
                        for key in ("train_loss", "valid_loss", "valid_acc")
                        if all(key in row for row in hist)}
    return result


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


# ----------------------------------------------------------------------- reporting


def write_report(results: list[Result], meta: dict[str, Any], out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(
        {"meta": meta, "results": [asdict(r) for r in results]}, indent=2))
    lines = [
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['machine']}; seed {SEED}; "
        f"total {meta['total_s'] / 60:.1f} min"
        + ("" if meta.get("finished", True) else " so far (run still going or stopped)"),
        "",
        "| dataset | strategy | backbone | val accuracy | macro F1 | fit s | predict img/s |"
        " settings |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        chosen = r.settings.get("best_params", {k: r.settings[k] for k in ("freeze_depth",)
                                                if k in r.settings})
        lines.append(f"| {r.dataset} (n={r.n_train}/{r.n_val}) | {r.strategy} | {r.backbone} | "
                     f"{r.accuracy:.4f} | {r.f1_macro:.4f} | {r.fit_s:.0f} | "
                     f"{r.predict_images_per_s:.1f}"
                     f"{' (cached)' if r.settings.get('predict_codes_from_cache') else ''} | "
                     f"{json.dumps(chosen)} |")
    notes = [f"- {name}: {note}" for name, note in meta["notes"].items() if note]
    if any(r.settings.get("predict_codes_from_cache") for r in results):
        notes.append("- predict img/s marked (cached): the val codes were already in the "
                     "feature cache (computed by the other codes strategy); only the head ran")
    table = "\n".join(lines + ([""] + notes if notes else [])) + "\n"
    (out / "results.md").write_text(table)
    plot(results, out)
    return table


#: One colour per strategy in every plot; where a strategy means what one of
#: ``StrategySearchCV(strategies="auto")`` does, its colour in ``StrategySearchCV.plot``
#: (codes C0, finetune_head C2, finetune_last C3: ``finetune_partial``'s default depth).
COLOURS = {"scratch_cnn": "C7", "codes_logreg": "C0", "codes_linearsvc": "C5",
           "finetune_head": "C2", "finetune_partial": "C3"}


def restored_epoch(curve: dict[str, list[float]]) -> int:
    """The epoch whose weights the fit kept: the lowest ``valid_loss`` (1-based), as
    ``EarlyStopping(monitor="valid_loss", load_best=True)`` restores."""
    return int(np.argmin(curve["valid_loss"])) + 1


def plot(results: list[Result], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    datasets = sorted({r.dataset for r in results})
    strategies = [s for s in STRATEGIES if any(r.strategy == s for r in results)]
    fig, ax = plt.subplots(figsize=(max(6, 2 * len(datasets)), 4))
    width = 0.8 / max(1, len(strategies))
    for k, s in enumerate(strategies):
        acc = [next((r.accuracy for r in results if r.dataset == d and r.strategy == s),
                    np.nan) for d in datasets]
        ax.bar(np.arange(len(datasets)) + k * width, acc, width, label=s, color=COLOURS[s])
    ax.set_xticks(np.arange(len(datasets)) + 0.4 - width / 2, datasets, rotation=15)
    ax.set_ylabel("val accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the bars
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=100)
    plt.close(fig)

    curves = [r for r in results if r.curve.get("valid_acc")]
    if curves:
        names = sorted({r.dataset for r in curves})
        fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names) + 1.8, 3.2),
                                 sharey=True, squeeze=False)
        for ax, name in zip(axes[0], names, strict=True):
            for r in (r for r in curves if r.dataset == name):
                acc = r.curve["valid_acc"]
                epochs = np.arange(1, len(acc) + 1)
                ax.plot(epochs, acc, marker="o", color=COLOURS[r.strategy], label=r.strategy)
                if r.curve.get("valid_loss"):
                    best = restored_epoch(r.curve)
                    ax.plot(best, acc[best - 1], marker="*", markersize=15, linestyle="none",
                            markerfacecolor="none", markeredgecolor="k")
            ax.set_title(name, fontsize=9)
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
        axes[0, 0].set_ylabel("internal validation accuracy")
        handles = {h.get_label(): h for ax in axes[0] for h in ax.get_lines()
                   if not h.get_label().startswith("_")}
        handles["restored epoch"] = plt.Line2D([], [], marker="*", markersize=12,
                                               linestyle="none", markerfacecolor="none",
                                               markeredgecolor="k")
        fig.legend(list(handles.values()), list(handles), fontsize=8, loc="center right")
        fig.tight_layout(rect=(0, 0, 1 - 1.6 / fig.get_figwidth(), 1))
        fig.savefig(out / "learning_curves.png", dpi=100)
        plt.close(fig)

    # several backbones: accuracy against speed, read where the codes were really computed
    measured = [r for r in results if r.strategy.startswith("codes_")
                and not r.settings.get("predict_codes_from_cache")]
    if len({r.backbone for r in measured}) > 1:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name in sorted({r.dataset for r in measured}):
            rows = [r for r in measured if r.dataset == name]
            ax.plot([r.predict_images_per_s for r in rows], [r.accuracy for r in rows],
                    "o", label=name)
            for r in rows:
                ax.annotate(r.backbone, (r.predict_images_per_s, r.accuracy), fontsize=7)
        ax.set_xlabel("CNN codes: images/s (predict, incl. decoding)")
        ax.set_ylabel("val accuracy")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "backbones.png", dpi=100)
        plt.close(fig)

    grids = [r for r in results if r.strategy == "finetune_partial" and r.grid]
    if grids:
        fig, ax = plt.subplots(figsize=(6, 4))
        for r, marker in zip(grids, "osD^v", strict=False):  # finetune_partial's colour
            depths = [str(p["freeze_depth"]) for p in r.grid["params"]]
            ax.plot(depths, r.grid["mean_cv_accuracy"], marker=marker, label=r.dataset,
                    color=COLOURS["finetune_partial"])
        ax.set_xlabel("freeze_depth")
        ax.set_ylabel("mean CV accuracy on train")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "freeze_depth.png", dpi=100)
        plt.close(fig)


# -------------------------------------------------------------------------- main


def default_out(datasets: list[Dataset], quick: bool, subset: bool) -> Path:
    """Where a run writes when ``--out`` is not given.

    Only the full, unfiltered ``--data`` run writes the report README quotes
    (``benchmarks/results``). The main job (digits, no data folder) writes to
    the git-ignored ``benchmarks/results/latest``, so it never rewrites the
    committed digits report (``--out benchmarks/results/digits`` does); smoke
    runs and runs over a subset of datasets, backbones or strategies write to
    the git-ignored ``quick`` and ``partial`` folders.
    """
    if quick:
        return RESULTS / "quick"
    if all(d.name == DIGITS for d in datasets):
        return LATEST
    return RESULTS / "partial" if subset else RESULTS


def _parse(argv: list[str] | None) -> tuple[argparse.Namespace, list[Dataset]]:
    """The arguments of ``python -m benchmarks run ARGV``, ``out`` resolved, and its datasets."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks run", description=__doc__)
    parser.add_argument("--data", type=Path, default=None,
                        help="folder of NAME/{train,val}/CLASS/* datasets (default: digits)")
    parser.add_argument("--datasets", nargs="*", help="only these dataset names")
    parser.add_argument("--backbones", nargs="*", default=["efficientnet_lite0"])
    parser.add_argument("--strategies", nargs="*", default=list(STRATEGIES),
                        choices=STRATEGIES)
    parser.add_argument("--quick", action="store_true", help="a few images per class")
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder (default: benchmarks/results for the full, "
                             "unfiltered run with --data; otherwise the git-ignored "
                             "benchmarks/results/latest for digits, /quick for --quick, "
                             "/partial for a subset; the committed digits report is "
                             "--out benchmarks/results/digits)")
    parser.add_argument("--cache", type=Path, default=None,
                        help="feature cache folder (default: OUT/cache)")
    parser.add_argument("--verbose", type=int, default=0, help="1 prints skorch epoch tables")
    args = parser.parse_args(argv)
    datasets = find_datasets(args.data, args.quick, args.datasets)
    subset = bool(args.datasets) or any(
        getattr(args, k) != parser.get_default(k) for k in ("backbones", "strategies"))
    args.out = args.out or default_out(datasets, args.quick, subset)
    return args, datasets


def output_folder(argv: list[str] | None = None) -> Path:
    """The folder ``python -m benchmarks run ARGV`` writes to, without running anything."""
    return _parse(argv)[0].out


def run(argv: list[str] | None = None, *, progress: Callable[[str], None] = print) -> str:
    start = time.perf_counter()
    args, datasets = _parse(argv)
    cache = args.cache or args.out / "cache"
    command = " ".join(["python -m benchmarks run",
                        *(argv if argv is not None else sys.argv[2:])])
    machine = describe()  # the load as the run starts
    results: list[Result] = []
    notes: dict[str, str] = {}
    for d in datasets:
        plan = plan_for(d, args.quick)
        d = cap_val(d, plan.max_val)
        notes[d.name] = d.note
        for backbone in args.backbones:
            for strategy in args.strategies:
                if strategy == "scratch_cnn" and backbone != args.backbones[0]:
                    continue  # the scratch CNN has no backbone: run it once
                r = evaluate(d, strategy, backbone, plan, cache, args.verbose)
                results.append(r)
                progress(f"{d.name:28s} {strategy:16s} {r.backbone:18s} acc {r.accuracy:.4f} "
                         f"f1 {r.f1_macro:.4f}  fit {r.fit_s:6.0f} s")
                # written after every result: a stopped run keeps what it measured
                write_report(results, _meta(command, start, notes, False, machine), args.out)
    meta = _meta(command, start, notes, True, machine)
    table = write_report(results, meta, args.out)
    progress(table)
    progress(f"written to {_shown(args.out)}")
    return table


def _shown(out: Path) -> str:
    """``out`` relative to the repository when it is inside it, for the closing message."""
    try:
        return f"{out.resolve().relative_to(REPO)}/"
    except ValueError:
        return f"{out}/"


def _meta(command: str, start: float, notes: dict[str, str], done: bool,
          machine: str) -> dict[str, Any]:
    return {
        "command": command,
        "machine": machine,
        "torch": torch.__version__, "sklearn_transfer": sklearn_transfer.__version__,
        "seed": SEED, "total_s": time.perf_counter() - start, "finished": done,
        "notes": notes,
    }


def replot(folder: Path) -> None:
    """Draw the plots of a written report again from its ``results.json``."""
    rows = json.loads((folder / "results.json").read_text())["results"]
    plot([Result(**row) for row in rows], folder)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "plot":
        replot(Path(sys.argv[2]))
    elif len(sys.argv) >= 2 and sys.argv[1] == "run":
        run(sys.argv[2:])
    else:
        sys.exit("usage: python -m benchmarks run [--data DIR] [--quick] [...] (see --help), "
                 "or python -m benchmarks plot RESULTS_FOLDER (redraws its plots)")


__all__ = ["main", "output_folder", "replot", "run"]
