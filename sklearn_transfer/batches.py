"""User images -> uint8 tensor batches for the networks, errors raised where they belong.

:class:`ImageDataset` decodes and transforms the images of an
:class:`~sklearn_transfer.images.ImageSource` (in DataLoader workers or a
background thread); a bad image comes back as a :class:`LoadFailure` and is
raised by :func:`iterate_batches` in the caller's process, as the error
:mod:`sklearn_transfer.images` wrote for it.

For skorch, :class:`ImageLoader` is the iterator (``iterator_train`` and
``iterator_valid``): a training dataset augments (and mixes, see
:class:`MixBatch`) its images and asks to be shuffled;
:meth:`ImageDataset.evaluation` is the same images as they are.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset

from sklearn_transfer.images import as_image_source
from sklearn_transfer.preprocessing import DataConfig, augment_options
from sklearn_transfer.runtime import seed_worker

__all__ = ["ImageDataset", "ImageLoader", "LoadFailure", "MixBatch", "collate_images",
           "iterate_batches"]


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
    mix : MixBatch, optional
        Mixes each batch (MixUp/CutMix); with ``augment``, a training dataset,
        which :class:`ImageLoader` shuffles.

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
                 augment: bool | dict = False, mix: MixBatch | None = None) -> None:
        self.source = as_image_source(source)
        self.config, self.targets, self.mix = config, targets, mix
        options = augment_options(augment)
        self.transform = (config.eval_transform() if options is None
                          else config.train_transform(**options))
        self.draft_size = config.resize_size
        self.training = options is not None or mix is not None

    def evaluation(self) -> ImageDataset:
        """The same images and targets with the evaluation transform, unmixed."""
        return ImageDataset(self.source, self.config, self.targets)

    def collate(self, batch: list) -> Any:
        """:func:`collate_images`, then the batch mixed if this dataset mixes."""
        collated = collate_images(batch)
        if self.mix is None or isinstance(collated, LoadFailure):
            return collated
        return self.mix(*collated)

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


class MixBatch:
    """MixUp/CutMix of a batch by timm's ``Mixup``: blended or pasted images, soft targets.

    timm mixes a batch with its reverse and needs an even size: an odd batch's
    last image stays as it is. Random draws come from NumPy's global RNG
    (timm's), which ``random_state`` seeds and a training checkpoint saves.

    Parameters
    ----------
    options : dict
        Keyword arguments of :class:`timm.data.Mixup`.
    n_classes : int
    multilabel : bool
    """

    def __init__(self, options: dict, n_classes: int, multilabel: bool) -> None:
        self.options, self.n_classes, self.multilabel = options, n_classes, multilabel

    def __call__(self, x: torch.Tensor, y: Any) -> tuple[torch.Tensor, torch.Tensor]:
        from timm.data import Mixup
        from timm.data.mixup import mixup_target

        x = x.float()  # [0, 255] floats: the network normalises them as it does uint8
        y = torch.as_tensor(y)
        mixer = Mixup(**self.options, label_smoothing=0.0, num_classes=self.n_classes,
                      multi_label=self.multilabel)
        pairs = len(x) - len(x) % 2
        soft = mixup_target(y, self.n_classes, 1.0, 0.0, self.multilabel)
        if pairs:
            _, soft[:pairs] = mixer(x[:pairs], y[:pairs])  # mixes x[:pairs] in place
        return x, soft


class ImageLoader(DataLoader):
    """A DataLoader for :class:`ImageDataset`: its collate, shuffling, seeded workers.

    skorch's ``iterator_train`` and ``iterator_valid``; routed options
    (``iterator_train__num_workers=4``) are DataLoader's. By default it
    collates with the dataset's :meth:`ImageDataset.collate`, shuffles a
    training dataset, seeds Python's and NumPy's RNGs in each worker process
    from torch's, and pins memory when CUDA is present. Iterating it raises a
    worker's image error in the caller's process (:func:`iterate_batches`).
    """

    def __init__(self, dataset: Any, batch_size: int | None = 1, shuffle: bool | None = None,
                 num_workers: int = 0, collate_fn: Any = None, pin_memory: bool | None = None,
                 worker_init_fn: Any = None, **kwargs: Any) -> None:
        base = dataset.dataset if isinstance(dataset, Subset) else dataset
        super().__init__(
            dataset, batch_size=batch_size,
            shuffle=bool(getattr(base, "training", False)) if shuffle is None else shuffle,
            num_workers=num_workers,
            collate_fn=getattr(base, "collate", collate_images) if collate_fn is None
            else collate_fn,
            pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
            worker_init_fn=seed_worker if worker_init_fn is None and num_workers else
            worker_init_fn, **kwargs)

    def __iter__(self):
        return iterate_batches(super().__iter__())

