"""Identity: what makes two images, networks, fits or data sets the same.

Every key and digest of the library is computed here, so that the feature
cache, the codes dataset, training checkpoints and saved models agree on
what "the same" means:

* :func:`content_key`: an image's key, the SHA-256 of its content (a file's
  or URL's bytes, an in-memory image's pixels), never its path, so that an
  edited file gets a new key and a copied one the same;
* :func:`fingerprint`: the SHA-256 of any value: a network by its
  architecture and every tensor, parameters by a stable description
  (:func:`describe`), never by memory addresses that change per process;
* :func:`data_digest`: the SHA-256 of a list of images and their labels.

The SHA-256 of a file written for later is :func:`sklearn_transfer.files.sha256_file`.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from sklearn_transfer.files import hash_stream
from sklearn_transfer.images import (
    ImageSource,
    as_image_source,
    file_error,
    file_url_path,
    is_url,
    read_image_bytes,
    regular_file,
)

__all__ = ["bytes_key", "content_key", "data_digest", "describe", "digest", "fingerprint",
           "image_keys", "run_fingerprint"]

def digest(*parts: bytes | str) -> str:
    """Hex SHA-256 of one or more byte strings (text is UTF-8 encoded).

    Several parts are length-prefixed, so ``("ab", "c")`` and ``("a", "bc")``
    differ; one part hashes as itself.

    Examples
    --------
    >>> from sklearn_transfer.identity import digest
    >>> digest("")[:12], digest("ab", "c") == digest("a", "bc")
    ('e3b0c44298fc', False)
    """
    h = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else bytes(part)
        if len(parts) > 1:
            h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


# ----------------------------------------------------------------- images


def bytes_key(data: bytes) -> bytes:
    """The content key of an image file's or URL's bytes: SHA-256 of ``b"file:"`` and them."""
    h = hashlib.sha256(b"file:")
    h.update(data)
    return h.digest()


def content_key(source: ImageSource, index: int) -> bytes:
    """SHA-256 of image ``index``'s content: the key of its codes wherever they are kept.

    A file's or URL's bytes (not its path: an edited file gets a new key, a
    copied one the same), or an in-memory image's mode/dtype, shape and
    pixels. A file is read again only when it may have changed: within a
    process its key is reused while its device, inode, size, modification
    and change times stay the same.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn_transfer.identity import content_key
    >>> from sklearn_transfer.images import as_image_source
    >>> source = as_image_source(np.zeros((2, 8, 8, 3), dtype=np.uint8))
    >>> content_key(source, 0) == content_key(source, 1)
    True
    """
    item = source.item(index)
    if source.kind == "items" and isinstance(item, (str, os.PathLike)):
        return _file_key(item, index)
    if isinstance(item, Image.Image):
        head, data = f"pil:{item.mode}:{item.size}:", item.tobytes()
    else:
        if isinstance(item, torch.Tensor):
            item = item.detach().cpu().numpy()
        arr = np.ascontiguousarray(item)
        head, data = f"array:{arr.dtype}:{arr.shape}:", arr.tobytes()
    return hashlib.sha256(head.encode() + data).digest()


def image_keys(source: Any) -> list[bytes]:
    """The :func:`content_key` of every image.

    Parameters
    ----------
    source : ImageSource or images
        Anything :func:`~sklearn_transfer.images.as_image_source` accepts.

    Returns
    -------
    list of bytes
        32-byte digests, one per image, in order.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn_transfer.identity import image_keys
    >>> images = np.zeros((3, 8, 8, 3), dtype=np.uint8)
    >>> images[2] += 1
    >>> keys = image_keys(images)
    >>> keys[0] == keys[1], keys[0] == keys[2], len(keys[0])
    (True, False, 32)
    """
    source = as_image_source(source)
    return [content_key(source, i) for i in range(len(source))]


# A grid search keys the same files once per fold and candidate (61 times for 5 folds x 6
# settings), and reading and hashing every file each time would cost more than the head
# fits the search is about. So within a process a file's key is reused while its (device,
# inode, size, mtime, ctime) are unchanged, git's test for an unchanged file; on POSIX ctime
# cannot be set back by the user. As in git ("racy git"), a file whose times were less than
# _SETTLED_NS old when it was hashed is not remembered: rewritten within the file system's
# timestamp granularity, it could keep its times. Not on Windows, where st_ctime is the
# (settable) creation time. Network file systems may report stale times.
_FILE_KEYS: dict[str, tuple[tuple[int, ...], bytes]] = {}
_FILE_KEYS_MAX = 1_000_000  # ~250 MB at most; then start afresh
_SETTLED_NS = 2_000_000_000  # coarser than any local file system's timestamps


def _stamp(name: str, index: int) -> tuple[int, ...]:
    st = regular_file(name, index)  # a pipe or a device would never end
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _file_key(item: str | os.PathLike, index: int) -> bytes:
    """:func:`bytes_key` of the file's bytes, remembered while the file is unchanged.

    A URL's key is that of its bytes too (a URL and a local copy of the same
    file share it), read each time: an object store offers no test for
    "unchanged" that is as cheap and as sure as a file's inode and times.
    """
    name = os.fspath(item)
    if is_url(name):
        local = file_url_path(name)
        if local is None:
            return bytes_key(read_image_bytes(name, index))
        name = local
    try:
        before = _stamp(name, index)
        known = _FILE_KEYS.get(name)
        if known is not None and known[0] == before:
            return known[1]
        started = time.time_ns()
        with open(name, "rb") as fh:
            key = hash_stream(hashlib.sha256(b"file:"), fh).digest()
        after = _stamp(name, index)
    except OSError as exc:
        raise file_error(exc, item, index) from None
    settled = max(before[3], before[4]) < started - _SETTLED_NS
    if after == before and settled and sys.platform != "win32":
        if len(_FILE_KEYS) >= _FILE_KEYS_MAX:
            _FILE_KEYS.clear()
        _FILE_KEYS[name] = (before, key)
    return key


def data_digest(X: Any, y: Any = None, *, files: str = "stat") -> str:
    """Hex SHA-256 of a list of images and their labels.

    Parameters
    ----------
    X : images
        Anything :func:`~sklearn_transfer.images.as_image_source` accepts.
    y : array-like, optional
        Labels, hashed as text.
    files : {"stat", "path"}, default="stat"
        How image files and URLs count: by path, size and modification time
        (``"stat"``; reading every file would cost an epoch's worth of I/O),
        or by path alone. In-memory images count by their :func:`content_key`.

    Examples
    --------
    >>> from sklearn_transfer.identity import data_digest
    >>> data_digest(["a.jpg", "b.jpg"], files="path") == data_digest(["a.jpg"], files="path")
    False
    """
    source = as_image_source(X)
    h = hashlib.sha256()
    for i in range(len(source)):
        item = source.item(i) if source.kind == "items" else None
        if isinstance(item, (str, os.PathLike)):
            stamp = ""
            if files == "stat" and not is_url(item):
                try:
                    st = os.stat(item)
                    stamp = f"{st.st_size}:{st.st_mtime_ns}"
                except OSError:
                    stamp = "missing"  # the work itself raises the error that names it
            h.update(f"file:{os.fspath(item)}:{stamp}\0".encode())
        else:
            h.update(content_key(source, i))
    if y is not None:
        h.update(json.dumps(np.asarray(y).astype(str).tolist()).encode())
    return h.hexdigest()


# ------------------------------------------------------------ values, networks


def describe(value: Any, depth: int = 0) -> Any:
    """A JSON-able description of a parameter value, stable across processes.

    Memory addresses (default ``repr``) differ in every process and would
    make the same fit look like another one, so objects are described by
    their class and attributes, networks by their :func:`fingerprint`.

    Examples
    --------
    >>> from torch import nn
    >>> from sklearn_transfer.identity import describe
    >>> describe({"lr": 0.1, "opt": nn.Linear})
    {'lr': 0.1, 'opt': 'torch.nn.modules.linear.Linear'}
    """
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, nn.Module):
        return f"module:{fingerprint(value)}"
    if isinstance(value, type) or callable(value) and hasattr(value, "__qualname__"):
        return f"{getattr(value, '__module__', '')}.{value.__qualname__}"
    if isinstance(value, np.random.RandomState):
        _, keys, pos, *_ = value.get_state()
        return f"RandomState:{digest(keys.tobytes())}:{pos}"
    if isinstance(value, np.ndarray):
        arr = np.ascontiguousarray(value)
        return f"ndarray:{arr.dtype}:{arr.shape}:{digest(arr.tobytes())}"
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if depth > 4:
        return type(value).__qualname__
    if isinstance(value, (list, tuple)):
        return [describe(v, depth + 1) for v in value]
    if isinstance(value, dict):
        return {str(k): describe(v, depth + 1)
                for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    name = f"{type(value).__module__}.{type(value).__qualname__}"
    if hasattr(value, "get_params"):
        try:
            return [name, describe(value.get_params(deep=False), depth + 1)]
        except TypeError:
            pass
    if hasattr(value, "__dict__"):
        public = {k: v for k, v in vars(value).items() if not k.startswith("_")}
        return [name, describe(public, depth + 1)]
    return name


def fingerprint(value: Any) -> str:
    """Hex SHA-256 identifying ``value``, stable across processes and machines.

    A network (``nn.Module``) by its class name, architecture and the
    contents of every parameter and buffer (including non-persistent ones),
    so that it differs as soon as one weight changes; anything else by the
    JSON of :func:`describe`.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from sklearn_transfer.identity import fingerprint
    >>> net = nn.Conv2d(3, 4, 3)
    >>> a = fingerprint(net)
    >>> with torch.no_grad():
    ...     _ = net.bias.add_(1.0)
    >>> a == fingerprint(net), len(a), fingerprint({"lr": 0.1}) == fingerprint({"lr": 0.1})
    (False, 64, True)
    """
    if not isinstance(value, nn.Module):
        return digest(json.dumps(describe(value), sort_keys=True, default=str))
    h = hashlib.sha256()
    # the qualified name, not the module path: a class must hash the same whether its
    # file is imported as a module or run as __main__
    h.update(type(value).__qualname__.encode())
    h.update(b"\0" + nn.Module.__repr__(value).encode())  # Backbone overrides __repr__
    for name, tensor in [*value.named_parameters(), *value.named_buffers()]:
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"\0{name}:{t.dtype}:{tuple(tensor.shape)}:".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def run_fingerprint(estimator: Any, X: Any, y: Any,
                    ignore: tuple[str, ...] = ()) -> str:
    """Hex SHA-256 identifying a fit: the estimator's class and parameters, and the data.

    Parameters
    ----------
    estimator : BaseEstimator
    X : images
        Files count by path, size and modification time (:func:`data_digest`).
    y : array-like
    ignore : tuple of str
        Parameters that change neither the computation nor its result.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn.linear_model import LogisticRegression
    >>> from sklearn_transfer.identity import run_fingerprint
    >>> X, y = np.zeros((2, 8, 8, 3), np.uint8), [0, 1]
    >>> a = run_fingerprint(LogisticRegression(C=1.0), X, y)
    >>> a == run_fingerprint(LogisticRegression(C=2.0), X, y)
    False
    """
    params = {k: v for k, v in estimator.get_params(deep=False).items() if k not in ignore}
    return digest(fingerprint([type(estimator).__qualname__, params]), data_digest(X, y))
