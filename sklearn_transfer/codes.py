"""The one codes pipeline: batches of images through an engine, in order.

Every caller that computes codes (``CNNFeatureTransformer.transform``,
:func:`~sklearn_transfer.extract_codes`) goes through :func:`image_batches`
and :func:`run_engine`, so that they share the rules that make it fast and
its errors clear:

* with ``num_workers=0`` a background thread decodes the next batches while
  the engine runs (Pillow and libjpeg release the GIL), with workers the
  DataLoader's processes do;
* a CUDA out-of-memory error says which ``batch_size`` to lower;
* a progress bar shows only for large jobs (:func:`progress_bar`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch

from sklearn_transfer.batches import collate_images, iterate_batches
from sklearn_transfer.runtime import Runtime, actionable_oom

__all__ = ["image_batches", "progress_bar", "run_engine"]

#: batches decoded ahead by the background thread when there are no worker processes
PREFETCH = 2


def image_batches(dataset: torch.utils.data.Dataset, runtime: Runtime, batch_size: int,
                  num_workers: int = 0,
                  collate_fn: Callable[[list], Any] = collate_images) -> Iterator:
    """The dataset's batches, decoded ahead of use, a worker's image error raised here.

    Parameters
    ----------
    dataset : Dataset
        Items as :class:`~sklearn_transfer.batches.ImageDataset` gives them.
    runtime : Runtime
        Pinned memory on CUDA.
    batch_size, num_workers : int
    collate_fn : callable, default=collate_images

    Returns
    -------
    iterator of batches
    """
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size,
                                         num_workers=num_workers, collate_fn=collate_fn,
                                         pin_memory=runtime.pin_memory)
    return iterate_batches(loader, prefetch=PREFETCH if num_workers == 0 else 0)


def run_engine(engine: Any, batches: Iterable[tuple[torch.Tensor, Any]], batch_size: int,
               bar: Any = None) -> Iterator[tuple[np.ndarray, Any]]:
    """``(codes, tag)`` of each ``(images, tag)`` batch through ``engine``, in order.

    Parameters
    ----------
    engine : TorchEngine or OpenVINOEngine
        See :func:`~sklearn_transfer.engines.engine_for`.
    batches : iterable of (uint8 images, tag)
    batch_size : int
        Named by a CUDA out-of-memory error, which says to lower it.
    bar : tqdm, optional
        Advanced by each batch's images.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from sklearn_transfer import Backbone, DataConfig
    >>> from sklearn_transfer.codes import run_engine
    >>> from sklearn_transfer.computation import CodesComputation
    >>> from sklearn_transfer.engines import engine_for
    >>> net = Backbone([("conv", nn.Conv2d(3, 8, 3))], DataConfig(input_size=32))
    >>> engine = engine_for(CodesComputation.of(net, stages=[0]), "cpu", net)
    >>> batches = [(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), "a"),
    ...            (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), "b")]
    >>> [(codes.shape, tag) for codes, tag in run_engine(engine, batches, batch_size=2)]
    [((2, 8), 'a'), ((1, 8), 'b')]
    """
    with actionable_oom(batch_size):
        for codes, tag in engine.map(batches):
            if bar is not None:
                bar.update(len(codes))
            yield codes, tag


def progress_bar(progress: bool | str, total: int, desc: str = "CNN codes") -> Any:
    """A tqdm bar over ``total`` images: ``progress=True``, or ``"auto"`` beyond 1,000 images.

    Examples
    --------
    >>> from sklearn_transfer.codes import progress_bar
    >>> progress_bar("auto", 10).disable, progress_bar(True, 10).disable
    (True, False)
    """
    from tqdm.auto import tqdm

    show = progress is True or (progress == "auto" and total > 1000)
    return tqdm(total=total, unit="img", disable=not show, desc=desc)
