"""Where and how computation runs: device, precision and random states.

Every estimator asks this module, so that "auto" means the same thing
everywhere and the CUDA-only switches (pinned memory, autocast,
non-blocking copies) are decided in one place; seeding and saving or
restoring the random states of Python, NumPy and torch live here too.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = [
    "PRECISIONS",
    "Runtime",
    "actionable_oom",
    "capture_rng",
    "native_precision",
    "resolve_device",
    "restore_rng",
    "seed_everything",
    "seed_worker",
    "seeded",
    "usable_cores",
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


PRECISIONS = ("auto", "float32", "bfloat16", "float16")


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one).

    Examples
    --------
    >>> from sklearn_transfer.runtime import usable_cores
    >>> usable_cores() >= 1
    True
    """
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def native_precision(device: torch.device) -> str:
    """The fastest precision ``device`` computes natively.

    ``"float16"`` on CUDA; ``"bfloat16"`` on CPUs with bfloat16 instructions
    (AVX512-BF16 or AMX), where it runs faster than float32;
    ``"float32"`` elsewhere (bfloat16 emulated in software is slower).

    Examples
    --------
    >>> import torch
    >>> from sklearn_transfer.runtime import native_precision
    >>> native_precision(torch.device("cpu")) in ("bfloat16", "float32")
    True
    """
    if device.type == "cuda":
        return "float16"
    # torch's own CPU-feature probes (private, but what its bf16 kernels dispatch on)
    if device.type == "cpu" and (torch.cpu._is_avx512_bf16_supported()
                                 or torch.cpu._is_amx_tile_supported()):
        return "bfloat16"
    return "float32"


@dataclass(frozen=True)
class Runtime:
    """The execution settings derived from a device and a precision, in one object.

    Attributes
    ----------
    device : torch.device
    precision : {"float32", "bfloat16", "float16"}
        The autocast precision, resolved: ``"auto"`` is
        :func:`native_precision`. float16 training uses a gradient scaler.
    pin_memory : bool
        Page-locked host batches; only pays on CUDA.
    non_blocking : bool
        Overlap host-to-device copies with compute; only with pinned memory.
    """

    device: torch.device
    precision: str
    pin_memory: bool
    non_blocking: bool

    @classmethod
    def from_device(cls, device: str | torch.device | None = "auto",
                    precision: str = "auto") -> Runtime:
        dev = resolve_device(device)
        if precision not in PRECISIONS:
            raise ValueError(f"precision={precision!r} is not one of {PRECISIONS}")
        cuda = dev.type == "cuda"
        return cls(
            device=dev,
            precision=native_precision(dev) if precision == "auto" else precision,
            pin_memory=cuda,
            non_blocking=cuda,
        )

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast to :attr:`precision`; float32 is a no-op."""
        if self.precision == "float32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=getattr(torch, self.precision))

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
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)  # noqa: NPY002
    random.seed(seed)


def capture_rng() -> dict[str, Any]:
    """The random states of Python, NumPy and torch (CPU and CUDA), as plain values.

    Only tensors, numbers, strings and containers: the result can be written
    with ``torch.save`` and read back with ``torch.load(weights_only=True)``.

    Examples
    --------
    >>> import random
    >>> from sklearn_transfer.runtime import capture_rng, restore_rng
    >>> state = capture_rng()
    >>> a = random.random()
    >>> restore_rng(state)
    >>> random.random() == a
    True
    """
    name, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002
    state = {
        "python": random.getstate(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Set the random states :func:`capture_rng` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy = state["numpy"]
    np.random.set_state((numpy["name"], numpy["keys"].numpy().astype(np.uint32),  # noqa: NPY002
                         numpy["pos"], numpy["has_gauss"], numpy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def seeded(random_state: int | np.random.RandomState | None) -> Iterator[None]:
    """Seed every RNG for the block (``None``: leave them alone), then restore the caller's.

    Examples
    --------
    >>> import random
    >>> from sklearn_transfer.runtime import seeded
    >>> with seeded(0):
    ...     a = random.random()
    >>> with seeded(0):
    ...     b = random.random()
    >>> a == b
    True
    """
    if random_state is None:  # unseeded work draws from, and advances, the caller's RNGs
        yield
        return
    state = capture_rng()
    seed_everything(random_state)
    try:
        yield
    finally:
        restore_rng(state)


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
