"""Anything a user passes as images -> RGB images -> uint8 batches, with clear errors.

Accepted collections (``X``):

* a sequence (list, tuple, 1-D array, pandas Series) of file paths (``str`` or
  ``pathlib.Path``), URLs, PIL images, ``(H, W)``/``(H, W, C)`` arrays or
  ``(C, H, W)`` tensors, mixed freely;
* a numpy array ``(n, H, W)`` or ``(n, H, W, C)`` with ``C`` in 1, 3, 4
  (channels last, as PIL and scikit-image use), uint8 or float in [0, 1];
* a torch tensor ``(n, C, H, W)`` (channels first, as torch uses), uint8 or
  float in [0, 1].

Every image becomes 8-bit RGB: grayscale is repeated, alpha is composited
on white, palette/CMYK/16-bit images are converted, the EXIF orientation
is applied. A bad item raises :class:`ImageLoadError` (a ``ValueError``) or
``FileNotFoundError`` naming the item and its index, in the caller's process.

A URL is a string ``scheme://...`` (or an fsspec chain ``a::b://...``) and is
read with fsspec (``s3://``, ``gs://``, ``http(s)://``, ``memory://``...: the
package for the protocol must be installed, e.g. ``aiohttp`` for HTTP,
``s3fs`` for S3); ``file://`` URLs are read as the local files they name.
Plain paths never touch fsspec. A missing object or a network error raises
``FileNotFoundError`` or :class:`ImageLoadError` naming the URL and its index.

This module does not import torch (a user who passes tensors has imported
it already); :mod:`sklearn_transfer.batches` turns the images into tensor
batches for the networks.
"""

from __future__ import annotations

import io
import os
import re
import stat
import struct
import sys
import urllib.parse
import urllib.request
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import simplejpeg
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["MAX_IMAGE_BYTES", "URL_CONCURRENCY", "URL_CONNECT_TIMEOUT", "URL_READ_TIMEOUT",
           "ImageLoadError", "ImageSource", "as_image_source", "decode_image_bytes", "file_error",
           "is_url", "load_image_folder", "read_image_bytes", "read_images_bytes", "regular_file"]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp",
                  ".gif")


class ImageLoadError(ValueError):
    """An input image could not be read; names the item and its index."""

    def __init__(self, message: str, index: int | None = None, item: Any = None) -> None:
        super().__init__(message)
        self.index = index
        self.item = item

    def __reduce__(self):  # keep index/item when crossing process boundaries
        return (type(self), (str(self), self.index, self.item))


def _is_tensor(item: Any) -> bool:
    """A torch tensor? (Without importing torch: no tensor exists before it is imported.)"""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(item, torch.Tensor)


def _describe(item: Any) -> str:
    if isinstance(item, (str, os.PathLike)):
        return repr(os.fspath(item))
    if isinstance(item, np.ndarray) or _is_tensor(item):
        return f"{type(item).__name__} of shape {tuple(item.shape)} and dtype {item.dtype}"
    return f"a {type(item).__module__}.{type(item).__name__}"


# ------------------------------------------------------------------ single images


def _to_rgb(im: Image.Image, index: int | None = None) -> Image.Image:
    """Any PIL mode -> RGB; alpha over white, 16-bit scaled to 8 bits."""
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(im, dtype=np.int64)
        if im.mode.startswith("I;16") or arr.max(initial=0) > 255:
            arr = arr >> 8  # 16-bit range -> 8 bits
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L").convert("RGB")
    if im.mode == "F":
        arr = np.asarray(im, dtype=np.float32)
        return _array_to_pil(arr, index)
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, im).convert("RGB")
    return im.convert("RGB")


def regular_file(path: str | os.PathLike, index: int) -> os.stat_result:
    """``os.stat`` of image file ``path``, refusing anything but a regular file.

    A named pipe or a device would block or never end once opened, so they
    are told apart by their metadata before anything reads them.
    """
    try:
        st = os.stat(path)
    except OSError as exc:
        raise file_error(exc, path, index) from None
    if stat.S_ISDIR(st.st_mode):
        raise file_error(IsADirectoryError(path), path, index)
    if not stat.S_ISREG(st.st_mode):
        kind = ("a named pipe (FIFO)" if stat.S_ISFIFO(st.st_mode) else
                "a socket" if stat.S_ISSOCK(st.st_mode) else "a device")
        raise ImageLoadError(
            f"image file {str(os.fspath(path))!r} (index {index}) is {kind}, not a regular file; "
            "pass image files only", index, path)
    return st


#: ``scheme://`` or an fsspec chain ``scheme::``; two letters at least, so ``C:/x`` is a path
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+(://|::)")


def is_url(item: Any) -> bool:
    """Whether ``item`` is a URL string (``pathlib.Path`` objects never are).

    Examples
    --------
    >>> from sklearn_transfer.images import is_url
    >>> is_url("s3://bucket/a.jpg"), is_url("simplecache::s3://b/a.jpg"), is_url("C:/a.jpg")
    (True, True, False)
    """
    return isinstance(item, str) and _URL.match(item) is not None


def file_url_path(url: str) -> str | None:
    """The local path a ``file://`` URL names, else ``None``."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme.lower() != "file" or parsed.netloc not in ("", "localhost"):
        return None
    return urllib.request.url2pathname(parsed.path)


def read_image_bytes(item: str | os.PathLike, index: int) -> bytes:
    """The bytes of image file or URL ``item``; errors name it and its index.

    Local paths (and ``file://`` URLs) are checked to be regular files
    first, with :func:`regular_file`; other URLs are read with fsspec.
    """
    if is_url(item):
        local = file_url_path(item)
        if local is None:
            return _read_url(item, index)
        item = local  # exactly a local path: the same checks, no fsspec
    if regular_file(item, index).st_size > MAX_IMAGE_BYTES:
        raise ImageLoadError(
            f"{_where(item, index)} has more than MAX_IMAGE_BYTES ({MAX_IMAGE_BYTES} bytes; "
            "sklearn_transfer.images.MAX_IMAGE_BYTES): not read", index, item)
    try:
        return Path(item).read_bytes()
    except OSError as exc:
        raise file_error(exc, item, index) from None


def read_images_bytes(items: Sequence[str | os.PathLike],
                      indices: Sequence[int]) -> list[bytes | Exception]:
    """The bytes of several images, or for each one that fails its error.

    As :func:`read_image_bytes` for each item, but URLs are fetched
    :data:`URL_CONCURRENCY` at a time: one request after another would leave
    a worker waiting for each round trip.

    Examples
    --------
    >>> import fsspec
    >>> from sklearn_transfer.images import read_images_bytes
    >>> fsspec.filesystem("memory").pipe("memory://doc-read/a.png", b"abc")
    >>> read_images_bytes(["memory://doc-read/a.png", "memory://doc-read/b.png"], [0, 1])
    [b'abc', FileNotFoundError("image URL 'memory://doc-read/b.png' (index 1) does not exist")]
    """
    from concurrent.futures import ThreadPoolExecutor

    def read(item: str | os.PathLike, index: int) -> bytes | Exception:
        try:
            return read_image_bytes(item, index)
        except Exception as exc:  # the caller decides: skipped or raised
            return exc

    remote = [is_url(item) and file_url_path(item) is None for item in items]
    if sum(remote) < 2:
        return [read(item, index) for item, index in zip(items, indices, strict=True)]
    # fsspec's blocking calls from several threads run concurrently on its event loop
    with ThreadPoolExecutor(URL_CONCURRENCY) as pool:
        return list(pool.map(read, items, indices))


#: requests in flight per batch: object stores take many more, but a small server's accept
#: queue drops the connections beyond a few, each then waiting for a retry
URL_CONCURRENCY = 4
#: seconds an http(s) image URL may take to connect: a server that accepts and never
#: answers fails then
URL_CONNECT_TIMEOUT = 10.0
#: seconds an http(s) image URL may take to send its next bytes (its headers included): a
#: server that stalls mid-way fails then
URL_READ_TIMEOUT = 30.0
#: bytes an image file or URL may have: a larger one is refused after reading this much
#: (as PIL.Image.MAX_IMAGE_PIXELS for pixels), never read whole
MAX_IMAGE_BYTES = 512 * 2**20


def _read_url(url: str, index: int) -> bytes:
    try:
        import fsspec
    except ImportError:
        raise ImportError(f"image URL {url!r} (index {index}): reading URLs needs fsspec; pip "
                          "install fsspec (and the package for the protocol, e.g. aiohttp for "
                          "http, s3fs for s3)") from None
    http = url.split(":", 1)[0].lower() in ("http", "https")
    try:
        if http:
            import aiohttp

            timeout = aiohttp.ClientTimeout(total=None, sock_connect=URL_CONNECT_TIMEOUT,
                                            sock_read=URL_READ_TIMEOUT)
            fs, path = fsspec.core.url_to_fs(url, client_kwargs={"timeout": timeout})
        else:
            fs, path = fsspec.core.url_to_fs(url)
        # streamed (block_size=0 over HTTP): no more than the limit is read, whatever is sent
        with fs.open(path, "rb", **({"block_size": 0} if http else {})) as fh:
            data = _read_at_most(fh, MAX_IMAGE_BYTES + 1)
    except Exception as exc:
        raise _url_error(exc, url, index) from None
    if len(data) > MAX_IMAGE_BYTES:
        raise ImageLoadError(
            f"image URL {url!r} (index {index}) holds more than MAX_IMAGE_BYTES "
            f"({MAX_IMAGE_BYTES} bytes; sklearn_transfer.images.MAX_IMAGE_BYTES): not read "
            "further", index, url)
    return data


def _read_at_most(fh: Any, limit: int) -> bytes:
    """Read ``fh`` to its end, or to ``limit`` bytes (a stream's read returns what has come)."""
    parts, size = [], 0
    while size < limit:
        part = fh.read(limit - size)
        if not part:
            break
        parts.append(part)
        size += len(part)
    return b"".join(parts)


def _is_timeout(exc: BaseException) -> bool:
    # asyncio's, aiohttp's and fsspec's timeouts have no common base but their names
    return isinstance(exc, TimeoutError) or "Timeout" in type(exc).__name__


def _url_error(exc: BaseException, url: str, index: int) -> Exception:
    """The error naming URL ``url`` at ``index`` for what fsspec or its backend raised."""
    where = f"image URL {url!r} (index {index})"
    if isinstance(exc, ImportError):  # the protocol's package: a set-up error, not this image's
        return ImportError(f"{where}: {exc}")
    # fsspec's HTTP "info" reports any failure as FileNotFoundError, the cause chained: the
    # first cause that is not a FileNotFoundError (a refused connection, a timeout) is it
    cause: BaseException | None = exc
    while isinstance(cause, FileNotFoundError):
        cause = cause.__cause__ or cause.__context__
    if cause is not None and getattr(cause, "status", None) != 404:  # an HTTP 404 is missing
        exc = cause
    if isinstance(exc, FileNotFoundError):
        missing = FileNotFoundError(f"{where} does not exist")
        missing.index, missing.item = index, url  # as ImageLoadError's, for callers remapping
        return missing
    if isinstance(exc, IsADirectoryError):
        return ImageLoadError(f"{where} is a directory, not an image", index, url)
    if _is_timeout(exc):
        connect = "Connect" in type(exc).__name__ or "connect" in str(exc).lower()
        limit, seconds = (("URL_CONNECT_TIMEOUT", URL_CONNECT_TIMEOUT) if connect
                          else ("URL_READ_TIMEOUT", URL_READ_TIMEOUT))
        what = "could not connect" if connect else "sent nothing more"
        return ImageLoadError(f"{where} {what} within {seconds:g} s "
                              f"(sklearn_transfer.images.{limit})", index, url)
    # network, auth, protocol errors of any library
    return ImageLoadError(f"{where} could not be read ({type(exc).__name__}: {exc})", index, url)


def open_image(path: str | os.PathLike, draft_size: int | None = None,
               index: int | None = None) -> Image.Image:
    """Read and decode an image file or URL to an RGB PIL image (see :func:`decode_image_bytes`)."""
    return decode_image_bytes(read_image_bytes(path, index), path, index, draft_size)


def decode_image_bytes(data: bytes, item: str | os.PathLike, index: int | None,
                       draft_size: int | None = None) -> Image.Image:
    """Decode the bytes of image file ``item`` to RGB PIL, applying EXIF orientation.

    Errors are :class:`ImageLoadError` naming ``item`` and ``index``.

    ``draft_size`` lets JPEGs decode at a reduced scale (1/2, 1/4 or 1/8, as
    Pillow's ``draft``) as long as both sides stay at least that large: far
    cheaper than decoding a large photo in full and shrinking it afterwards.

    Partial image data is an error, never gray rows: JPEGs are decoded by
    libjpeg-turbo (simplejpeg) with its warnings as errors, and a PNG whose
    compressed rows stop before its last row is refused.

    Examples
    --------
    >>> import io
    >>> from PIL import Image
    >>> from sklearn_transfer.images import decode_image_bytes
    >>> buffer = io.BytesIO()
    >>> Image.new("L", (4, 3)).save(buffer, "PNG")
    >>> decode_image_bytes(buffer.getvalue(), "memory://a.png", 0).mode
    'RGB'
    >>> decode_image_bytes(b"", "memory://b.png", 1)
    Traceback (most recent call last):
    ...
    sklearn_transfer.images.ImageLoadError: image URL 'memory://b.png' (index 1) is empty (0 bytes)
    """
    if not data:
        raise ImageLoadError(f"{_where(item, index)} is empty (0 bytes)", index, item)
    try:
        return _decode(data, item, draft_size, index)
    except ImageLoadError:
        raise  # already names the item
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise file_error(exc, item, index) from None


def _decode(data: bytes, item: str | os.PathLike, draft_size: int | None,
            index: int | None) -> Image.Image:
    with warnings.catch_warnings():
        # Pillow warns for images over MAX_IMAGE_PIXELS (and raises over twice that) before
        # knowing whether draft mode shrinks the decode; the warning below says what it costs
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(data)) as im:
            jpeg = im.format in ("JPEG", "MPO")  # MPO: the first image is a plain JPEG
            scale = _jpeg_scale(im.size, draft_size) if jpeg else 1
            limit = Image.MAX_IMAGE_PIXELS
            decoded = -(-im.width // scale) * -(-im.height // scale)
            if limit and decoded > limit:
                warnings.warn(
                    f"{_where(item, index)} has {im.width}x{im.height}"
                    f" pixels, more than PIL.Image.MAX_IMAGE_PIXELS ({limit}): decoding it "
                    f"takes about {decoded * 4 / 1e6:.0f} MB",
                    RuntimeWarning, stacklevel=4)
            if jpeg:
                decoded_im = _decode_jpeg(data, im, scale)
            else:
                im.load()
                if im.format == "PNG" and _png_rows_missing(data):
                    raise OSError("its compressed data ends before the last row")
                decoded_im = im
            # in place: a copy of every image without an orientation tag costs as much as
            # decoding it, and this image is ours
            ImageOps.exif_transpose(decoded_im, in_place=True)
            return _to_rgb(decoded_im)


def _jpeg_scale(size: tuple[int, int], draft_size: int | None) -> int:
    """Pillow's draft rule: the largest of 8, 4, 2 dividing both sides down to ``draft_size``."""
    if not draft_size:
        return 1
    ratio = min(size[0] // draft_size, size[1] // draft_size)
    return next((s for s in (8, 4, 2) if ratio >= s), 1)


def _decode_jpeg(data: bytes, header: Image.Image, scale: int) -> Image.Image:
    """Decode JPEG ``data`` at ``1/scale`` with libjpeg's warnings raised as ``ValueError``.

    libjpeg only warns ("premature end of data segment") when the data stops
    early and fills the rest with gray; Pillow ignores that warning.
    ``header`` is the file opened by Pillow, for its mode and metadata.
    """
    cmyk = header.mode == "CMYK"
    options = {"colorspace": "CMYK" if cmyk else "RGB",
               "min_width": -(-header.width // scale), "min_height": -(-header.height // scale)}
    try:
        arr = simplejpeg.decode_jpeg(data, strict=True, **options)
    except ValueError as exc:
        # junk just before the end marker is common in the wild and loses no pixel
        if "extraneous bytes before marker 0xd9" not in str(exc):
            raise
        arr = simplejpeg.decode_jpeg(data, strict=False, **options)
    if cmyk:  # inverted (Adobe) CMYK, as Pillow reads it
        im = Image.frombytes("CMYK", (arr.shape[1], arr.shape[0]), arr, "raw", "CMYK;I")
    else:
        im = Image.fromarray(arr)
    im.info = dict(header.info)  # the EXIF (or XMP) orientation, for exif_transpose
    return im


_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # by colour type
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2),
          (0, 1, 1, 2))  # (x0, y0, dx, dy) of the interlaced passes


def _png_rows_missing(data: bytes) -> bool:
    """Whether the IDAT stream of PNG ``data`` inflates to fewer bytes than its rows need.

    Pillow stops quietly when the zlib stream ends before the last row (as in
    a file cut and closed again, or a header claiming more rows than stored)
    and leaves the missing rows blank.
    """
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", data[16:29])
    bits = depth * _PNG_CHANNELS.get(colour, 1)
    need = 0
    for x0, y0, dx, dy in _ADAM7 if interlace else ((0, 0, 1, 1),):
        w, h = -(-(width - x0) // dx), -(-(height - y0) // dy)
        if w > 0 and h > 0:
            need += h * (1 + -(-w * bits // 8))  # a filter byte, then the packed pixels
    inflate, got, pos = zlib.decompressobj(), 0, 8
    while pos + 8 <= len(data) and got < need:
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"IDAT":
            chunk = data[pos + 8:pos + 8 + length]
            while chunk and got < need and not inflate.eof:
                try:
                    got += len(inflate.decompress(chunk, 1 << 20))  # bounded memory
                except zlib.error:
                    return True
                chunk = inflate.unconsumed_tail
        pos += 12 + length
    return got < need


def _array_to_pil(arr: np.ndarray, index: int | None, channels_first: bool = False) -> Image.Image:
    if channels_first:
        if arr.ndim != 3:
            raise ImageLoadError(
                f"image at index {index} is a tensor of shape {arr.shape}; expected (C, H, W)",
                index,
            )
        arr = np.moveaxis(arr, 0, -1)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
        raise ImageLoadError(
            f"image at index {index} has shape {arr.shape}; expected (H, W), (H, W, 3) or "
            "(H, W, 4) (channels last; pass torch tensors channels first)",
            index,
        )
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageLoadError(f"image at index {index} is empty: shape {arr.shape}", index)
    if arr.dtype == np.uint8:
        pass
    elif arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    elif np.issubdtype(arr.dtype, np.floating):
        _check_unit_range(arr, index)
        arr = np.round(arr.astype(np.float32) * 255.0).astype(np.uint8)
    elif np.issubdtype(arr.dtype, np.integer):
        if arr.min(initial=0) < 0 or arr.max(initial=0) > 255:
            raise ImageLoadError(
                f"image at index {index} is an integer array with values outside 0..255 "
                f"({arr.min()}..{arr.max()}); pass uint8, or floats in [0, 1]",
                index,
            )
        arr = arr.astype(np.uint8)
    else:
        raise ImageLoadError(f"image at index {index} has unsupported dtype {arr.dtype}", index)
    im = Image.fromarray(np.ascontiguousarray(arr))
    return _to_rgb(im)


def _check_unit_range(arr: np.ndarray, index: int | None) -> None:
    if not np.isfinite(arr).all():
        raise ImageLoadError(f"image at index {index} contains NaN or infinite values", index)
    lo, hi = float(arr.min(initial=0.0)), float(arr.max(initial=0.0))
    if lo < 0.0 or hi > 1.0:
        raise ImageLoadError(
            f"image at index {index} is a float array with values in [{lo:.3g}, {hi:.3g}]; "
            "float images must lie in [0, 1] (pass uint8 for 0..255)",
            index,
        )


# --------------------------------------------------------------------- collections


@dataclass
class ImageSource:
    """An indexable, picklable view of the user's images.

    ``kind`` is ``"items"`` (a sequence of paths/PIL/arrays), ``"array"``
    (an ``(n, H, W[, C])`` numpy batch) or ``"tensor"`` (``(n, C, H, W)``).
    """

    data: Any
    kind: str

    def __len__(self) -> int:
        return len(self.data)

    def item(self, index: int) -> Any:
        return self.data[index]

    def load(self, index: int, draft_size: int | None = None) -> Image.Image:
        """The ``index``-th image as RGB PIL; raises errors naming it."""
        if self.kind == "array":
            return _array_to_pil(self.data[index], index)
        if self.kind == "tensor":
            return _array_to_pil(self.data[index].numpy(), index, channels_first=True)
        return load_item(self.data[index], index, draft_size)


def _where(item: Any, index: int | None) -> str:
    return f"image {'URL' if is_url(item) else 'file'} {str(os.fspath(item))!r} (index {index})"


def file_error(exc: BaseException, item: Any, index: int) -> Exception:
    """The error that tells the user what is wrong with image file ``item`` at ``index``."""
    where = _where(item, index)
    if isinstance(exc, FileNotFoundError):
        missing = FileNotFoundError(f"{where} does not exist")
        missing.index, missing.item = index, item  # as ImageLoadError's, for callers remapping
        return missing
    if isinstance(exc, IsADirectoryError):
        return ImageLoadError(f"{where} is a directory, not an image file", index, item)
    if isinstance(exc, PermissionError):
        return ImageLoadError(f"{where} cannot be read: permission denied", index, item)
    if isinstance(exc, Image.DecompressionBombError):
        return ImageLoadError(
            f"{where} is too large to decode safely ({exc}); raise PIL.Image.MAX_IMAGE_PIXELS "
            "only if you trust the file",
            index,
            item,
        )
    if isinstance(exc, UnidentifiedImageError):  # empty data is refused before decoding
        return ImageLoadError(f"{where} is not an image Pillow can read", index, item)
    return ImageLoadError(
        f"{where} could not be decoded ({type(exc).__name__}: {exc}); it may be truncated "
        "or corrupt",
        index,
        item,
    )


def load_item(item: Any, index: int, draft_size: int | None = None) -> Image.Image:
    """One element of a sequence of images -> RGB PIL image."""
    if isinstance(item, (str, os.PathLike)):
        return open_image(item, draft_size, index)  # its errors name the item
    if isinstance(item, Image.Image):
        try:
            item.load()
            return _to_rgb(ImageOps.exif_transpose(item), index)
        except ImageLoadError:
            raise  # already names the item
        except (OSError, ValueError) as exc:
            raise ImageLoadError(
                f"PIL image at index {index} could not be loaded ({exc})", index
            ) from None
    if _is_tensor(item):
        return _array_to_pil(item.detach().cpu().numpy(), index, channels_first=True)
    if isinstance(item, np.ndarray):
        return _array_to_pil(item, index)
    raise TypeError(
        f"image at index {index} is {_describe(item)}; expected a file path (str or "
        "pathlib.Path), a PIL image, a numpy array (H, W[, C]) or a torch tensor (C, H, W)"
    )


def as_image_source(X: Any) -> ImageSource:
    """Validate a collection of images cheaply (no decoding) and wrap it.

    Parameters
    ----------
    X : sequence of images, numpy array or torch tensor
        See the module docstring.

    Returns
    -------
    ImageSource

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn_transfer.images import as_image_source
    >>> src = as_image_source(np.zeros((2, 8, 8, 3), dtype=np.uint8))
    >>> len(src), src.load(0).size
    (2, (8, 8))
    """
    if isinstance(X, ImageSource):
        return X
    if isinstance(X, (str, os.PathLike)):
        raise TypeError(
            f"X is a single path {os.fspath(X)!r}; pass a list of paths (use "
            "sklearn_transfer.load_image_folder to list a folder tree)"
        )
    if isinstance(X, Image.Image):
        raise TypeError("X is a single PIL image; pass a list of images")
    if _is_tensor(X):
        X = X.detach().cpu()
        if X.ndim != 4 or X.shape[1] not in (1, 3, 4):
            raise ValueError(
                f"a torch tensor X must be (n, C, H, W) with C in 1, 3, 4 (channels first); "
                f"got shape {tuple(X.shape)}"
            )
        if X.is_floating_point():
            _check_batch_range(X.numpy())
        return _nonempty(ImageSource(X, "tensor"))
    if hasattr(X, "iloc") and hasattr(X, "to_numpy"):  # pandas Series/DataFrame
        X = X.to_numpy()
        if X.ndim == 2 and X.shape[1] == 1:
            X = X[:, 0]
    if isinstance(X, np.ndarray) and X.dtype != object and X.dtype.kind not in "US":
        if X.ndim == 4 and X.shape[-1] not in (1, 3, 4):
            hint = " It looks channels-first: use X.transpose(0, 2, 3, 1)." if X.shape[1] in (
                1, 3, 4) else ""
            raise ValueError(
                f"a numpy array X must be (n, H, W) or (n, H, W, C) with C in 1, 3, 4 "
                f"(channels last); got shape {X.shape}.{hint}"
            )
        if X.ndim not in (3, 4):
            raise ValueError(
                f"a numpy array X must be (n, H, W) or (n, H, W, C) (channels last), or a 1-D "
                f"array of paths; got shape {X.shape} and dtype {X.dtype}"
            )
        if np.issubdtype(X.dtype, np.floating):
            _check_batch_range(X)
        return _nonempty(ImageSource(X, "array"))
    if isinstance(X, np.ndarray):
        if X.ndim != 1:
            raise ValueError(f"an array of paths or objects must be 1-D; got shape {X.shape}")
        return _nonempty(ImageSource(X, "items"))
    if isinstance(X, Sequence) or hasattr(X, "__len__") and hasattr(X, "__getitem__"):
        items = list(X)
        for i, item in enumerate(items):
            if not (isinstance(item, (str, os.PathLike, Image.Image, np.ndarray))
                    or _is_tensor(item)):
                load_item(item, i)  # raises the TypeError that names it
        return _nonempty(ImageSource(items, "items"))
    raise TypeError(
        f"X is {_describe(X)}; expected a sequence of images, a numpy array or a torch tensor"
    )


def _check_batch_range(arr: np.ndarray) -> None:
    bad = ~np.isfinite(arr).reshape(len(arr), -1).all(axis=1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ImageLoadError(f"image at index {i} contains NaN or infinite values", i)
    flat = arr.reshape(len(arr), -1)
    out = (flat.min(axis=1) < 0) | (flat.max(axis=1) > 1) if flat.shape[1] else bad
    if out.any():
        i = int(np.flatnonzero(out)[0])
        _check_unit_range(arr[i], i)


def _nonempty(src: ImageSource) -> ImageSource:
    if len(src) == 0:
        raise ValueError("X holds no images (0 samples); at least one is required")
    return src


# --------------------------------------------------------------------- folder trees


def load_image_folder(root: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """List an ImageFolder tree ``root/CLASS/*`` as paths and class names.

    Uses scikit-learn's :func:`~sklearn.datasets.load_files` to walk the tree
    and keeps the files with an image extension (those torchvision's
    ``ImageFolder`` would take), in sorted order.

    Parameters
    ----------
    root : path-like

    Returns
    -------
    X : ndarray of str, shape (n_samples,)
        File paths.
    y : ndarray of str, shape (n_samples,)
        The class folder of each file.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> from PIL import Image
    >>> from sklearn_transfer import load_image_folder
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> for c in ("ants", "bees"):
    ...     (root / c).mkdir()
    ...     Image.new("RGB", (8, 8)).save(root / c / "a.png")
    >>> X, y = load_image_folder(root)
    >>> y.tolist()
    ['ants', 'bees']
    """
    from sklearn.datasets import load_files

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist or is not a folder")
    bunch = load_files(root, load_content=False, shuffle=False)
    names = np.asarray(bunch.target_names)
    keep = [i for i, f in enumerate(bunch.filenames) if f.lower().endswith(IMG_EXTENSIONS)]
    if not keep:
        raise ValueError(f"no image files under {str(root)!r} (expected root/CLASS/*.jpg)")
    empty = sorted(set(names) - set(names[bunch.target[keep]]))
    if empty:  # a class silently missing from y would be a wrong result, not an error
        raise ValueError(
            f"class folder(s) {[str(root / c) for c in empty]} hold no image file with one of "
            f"the extensions {list(IMG_EXTENSIONS)} (files in subfolders are not read); "
            "add images, convert the files, or remove the folder"
        )
    X = np.asarray(bunch.filenames)[keep]
    y = names[bunch.target[keep]]
    order = np.argsort(X, kind="stable")
    return X[order], y[order]

