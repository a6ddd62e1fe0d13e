"""User images -> uint8 tensor batches for the networks, errors raised where they belong.

:class:`ImageDataset` decodes and transforms the images of an
:class:`~sklearn_transfer.images.ImageSource` (in DataLoader workers or a
background thread); a bad image comes back as a :class:`LoadFailure` and is
raised by :func:`iterate_batches` in the caller's process, as the error
:mod:`sklearn_transfer.images` wrote for it.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Any

import torch

from sklearn_transfer.images import as_image_source
from sklearn_transfer.preprocessing import DataConfig, augment_options

__all__ = ["ImageDataset", "LoadFailure", "collate_images", "iterate_batches"]


@dataclass
class LoadFailure:
    """What a worker returns instead of raising, so the caller raises it cleanly."""

    error: Exception


class ImageDataset(torch.utils.data.Dataset):
    """Images -> ``(H, W, 3)`` uint8 tensors with a backbone's preprocessing, never raising.

    Parameters
    ----------
    source : ImageSource or images
        Anything :func:`~sklearn_transfer.images.as_image_source` accepts.
    config : DataConfig
        The preprocessing of the weights: the evaluation resize and centre
        crop, or with ``augment`` its training augmentation.
    targets : array-like, optional
        Returned with each image (else its index).
    augment : bool or dict, default=False
        See :func:`~sklearn_transfer.preprocessing.augment_options`.

    Notes
    -----
    Items are returned channels-last so that a stacked batch permuted to
    ``(N, 3, H, W)`` is already in ``channels_last`` memory format. JPEGs are
    decoded at a reduced scale where that keeps at least the resize size.
    A bad image comes back as a :class:`LoadFailure`, raised by
    :func:`iterate_batches` in the caller's process.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn_transfer.batches import ImageDataset
    >>> from sklearn_transfer.preprocessing import DataConfig
    >>> ds = ImageDataset(np.zeros((2, 40, 50, 3), np.uint8), DataConfig(input_size=32))
    >>> ds[0][0].shape, ds[0][1]
    (torch.Size([32, 32, 3]), 0)
    """

    def __init__(self, source: Any, config: DataConfig, targets: Any = None,
                 augment: bool | dict = False) -> None:
        self.source = as_image_source(source)
        options = augment_options(augment)
        self.transform = (config.eval_transform() if options is None
                          else config.train_transform(**options))
        self.targets = targets
        self.draft_size = config.resize_size

    def __len__(self) -> int:
        return len(self.source)

    def pixels(self, im: Any) -> torch.Tensor:
        """An RGB PIL image -> its transformed ``(H, W, 3)`` uint8 tensor."""
        return self.transform(im).permute(1, 2, 0).contiguous()

    def __getitem__(self, index: int):
        try:
            x = self.pixels(self.source.load(index, self.draft_size))
        except Exception as exc:  # reported by collate_images in the caller's process
            return LoadFailure(exc), index
        y = self.targets[index] if self.targets is not None else index
        return x, y


def collate_images(batch: list) -> Any:
    """Stack ``(H, W, 3)`` uint8 images to ``(N, 3, H, W)`` (channels_last strides)."""
    for x, _ in batch:
        if isinstance(x, LoadFailure):
            return x
    xs = torch.stack([x for x, _ in batch]).permute(0, 3, 1, 2)
    ys = torch.utils.data.default_collate([y for _, y in batch])
    return xs, ys


def iterate_batches(loader: Any, prefetch: int = 0):
    """Yield a loader's batches, raising a worker's load error as the original error.

    With ``prefetch > 0`` the loader is driven by a background thread that
    keeps that many batches ready: Pillow releases the GIL while decoding and
    resizing, so with ``num_workers=0`` decoding overlaps the forward pass
    without the cost of worker processes.
    """
    batches = _prefetched(loader, prefetch) if prefetch > 0 else iter(loader)
    finished = False
    try:
        for batch in batches:
            if isinstance(batch, LoadFailure):
                raise batch.error
            yield batch
        finished = True
    finally:
        # Left mid-epoch (an error, a break): stop worker processes now. Left to the
        # garbage collector, torch's iterator waits seconds for workers busy on
        # batches nobody will read.
        shutdown = getattr(batches, "_shutdown_workers", None)
        if not finished and shutdown is not None:
            shutdown()


def _prefetched(iterable: Any, depth: int):
    done = object()
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in iterable:
                if stop.is_set():
                    return
                buffer.put(item)
        except BaseException as exc:  # handed to the consumer, raised there
            buffer.put(LoadFailure(exc))
        buffer.put(done)

    thread = threading.Thread(target=produce, daemon=True, name="sklearn_transfer-prefetch")
    thread.start()
    try:
        while (item := buffer.get()) is not done:
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                buffer.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.05)
