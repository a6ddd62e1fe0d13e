"""The command line: ``python -m sklearn_transfer`` (or ``sklearn-transfer``) COMMAND.

* ``fit TRAIN_DIR --out MODEL``: fit on class folders (``TRAIN_DIR/CLASS/*``),
  with a named strategy or ``--strategy auto`` (:class:`~sklearn_transfer.StrategySearchCV`
  within ``--time-budget``), and save the model with
  :func:`~sklearn_transfer.persistence.dump` (no pickle).
* ``predict MODEL SRC --out FILE``: a saved model's predictions for a folder
  of images or a text file listing paths, streamed to CSV or Parquet
  (:func:`~sklearn_transfer.predictions.write_predictions`).
* ``evaluate MODEL VAL_DIR --report DIR``: accuracy, per-class report,
  confusion matrix and top-loss images on labelled class folders.
* ``export MODEL --out DIR``: a saved model as one OpenVINO network that
  needs only its runtime, NumPy and Pillow (:func:`~sklearn_transfer.export`).
* ``extract SRC --out DIR``: CNN codes of an image collection to a resumable
  Parquet dataset (:func:`~sklearn_transfer.extract_codes`).

Each command shows progress on stderr and ends with a one-line summary on
stdout. A failure is one line on stderr naming the file, image or option at
fault, with exit status 1 (2 for a bad option, as argparse does); so is a
run in which every image failed. ``COMMAND --help`` lists the options.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sklearn_transfer.computation import POOLINGS
from sklearn_transfer.engines import ENGINES
from sklearn_transfer.runtime import PRECISIONS

__all__ = ["main"]

STRATEGIES = ("auto", "codes", "finetune")
# the options of `fit` that mean something only for some strategies
_FIT_OPTIONS = {"time_budget": ("auto",), "memory": ("auto", "codes"),
                "weights": ("codes", "finetune"), "freeze_depth": ("finetune",),
                "max_epochs": ("finetune",), "random_state": ("auto", "finetune")}
_TOP_LOSSES = 16
_EVALUATE_CHUNK = 256  # images per call: the progress bar's step


def _stage(text: str) -> int | str:
    try:
        return int(text)
    except ValueError:
        return text


def _depth(text: str) -> int | str:
    if text == "all":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'all', got {text!r}") from None


def _positive(kind: type) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not value > 0:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}")
        return value
    return parse


def _prog() -> str:
    return "sklearn-transfer" if Path(sys.argv[0]).name == "sklearn-transfer" \
        else "python -m sklearn_transfer"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=_prog(), description="Transfer learning on images.")
    commands = parser.add_subparsers(dest="command", required=True)
    _fit_parser(commands)
    _predict_parser(commands)
    _evaluate_parser(commands)
    _export_parser(commands)
    _extract_parser(commands)
    return parser


def _fit_parser(commands: Any) -> None:
    fit = commands.add_parser(
        "fit", help="fit a classifier on class folders and save it",
        description="Fit on TRAIN_DIR/CLASS/* (the folder names are the labels) and save the "
                    "model to MODEL (sklearn_transfer.persistence, no pickle).")
    fit.add_argument("train_dir", metavar="TRAIN_DIR", help="class folders: TRAIN_DIR/CLASS/*")
    fit.add_argument("--out", required=True, metavar="MODEL", help="the model file to write")
    fit.add_argument("--strategy", default="codes", choices=STRATEGIES,
                     help="codes: CNN codes + logistic regression (default); finetune: a "
                          "FineTunedClassifier; auto: StrategySearchCV cross-validates the "
                          "codes and fine-tuning strategies within --time-budget and keeps "
                          "the best")
    fit.add_argument("--time-budget", type=_positive(float), metavar="SECONDS",
                     help="auto: seconds the cross-validation may take (default: no limit)")
    fit.add_argument("--backbone", default="efficientnet_lite0")
    fit.add_argument("--weights", help="codes, finetune: 'pretrained' (default), 'none' "
                                       "(random) or a weights file")
    fit.add_argument("--freeze-depth", type=_depth, metavar="DEPTH",
                     help="finetune: stages kept frozen, 'all' or an integer (-2: all but the "
                          "last two; default)")
    fit.add_argument("--max-epochs", type=_positive(int), metavar="N",
                     help="finetune: training epochs (default 5)")
    fit.add_argument("--random-state", type=int, metavar="SEED",
                     help="auto, finetune: seed of the fine-tunings")
    fit.add_argument("--memory", metavar="DIR",
                     help="auto, codes: a FeatureCache directory (codes and converted networks "
                          "reused across runs); a codes model keeps using it")
    fit.set_defaults(check=lambda args: _check_fit_options(fit, args))


def _predict_parser(commands: Any) -> None:
    predict = commands.add_parser(
        "predict", help="a saved model's predictions, streamed to CSV or Parquet",
        description="Predict the images of SRC with MODEL and write one row per image: path, "
                    "label, one probability column per class (named after the class) and "
                    "error (empty unless the image could not be read). The paths are read "
                    "and predicted --chunk-size at a time and the rows appended, so any "
                    "number of paths fits in memory.")
    predict.add_argument("model", metavar="MODEL", help="a file written by fit")
    predict.add_argument("src", metavar="SRC",
                         help="a folder (every image file under it, each folder in sorted "
                              "order) or a text file with one image path per line")
    predict.add_argument("--out", required=True, metavar="FILE",
                         help="the predictions, FILE.csv or FILE.parquet")
    predict.add_argument("--on-error", default="skip", choices=["skip", "raise"],
                         help="an unreadable image: its row holds the reason in the error "
                              "column and no label (default; the summary counts them), or the "
                              "end of the command (no output written)")
    predict.add_argument("--chunk-size", type=_positive(int), default=1000, metavar="N",
                         help="paths predicted and rows written at a time (default 1000)")


def _evaluate_parser(commands: Any) -> None:
    evaluate = commands.add_parser(
        "evaluate", help="accuracy, per-class report, confusion matrix and top losses",
        description="Score MODEL on VAL_DIR/CLASS/* and write to DIR: report.txt (accuracy "
                    "and scikit-learn's classification_report), report.json (the same, the "
                    "confusion matrix and the top losses), confusion_matrix.png and "
                    "top_losses.png (the images the model is most wrong about).")
    evaluate.add_argument("model", metavar="MODEL", help="a file written by fit")
    evaluate.add_argument("val_dir", metavar="VAL_DIR", help="class folders: VAL_DIR/CLASS/*")
    evaluate.add_argument("--report", required=True, metavar="DIR",
                          help="the report's folder (created if missing)")


def _export_parser(commands: Any) -> None:
    export = commands.add_parser(
        "export", help="a saved model as one OpenVINO network, for its runtime alone",
        description="Write MODEL to the new folder DIR as one OpenVINO network (uint8 images "
                    "to probabilities) with model.json (its preprocessing and classes); "
                    "sklearn_transfer.load_exported(DIR) runs it with OpenVINO, NumPy and "
                    "Pillow only.")
    export.add_argument("model", metavar="MODEL", help="a file written by fit")
    export.add_argument("--out", required=True, metavar="DIR", help="the folder to create")


def _extract_parser(commands: Any) -> None:
    extract = commands.add_parser(
        "extract", help="CNN codes of an image collection, to a resumable Parquet dataset",
        description="Write the CNN codes of every image under SRC to a Parquet dataset in "
                    "--out (see sklearn_transfer.extract_codes). Stopped anywhere, the same "
                    "command resumes: it computes only the partitions not yet written.")
    extract.add_argument("src", metavar="SRC",
                         help="a folder (every image file under it) or a text file with one "
                              "image path per line")
    extract.add_argument("--out", required=True, metavar="DIR", help="the dataset's directory")
    extract.add_argument("--scheduler", metavar="ADDRESS",
                         help="a Dask scheduler (tcp://host:8786) to run the partitions on; "
                              "default: this process")
    extract.add_argument("--class-folders", action="store_true",
                         help="SRC/CLASS/*: store each image's folder name as its label")
    extract.add_argument("--backbone", default="efficientnet_lite0")
    extract.add_argument("--weights", default="pretrained",
                         help="'pretrained', 'none' (random) or a weights file")
    extract.add_argument("--stage", nargs="+", type=_stage, default=[-1],
                         help="stage indices or names (several: concatenated); default -1")
    extract.add_argument("--pooling", default="avg", choices=POOLINGS)
    extract.add_argument("--engine", default="auto", choices=ENGINES)
    extract.add_argument("--precision", default="auto", choices=PRECISIONS)
    extract.add_argument("--device", default="auto")
    extract.add_argument("--batch-size", type=int, default=16)
    extract.add_argument("--partition-size", type=int, default=1000)
    extract.add_argument("--on-error", default="skip", choices=["skip", "raise"],
                         help="an unreadable image: recorded in the failures and skipped "
                              "(default), or the end of the job")
    extract.add_argument("--memory", metavar="DIR",
                         help="a FeatureCache directory (codes and converted networks reused "
                              "across runs)")


def _check_fit_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse, as argparse does, a fit option the chosen strategy does not use."""
    for option, strategies in _FIT_OPTIONS.items():
        if getattr(args, option) is not None and args.strategy not in strategies:
            parser.error(f"argument --{option.replace('_', '-')}: applies to --strategy "
                         f"{' and '.join(strategies)}, not {args.strategy}")


# ------------------------------------------------------------------------ helpers


def _weights(text: str | None) -> str | None:
    return "pretrained" if text is None else None if text.lower() == "none" else text


def _check_writable_file(path: str, what: str) -> None:
    """Before any work: a file can be written at ``path``."""
    if os.path.isdir(path):
        raise IsADirectoryError(f"{what} {path!r} is a folder; give a file name")
    if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise FileNotFoundError(f"cannot write {what} {path!r}: its folder does not exist")


def _load_model(path: str) -> Any:
    """A saved model, with its transformer's own progress bar off (the commands show theirs)."""
    from sklearn.pipeline import Pipeline

    from sklearn_transfer import CNNFeatureTransformer
    from sklearn_transfer.persistence import load

    model = load(path)
    if isinstance(model, Pipeline) and isinstance(model.steps[0][1], CNNFeatureTransformer):
        model.steps[0][1].set_params(progress=False)
    if not hasattr(model, "classes_"):
        raise ValueError(f"{path!r} holds a {type(model).__name__}, not a classifier")
    return model


def _bar(total: int | None, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="img", desc=desc)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    known = (ValueError, OSError, ImportError, TypeError, LookupError)
    return text if isinstance(exc, known) and text else f"{type(exc).__name__}: {text}"


@contextlib.contextmanager
def _warnings_on_one_line(prefix: str) -> Iterator[None]:
    """Warnings printed as ``PREFIX: warning: message`` (no source line), then as before."""
    original = warnings.formatwarning

    def formatwarning(message: Any, category: type, *args: Any, **kwargs: Any) -> str:
        return f"{prefix}: warning: {' '.join(str(message).split())}\n"

    warnings.formatwarning = formatwarning
    try:
        yield
    finally:
        warnings.formatwarning = original


# ------------------------------------------------------------------------ fit


def _estimator(args: argparse.Namespace) -> Any:
    """The estimator ``fit`` trains, from the options."""
    from sklearn_transfer import FineTunedClassifier, StrategySearchCV
    from sklearn_transfer.strategy import auto_strategies

    if args.strategy == "auto":
        return StrategySearchCV(time_budget=args.time_budget, memory=args.memory,
                                random_state=args.random_state, backbone=args.backbone,
                                verbose=1)
    if args.strategy == "codes":
        codes, _ = auto_strategies(args.backbone, args.memory)["codes"]
        return codes.set_params(codes__weights=_weights(args.weights), codes__progress=True)
    from skorch.callbacks import ProgressBar

    options = {"freeze_depth": args.freeze_depth, "max_epochs": args.max_epochs,
               "random_state": args.random_state}
    return FineTunedClassifier(args.backbone, weights=_weights(args.weights), verbose=1,
                               callbacks=[("progress", ProgressBar())],
                               **{k: v for k, v in options.items() if v is not None})


def fit(args: argparse.Namespace) -> int:
    """Run the ``fit`` command; returns the exit status."""
    from sklearn_transfer import load_image_folder
    from sklearn_transfer.persistence import dump

    _check_writable_file(args.out, "MODEL")
    X, y = load_image_folder(args.train_dir)
    estimator = _estimator(args)
    started = time.perf_counter()
    estimator.fit(X, y)
    seconds = time.perf_counter() - started
    model = estimator.best_estimator_ if args.strategy == "auto" else estimator
    # back to the defaults of a model used elsewhere: no training display, no callbacks (code)
    if args.strategy == "codes":
        model.set_params(codes__progress="auto")
    elif args.strategy == "finetune":
        model.set_params(callbacks=None, verbose=0)
    dump(model, args.out)
    classes = ", ".join(map(str, model.classes_))
    if args.strategy == "auto":
        status = estimator.cv_results_["status"]
        skipped = int((status == "skipped").sum())
        what = (f"auto chose {estimator.best_strategy_} {estimator.best_params_} (CV accuracy "
                f"{estimator.best_score_:.3f}; {len(status) - skipped} of {len(status)} "
                f"candidates ran" + (f", {skipped} skipped by --time-budget {args.time_budget:g}"
                                     if skipped else "") + ")")
    elif args.strategy == "finetune":
        what = f"finetune on {args.backbone} ({len(model.history)} epochs)"
    else:
        what = f"codes on {args.backbone}"
    print(f"{args.out}: {what}, fitted on {len(y)} images of {len(model.classes_)} classes "
          f"({classes}) in {seconds:.1f} s; {os.path.getsize(args.out) / 1e6:.1f} MB")
    return 0


# ------------------------------------------------------------------------ predict


def predict(args: argparse.Namespace) -> int:
    """Run the ``predict`` command; returns the exit status."""
    from sklearn_transfer.predictions import iter_image_paths, output_format, write_predictions

    output_format(args.out)
    total = sum(1 for _ in iter_image_paths(args.src))  # checks SRC, sizes the progress bar
    if total == 0:
        raise ValueError(f"SRC {args.src!r} holds no image paths")
    model = _load_model(args.model)
    summary = write_predictions(model, iter_image_paths(args.src), args.out,
                                chunk_size=args.chunk_size, on_error=args.on_error,
                                total=total)
    rate = summary.n_images / summary.seconds
    print(f"{args.out}: {summary.n_images} images, {len(model.classes_)} classes; "
          f"{summary.n_failed} could not be read"
          + (" (the error column of their rows says why)" if summary.n_failed else "")
          + f"; {summary.seconds:.1f} s, {rate:.1f} images/s")
    if summary.n_failed == summary.n_images:
        raise ValueError(f"none of the {summary.n_images} images could be read (the first: "
                         f"{summary.first_error})")
    return 0


# ------------------------------------------------------------------------ evaluate


def _val_labels(y: np.ndarray, classes: np.ndarray, val_dir: str) -> np.ndarray:
    """The class folders' names as the model's classes (matched as text), or an error."""
    by_name = {str(c): c for c in classes.tolist()}
    unknown = sorted(set(y.tolist()) - set(by_name))
    if unknown:
        raise ValueError(f"VAL_DIR {val_dir!r} has class folders the model does not know: "
                         f"{unknown} (its classes: {sorted(by_name)})")
    return np.array([by_name[name] for name in y.tolist()], dtype=classes.dtype)


def evaluate(args: argparse.Namespace) -> int:
    """Run the ``evaluate`` command; returns the exit status."""
    from sklearn.metrics import accuracy_score

    from sklearn_transfer import load_image_folder
    from sklearn_transfer.predictions import predict_chunks

    try:
        import matplotlib  # noqa: F401 (the figures; checked before any work)
    except ImportError:
        raise ImportError("evaluate draws its figures with matplotlib, which is not "
                          "installed: pip install matplotlib") from None
    X, folders = load_image_folder(args.val_dir)
    report = Path(args.report)
    if report.exists() and not report.is_dir():
        raise FileExistsError(f"--report {args.report!r} is a file; give a folder")
    model = _load_model(args.model)
    classes = np.asarray(model.classes_)
    y = _val_labels(folders, classes, args.val_dir)
    report.mkdir(parents=True, exist_ok=True)
    parts = []
    with _bar(len(X), "evaluate") as bar:
        for paths, values, _ in predict_chunks(model, X, _EVALUATE_CHUNK, on_error="raise"):
            parts.append(values)
            bar.update(len(paths))
    values = np.concatenate(parts)
    proba = values if values.ndim == 2 else None
    pred = classes[np.argmax(proba, axis=1)] if proba is not None else values.astype(y.dtype)
    accuracy = accuracy_score(y, pred)
    files = _write_report(report, X, y, pred, proba, classes, args)
    print(f"{args.report}: accuracy {accuracy:.3f} on {len(y)} images of "
          f"{len(np.unique(y))} classes; {', '.join(files)}")
    return 0


def _write_report(report: Path, X: np.ndarray, y: np.ndarray, pred: np.ndarray,
                  proba: np.ndarray | None, classes: np.ndarray,
                  args: argparse.Namespace) -> list[str]:
    """The report's files: texts, JSON and figures; returns their names."""
    from sklearn.metrics import accuracy_score, classification_report, confusion_matrix

    from sklearn_transfer.analysis import ErrorAnalysis

    names = [str(c) for c in classes]
    options = dict(labels=classes, target_names=names, zero_division=0)
    text = classification_report(y, pred, digits=3, **options)
    accuracy = accuracy_score(y, pred)
    (report / "report.txt").write_text(
        f"model: {args.model}\nimages: {args.val_dir} ({len(y)})\naccuracy: {accuracy:.4f}\n\n"
        f"{text}")
    summary = {
        "model": args.model, "val_dir": args.val_dir, "n_images": len(y),
        "accuracy": accuracy, "classes": classes.tolist(),
        "classification_report": classification_report(y, pred, output_dict=True, **options),
        "confusion_matrix": confusion_matrix(y, pred, labels=classes).tolist(),
    }
    files = ["report.txt", "report.json", "confusion_matrix.png"]
    _confusion_matrix_png(report / "confusion_matrix.png", y, pred, classes,
                          f"{args.val_dir}: accuracy {accuracy:.3f}")
    if proba is not None:
        analysis = ErrorAnalysis.from_predictions(y, proba, classes=classes, X=X)
        summary["most_confused"] = _rows(analysis.most_confused())
        summary["top_losses"] = _rows(analysis.top_losses(_TOP_LOSSES))
        _save(analysis.plot_top_losses(_TOP_LOSSES), report / "top_losses.png")
        files.append("top_losses.png")
    else:
        files.append("no top_losses.png (the model has no predict_proba)")
    # NumPy scalars (counts, labels) as the Python values they hold
    text = json.dumps(summary, indent=2, default=lambda value: value.item())
    (report / "report.json").write_text(text + "\n")
    return files


def _rows(table: dict[str, np.ndarray]) -> list[dict]:
    """A table of equal-length columns as a list of rows."""
    return [dict(zip(table, row, strict=True)) for row in zip(*table.values(), strict=True)]


def _save(fig: Any, path: Path) -> None:
    """Save a figure pyplot made, then free it (commands may run in a longer process)."""
    import matplotlib.pyplot as plt

    try:
        fig.savefig(path, dpi=80)
    finally:
        plt.close(fig)


def _confusion_matrix_png(path: Path, y: np.ndarray, pred: np.ndarray, classes: np.ndarray,
                          title: str) -> None:
    from matplotlib.figure import Figure
    from sklearn.metrics import ConfusionMatrixDisplay

    size = 3 + 0.5 * len(classes)
    fig = Figure(figsize=(size + 1, size), layout="constrained")
    display = ConfusionMatrixDisplay.from_predictions(
        y, pred, labels=classes, display_labels=[str(c) for c in classes],
        ax=fig.add_subplot(), xticks_rotation="vertical" if len(classes) > 6 else "horizontal")
    display.ax_.set_title(title, fontsize=9)
    fig.savefig(path, dpi=100)


# ------------------------------------------------------------------------ extract


def _images(src: str, class_folders: bool) -> tuple[Any, Any]:
    from sklearn_transfer import load_image_folder
    from sklearn_transfer.predictions import iter_image_paths

    if class_folders:
        return load_image_folder(src)
    if os.path.isdir(src):
        return src, None
    return list(iter_image_paths(src)), None


def extract(args: argparse.Namespace) -> int:
    """Run the ``extract`` command; returns the exit status."""
    from sklearn_transfer import CNNFeatureTransformer, extract_codes

    images, labels = _images(args.src, args.class_folders)
    if not isinstance(images, str) and len(images) == 0:
        raise ValueError(f"SRC {args.src!r} holds no image paths")
    transformer = CNNFeatureTransformer(
        args.backbone, weights=_weights(args.weights),
        stage=args.stage if len(args.stage) > 1 else args.stage[0],
        pooling=args.pooling, engine=args.engine, precision=args.precision,
        device=args.device, batch_size=args.batch_size, memory=args.memory, progress=False)
    client = None
    if args.scheduler:
        from distributed import Client

        client = Client(args.scheduler)
    try:
        summary = extract_codes(images, args.out, transformer, labels=labels, client=client,
                                partition_size=args.partition_size, on_error=args.on_error,
                                progress=True)
    finally:
        if client is not None:
            client.close()
    done = summary.n_images_computed
    rate = f"{done / summary.seconds:.1f} images/s" if done else "nothing left to compute"
    print(f"{summary.out}: {summary.n_images} images in {summary.n_partitions} partitions; "
          f"this run computed {done} images ({summary.n_computed} partitions) in "
          f"{summary.seconds:.1f} s, {rate}; {summary.n_failed} images could not be read"
          + (" (read_codes(out).failures lists them)" if summary.n_failed else ""))
    if summary.n_failed == summary.n_images:
        raise ValueError(f"none of the {summary.n_images} images could be read; "
                         "read_codes(out).failures lists why")
    return 0


# ------------------------------------------------------------------------ export


def export(args: argparse.Namespace) -> int:
    """Run the ``export`` command; returns the exit status."""
    from sklearn_transfer.exporting import export as export_model

    model = _load_model(args.model)
    folder = export_model(model, args.out)
    size = sum(f.stat().st_size for f in folder.iterdir())
    digest = json.loads((folder / "model.json").read_text())["sha256"]["model.bin"]
    print(f"{folder}: {type(getattr(model, 'best_estimator_', model)).__name__} as one "
          f"OpenVINO network, {len(model.classes_)} classes, {size / 1e6:.1f} MB "
          f"(model.bin SHA-256 {digest[:12]}…)")
    return 0


# ------------------------------------------------------------------------ entry point

COMMANDS = {"fit": fit, "predict": predict, "evaluate": evaluate, "export": export,
            "extract": extract}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m sklearn_transfer`` and ``sklearn-transfer``; the exit status.

    Examples
    --------
    >>> from sklearn_transfer.cli import main
    >>> main(["predict", "no-such-model.zip", "no-such-folder", "--out", "p.csv"])
    1
    """
    parser = _parser()
    args = parser.parse_args(argv)
    if hasattr(args, "check"):  # what argparse cannot say alone: options that go together
        args.check(args)
    prefix = f"{parser.prog} {args.command}"
    with _warnings_on_one_line(prefix):
        try:
            return COMMANDS[args.command](args)
        except KeyboardInterrupt:
            print(f"{prefix}: interrupted", file=sys.stderr)
            return 130
        except Exception as exc:  # the library's errors name the item: one line, no traceback
            print(f"{prefix}: error: {_one_line(exc)}", file=sys.stderr)
            return 1
