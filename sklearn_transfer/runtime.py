"""Where and how computation runs: device, precision, threads and seeds.

Every estimator asks this module, so that "auto" means the same thing
everywhere and the CUDA-only switches (pinned memory, autocast,
non-blocking copies) are decided in one place. torch is imported when first
needed: :func:`autocast_dtype` can often answer without it, which lets a
transformer serve codes from a warm cache without importing torch at all.
"""

from __future__ import annotations

import ast
import contextlib
import ctypes
import functools
import importlib.util
import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = [
    "Runtime",
    "actionable_oom",
    "autocast_dtype",
    "resolve_device",
    "seed_everything",
    "seed_worker",
]


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """Turn a user's ``device`` parameter into a :class:`torch.device`.

    Parameters
    ----------
    device : {"auto", "cpu", "cuda", "cuda:N", "mps"} or torch.device
        ``"auto"`` (or ``None``) picks CUDA when a GPU is visible, the CPU
        otherwise.

    Returns
    -------
    torch.device

    Examples
    --------
    >>> from sklearn_transfer.runtime import resolve_device
    >>> resolve_device("cpu")
    device(type='cpu')
    """
    import torch

    if device is None or (isinstance(device, str) and device == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(
            f"device={device!r} is not a device torch knows; use 'auto', 'cpu' or 'cuda'."
        ) from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device={device!r} was asked for but no CUDA GPU is visible; use device='auto' "
            "to fall back to the CPU."
        )
    return dev


def autocast_dtype(device: str | torch.device | None = "auto") -> str | None:
    """The autocast dtype ``Runtime.from_device(device)`` would use, by name.

    ``"float16"`` on CUDA, ``None`` elsewhere. Answered without importing
    torch where that is certain: ``"cpu"``, or ``"auto"`` when torch is a CPU
    build or no CUDA driver library can be loaded (then torch sees no GPU
    either). Otherwise torch is imported and asked.

    Parameters
    ----------
    device : {"auto", "cpu", "cuda", "cuda:N", "mps"} or torch.device

    Returns
    -------
    str or None

    Examples
    --------
    >>> from sklearn_transfer.runtime import autocast_dtype
    >>> autocast_dtype("cpu") is None
    True
    """
    if isinstance(device, str) and device == "cpu":
        return None
    if (device is None or isinstance(device, str) and device == "auto") and (
            "torch" not in sys.modules and not _torch_may_see_cuda()):
        return None
    amp = Runtime.from_device(device).amp_dtype
    return None if amp is None else str(amp).removeprefix("torch.")


@functools.cache  # an installation does not change under a running process
def _torch_may_see_cuda() -> bool:
    """False when torch, once imported, certainly reports no CUDA device; else True.

    Reads torch's generated ``version.py`` (a CPU build says ``cuda = None``)
    and tries to load the CUDA driver library, which torch needs for any GPU.
    Nothing is initialised, so this is safe before forking workers.
    """
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return True  # let the import say what is wrong
    try:
        tree = ast.parse((Path(list(spec.submodule_search_locations)[0]) / "version.py")
                         .read_text())
        built: dict[str, object] = {}
        for node in tree.body:
            target = node.targets[0] if isinstance(node, ast.Assign) else getattr(
                node, "target", None)
            if isinstance(target, ast.Name) and target.id in ("cuda", "hip"):
                built[target.id] = ast.literal_eval(node.value)
    except (OSError, SyntaxError, ValueError, IndexError):
        return True
    if set(built) != {"cuda", "hip"} or built["hip"] is not None:
        return True  # unknown layout, or ROCm: torch.cuda there is HIP; ask torch
    if built["cuda"] is None or sys.platform == "darwin":
        return False
    try:
        ctypes.CDLL("nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1")
    except OSError:
        return False
    return True


@dataclass(frozen=True)
class Runtime:
    """The execution settings derived from a device, in one object.

    Attributes
    ----------
    device : torch.device
    pin_memory : bool
        Page-locked host batches; only pays on CUDA.
    non_blocking : bool
        Overlap host-to-device copies with compute; only with pinned memory.
    amp_dtype : torch.dtype or None
        Autocast dtype for inference/training on CUDA (``float16``), ``None``
        on the CPU, where bfloat16 autocast is slower than float32 on most
        machines and changes results.
    """

    device: torch.device
    pin_memory: bool
    non_blocking: bool
    amp_dtype: torch.dtype | None

    @classmethod
    def from_device(cls, device: str | torch.device | None = "auto") -> Runtime:
        import torch

        dev = resolve_device(device)
        cuda = dev.type == "cuda"
        return cls(
            device=dev,
            pin_memory=cuda,
            non_blocking=cuda,
            amp_dtype=torch.float16 if cuda else None,
        )

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast on CUDA, a no-op elsewhere."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        import torch

        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.device, non_blocking=self.non_blocking)


def seed_everything(random_state: int | np.random.RandomState | None) -> torch.Generator | None:
    """Seed Python, NumPy and torch; return a torch generator for samplers.

    ``None`` leaves the global state alone and returns ``None``.

    Examples
    --------
    >>> from sklearn_transfer.runtime import seed_everything
    >>> g = seed_everything(0)
    >>> int(g.initial_seed())
    0
    """
    if random_state is None:
        return None
    import torch

    if isinstance(random_state, np.random.RandomState):
        seed = int(random_state.randint(0, 2**31 - 1))
    else:
        seed = int(random_state)
    random.seed(seed)
    # the global NumPy state is what third-party augmentations draw from
    np.random.seed(seed % 2**32)  # noqa: NPY002
    torch.manual_seed(seed)
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn`` that derives NumPy/random seeds from torch's.

    torch seeds each worker from the loader's generator; Python's ``random``
    and NumPy are not, so augmentations using them would repeat across
    workers and runs without this.
    """
    import torch

    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)  # noqa: NPY002
    random.seed(seed)


@contextlib.contextmanager
def actionable_oom(batch_size: int, parameter: str = "batch_size",
                   advice: str = "") -> Iterator[None]:
    """Turn a CUDA out-of-memory error in the block into one that says what to change.

    The error stays a ``torch.cuda.OutOfMemoryError`` (code catching it keeps
    working), with the original chained, and the CUDA cache is emptied so the
    process can go on with a smaller batch.

    Parameters
    ----------
    batch_size : int
        The batch size in use.
    parameter : str
        The parameter that sets it, named in the message.
    advice : str
        Further advice appended to the message.

    Examples
    --------
    >>> import torch
    >>> from sklearn_transfer.runtime import actionable_oom
    >>> try:
    ...     with actionable_oom(64):
    ...         raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
    ... except torch.cuda.OutOfMemoryError as exc:
    ...     print(str(exc)[:72])
    the GPU ran out of memory on a batch of 64 images (batch_size=64): lower
    """
    import torch

    try:
        yield
    except torch.cuda.OutOfMemoryError as exc:
        if getattr(exc, "actionable", False):  # already explained by an inner block
            raise
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        smaller = max(int(batch_size) // 2, 1) if int(batch_size) > 1 else 1
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        error = torch.cuda.OutOfMemoryError(
            f"the GPU ran out of memory on a batch of {batch_size} images "
            f"({parameter}={batch_size}): lower {parameter} (e.g. {parameter}={smaller}){advice}. "
            f"CUDA said: {detail}"
        )
        error.actionable = True
        raise error from exc
