"""Codes of large image collections, to and from a Parquet dataset: :func:`extract_codes`.

:func:`extract_codes` runs a fitted :class:`~sklearn_transfer.CNNFeatureTransformer`
over a collection too large for one ``transform`` call and writes the codes
to a directory, one Parquet file per partition of the input;
:func:`read_codes` reads them back as one float32 array and
:func:`iter_codes` streams them in batches.

The directory
-------------
Every Parquet reader opens it as it is (``pandas.read_parquet(out)``,
``pyarrow.dataset.dataset(out)``, ``dask.dataframe.read_parquet(out)``,
DuckDB's and Polars' ``out/*.parquet``): the job's own file starts with
``_``, which those readers skip, as Hive, Spark and Arrow do.

``_manifest.json``
    The format tag, the computation (its :attr:`~sklearn_transfer.CodesComputation.key`
    and description), the number of images, the partition size, and a
    SHA-256 of the image list and labels: what makes a rerun the *same* job.
    It is created exclusively, so two jobs started together into one empty
    directory cannot both claim it.
``part-{index:05d}-{key[:16]}.parquet``
    Rows ``index * partition_size`` onwards, in input order, with columns

    * ``index`` (int64): the image's position in the input;
    * ``path`` (string): its absolute path, or its URL as given;
    * ``key`` (binary(32)): its content key,
      :func:`~sklearn_transfer.identity.content_key` (the SHA-256 of its bytes;
      null when they could not be read);
    * ``label``: when ``labels`` were given;
    * ``codes`` (fixed_size_list<float32>[n_features]; null for a failed image);
    * ``error`` (string): null, or why the image has no codes.

    Each file's schema metadata says where it belongs: the computation key,
    the job's digest, its first index and number of rows, its number of
    failed images, and a digest of its image files' paths, sizes and
    modification times when it was computed.

Images and URLs
---------------
Images are local paths or fsspec URLs (``s3://``, ``gs://``, ``http(s)://``,
``memory://``, ``file://``...), so workers need not share a file system
with the client for the images (the output directory they do share). Each
image is read once per computation: its bytes are hashed for its key and
decoded from memory.

Failures
--------
With ``on_error="skip"`` (the default) an image that cannot be read or
decoded (missing, empty, corrupt, a 404, a refused connection) does not
stop the job: its row stays in its partition with null codes and its
``error``, so every image of the input is in the dataset exactly once,
either with codes or as a failure. :func:`read_codes` and
:func:`iter_codes` return the codes of the good images and the failures
apart (``.failures``). A rerun does not retry failed images (their
partitions are complete: a corrupt file stays corrupt);
``retry_failed=True`` recomputes the partitions that hold failures, for
errors that may pass (a network outage). Errors that are no image's fault
(a protocol's package not installed, out of memory) always stop the job.

Why a fixed-size list column and not one column per feature: CNN codes are
1,000 to 4,000+ numbers used together, never one by one; Parquet keeps
metadata and statistics for every column of every row group, so thousands of
columns make files slow to write and open, while one list column is a single
contiguous float32 buffer that reads back as an ``(n, n_features)`` array
without any per-column assembly. The width is part of the type, so a
dataset cannot hold ragged codes. Tools that want columns (pandas, DuckDB,
Polars) unnest the list in one call.

Resuming
--------
A partition's file is written under a temporary name and renamed when
complete, so it is either whole or absent; a run stopped anywhere (Ctrl-C,
SIGKILL, a bad image, a reboot) leaves whole partitions only, and the same
call run again computes the missing partitions and nothing else. Each
partition has one file name, so no row is ever written twice. Partitions are
fixed by the input and ``partition_size``, which the manifest records: a
rerun with another image list, other labels, another partition size or
another computation is refused instead of mixing two jobs in one dataset.
A rerun also recomputes the partitions whose image files changed since
(size or modification time), and sets aside, with a warning naming them,
partition files that are damaged or do not belong where they sit (another
index, another job); temporary files of a run killed mid-write are removed.

On a cluster, a worker that dies mid-task (killed, out of memory) loses at
most the partition it was writing: Dask runs the task again on another
worker, and the rename makes the partition's file appear once. Memory per
worker is bounded by one partition (its codes and one batch of pixels,
never the whole input), whatever the number of images.
"""

from __future__ import annotations

import contextlib
import json
import numbers
import os
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from sklearn.base import clone

from sklearn_transfer.batches import ImageDataset, LoadFailure
from sklearn_transfer.cache import as_feature_cache
from sklearn_transfer.codes import image_batches, progress_bar, run_engine
from sklearn_transfer.computation import CodesComputation
from sklearn_transfer.engines import engine_for
from sklearn_transfer.features import CNNFeatureTransformer
from sklearn_transfer.files import atomic_write, check_format, format_tag
from sklearn_transfer.identity import bytes_key, data_digest
from sklearn_transfer.images import (
    IMG_EXTENSIONS,
    ImageLoadError,
    ImageSource,
    decode_image_bytes,
    is_url,
    read_images_bytes,
)
from sklearn_transfer.runtime import Runtime, usable_cores

__all__ = ["ExtractedCodes", "ExtractionSummary", "Failure", "extract_codes", "iter_codes",
           "read_codes"]

MANIFEST = "_manifest.json"
_AGAIN = "extract the codes again into another directory"
_RECOVER = ("run the same extract_codes call again: it sets damaged partitions aside and "
            "computes them again")
#: what a manifest holds, and of which type (a damaged or edited one is named, not trusted)
_MANIFEST_FIELDS = {"format": str, "computation": str, "description": dict, "n_features": int,
                    "n_images": int, "partition_size": int, "images_sha256": str,
                    "labels": bool}
#: how long extract_codes(client=...) waits for a worker before saying the cluster has none
WORKER_WAIT_S = 30.0
#: a running job's temporary file lives for the seconds one write takes; older ones are debris
STALE_TMP_S = 600


# ------------------------------------------------------------------------------ writing


@dataclass(frozen=True)
class ExtractionSummary:
    """What one :func:`extract_codes` call did.

    Attributes
    ----------
    out : Path
        The dataset's directory.
    n_images, n_partitions : int
        In the whole dataset.
    n_computed : int
        Partitions this call computed (the others were already written).
    n_images_computed : int
        Images in those partitions.
    seconds : float
        Wall time of this call.
    n_failed : int
        Images of the whole dataset that have no codes (see
        :attr:`ExtractedCodes.failures`).
    """

    out: Path
    n_images: int
    n_partitions: int
    n_computed: int
    n_images_computed: int
    seconds: float
    n_failed: int = 0


def extract_codes(
    images: Sequence[str | os.PathLike] | np.ndarray | str | os.PathLike,
    out: str | os.PathLike,
    transformer: CNNFeatureTransformer | None = None,
    *,
    labels: Sequence[Any] | np.ndarray | None = None,
    client: Any = None,
    partition_size: int = 1000,
    progress: bool | str = "auto",
    on_error: str = "skip",
    retry_failed: bool = False,
) -> ExtractionSummary:
    """Write the codes of many image files to a Parquet dataset, resumably.

    Parameters
    ----------
    images : sequence of paths or URLs, 1-D array of them, or a folder
        Local paths or fsspec URLs (``s3://``, ``gs://``, ``http(s)://``,
        ``memory://``, ``file://``; the protocol's package must be
        installed, e.g. ``aiohttp`` for HTTP). A folder (a path or a URL
        such as ``s3://bucket/images/``) means every image file under it
        (any depth), in sorted order; for class folders with labels use
        :func:`~sklearn_transfer.load_image_folder`.
    out : path-like
        The dataset's directory, created if missing. With a ``client`` the
        workers write the files, so it must be on a file system they share.
    transformer : CNNFeatureTransformer, optional
        Fitted or not (an unfitted one is cloned and fitted, which needs no
        data); default
        ``CNNFeatureTransformer()``. Its ``computation_`` is what the dataset
        holds.
    labels : array-like of shape (n_images,), optional
        Stored in a ``label`` column.
    client : dask.distributed.Client, optional
        Run the partitions as tasks on its cluster (needs the ``dask``
        extra). ``None`` computes them one after another in this process,
        which on a single machine is as fast (see the README).
    partition_size : int, default=1000
        Images per partition (per file and per task): what a stopped run
        loses at most per worker.
    progress : bool or "auto", default="auto"
        A tqdm progress bar in images/s, updated per partition; ``"auto"``
        shows it for more than 1,000 images to compute.
    on_error : {"skip", "raise"}, default="skip"
        What an image that cannot be read does. ``"skip"`` records it (its
        index, path or URL, and the reason) in its partition, without codes,
        and goes on: one bad file in a million must not throw away hours of
        work, and nothing is silent (``n_failed``, a warning, and
        ``read_codes(out).failures``). ``"raise"`` stops at the first one.
    retry_failed : bool, default=False
        Also recompute the partitions that hold failed images (for errors
        that may pass, such as a network outage); by default a rerun
        computes only missing partitions.

    Returns
    -------
    ExtractionSummary

    Raises
    ------
    ValueError
        ``out`` holds another job: another computation (the message names
        both), image list, labels or partition size.
    ImageLoadError, FileNotFoundError
        With ``on_error="raise"``: an image cannot be read, named by its
        path or URL and its index in ``images`` (also when it failed on a
        Dask worker). Partitions already written stay; fix or remove the
        image and run the same call again.

    Warns
    -----
    UserWarning
        With ``on_error="skip"``, when images of this call failed: how many
        and the first one's reason.

    Notes
    -----
    With a ``client``, the fitted transformer is sent once to every worker
    (a named network such as the default travels by name and weights, and
    each worker builds it and checks its fingerprint); tasks carry paths,
    never pixels. A worker builds the network and its engine once per
    computation, and sets
    ``torch.set_num_threads(cores // threads on that machine)``, which also
    sizes OpenVINO, so that Dask threads times engine threads match the cores.
    Give the workers one thread each (``threads_per_worker=1``): the engine
    parallelises inside a batch anyway. Images given as URLs are read by the
    workers themselves (``memory://`` objects live in one process: workers
    in other processes do not see them).

    The transformer's ``memory=`` cache serves its converted network but not
    the codes: the dataset is their store (a rerun resumes it), and each
    image is read once for its key and its pixels, which a cache lookup
    (hash, then decode) would make twice.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> import numpy as np
    >>> from PIL import Image
    >>> from torch import nn
    >>> from sklearn_transfer import (Backbone, CNNFeatureTransformer, DataConfig,
    ...                               extract_codes, read_codes)
    >>> tmp = pathlib.Path(tempfile.mkdtemp())
    >>> paths = []
    >>> for i in range(5):
    ...     paths.append(tmp / f"{i}.png")
    ...     Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(paths[-1])
    >>> net = Backbone([("conv", nn.Conv2d(3, 8, 3))], DataConfig(input_size=32), name="tiny")
    >>> tf = CNNFeatureTransformer(net, engine="torch", progress=False)
    >>> extract_codes(paths, tmp / "codes", tf, labels=[0, 1, 0, 1, 0],
    ...               partition_size=2).n_computed
    3
    >>> extract_codes(paths, tmp / "codes", tf, labels=[0, 1, 0, 1, 0],
    ...               partition_size=2).n_computed  # done already: a rerun resumes
    0
    >>> stored = read_codes(tmp / "codes")
    >>> stored.codes.shape, stored.labels.tolist()
    ((5, 8), [0, 1, 0, 1, 0])

    An unreadable image is recorded, not fatal:

    >>> _ = (tmp / "bad.png").write_bytes(b"not an image")
    >>> import warnings
    >>> with warnings.catch_warnings(record=True):
    ...     summary = extract_codes(paths + [tmp / "bad.png"], tmp / "codes2", tf)
    >>> summary.n_failed
    1
    >>> stored = read_codes(tmp / "codes2")
    >>> stored.codes.shape, stored.failures[0].index
    ((5, 8), 5)
    >>> print(stored.failures[0].reason)  # doctest: +ELLIPSIS
    image file '.../bad.png' (index 5) is not an image Pillow can read
    """
    started = time.perf_counter()
    paths = _list_images(images)
    labels = _check_labels(labels, len(paths))
    _check_options(partition_size, progress, on_error, retry_failed)
    if client is not None:
        _check_client(client)
    transformer = _fitted(transformer)
    computation = transformer.computation_
    out = _output_directory(out)
    manifest = {
        "format": format_tag("codes-dataset"),
        "computation": computation.key,
        "description": computation.describe(),
        "n_features": computation.n_features,
        "n_images": len(paths),
        "partition_size": int(partition_size),
        "images_sha256": data_digest(paths, labels, files="path"),
        "labels": labels is not None,
    }
    _claim(out, manifest)
    todo, kept_failed = _plan(out, manifest, paths, retry_failed)
    missing = sum(min(partition_size, len(paths) - start) for _, start in todo)
    jobs = [(i, paths[s: s + partition_size],
             None if labels is None else labels[s: s + partition_size], s) for i, s in todo]
    cache = as_feature_cache(transformer.memory)
    settings = _Settings(computation, manifest["images_sha256"], str(transformer.device),
                         transformer.batch_size, transformer.num_workers,
                         None if cache is None else cache.directory)
    with progress_bar(progress, missing) as bar:
        done = _Done(bar)
        if client is None:
            for job in jobs:
                done(_write_partition(settings, str(out), *job, on_error))
        else:
            _run_on_cluster(client, settings, str(out), jobs, on_error, done)
    if done.failed:
        warnings.warn(f"{done.failed} of {missing} images could not be read and have no codes "
                      f"(the first: {done.first_error}); they are listed in "
                      "read_codes(out).failures; on_error='raise' stops at the first one "
                      "instead", stacklevel=2)
    n_partitions = -(-len(paths) // partition_size)
    return ExtractionSummary(out, len(paths), n_partitions, len(todo), missing,
                             time.perf_counter() - started, kept_failed + done.failed)


def _check_labels(labels: Any, n_images: int) -> np.ndarray | None:
    """The labels as an array Parquet can store, one per image, of one kind, before any work."""
    import pyarrow as pa

    if labels is None:
        return None
    if not isinstance(labels, np.ndarray) or labels.dtype == object:
        kinds = {"text" if isinstance(v, str) else "number" if isinstance(v, numbers.Number)
                 else type(v).__name__ for v in labels}
        if {"text", "number"} <= kinds:
            raise ValueError(f"labels mix strings and numbers ({sorted(kinds)}); an array would "
                             "turn the numbers into text: give labels of one kind")
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) != n_images:
        raise ValueError(f"labels must be 1-D with one label per image ({n_images}); got "
                         f"shape {labels.shape}")
    try:
        pa.array(labels)
    except (pa.ArrowException, OverflowError, TypeError) as exc:
        index = next((i for i, v in enumerate(labels) if not _storable(v)), None)
        where = "" if index is None else f" (labels[{index}] = {labels[index]!r})"
        raise ValueError(f"labels cannot be stored in Parquet{where}: {exc}") from None
    return labels


def _storable(value: Any) -> bool:
    import pyarrow as pa

    try:
        pa.array([value])
    except (pa.ArrowException, OverflowError, TypeError):
        return False
    return True


def _check_options(partition_size: Any, progress: Any, on_error: Any, retry_failed: Any) -> None:
    if isinstance(partition_size, bool) or not isinstance(partition_size, (int, np.integer)) \
            or partition_size < 1:
        raise ValueError(f"partition_size must be a positive integer; got {partition_size!r}")
    if progress not in (True, False, "auto"):
        raise ValueError(f"progress must be True, False or 'auto'; got {progress!r}")
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error must be 'skip' or 'raise'; got {on_error!r}")
    if not isinstance(retry_failed, (bool, np.bool_)):
        raise ValueError(f"retry_failed must be True or False; got {retry_failed!r}")


def _fitted(transformer: Any) -> CNNFeatureTransformer:
    if transformer is None:
        transformer = CNNFeatureTransformer()
    if not isinstance(transformer, CNNFeatureTransformer):
        raise TypeError(f"transformer must be a CNNFeatureTransformer; got "
                        f"{type(transformer).__name__}")
    if not hasattr(transformer, "computation_"):
        transformer = clone(transformer).fit()  # the caller's estimator stays unfitted
    return transformer


def _output_directory(out: str | os.PathLike) -> Path:
    out = Path(out).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise ValueError(f"out={str(out)!r} is a file, not a directory; name a directory for "
                         "the codes dataset")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OSError(exc.errno, f"out={str(out)!r} cannot be created: {exc.strerror}") from None
    return out


def _plan(out: Path, manifest: dict, paths: list[str],
          retry_failed: bool) -> tuple[list[tuple[int, int]], int]:
    """The partitions to compute ``(index, start)``, and the failed images of the others.

    Missing partitions are computed; so are those whose image files changed
    since, and those failing their checks, set aside with a warning.
    """
    for tmp in out.glob(".part-*.tmp"):  # left by a run killed mid-write
        with contextlib.suppress(OSError):  # (or removed by another run meanwhile)
            if time.time() - tmp.stat().st_mtime > STALE_TMP_S:
                tmp.unlink()
    size, todo, kept_failed, changed = manifest["partition_size"], [], 0, []
    for i, start in enumerate(range(0, len(paths), size)):
        part = out / _part_name(i, manifest["computation"])
        state, failed = _partition_state(part, manifest, start, paths[start: start + size])
        if state == "ok" and not (retry_failed and failed):
            kept_failed += failed
            continue
        todo.append((i, start))
        if state == "changed":
            changed.append(part.name)
        elif state not in ("ok", "missing"):
            _set_aside(part, state)
    if changed:
        warnings.warn(f"the image files of {len(changed)} partitions changed since they were "
                      f"computed ({changed[0]}, ...): computing them again", stacklevel=3)
    return todo, kept_failed


def _set_aside(part: Path, reason: str) -> None:
    """Move a partition file that cannot be trusted out of the readers' way, warning."""
    target = part.with_name(f".damaged-{time.time_ns()}-{part.name}")
    with contextlib.suppress(OSError):
        part.rename(target)
    warnings.warn(f"{str(part)!r} {reason}; it was moved to {target.name!r} and is computed "
                  "again", RuntimeWarning, stacklevel=4)


class _Done:
    """Counts what the partitions report and shows it on the progress bar."""

    def __init__(self, bar: Any) -> None:
        self.bar, self.failed, self.first_error = bar, 0, None

    def __call__(self, result: tuple[int, int, str | None]) -> None:
        n_rows, n_failed, first_error = result
        if n_failed:
            self.failed += n_failed
            self.first_error = self.first_error or first_error
            self.bar.set_postfix(failed=self.failed, refresh=False)
        self.bar.update(n_rows)


def _list_images(images: Any) -> list[str]:
    """The user's images as absolute path strings or URLs (kept as given)."""
    if is_url(images):
        return _list_url_folder(images)
    if isinstance(images, (str, os.PathLike)):
        root = Path(images)
        if not root.is_dir():
            raise ValueError(f"images={os.fspath(images)!r} is not a folder; pass a folder or a "
                             "list of image paths")
        paths = sorted(str(p) for p in root.rglob("*")
                       if p.suffix.lower() in IMG_EXTENSIONS and p.is_file())
        if not paths:
            raise ValueError(f"images={os.fspath(images)!r}: no image files under this folder "
                             f"(extensions {list(IMG_EXTENSIONS)})")
    else:
        if isinstance(images, np.ndarray) and images.ndim != 1:
            raise ValueError(f"images must be a 1-D array of paths; got shape {images.shape}")
        paths = list(images)
        for i, p in enumerate(paths):
            if not isinstance(p, (str, os.PathLike)):
                raise TypeError(f"images[{i}] is a {type(p).__name__}; extract_codes takes file "
                                "paths or URLs (in-memory images fit "
                                "CNNFeatureTransformer.transform)")
        if not paths:
            raise ValueError("images holds no paths; at least one is required")
    # absolute: a rerun from another directory must not resume with other files
    return [p if is_url(p) else os.path.abspath(os.fspath(p)) for p in paths]


def _list_url_folder(url: str) -> list[str]:
    """Every image file under folder URL ``url``, in sorted order (fsspec's ``find``)."""
    try:
        import fsspec

        fs, root = fsspec.core.url_to_fs(url)
        found = fs.find(root) if fs.isdir(root) else None
    except ImportError as exc:
        raise ImportError(f"images={url!r}: listing a URL needs fsspec and the package for its "
                          f"protocol ({exc})") from None
    except Exception as exc:  # network, auth, protocol errors of any library
        raise ValueError(f"images={url!r}: the folder could not be listed "
                         f"({type(exc).__name__}: {exc})") from None
    if found is None:
        raise ValueError(f"images={url!r} is not a folder; pass a folder or a list of image "
                         "paths or URLs")
    paths = sorted(fs.unstrip_protocol(p) for p in found if p.lower().endswith(IMG_EXTENSIONS))
    if not paths:
        raise ValueError(f"images={url!r}: no image files under this folder "
                         f"(extensions {list(IMG_EXTENSIONS)})")
    return paths


def _part_name(index: int, key: str) -> str:
    return f"part-{index:05d}-{key[:16]}.parquet"


def _describe(description: dict, key: str) -> str:
    d = description
    return (f"{d['backbone']} stages={d['stage_names']} pooling={d['pooling']!r} "
            f"precision={d['precision']!r} engine={d['engine']!r} (key {key[:12]}…)")


def _read_manifest(out: Path) -> dict:
    """The dataset's manifest, checked to be this release's format and whole."""
    path = out / MANIFEST
    try:
        text = path.read_text()
    except FileNotFoundError:
        if (out / "manifest.json").is_file():  # written by a release before the format tags
            raise ValueError(f"{str(out)!r} holds a codes dataset of an older format, which "
                             f"this version does not read; {_AGAIN}") from None
        raise FileNotFoundError(f"{str(out)!r} holds no codes dataset (no {MANIFEST}); write "
                                "one with sklearn_transfer.extract_codes") from None
    try:
        manifest = json.loads(text)
    except ValueError:
        manifest = None
    if not isinstance(manifest, dict):
        raise ValueError(f"{str(path)!r} is damaged (not a JSON object); restore it, or "
                         f"{_AGAIN}")
    check_format("codes-dataset", manifest.get("format"), out, _AGAIN)
    for field, kind in _MANIFEST_FIELDS.items():
        value = manifest.get(field)
        if not isinstance(value, kind) or (kind is int and (isinstance(value, bool) or value
                                                            < (field != "n_images"))):
            raise ValueError(f"{str(path)!r} is damaged: its {field!r} is {value!r}; restore "
                             f"it, or {_AGAIN}")
    return manifest


def _check_computation(stored: dict, key: str, description: dict, out: Path) -> None:
    if stored["computation"] != key:
        raise ValueError(
            f"{str(out)!r} holds codes of another computation: "
            f"{_describe(stored['description'], stored['computation'])}, not "
            f"{_describe(description, key)}; use another directory for these codes")


def _create_exclusively(path: Path, text: str) -> None:
    """Write ``path`` whole unless it exists: of two jobs started together, one claims it."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        try:  # a hard link appears whole, and fails where the name exists
            os.link(tmp, path)
        except FileExistsError:
            pass
        except OSError:  # a file system without hard links: exclusive, if not atomic
            with contextlib.suppress(FileExistsError), open(path, "x") as fh:
                fh.write(text)
    finally:
        os.unlink(tmp)


def _claim(out: Path, manifest: dict) -> None:
    """Make ``out`` this job's: create its manifest exclusively, or check the one there."""
    path = out / MANIFEST
    if not path.exists():
        if any(out.glob("part-*.parquet")):
            raise ValueError(f"{str(out)!r} holds Parquet partitions but no {MANIFEST}; "
                             "use an empty directory")
        _create_exclusively(path, json.dumps(manifest, indent=1))
    stored = _read_manifest(out)
    _check_computation(stored, manifest["computation"], manifest["description"], out)
    for field, what in [("n_images", "number of images"), ("partition_size", "partition_size"),
                        ("images_sha256", "image list or labels")]:
        if stored[field] != manifest[field]:
            raise ValueError(
                f"{str(out)!r} holds the codes of another job (its {what} differs: "
                f"{stored[field]!r} there, {manifest[field]!r} here); a rerun resumes only the "
                "same images, labels and partition_size: use another directory")


class _PartitionImages(ImageDataset):
    """The images of one partition: each read once, hashed and decoded, failures returned.

    Items are ``(pixels or LoadFailure, position, key or None)``: a bad image
    travels with its batch (also out of DataLoader workers) instead of
    ending it, so the good images of the batch keep their codes. The
    DataLoader asks for a batch at once (``__getitems__``), so that the URLs
    of a batch are fetched concurrently.
    """

    def __init__(self, paths: list[str], start: int, config: Any) -> None:
        super().__init__(ImageSource(paths, "items"), config)
        self.start = start

    def __getitem__(self, i: int) -> tuple[Any, int, bytes | None]:
        return self.__getitems__([i])[0]

    def __getitems__(self, positions: list[int]) -> list[tuple[Any, int, bytes | None]]:
        items = [self.source.data[i] for i in positions]
        indices = [self.start + i for i in positions]
        batch = []
        for i, item, index, data in zip(positions, items, indices,
                                        read_images_bytes(items, indices), strict=True):
            if isinstance(data, BaseException):
                batch.append((LoadFailure(data), i, None))
                continue
            key = bytes_key(data)  # identity.content_key's, from the one read
            try:
                x = self.pixels(decode_image_bytes(data, item, index, self.draft_size))
                batch.append((x, i, key))
            except Exception as exc:  # judged by the caller: skipped or raised
                batch.append((LoadFailure(exc), i, key))
        return batch


def _collate(batch: list) -> tuple[Any, list[int], list[tuple[int, bytes | None]], list]:
    """``(pixels of the good images or None, their positions, all keys, failures)``."""
    good = [(x, i) for x, i, _ in batch if not isinstance(x, LoadFailure)]
    xs = torch.stack([x for x, _ in good]).permute(0, 3, 1, 2) if good else None
    failures = [(i, x.error) for x, i, _ in batch if isinstance(x, LoadFailure)]
    return xs, [i for _, i in good], [(i, k) for _, i, k in batch], failures


class _Settings(NamedTuple):
    """How a partition's codes are computed: what a task needs besides its images."""

    computation: CodesComputation
    job: str  # the manifest's digest of the image list and labels
    device: str
    batch_size: int
    num_workers: int
    directory: str | None  # where OpenVINO keeps converted networks


def _partition_codes(settings: _Settings, paths: list[str], start: int,
                     on_error: str) -> tuple[np.ndarray, list, list[str | None]]:
    """Codes (zeros where failed), content keys and errors of one partition's images."""
    computation = settings.computation
    runtime = Runtime.from_device(settings.device, computation.precision)
    engine = engine_for(computation, runtime.device, directory=settings.directory)
    batches = image_batches(_PartitionImages(paths, start, computation.data_config), runtime,
                            settings.batch_size, settings.num_workers, collate_fn=_collate)
    codes = np.zeros((len(paths), computation.n_features), dtype=np.float32)
    keys: list[bytes | None] = [None] * len(paths)
    errors: list[str | None] = [None] * len(paths)

    def good_images():
        for xs, positions, batch_keys, failures in batches:
            for i, exc in failures:
                # only the image's own faults are skipped; a missing package stops the job
                if on_error == "raise" or not isinstance(exc, (ImageLoadError,
                                                               FileNotFoundError)):
                    raise exc
                errors[i] = str(exc)
            for i, key in batch_keys:
                keys[i] = key
            if xs is not None:
                yield xs, positions

    for batch_codes, positions in run_engine(engine, good_images(), settings.batch_size):
        codes[positions] = batch_codes
    return codes, keys, errors


def _write_partition(settings: _Settings, out: str, index: int,
                     paths: list[str], labels: np.ndarray | None, start: int,
                     on_error: str = "raise") -> tuple[int, int, str | None]:
    """Compute one partition and write its file atomically.

    Returns its number of rows, of failed images, and the first failure's reason.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    computation = settings.computation
    codes, keys, errors = _partition_codes(settings, paths, start, on_error)
    failed = [e is not None for e in errors]
    columns = {
        "index": pa.array(np.arange(start, start + len(paths)), pa.int64()),
        "path": pa.array(paths, pa.string()),
        "key": pa.array(keys, pa.binary(32)),
    }
    if labels is not None:
        columns["label"] = pa.array(labels)
    columns["codes"] = pa.FixedSizeListArray.from_arrays(
        pa.array(codes.ravel(), pa.float32()), codes.shape[1],
        mask=pa.array(failed) if any(failed) else None)
    columns["error"] = pa.array(errors, pa.string())
    table = pa.table(columns).replace_schema_metadata({
        "sklearn_transfer.computation": computation.key,
        "sklearn_transfer.job": settings.job,
        "sklearn_transfer.start": str(start),
        "sklearn_transfer.rows": str(len(paths)),
        "sklearn_transfer.n_failed": str(sum(failed)),
        "sklearn_transfer.images": data_digest(paths, files="stat"),
    })
    name = Path(out) / _part_name(index, computation.key)
    try:
        with atomic_write(name) as tmp:
            # dictionaries pay for repeated labels only, never for unique paths or floats
            pq.write_table(table, tmp, use_dictionary=["label"] if labels is not None else False)
    except OSError as exc:  # a full disk, a lost mount: the file, not pyarrow's words
        raise OSError(exc.errno, f"could not write the partition {str(name)!r}: "
                                 f"{exc.strerror or exc}") from None
    return len(paths), sum(failed), next((e for e in errors if e is not None), None)


def _partition_state(part: Path, manifest: dict, start: int,
                     images: list[str] | None = None) -> tuple[str, int]:
    """``("ok", n_failed)``, ``("missing", 0)``, ``("changed", 0)`` or (what is wrong, 0).

    A partition proves where it belongs by its footer (this job, this
    computation, its first index and number of rows, read without its rows);
    with ``images``, its image files must not have changed since.
    """
    import pyarrow.parquet as pq

    if not part.exists():
        return "missing", 0
    try:
        found = {k.decode(): v.decode() for k, v in (pq.read_schema(part).metadata or {}).items()
                 if k.startswith(b"sklearn_transfer.")}
    except Exception as exc:  # pyarrow's errors for cut, garbage or empty files
        return f"cannot be read as Parquet ({type(exc).__name__}: {exc})", 0
    n = min(manifest["partition_size"], manifest["n_images"] - start)
    expected = {"computation": manifest["computation"], "job": manifest["images_sha256"],
                "start": str(start), "rows": str(n)}
    for field, value in expected.items():
        if found.get(f"sklearn_transfer.{field}") != value:
            return (f"does not belong here (its {field} is "
                    f"{found.get(f'sklearn_transfer.{field}')!r}, not {value!r})"), 0
    if images is not None and found.get("sklearn_transfer.images") != data_digest(
            images, files="stat"):
        return "changed", 0
    return "ok", int(found.get("sklearn_transfer.n_failed", 0))


# ------------------------------------------------------------------------------ on Dask

def _import_distributed() -> Any:
    try:
        import distributed
    except ImportError as exc:
        raise ImportError(
            f"extract_codes(client=...) needs dask.distributed ({exc}); install it with "
            "pip install 'sklearn-transfer[dask]', or pass client=None") from None
    return distributed


def _check_client(client: Any) -> None:
    """A client that can run the job now: open, with a worker, within a bounded wait."""
    distributed = _import_distributed()
    if not isinstance(client, distributed.Client):
        raise TypeError(f"client must be a dask.distributed.Client or None; got "
                        f"{type(client).__name__}")
    if client.status != "running":
        raise ValueError(f"client={client!r} is {client.status}: connect a new "
                         "dask.distributed.Client, or pass client=None")
    try:
        client.wait_for_workers(1, timeout=WORKER_WAIT_S)
    except Exception as exc:  # distributed's timeouts and closed comms
        reason = f" ({type(exc).__name__}: {exc})" if str(exc) else ""
        raise ValueError(f"client={client!r} has no worker to run the partitions: none "
                         f"joined within {WORKER_WAIT_S:g} s{reason}; start workers, or pass "
                         "client=None") from None


def _engine_threads(client: Any) -> dict[str, int]:
    """Torch/OpenVINO threads for each worker: its machine's cores over its Dask threads."""
    workers = client.scheduler_info()["workers"]
    cores = client.run(usable_cores)
    on_host = Counter()
    for info in workers.values():
        on_host[info["host"]] += info["nthreads"]
    return {a: max(1, cores.get(a, 1) // on_host[info["host"]]) for a, info in workers.items()}


def _partition_task(settings: _Settings, threads: dict[str, int], out: str,
                    index: int, paths: list[str], labels: np.ndarray | None, start: int,
                    on_error: str) -> tuple[int, int, str | None]:
    from distributed import get_worker

    # Dask threads times engine threads match the worker's share of the cores (it also
    # sizes OpenVINO); set before the engine of this process is built
    torch.set_num_threads(threads.get(get_worker().address, 1))
    return _write_partition(settings, out, index, paths, labels, start, on_error)


def _run_on_cluster(client: Any, settings: _Settings, out: str, jobs: list,
                    on_error: str, done: _Done) -> None:
    distributed = _import_distributed()
    if not jobs:
        return
    # a named network travels by name (workers build it, checked against its fingerprint)
    shipped = client.scatter(settings, broadcast=True, hash=False)
    threads = _engine_threads(client)
    run = os.urandom(4).hex()  # a fresh name per call: never an erred result of an earlier one
    futures = [client.submit(_partition_task, shipped, threads, out, *job, on_error,
                             pure=False, key=f"sklearn_transfer-codes-{job[0]:05d}-{run}")
               for job in jobs]
    try:
        for future in distributed.as_completed(futures):
            try:
                done(future.result())
            except (ImageLoadError, FileNotFoundError) as exc:
                # the message names the image; the worker's frames would only bury it
                raise exc.with_traceback(None) from None
    finally:
        with contextlib.suppress(Exception):  # an error or Ctrl-C: stop what still runs
            client.cancel(futures)


# ------------------------------------------------------------------------------ reading


class Failure(NamedTuple):
    """An image that has no codes: its index in the input, its path or URL, and why."""

    index: int
    path: str
    reason: str


@dataclass(frozen=True)
class ExtractedCodes:
    """Codes read back from a dataset :func:`extract_codes` wrote, in input order.

    Only images with codes are rows; failed images are in ``failures``.

    Attributes
    ----------
    paths : ndarray of str, shape (n,)
        The images' absolute paths or URLs: the ids of the rows.
    keys : ndarray of object (bytes), shape (n,)
        Their content keys.
    codes : ndarray of float32, shape (n, n_features)
    labels : ndarray of shape (n,) or None
        When the dataset stores labels.
    computation : str
        The computation key.
    indices : ndarray of int64, shape (n,)
        The rows' positions in the input images (they skip failed images).
    failures : tuple of Failure
        The images without codes, in input order.
    """

    paths: np.ndarray
    keys: np.ndarray
    codes: np.ndarray
    labels: np.ndarray | None
    computation: str
    indices: np.ndarray
    failures: tuple[Failure, ...] = ()


def _open_dataset(out: str | os.PathLike, computation: Any) -> tuple[dict, Any]:
    """The manifest and a ``pyarrow.dataset`` of its partitions, in order, each checked."""
    import pyarrow.dataset as ds

    out = Path(out).expanduser().resolve()
    manifest = _read_manifest(out)
    if computation is not None:
        if isinstance(computation, CNNFeatureTransformer):
            if not hasattr(computation, "computation_"):
                computation = clone(computation).fit()  # as extract_codes resolves it
            computation = computation.computation_
        if not isinstance(computation, CodesComputation):
            raise TypeError(f"computation must be a CNNFeatureTransformer or a "
                            f"CodesComputation; got {type(computation).__name__}")
        _check_computation(manifest, computation.key, computation.describe(), out)
    size, key = manifest["partition_size"], manifest["computation"]
    files, missing = [], []
    for i, start in enumerate(range(0, manifest["n_images"], size)):
        part = out / _part_name(i, key)
        state, _ = _partition_state(part, manifest, start)
        if state == "missing":
            missing.append(part.name)
        elif state != "ok":
            raise ValueError(f"{str(part)!r} {state}; {_RECOVER}")
        files.append(str(part))
    if missing:
        raise ValueError(f"{str(out)!r} is incomplete: {len(missing)} of {len(files)} "
                         f"partitions missing ({missing[0]}, ...); run the same extract_codes "
                         "call again to finish it")
    return manifest, ds.dataset(files, format="parquet")


def _batch_to_codes(batch: Any, manifest: dict) -> ExtractedCodes:
    """A table or record batch of partitions -> the codes of its good images, its failures."""
    failures: tuple[Failure, ...] = ()
    error = batch.column("error")
    if error.null_count < len(batch):  # rows of failed images: out of the codes
        import pyarrow.compute as pc

        failed = pc.is_valid(error)
        rows = batch.filter(failed)
        failures = tuple(Failure(*row) for row in zip(
            rows.column("index").to_pylist(), rows.column("path").to_pylist(),
            rows.column("error").to_pylist(), strict=True))
        batch = batch.filter(pc.invert(failed))
    codes = batch.column("codes")
    if hasattr(codes, "combine_chunks"):
        codes = codes.combine_chunks()
    values = codes.flatten().to_numpy(zero_copy_only=False)  # no copy: float32 without nulls
    return ExtractedCodes(
        paths=batch.column("path").to_numpy(zero_copy_only=False),
        keys=batch.column("key").to_numpy(zero_copy_only=False),
        codes=values.reshape(len(batch), manifest["n_features"]),
        labels=(batch.column("label").to_numpy(zero_copy_only=False)
                if manifest["labels"] else None),
        computation=manifest["computation"],
        indices=batch.column("index").to_numpy(),
        failures=failures,
    )


def read_codes(out: str | os.PathLike, computation: Any = None) -> ExtractedCodes:
    """Read a whole codes dataset written by :func:`extract_codes`.

    Parameters
    ----------
    out : path-like
        The dataset's directory.
    computation : CNNFeatureTransformer or CodesComputation, optional
        The computation you expect; another one is refused with an error
        naming both.

    Returns
    -------
    ExtractedCodes
        ``paths``, ``keys``, ``codes`` (float32, ``(n, n_features)``),
        ``labels`` (or ``None``) and ``indices`` of the images with codes, in
        the order of the input images; the others in ``failures``.

    Notes
    -----
    The partitions are read as one ``pyarrow.dataset``; the codes take their
    size in memory about once. For codes larger than memory, stream them
    with :func:`iter_codes`.

    Examples
    --------
    See :func:`extract_codes` and :func:`iter_codes`.
    """
    manifest, dataset = _open_dataset(out, computation)
    codes = _batch_to_codes(dataset.to_table(), manifest)
    if len(codes.indices) + len(codes.failures) != manifest["n_images"]:
        raise ValueError(f"{os.fspath(out)!r} holds {len(codes.indices)} rows of codes and "
                         f"{len(codes.failures)} failures for {manifest['n_images']} images; "
                         f"it is damaged: {_RECOVER}")
    return codes


def iter_codes(out: str | os.PathLike, computation: Any = None, *,
               batch_size: int = 10_000) -> Iterator[ExtractedCodes]:
    """Stream a codes dataset in batches of at most ``batch_size`` rows, in input order.

    Memory stays at about one batch whatever the dataset's size: fit a linear
    head on codes that do not fit in memory with ``partial_fit``.

    Parameters
    ----------
    out : path-like
    computation : CNNFeatureTransformer or CodesComputation, optional
        See :func:`read_codes`.
    batch_size : int, default=10_000
        Rows per batch (a batch does not span two partition files). A
        batch's failed images are in its ``failures``, not in its rows, so
        it may hold fewer rows, none if all of them failed (skip it before
        ``partial_fit``, as below).

    Yields
    ------
    ExtractedCodes

    Examples
    --------
    >>> import tempfile, pathlib
    >>> import numpy as np
    >>> from PIL import Image
    >>> from sklearn.linear_model import SGDClassifier
    >>> from torch import nn
    >>> from sklearn_transfer import (Backbone, CNNFeatureTransformer, DataConfig,
    ...                               extract_codes, iter_codes)
    >>> tmp = pathlib.Path(tempfile.mkdtemp())
    >>> paths = []
    >>> for i in range(8):
    ...     paths.append(tmp / f"{i}.png")
    ...     Image.fromarray(np.full((32, 32, 3), 30 * i, np.uint8)).save(paths[-1])
    >>> net = Backbone([("conv", nn.Conv2d(3, 8, 3))], DataConfig(input_size=32), name="tiny")
    >>> tf = CNNFeatureTransformer(net, engine="torch", progress=False)
    >>> _ = extract_codes(paths, tmp / "codes", tf, labels=[0, 1] * 4, partition_size=4)
    >>> clf = SGDClassifier(random_state=0)
    >>> for batch in iter_codes(tmp / "codes", tf, batch_size=3):
    ...     if len(batch.codes):  # empty when all images of the batch failed
    ...         clf = clf.partial_fit(batch.codes, batch.labels, classes=[0, 1])
    >>> clf.predict(batch.codes).shape
    (1,)
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
            or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}")
    manifest, dataset = _open_dataset(out, computation)  # checked now, not at the first batch

    def batches() -> Iterator[ExtractedCodes]:
        for batch in dataset.to_batches(batch_size=batch_size):  # in file order
            yield _batch_to_codes(batch, manifest)

    return batches()
