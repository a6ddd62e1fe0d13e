"""Reading and writing files safely: SHA-256 digests, weights-only loading, atomic writes.

Every file this library trusts (pretrained weights, a user's state dict, a
training checkpoint) is read here, with ``torch.load(weights_only=True)``,
which refuses pickled Python objects (loading them can run arbitrary code);
every file it writes for later resuming is written here, atomically.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import torch

__all__ = ["atomic_save", "atomic_write", "load_weights_only", "sha256_file"]


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
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
    with atomic_write(path) as tmp:
        torch.save(obj, tmp)
