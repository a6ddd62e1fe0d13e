"""Crash-safe fine-tuning: one atomic checkpoint per epoch that a new ``fit`` resumes exactly.

:class:`FitCheckpoint` is what ``FineTunedClassifier(checkpoint_dir=...)``
uses. At the end of every epoch it writes one file holding everything the
next epoch depends on: the module, the optimizer, the history, the state of
the learning-rate schedulers and of early stopping (its best weights
included), and the random states of Python, NumPy and torch, both those the
fit started from (initialisation and the validation split replay from them)
and those after the epoch (shuffling, augmentation, dropout). The file is
written next to its final name and renamed over it (``os.replace``), so a
process killed at any moment leaves either the previous checkpoint or the new
one, never half a file.

A fit looks for the file of *its own run*: the name carries a SHA-256 of the
estimator's parameters and of the training data, so a changed parameter or
data set starts afresh, and the folds and candidates of a grid search sharing
one directory never resume each other's runs.

The file is read with ``torch.load(weights_only=True)``: tensors and plain
containers only; the history travels as a JSON string. Nothing in it can run
code.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from skorch.callbacks import EarlyStopping, LRScheduler
from skorch.history import History
from torch import nn

from sklearn_transfer.backbones import module_fingerprint
from sklearn_transfer.cache import content_key

__all__ = ["FitCheckpoint", "describe_value", "run_fingerprint"]

FORMAT = "sklearn_transfer.fit-checkpoint/1"
# parameters that change neither the computation nor its result
_NOT_IN_FINGERPRINT = ("verbose", "checkpoint_dir")


def describe_value(value: Any, depth: int = 0) -> Any:
    """A JSON-able description of a parameter value, stable across processes.

    Memory addresses (default ``repr``) differ in every process and would
    make a resumed run look like another one, so objects are described by
    their class and attributes, modules by their weights.

    Examples
    --------
    >>> from torch import nn
    >>> from sklearn_transfer.checkpoint import describe_value
    >>> describe_value({"lr": 0.1, "opt": nn.Linear})
    {'lr': 0.1, 'opt': 'torch.nn.modules.linear.Linear'}
    """
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, nn.Module):
        return f"module:{module_fingerprint(value)}"
    if isinstance(value, type) or callable(value) and hasattr(value, "__qualname__"):
        return f"{getattr(value, '__module__', '')}.{value.__qualname__}"
    if isinstance(value, np.random.RandomState):
        keys = value.get_state()[1]
        return f"RandomState:{hashlib.sha256(keys.tobytes()).hexdigest()}:{value.get_state()[2]}"
    if isinstance(value, np.ndarray):
        arr = np.ascontiguousarray(value)
        return f"ndarray:{arr.dtype}:{arr.shape}:{hashlib.sha256(arr.tobytes()).hexdigest()}"
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if depth > 4:
        return type(value).__qualname__
    if isinstance(value, (list, tuple)):
        return [describe_value(v, depth + 1) for v in value]
    if isinstance(value, dict):
        return {str(k): describe_value(v, depth + 1) for k, v in sorted(
            value.items(), key=lambda kv: str(kv[0]))}
    name = f"{type(value).__module__}.{type(value).__qualname__}"
    if hasattr(value, "get_params"):
        try:
            return [name, describe_value(value.get_params(deep=False), depth + 1)]
        except TypeError:
            pass
    if hasattr(value, "__dict__"):
        public = {k: v for k, v in vars(value).items() if not k.startswith("_")}
        return [name, describe_value(public, depth + 1)]
    return name


def _data_digest(source: Any, y: np.ndarray) -> str:
    """SHA-256 of the training images and labels.

    Files count by path, size and modification time (reading every file
    would add an epoch's worth of I/O to each fit); in-memory images by content.
    """
    h = hashlib.sha256()
    for i in range(len(source)):
        item = source.item(i) if source.kind == "items" else None
        if isinstance(item, (str, os.PathLike)):
            try:
                st = os.stat(item)
                stamp = f"{st.st_size}:{st.st_mtime_ns}"
            except OSError:
                stamp = "missing"  # the fit itself raises the error that names it
            h.update(f"file:{os.fspath(item)}:{stamp}\0".encode())
        else:
            h.update(content_key(source, i))
    h.update(json.dumps(np.asarray(y).astype(str).tolist()).encode())
    return h.hexdigest()


def run_fingerprint(estimator: Any, source: Any, y: Any) -> str:
    """SHA-256 identifying a fit: the estimator's parameters and the data.

    Parameters
    ----------
    estimator : BaseEstimator
    source : ImageSource
    y : array-like

    Returns
    -------
    str
        64 hex digits.
    """
    params = {k: v for k, v in estimator.get_params(deep=False).items()
              if k not in _NOT_IN_FINGERPRINT}
    description = json.dumps([type(estimator).__qualname__, describe_value(params)],
                             sort_keys=True, default=str)
    h = hashlib.sha256(description.encode())
    h.update(_data_digest(source, y).encode())
    return h.hexdigest()


# --------------------------------------------------------------------- random states


def capture_rng() -> dict[str, Any]:
    """Python, NumPy and torch (CPU and CUDA) random states, as weights-only-safe values."""
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
    """Set the states :func:`capture_rng` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy = state["numpy"]
    np.random.set_state((numpy["name"], numpy["keys"].numpy().astype(np.uint32),  # noqa: NPY002
                         numpy["pos"], numpy["has_gauss"], numpy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------- file access


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file in ``path``'s directory, then rename it over ``path``.

    The rename is atomic on POSIX and Windows: readers (and a resumed fit
    after a crash) see the old file or the new one, never a partial write.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())  # the data on disk before the name points at it
        os.replace(tmp, path)
    except BaseException:
        with _suppress_os_error():
            os.unlink(tmp)
        raise


class _suppress_os_error:
    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, exc: Any, tb: Any) -> bool:
        return kind is not None and issubclass(kind, OSError)


def load_weights_only(path: Path) -> dict[str, Any]:
    """Read a checkpoint with ``torch.load(weights_only=True)``, with a clear error."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError, EOFError ...
        raise ValueError(
            f"could not read the training checkpoint {str(path)!r} ({type(exc).__name__}): it "
            "is damaged or holds pickled Python objects, which are refused because loading "
            "them can run arbitrary code. Delete it to train from the start."
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(
            f"{str(path)!r} is not a sklearn_transfer training checkpoint ({FORMAT}); delete "
            "it to train from the start"
        )
    return state


# ------------------------------------------------------------------------ the run


class FitCheckpoint:
    """The checkpoint of one fit: resumed if its file exists, rewritten each epoch.

    Parameters
    ----------
    directory : path-like
    fingerprint : str
        :func:`run_fingerprint` of the fit; names the file.

    Attributes
    ----------
    path : Path
    state : dict or None
        The loaded checkpoint when resuming.
    """

    def __init__(self, directory: str | os.PathLike, fingerprint: str) -> None:
        self.directory = Path(directory)
        self.fingerprint = fingerprint
        self.path = self.directory / f"fit-{fingerprint[:24]}.pt"
        self.state: dict[str, Any] | None = None
        self._epoch_rng: dict[str, Any] | None = None
        self._start_rng: dict[str, Any] = {}

    @classmethod
    def open(cls, directory: str | os.PathLike, estimator: Any, source: Any,
             y: Any) -> FitCheckpoint:
        """Find the run's checkpoint; when resuming, rewind the RNGs to where it started.

        Call before the network is initialised: initialisation and the
        validation split then draw the same numbers as in the interrupted fit.
        """
        run = cls(directory, run_fingerprint(estimator, source, y))
        try:
            run.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ValueError(
                f"checkpoint_dir={os.fspath(directory)!r} cannot be created ({exc})"
            ) from None
        if not os.access(run.directory, os.W_OK):
            raise ValueError(f"checkpoint_dir={os.fspath(directory)!r} is not writable")
        if run.path.is_file():
            state = load_weights_only(run.path)
            if state.get("fingerprint") != run.fingerprint:
                raise ValueError(
                    f"{str(run.path)!r} belongs to another run (fingerprint "
                    f"{state.get('fingerprint')!r}); delete it to train from the start"
                )
            run.state = state
            run._start_rng = state["start_rng"]
            run._epoch_rng = state["rng"]
            restore_rng(run._start_rng)
        else:
            run._start_rng = capture_rng()
        return run

    @property
    def resuming(self) -> bool:
        return self.state is not None

    # the net calls these around skorch's own notifications

    def load_before_callbacks(self, net: Any) -> None:
        """Module, optimizer and history, before callbacks rebuild from the history."""
        if self.state is None:
            return
        net.module_.load_state_dict(self.state["module"])
        net.optimizer_.load_state_dict(self.state["optimizer"])
        net.history_ = History(json.loads(self.state["history"]))

    def load_after_callbacks(self, net: Any) -> None:
        """Scheduler and early-stopping states, over what their ``on_train_begin`` reset."""
        if self.state is None:
            return
        for name, cb in net.callbacks_:
            if isinstance(cb, LRScheduler) and name in self.state["lr_schedulers"]:
                cb.lr_scheduler_.load_state_dict(self.state["lr_schedulers"][name])
            if isinstance(cb, EarlyStopping) and name in self.state["early_stopping"]:
                saved = self.state["early_stopping"][name]
                cb.misses_ = saved["misses"]
                cb.dynamic_threshold_ = saved["dynamic_threshold"]
                cb.best_epoch_ = saved["best_epoch"]
                cb.best_model_weights_ = saved["best_model_weights"]
        # building a scheduler with last_epoch > -1 steps the learning rates: put them back
        net.optimizer_.load_state_dict(self.state["optimizer"])
        if net.verbose:
            print(f"Resuming from {self.path} after epoch {len(net.history)}.")

    def on_epoch_begin(self) -> None:
        """After a resume, the RNGs continue where the interrupted fit's last epoch ended."""
        if self._epoch_rng is not None:
            restore_rng(self._epoch_rng)
            self._epoch_rng = None

    def save(self, net: Any) -> None:
        """Write the state after the epoch that just ended (atomically)."""
        schedulers = {name: cb.lr_scheduler_.state_dict() for name, cb in net.callbacks_
                      if isinstance(cb, LRScheduler) and cb.lr_scheduler_ is not None}
        stopping = {
            name: {"misses": int(cb.misses_), "dynamic_threshold": float(cb.dynamic_threshold_),
                   "best_epoch": int(cb.best_epoch_),
                   "best_model_weights": cb.__dict__.get("best_model_weights_")}
            for name, cb in net.callbacks_ if isinstance(cb, EarlyStopping)
        }
        state = {
            "format": FORMAT,
            "fingerprint": self.fingerprint,
            "epoch": len(net.history),
            "module": net.module_.state_dict(),
            "optimizer": net.optimizer_.state_dict(),
            "history": json.dumps(net.history.to_list()),
            "lr_schedulers": schedulers,
            "early_stopping": stopping,
            "start_rng": self._start_rng,
            "rng": capture_rng(),
        }
        atomic_save(state, self.path)

    def remove(self) -> None:
        """Delete the checkpoint once the fit has completed."""
        with _suppress_os_error():
            self.path.unlink()
