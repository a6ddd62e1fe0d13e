"""Codes of large image collections, to and from a Parquet dataset: :func:`extract_codes`.

:func:`extract_codes` runs a fitted :class:`~sklearn_transfer.CNNFeatureTransformer`
over a collection too large for one ``transform`` call and writes the codes
to a directory, one Parquet file per partition of the input;
:func:`read_codes` reads them back as one float32 array and
:func:`iter_codes` streams them in batches.

The directory
-------------
``manifest.json``
    The computation (its :attr:`~sklearn_transfer.CodesComputation.key`
    and description), the number of images, the partition size, and a
    SHA-256 of the image list and labels: what makes a rerun the *same* job.
``part-{index:05d}-{key[:16]}.parquet``
    Rows ``index * partition_size`` onwards, in input order, with columns

    * ``index`` (int64): the image's position in the input;
    * ``path`` (string): its absolute path;
    * ``key`` (binary(32)): its content key,
      :func:`~sklearn_transfer.cache.content_key` (the SHA-256 of its bytes);
    * ``label``: when ``labels`` were given;
    * ``codes`` (fixed_size_list<float32>[n_features]).

    Each file's schema metadata holds the computation key too.

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
Temporary files of a run killed mid-write are removed by a later run.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.base import clone

from sklearn_transfer.backbones import module_fingerprint
from sklearn_transfer.cache import _file_key
from sklearn_transfer.computation import CodesComputation
from sklearn_transfer.features import CNNFeatureTransformer
from sklearn_transfer.files import atomic_write
from sklearn_transfer.images import IMG_EXTENSIONS, ImageLoadError, ImageSource, load_item

__all__ = ["ExtractedCodes", "ExtractionSummary", "extract_codes", "iter_codes", "read_codes"]

MANIFEST = "manifest.json"
FORMAT = 1
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
    """

    out: Path
    n_images: int
    n_partitions: int
    n_computed: int
    n_images_computed: int
    seconds: float


def extract_codes(
    images: Sequence[str | os.PathLike] | np.ndarray | str | os.PathLike,
    out: str | os.PathLike,
    transformer: CNNFeatureTransformer | None = None,
    *,
    labels: Sequence[Any] | np.ndarray | None = None,
    client: Any = None,
    partition_size: int = 1000,
    progress: bool | str = "auto",
) -> ExtractionSummary:
    """Write the codes of many image files to a Parquet dataset, resumably.

    Parameters
    ----------
    images : sequence of paths, 1-D array of paths, or a folder
        A folder means every image file under it (any depth), in sorted
        order; for class folders with labels use
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

    Returns
    -------
    ExtractionSummary

    Raises
    ------
    ValueError
        ``out`` holds another job: another computation (the message names
        both), image list, labels or partition size.
    ImageLoadError, FileNotFoundError
        An image cannot be read, named by its path and index in ``images``
        (also when it failed on a Dask worker). Partitions already written
        stay; fix or remove the image and run the same call again.

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
    parallelises inside a batch anyway.

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
    """
    started = time.perf_counter()
    paths = _list_images(images)
    if labels is not None:
        labels = np.asarray(labels)
        if labels.ndim != 1 or len(labels) != len(paths):
            raise ValueError(f"labels must be 1-D with one label per image ({len(paths)}); got "
                             f"shape {labels.shape}")
    if isinstance(partition_size, bool) or not isinstance(partition_size, (int, np.integer)) \
            or partition_size < 1:
        raise ValueError(f"partition_size must be a positive integer; got {partition_size!r}")
    if progress not in (True, False, "auto"):
        raise ValueError(f"progress must be True, False or 'auto'; got {progress!r}")
    if client is not None and not isinstance(client, _import_distributed().Client):
        raise TypeError(f"client must be a dask.distributed.Client or None; got "
                        f"{type(client).__name__}")
    if transformer is None:
        transformer = CNNFeatureTransformer()
    if not isinstance(transformer, CNNFeatureTransformer):
        raise TypeError(f"transformer must be a CNNFeatureTransformer; got "
                        f"{type(transformer).__name__}")
    if not hasattr(transformer, "computation_"):
        transformer = clone(transformer).fit()  # the caller's estimator stays unfitted
    computation = transformer.computation_
    out = Path(out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    manifest = {
        "format": FORMAT,
        "computation": computation.key,
        "description": computation.describe(),
        "n_features": computation.n_features,
        "n_images": len(paths),
        "partition_size": int(partition_size),
        "images_sha256": _digest(paths, labels),
        "labels": labels is not None,
    }
    _check_or_write_manifest(out, manifest)
    for tmp in out.glob(".part-*.tmp"):  # left by a run killed mid-write
        with contextlib.suppress(OSError):  # (or removed by another run meanwhile)
            if time.time() - tmp.stat().st_mtime > STALE_TMP_S:
                tmp.unlink()

    starts = range(0, len(paths), partition_size)
    todo = [(i, start) for i, start in enumerate(starts)
            if not (out / _part_name(i, computation.key)).exists()]
    missing = sum(min(partition_size, len(paths) - start) for _, start in todo)
    from tqdm.auto import tqdm

    show = progress is True or (progress == "auto" and missing > 1000)
    bar = tqdm(total=missing, unit="img", disable=not show, desc="CNN codes")
    jobs = [(i, paths[s: s + partition_size],
             None if labels is None else labels[s: s + partition_size], s) for i, s in todo]
    # the inner per-transform bar would fight with this one
    shipped = copy.copy(transformer)
    shipped.progress = False
    with bar:
        if client is None:
            for job in jobs:
                bar.update(_write_partition(shipped, str(out), *job))
        else:
            _run_on_cluster(client, shipped, str(out), jobs, bar)
    return ExtractionSummary(out, len(paths), len(starts), len(todo), missing,
                             time.perf_counter() - started)


def _list_images(images: Any) -> list[str]:
    """The user's images as absolute path strings (the slot where URLs will go)."""
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
                                "paths (in-memory images fit CNNFeatureTransformer.transform)")
        if not paths:
            raise ValueError("images holds no paths; at least one is required")
    # absolute: a rerun from another directory must not resume with other files
    return [os.path.abspath(os.fspath(p)) for p in paths]


def _digest(paths: list[str], labels: np.ndarray | None) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.encode() + b"\0")
    if labels is not None:
        h.update(json.dumps(labels.tolist(), default=str).encode())
    return h.hexdigest()


def _part_name(index: int, key: str) -> str:
    return f"part-{index:05d}-{key[:16]}.parquet"


def _describe(description: dict, key: str) -> str:
    d = description
    return (f"{d['backbone']} stages={d['stage_names']} pooling={d['pooling']!r} "
            f"precision={d['precision']!r} engine={d['engine']!r} (key {key[:12]}…)")


def _read_manifest(out: Path) -> dict:
    try:
        return json.loads((out / MANIFEST).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{str(out)!r} holds no codes dataset (no {MANIFEST}); write "
                                "one with sklearn_transfer.extract_codes") from None


def _check_computation(stored: dict, key: str, description: dict, out: Path) -> None:
    if stored["computation"] != key:
        raise ValueError(
            f"{str(out)!r} holds codes of another computation: "
            f"{_describe(stored['description'], stored['computation'])}, not "
            f"{_describe(description, key)}; use another directory for these codes")


def _check_or_write_manifest(out: Path, manifest: dict) -> None:
    if not (out / MANIFEST).exists():
        if any(out.glob("part-*.parquet")):
            raise ValueError(f"{str(out)!r} holds Parquet partitions but no {MANIFEST}; "
                             "use an empty directory")
        with atomic_write(out / MANIFEST) as tmp:
            Path(tmp).write_text(json.dumps(manifest, indent=1))
        return
    stored = _read_manifest(out)
    if stored.get("format") != FORMAT:
        raise ValueError(f"{str(out)!r} holds a codes dataset of format {stored.get('format')}, "
                         f"this version writes format {FORMAT}; use another directory")
    _check_computation(stored, manifest["computation"], manifest["description"], out)
    for field, what in [("n_images", "number of images"), ("partition_size", "partition_size"),
                        ("images_sha256", "image list or labels")]:
        if stored[field] != manifest[field]:
            raise ValueError(
                f"{str(out)!r} holds the codes of another job (its {what} differs: "
                f"{stored[field]!r} there, {manifest[field]!r} here); a rerun resumes only the "
                "same images, labels and partition_size: use another directory")


@dataclass
class _PartitionSource(ImageSource):
    """The paths of one partition, whose errors name the index in the whole input."""

    start: int = 0

    def load(self, index: int, draft_size: int | None = None) -> Any:
        return load_item(self.data[index], self.start + index, draft_size)


def _write_partition(transformer: CNNFeatureTransformer, out: str, index: int,
                     paths: list[str], labels: np.ndarray | None, start: int) -> int:
    """Compute one partition and write its file atomically; returns its number of rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    computation = transformer.computation_
    codes = transformer.transform(_PartitionSource(paths, "items", start))
    keys = [_file_key(p, start + i) for i, p in enumerate(paths)]
    columns = {
        "index": pa.array(np.arange(start, start + len(paths)), pa.int64()),
        "path": pa.array(paths, pa.string()),
        "key": pa.array(keys, pa.binary(32)),
    }
    if labels is not None:
        columns["label"] = pa.array(labels)
    columns["codes"] = pa.FixedSizeListArray.from_arrays(
        pa.array(codes.ravel(), pa.float32()), codes.shape[1])
    table = pa.table(columns).replace_schema_metadata(
        {"sklearn_transfer.computation": computation.key})
    with atomic_write(Path(out) / _part_name(index, computation.key)) as tmp:
        # dictionaries pay for repeated labels only, never for unique paths or floats
        pq.write_table(table, tmp, use_dictionary=["label"] if labels is not None else False)
    return len(paths)


# ------------------------------------------------------------------------------ on Dask

#: per worker process: a transformer for the computation it last ran, with its network built
#: once (its engine serves several threads: one inference request per batch)
_TRANSFORMERS: dict[str, CNNFeatureTransformer] = {}
_LOCK = threading.Lock()


def _import_distributed() -> Any:
    try:
        import distributed
    except ImportError as exc:
        raise ImportError(
            f"extract_codes(client=...) needs dask.distributed ({exc}); install it with "
            "pip install 'sklearn-transfer[dask]', or pass client=None") from None
    return distributed


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _engine_threads(client: Any) -> dict[str, int]:
    """Torch/OpenVINO threads for each worker: its machine's cores over its Dask threads."""
    workers = client.scheduler_info()["workers"]
    cores = client.run(_usable_cores)
    on_host = Counter()
    for info in workers.values():
        on_host[info["host"]] += info["nthreads"]
    return {a: max(1, cores.get(a, 1) // on_host[info["host"]]) for a, info in workers.items()}


def _on_worker(shipped: CNNFeatureTransformer, threads: dict[str, int]) -> CNNFeatureTransformer:
    """This worker's transformer for ``shipped``'s computation, its network built once."""
    import torch
    from distributed import get_worker

    computation = shipped.computation_
    with _LOCK:
        if computation.key not in _TRANSFORMERS:
            torch.set_num_threads(threads.get(get_worker().address, 1))
            network = computation.network().eval()
            if module_fingerprint(network) != computation.fingerprint:
                raise RuntimeError(
                    f"the worker {get_worker().address} builds another {computation.name} "
                    "network than the client (other weights or package versions "
                    "installed there); install the same versions on every worker")
            local = copy.copy(shipped)
            local.backbone_ = network
            _TRANSFORMERS.clear()  # one computation at a time: free the last one's weights
            _TRANSFORMERS[computation.key] = local
        return _TRANSFORMERS[computation.key]


def _partition_task(shipped: CNNFeatureTransformer, threads: dict[str, int], out: str,
                    index: int, paths: list[str], labels: np.ndarray | None, start: int) -> int:
    return _write_partition(_on_worker(shipped, threads), out, index, paths, labels, start)


def _run_on_cluster(client: Any, shipped: CNNFeatureTransformer, out: str, jobs: list,
                    bar: Any) -> None:
    distributed = _import_distributed()
    if not jobs:
        return
    if isinstance(shipped.computation_.backbone, str):
        shipped.backbone_ = None  # a named network travels by name: workers build it
    transformer = client.scatter(shipped, broadcast=True, hash=False)
    threads = _engine_threads(client)
    run = os.urandom(4).hex()  # a fresh name per call: never an erred result of an earlier one
    futures = [client.submit(_partition_task, transformer, threads, out, *job, pure=False,
                             key=f"sklearn_transfer-codes-{job[0]:05d}-{run}")
               for job in jobs]
    try:
        for future in distributed.as_completed(futures):
            try:
                bar.update(future.result())
            except (ImageLoadError, FileNotFoundError) as exc:
                # the message names the image; the worker's frames would only bury it
                raise exc.with_traceback(None) from None
    finally:
        with contextlib.suppress(Exception):  # an error or Ctrl-C: stop what still runs
            client.cancel(futures)


# ------------------------------------------------------------------------------ reading


@dataclass(frozen=True)
class ExtractedCodes:
    """Codes read back from a dataset :func:`extract_codes` wrote, in input order.

    Attributes
    ----------
    paths : ndarray of str, shape (n,)
        The images' absolute paths: the ids of the rows.
    keys : ndarray of object (bytes), shape (n,)
        Their content keys.
    codes : ndarray of float32, shape (n, n_features)
    labels : ndarray of shape (n,) or None
        When the dataset stores labels.
    computation : str
        The computation key.
    """

    paths: np.ndarray
    keys: np.ndarray
    codes: np.ndarray
    labels: np.ndarray | None
    computation: str


def _open_dataset(out: str | os.PathLike, computation: Any) -> tuple[dict, list[Path]]:
    """The manifest and the partition files, in order, checked complete and of one job."""
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
    key = manifest["computation"]
    n_parts = -(-manifest["n_images"] // manifest["partition_size"])
    files = [out / _part_name(i, key) for i in range(n_parts)]
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise ValueError(f"{str(out)!r} is incomplete: {len(missing)} of {n_parts} partitions "
                         f"missing ({missing[0]}, ...); run the same extract_codes call again "
                         "to finish it")
    return manifest, files


def _batch_to_codes(batch: Any, manifest: dict, name: str) -> ExtractedCodes:
    stored = (batch.schema.metadata or {}).get(b"sklearn_transfer.computation", b"").decode()
    if stored != manifest["computation"]:
        raise ValueError(f"{name} holds codes of computation {stored[:12] or 'unknown'}…, "
                         f"not the dataset's {manifest['computation'][:12]}…; it does not "
                         "belong in this directory")
    width = manifest["n_features"]
    codes = batch.column("codes")
    if hasattr(codes, "combine_chunks"):
        codes = codes.combine_chunks()
    values = codes.flatten().to_numpy(zero_copy_only=False)  # no copy: float32 without nulls
    return ExtractedCodes(
        paths=batch.column("path").to_numpy(zero_copy_only=False),
        keys=batch.column("key").to_numpy(zero_copy_only=False),
        codes=values.reshape(len(batch), width),
        labels=(batch.column("label").to_numpy(zero_copy_only=False)
                if manifest["labels"] else None),
        computation=manifest["computation"],
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
        ``paths``, ``keys``, ``codes`` (float32, ``(n, n_features)``) and
        ``labels`` (or ``None``), in the order of the input images.

    Notes
    -----
    Files are memory-mapped and decoded by pyarrow into one preallocated
    float32 array, so the codes take their size in memory once. For codes
    larger than memory, stream them with :func:`iter_codes`.

    Examples
    --------
    See :func:`extract_codes` and :func:`iter_codes`.
    """
    import pyarrow.parquet as pq

    manifest, files = _open_dataset(out, computation)
    n = manifest["n_images"]
    codes = np.empty((n, manifest["n_features"]), dtype=np.float32)
    parts, pos = [], 0
    for f in files:
        part = _batch_to_codes(pq.read_table(f, memory_map=True), manifest, f.name)
        if pos + len(part.codes) > n:
            raise ValueError(f"{f.name} holds more rows than the dataset has images")
        codes[pos: pos + len(part.codes)] = part.codes
        pos += len(part.codes)
        parts.append(part)
    if pos != n:
        raise ValueError(f"{str(out)!r} holds {pos} rows for {n} images; it is damaged")
    return ExtractedCodes(
        paths=np.concatenate([p.paths for p in parts]),
        keys=np.concatenate([p.keys for p in parts]),
        codes=codes,
        labels=np.concatenate([p.labels for p in parts]) if manifest["labels"] else None,
        computation=manifest["computation"],
    )


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
        Rows per batch (a batch does not span two partition files).

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
    ...     clf = clf.partial_fit(batch.codes, batch.labels, classes=[0, 1])
    >>> clf.predict(batch.codes).shape
    (1,)
    """
    import pyarrow.parquet as pq

    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
            or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}")
    manifest, files = _open_dataset(out, computation)  # checked now, not at the first batch

    def batches() -> Iterator[ExtractedCodes]:
        for f in files:
            with pq.ParquetFile(f, memory_map=True) as parquet:
                metadata = parquet.schema_arrow.metadata
                for batch in parquet.iter_batches(batch_size=batch_size):
                    yield _batch_to_codes(batch.replace_schema_metadata(metadata), manifest,
                                          f.name)

    return batches()
