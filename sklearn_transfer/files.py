"""Files this library writes and reads back: format tags, checksums, weights-only loading,
atomic writes.

Every file or folder the library writes for later (the feature cache, a
codes dataset, a training checkpoint, a saved model, an exported model) says
what it is with a format tag, ``"sklearn_transfer.<kind>/<version>"``
(:func:`format_tag`), checked when it is read back (:func:`check_format`);
files read back whole carry their SHA-256 (:func:`sha256_file`). Every file it trusts
(pretrained weights, a user's state dict, a training checkpoint) is read with
``torch.load(weights_only=True)``, which refuses pickled Python objects
(loading them can run arbitrary code); every file written for later
resuming is written atomically.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

__all__ = ["FORMATS", "FormatError", "atomic_save", "atomic_write", "check_format",
           "format_tag", "hash_stream", "load_weights_only", "sha256_file"]

#: The on-disk formats, by kind, with the version this release reads and writes. A version
#: changes when what is written changes meaning; older versions are refused, never guessed.
FORMATS = {
    "feature-cache": 1,  # FeatureCache's SQLite database (its user_version)
    "codes-dataset": 3,  # extract_codes' Parquet dataset
    "fit-checkpoint": 5,  # TrainingCheckpoint's file
    "persistence": 2,  # persistence.dump's zip file
    "converted-network": 1,  # an OpenVINO network kept in a feature cache directory
    "exported-model": 1,  # export()'s folder: an OpenVINO network and what it expects
}


class FormatError(ValueError):
    """A file or folder is not of the format (kind and version) this release reads."""


_CHUNK = 1 << 20


def hash_stream(h: Any, fh: BinaryIO) -> Any:
    """Feed hashlib object ``h`` with the rest of binary file ``fh`` in 1 MiB chunks; return it."""
    for chunk in iter(lambda: fh.read(_CHUNK), b""):
        h.update(chunk)
    return h


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks.

    Examples
    --------
    >>> import tempfile
    >>> from sklearn_transfer.files import sha256_file
    >>> with tempfile.NamedTemporaryFile() as fh:
    ...     sha256_file(fh.name)[:12]
    'e3b0c44298fc'
    """
    with open(path, "rb") as fh:
        return hash_stream(hashlib.sha256(), fh).hexdigest()


def format_tag(kind: str, version: int | None = None) -> str:
    """``"sklearn_transfer.<kind>/<version>"``, by default the version this release writes.

    Examples
    --------
    >>> from sklearn_transfer.files import format_tag
    >>> format_tag("persistence")
    'sklearn_transfer.persistence/2'
    """
    return f"sklearn_transfer.{kind}/{FORMATS[kind] if version is None else version}"


def check_format(kind: str, found: Any, where: str | os.PathLike, advice: str) -> None:
    """Raise :class:`FormatError` unless ``found`` is this release's tag of ``kind``.

    Parameters
    ----------
    kind : str
        A key of :data:`FORMATS`.
    found : object
        The tag read back (``None`` when there was none).
    where : str or path-like
        The file or folder, named in the message.
    advice : str
        What the user can do, ending the message.

    Examples
    --------
    >>> from sklearn_transfer.files import check_format, format_tag
    >>> check_format("persistence", format_tag("persistence"), "m.zip", "")
    >>> try:
    ...     check_format("persistence", None, "m.zip", "save it again")
    ... except ValueError as exc:
    ...     print(str(exc)[:40], "...", str(exc)[-30:])
    'm.zip' has no format tag, which this ve ... does not read; save it again
    """
    expected = format_tag(kind)
    if found == expected:
        return
    what = "no format tag" if found is None else f"format {found!r}"
    raise FormatError(f"{os.fspath(where)!r} has {what}, which this version of sklearn_transfer "
                      f"(format {expected!r}) does not read; {advice}")


def load_weights_only(path: str | os.PathLike | BinaryIO, what: str = "checkpoint",
                      name: str | None = None) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, with an error that names the file.

    Parameters
    ----------
    path : path-like or binary file object
    what : str
        What the file is, for the error message ("weights file", "training checkpoint").
    name : str, optional
        The name the error gives it (default: the path).

    Raises
    ------
    ValueError
        The file is damaged, not a torch file, or holds pickled objects.
    """
    import torch  # here: the exported-model loader reads this module without torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        name = os.fspath(path) if name is None else name
        raise ValueError(
            f"could not read the {what} {name!r} ({type(exc).__name__}): it is "
            "damaged, not a PyTorch file, or holds pickled Python objects, which are refused "
            "because loading them can run arbitrary code. Save plain tensors with "
            "torch.save(model.state_dict(), path)."
        ) from None


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary name next to ``path``; once written there, rename it over ``path``.

    The rename is atomic on POSIX and Windows: readers (and a job resumed
    after a crash) see the old file or the new one, never a partial write.
    On an error the temporary file is removed and ``path`` left as it was.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())  # the data on disk before the name points at it
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path`` atomically (see :func:`atomic_write`)."""
    import torch

    with atomic_write(path) as tmp:
        torch.save(obj, tmp)
