"""A fitted classifier's predictions over image files, streamed chunk by chunk to CSV or Parquet.

:func:`write_predictions` reads the paths lazily (any iterable: a generator
over a folder or a list file, see :func:`iter_image_paths`), predicts them
``chunk_size`` at a time and appends each chunk's rows to the output, so
that millions of paths need the memory of one chunk. Each row holds the
image's ``path``, its predicted ``label``, one probability column per class
(named after the class) and an ``error`` column, empty unless the image
could not be read.

A bad image (missing, empty, not an image, truncated) is treated as
:func:`~sklearn_transfer.extract_codes` treats it: ``on_error="skip"``
writes its row with the reason in ``error`` and no label or probabilities,
and goes on (missing files are found by their metadata first; a chunk
holding an image that cannot be decoded is predicted again without it);
``on_error="raise"`` stops at the first one, naming it and its index in the
listing, and leaves no output file.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.utils.validation import check_is_fitted

from sklearn_transfer.files import atomic_write
from sklearn_transfer.images import IMG_EXTENSIONS, ImageLoadError, is_url, regular_file

__all__ = ["PredictionSummary", "iter_image_paths", "output_format", "predict_chunks",
           "write_predictions"]

_FIXED_COLUMNS = ("path", "label", "error")
_SNIFF_BYTES = 8192


@dataclass
class PredictionSummary:
    """What :func:`write_predictions` did.

    Attributes
    ----------
    out : Path
        The file written.
    n_images : int
        Rows written: one per path.
    n_failed : int
        Images that could not be read (their ``error`` column says why).
    seconds : float
        Wall time.
    classes : list
        The model's classes, one probability column each (none when the
        model has no ``predict_proba``).
    first_error : str or None
        The first failed image's reason.
    """

    out: Path
    n_images: int
    n_failed: int
    seconds: float
    classes: list
    first_error: str | None = None


def iter_image_paths(src: str | os.PathLike) -> Iterator[str]:
    """The image paths of a folder (any depth) or of a text file listing one per line.

    A folder is walked lazily (:func:`os.walk`), keeping the files with an
    image extension: a folder's files in sorted order, then its subfolders in
    sorted order. A list file is read line by line (UTF-8, blank lines
    skipped, each path as written). Nothing is held in memory but the current
    folder's entries.

    Parameters
    ----------
    src : path-like

    Yields
    ------
    str

    Raises
    ------
    FileNotFoundError
        ``src`` does not exist.
    ValueError
        ``src`` is a binary file (an image, say), not a text file of paths;
        the message names it (and the line, for text that is not UTF-8).

    Examples
    --------
    >>> import tempfile, pathlib
    >>> from sklearn_transfer.predictions import iter_image_paths
    >>> tmp = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (tmp / "list.txt").write_text("a.jpg\\n\\nb/c.png\\n")
    >>> list(iter_image_paths(tmp / "list.txt"))
    ['a.jpg', 'b/c.png']
    """
    path = Path(src)
    if path.is_dir():
        return _walk_images(path)
    if not path.exists():
        raise FileNotFoundError(f"{os.fspath(src)!r} does not exist (expected a folder of "
                                "images or a text file with one image path per line)")
    _check_text(path)
    return _listed_paths(path)


def _walk_images(root: Path) -> Iterator[str]:
    for folder, dirs, files in os.walk(root):
        dirs.sort()  # os.walk descends in the order left in dirs
        for name in sorted(files):
            if name.lower().endswith(IMG_EXTENSIONS):
                yield os.path.join(folder, name)


def _check_text(path: Path) -> None:
    """Refuse a binary file given where a list of paths is expected, saying what it is."""
    with open(path, "rb") as fh:
        head = fh.read(_SNIFF_BYTES)
    try:
        head.decode("utf-8")
        binary = b"\0" in head
    except UnicodeDecodeError as exc:
        # a multi-byte character cut at the end of the sample is no sign of binary data
        binary = len(head) < _SNIFF_BYTES or exc.start < len(head) - 3
    if binary:
        from PIL import Image

        try:
            with Image.open(path) as im:
                what = f"it is a {im.format} image"
        except Exception:  # Pillow raises several types for what is not an image
            what = "it is not UTF-8 text"
        raise ValueError(f"{os.fspath(path)!r} is not a text file listing image paths (one per "
                         f"line): {what}; pass a folder of images or such a list")


def _listed_paths(path: Path) -> Iterator[str]:
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                raise ValueError(f"{os.fspath(path)!r}: line {number} is not UTF-8 text; a list "
                                 "of image paths is a UTF-8 text file, one path per line") from None
            if line:
                yield line


def predict_chunks(estimator: Any, images: Iterable[str | os.PathLike], chunk_size: int = 1000,
                   on_error: str = "skip") -> Iterator[tuple[list, np.ndarray, list]]:
    """Predict ``images`` ``chunk_size`` at a time; yield each chunk's paths, values and errors.

    Parameters
    ----------
    estimator : fitted classifier on images
        Its ``predict_proba`` is used (values: probabilities, one column per
        class), or ``predict`` when it has none (values: labels).
    images : iterable of paths
        Read lazily.
    chunk_size : int, default=1000
    on_error : {"skip", "raise"}, default="skip"
        A bad image: its error recorded (its row of values is NaN, or None
        for labels) and the chunk predicted again without it; or raised,
        naming the image and its index in ``images``.

    Returns
    -------
    iterator of (paths, values, errors)
        Per chunk: the list of paths (str), an ndarray of shape
        ``(len(paths), n_classes)`` or ``(len(paths),)``, and the list of
        errors (str, or None where the image was read).
    """
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error must be 'skip' or 'raise'; got {on_error!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) \
            or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer; got {chunk_size!r}")
    proba = hasattr(estimator, "predict_proba")
    method = estimator.predict_proba if proba else estimator.predict
    # checked now, not at the first chunk: a generator runs nothing until asked
    return _chunks(method, iter(images), chunk_size, on_error,
                   len(estimator.classes_) if proba else None)


def _chunks(method: Callable, iterator: Iterator, chunk_size: int, on_error: str,
            n_classes: int | None) -> Iterator[tuple[list, np.ndarray, list]]:
    start = 0
    while chunk := [os.fspath(p) for p in islice(iterator, chunk_size)]:
        values, errors = _predict_chunk(method, chunk, start, on_error, n_classes)
        yield chunk, values, errors
        start += len(chunk)


def _predict_chunk(method: Callable, paths: list[str], start: int, on_error: str,
                   n_classes: int | None) -> tuple[np.ndarray, list]:
    """``method`` on ``paths`` without the images that fail, each named by its index in all.

    Values are probabilities (NaN rows where failed) with ``n_classes``, else
    labels (None where failed).
    """
    errors: list[str | None] = [None] * len(paths)
    for i, path in enumerate(paths):
        # missing files and folders found by their metadata, not one failed call each
        try:
            if not is_url(path):
                regular_file(path, start + i)
        except (ImageLoadError, FileNotFoundError) as exc:
            if on_error == "raise":
                raise
            errors[i] = str(exc)
    todo, predicted = [i for i, error in enumerate(errors) if error is None], None
    while todo:
        try:
            predicted = method([paths[i] for i in todo])
            break
        except (ImageLoadError, FileNotFoundError) as exc:
            position = getattr(exc, "index", None)
            if not isinstance(position, int) or not 0 <= position < len(todo):
                raise  # not one image's fault
            index = todo[position]
            # the estimator saw this chunk's remaining images: the user's index is in the listing
            text = str(exc).replace(f"(index {position})", f"(index {start + index})")
            if on_error == "raise":
                raise _renamed(exc, text, start + index, paths[index]) from None
            errors[index] = text
            del todo[position]
    if n_classes is None:
        values = np.full(len(paths), None, dtype=object)
    else:
        values = np.full((len(paths), n_classes), np.nan)
    if predicted is not None:
        values[todo] = predicted
    return values, errors


def _renamed(exc: Exception, text: str, index: int, item: str) -> Exception:
    """``exc`` of the same type, saying ``text``, with the image's ``index`` and ``item``."""
    if isinstance(exc, ImageLoadError):
        return ImageLoadError(text, index, item)
    renamed = type(exc)(text)
    renamed.index, renamed.item = index, item  # as ImageLoadError's
    return renamed


def write_predictions(estimator: Any, images: Iterable[str | os.PathLike],
                      out: str | os.PathLike, *, chunk_size: int = 1000, on_error: str = "skip",
                      progress: bool = True, total: int | None = None) -> PredictionSummary:
    """Write ``estimator``'s predictions for image files to a CSV or Parquet file, streaming.

    Parameters
    ----------
    estimator : fitted classifier on images
        A ``FineTunedClassifier``, a pipeline starting with a
        ``CNNFeatureTransformer``, a ``StrategySearchCV``... With
        ``predict_proba``, one probability column per class.
    images : iterable of paths
        Read lazily, ``chunk_size`` at a time (see :func:`iter_image_paths`).
    out : path-like
        Ending in ``.csv`` or ``.parquet``, written by pyarrow's ``CSVWriter`` or
        ``ParquetWriter`` (one row group per chunk); an image that failed has empty
        (null) label and probabilities. Written under a
        temporary name and renamed when complete.
    chunk_size : int, default=1000
        Paths predicted per call and rows per write: the memory held.
    on_error : {"skip", "raise"}, default="skip"
        See the module docstring.
    progress : bool, default=True
        A tqdm progress bar, updated per chunk.
    total : int, optional
        The number of paths, for the bar's ETA.

    Returns
    -------
    PredictionSummary

    Warns
    -----
    UserWarning
        With ``on_error="skip"``, when images failed: how many and the first one's reason.

    Examples
    --------
    >>> import tempfile, pathlib, csv
    >>> import numpy as np
    >>> from PIL import Image
    >>> from torch import nn
    >>> from sklearn.linear_model import LogisticRegression
    >>> from sklearn.pipeline import make_pipeline
    >>> from sklearn_transfer import Backbone, CNNFeatureTransformer, DataConfig
    >>> from sklearn_transfer.predictions import write_predictions
    >>> tmp = pathlib.Path(tempfile.mkdtemp())
    >>> paths = []
    >>> for i in range(4):
    ...     paths.append(str(tmp / f"{i}.png"))
    ...     Image.fromarray(np.full((32, 32, 3), 60 * i, np.uint8)).save(paths[-1])
    >>> net = Backbone([("conv", nn.Conv2d(3, 8, 3))], DataConfig(input_size=32))
    >>> model = make_pipeline(CNNFeatureTransformer(net, engine="torch", progress=False),
    ...                       LogisticRegression()).fit(paths, ["dark", "dark", "light", "light"])
    >>> summary = write_predictions(model, iter(paths), tmp / "out.csv", progress=False)
    >>> summary.n_images, summary.n_failed
    (4, 0)
    >>> rows = list(csv.DictReader(open(tmp / "out.csv")))
    >>> list(rows[0]), rows[0]["label"]
    (['path', 'label', 'dark', 'light', 'error'], 'dark')
    """
    from tqdm.auto import tqdm

    started = time.perf_counter()
    out = Path(out)
    fmt = output_format(out)
    check_is_fitted(estimator)
    classes = np.asarray(estimator.classes_).tolist() if hasattr(estimator, "predict_proba") \
        else []
    columns = _columns(classes)
    n_images, n_failed, first_error = 0, 0, None
    labels = np.asarray(getattr(estimator, "classes_", [])).tolist()  # the label column's type
    with atomic_write(out) as tmp, _TableWriter(tmp, columns, labels, fmt) as writer, \
            tqdm(total=total, unit="img", desc="predict", disable=not progress) as bar:
        for paths, values, errors in predict_chunks(estimator, images, chunk_size, on_error):
            writer.write(paths, values, errors, estimator)
            failed = [e for e in errors if e is not None]
            n_images, n_failed = n_images + len(paths), n_failed + len(failed)
            first_error = first_error or (failed[0] if failed else None)
            if n_failed:
                bar.set_postfix(failed=n_failed, refresh=False)
            bar.update(len(paths))
        if n_images == 0:
            raise ValueError("no image paths to predict (an empty folder or list)")
    if n_failed:
        warnings.warn(f"{n_failed} of {n_images} images could not be read and have no "
                      f"prediction (the first: {first_error}); the error column of their rows "
                      "says why; on_error='raise' stops at the first one instead", stacklevel=2)
    return PredictionSummary(out, n_images, n_failed, time.perf_counter() - started, classes,
                             first_error)


def output_format(out: str | os.PathLike) -> str:
    """``"csv"`` or ``"parquet"``, from the suffix of ``out``, once it can be written there.

    Raises
    ------
    ValueError
        Another suffix.
    FileNotFoundError
        The folder of ``out`` does not exist.

    Examples
    --------
    >>> from sklearn_transfer.predictions import output_format
    >>> output_format("predictions.parquet")
    'parquet'
    """
    suffix = Path(out).suffix.lower()
    if suffix not in (".csv", ".parquet"):
        raise ValueError(f"the output {os.fspath(out)!r} must end in .csv or .parquet")
    if os.path.isdir(out):
        raise IsADirectoryError(f"the output {os.fspath(out)!r} is a folder; give a file name")
    if not os.path.isdir(os.path.dirname(os.path.abspath(out))):
        raise FileNotFoundError(f"cannot write {os.fspath(out)!r}: its folder does not exist")
    return suffix[1:]


def _columns(classes: list) -> list[str]:
    names = [str(c) for c in classes]
    taken = [n for n in names if n in _FIXED_COLUMNS]
    if taken or len(set(names)) != len(names):
        raise ValueError(f"the classes {classes!r} cannot each name a probability column: "
                         f"{taken or 'two are equal as text'} would repeat a column name "
                         f"(the others are {list(_FIXED_COLUMNS)})")
    return ["path", "label", *names, "error"]


def _labels(values: np.ndarray, errors: list, estimator: Any) -> list:
    """The predicted label of each row (None where the image failed)."""
    if values.ndim == 1:  # predict's labels already
        return [None if e is not None else v for v, e in zip(values, errors, strict=True)]
    best = np.asarray(estimator.classes_)[np.argmax(np.nan_to_num(values, nan=-1), axis=1)]
    return [None if e is not None else b for b, e in zip(best.tolist(), errors, strict=True)]


class _TableWriter:
    """Each chunk as one pyarrow table, appended by pyarrow's CSV or Parquet writer."""

    def __init__(self, path: str, columns: list[str], labels: list, fmt: str) -> None:
        import pyarrow as pa
        import pyarrow.csv
        import pyarrow.parquet

        try:
            label_type = pa.array(np.asarray(labels)).type if labels else pa.string()
        except (ValueError, pa.ArrowException):  # classes_ of several outputs: as text
            label_type = pa.string()
        fields = [("path", pa.string()), ("label", label_type)]
        fields += [(name, pa.float64()) for name in columns[2:-1]] + [("error", pa.string())]
        self.schema = pa.schema(fields)
        self.writer = (pyarrow.csv.CSVWriter if fmt == "csv"
                       else pyarrow.parquet.ParquetWriter)(path, self.schema)

    def __enter__(self) -> _TableWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.writer.close()

    def write(self, paths: list, values: np.ndarray, errors: list, estimator: Any) -> None:
        import pyarrow as pa

        labels = _labels(values, errors, estimator)
        if values.ndim == 1:
            labels = [None if v is None else np.asarray(v).item() for v in labels]
        columns = [paths, labels]
        columns += [values[:, j] for j in range(values.shape[1])] if values.ndim == 2 else []
        columns.append(errors)
        self.writer.write_table(pa.table(
            [pa.array(c, type=f.type, from_pandas=True) for c, f in zip(columns, self.schema,
                                                                       strict=True)],
            schema=self.schema))
