"""Crash-safe fine-tuning as a skorch callback: one atomic checkpoint per epoch, resumed exactly.

:class:`TrainingCheckpoint` is what ``FineTunedClassifier(checkpoint_dir=...)``
adds to its callbacks. It writes one file holding everything the next epoch
depends on: the module, the optimizer, the history, the fitted state of the
other callbacks (their attributes ending in ``_`` that are numbers, tensors,
dicts of tensors or have a ``state_dict()``: learning-rate schedulers, early
stopping with its best weights, the best scores of the scoring callbacks, the
weight average of :class:`~sklearn_transfer.callbacks.WeightEMA`), and the
random states of Python,
NumPy and torch, both those the training started from (the validation
split replays from them) and those after the epoch (shuffling, augmentation,
dropout). The file is written next to its final name and renamed over it
(:func:`~sklearn_transfer.files.atomic_save`), so a process killed at any
moment leaves either the previous checkpoint or the new one, never half a file.

A fit looks for the file of *its own run*: the name carries a SHA-256 of the
estimator's parameters and of the training data, so a changed parameter or
data set starts afresh, and the folds and candidates of a grid search sharing
one directory never resume each other's runs.

A run that is interrupted and never fitted again leaves its file behind. When
a run opens the directory it deletes the checkpoints of *other* runs that no
fit has written or resumed for ``max_age_days`` (7 by default): a running fit
rewrites its file every epoch and a resumed one touches it, so only abandoned
runs age. Only files named and laid out as this library writes them are
deleted (``fit-<24 hex digits>.pt`` holding its format, and their temporary
files); anything else in the directory is left alone.

The file is read with ``torch.load(weights_only=True)``: tensors and plain
containers only; the history travels as a JSON string. Nothing in it can run
code.
"""

from __future__ import annotations

import contextlib
import io
import json
import numbers
import os
import re
import time
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from skorch.callbacks import Callback, EarlyStopping
from skorch.history import History

from sklearn_transfer.files import (
    FormatError,
    atomic_save,
    check_format,
    format_tag,
    load_weights_only,
)
from sklearn_transfer.identity import digest, run_fingerprint
from sklearn_transfer.runtime import capture_rng, restore_rng

__all__ = ["TrainingCheckpoint"]

# parameters that change neither the computation nor its result
_NOT_IN_FINGERPRINT = ("verbose", "checkpoint_dir", "callbacks__checkpoint__max_age_days")
# a run's checkpoint, or (group 1) a temporary file of atomic_save writing one
_OURS = re.compile(r"fit-[0-9a-f]{24}\.pt|(\.fit-[0-9a-f]{24}\.pt\.[a-z0-9_]+\.tmp)")


class TrainingCheckpoint(Callback):
    """Save the training state after every epoch; a fit of the same run resumes from it.

    Place it first among the callbacks (``FineTunedClassifier`` does): its
    ``on_train_begin`` restores the history before the scoring callbacks
    read it, and the state after epoch ``k`` is written at the start of
    epoch ``k + 1``, once every callback has recorded epoch ``k``. A resumed
    run trains the epochs the checkpoint lacks and stops as skorch's
    callbacks stop training (a ``KeyboardInterrupt``, as ``EarlyStopping``).
    It checkpoints fits from scratch (an empty history when training
    begins); ``partial_fit`` calls and warm starts continue another run and
    are not saved. The file is deleted when its run completes.

    skorch's own ``Checkpoint``/``LoadInitState`` keep the best epoch's
    parameters in separate files; exact resuming needs one file with the
    random states and every callback's state, written atomically.

    Parameters
    ----------
    directory : path-like
        Where the checkpoint files live; created if missing.
    max_age_days : float or None, default=7
        When a run opens ``directory``, the checkpoints of other runs that no
        fit has written or resumed for this long are deleted (they belong to
        runs that were interrupted and never fitted again); ``None`` keeps
        them. A running fit's file is as old as its last epoch: keep this
        well above an epoch's duration. Set it through
        ``FineTunedClassifier(..., callbacks__checkpoint__max_age_days=30)``.

    Attributes
    ----------
    path_ : Path or None
        The file of the current run (set when training begins, ``None`` once it ends).
    resumed_epochs_ : int
        Epochs the current fit took from the checkpoint.
    """

    def __init__(self, directory: str | os.PathLike | None = None,
                 max_age_days: float | None = 7) -> None:
        self.directory = directory
        self.max_age_days = max_age_days

    def initialize(self) -> TrainingCheckpoint:
        self.path_: Path | None = None
        self.fingerprint_: str | None = None
        self.resumed_epochs_ = 0
        self._state: dict[str, Any] | None = None
        self._start_rng: dict[str, Any] | None = None
        return self

    def on_train_begin(self, net: Any, X: Any = None, y: Any = None, **kwargs: Any) -> None:
        # a fit from scratch has no history yet; partial_fit and warm starts continue another
        # run, which is not this callback's to save
        self.path_, self._state, self.resumed_epochs_ = None, None, 0
        if len(net.history) > 0:
            return
        self._open(net, X, y)
        if self._state is None:
            self._start_rng = capture_rng()
            return
        self.resumed_epochs_ = int(self._state["epoch"])
        # the history first: the scoring callbacks after this one look up their best from it
        net.module_.load_state_dict(self._state["module"])
        net.optimizer_.load_state_dict(self._state["optimizer"])
        net.history_ = History(json.loads(self._state["history"]))
        # the validation split draws next: as in the interrupted fit
        self._start_rng = self._state["start_rng"]
        restore_rng(self._start_rng)
        if net.verbose:
            print(f"Resuming from {self.path_} after epoch {self.resumed_epochs_}.")

    def _open(self, net: Any, X: Any, y: Any) -> None:
        """Find this run's checkpoint file, and read it if there is one."""
        directory = Path(self.directory)
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ValueError(
                f"checkpoint_dir={os.fspath(self.directory)!r} cannot be created ({exc})"
            ) from None
        if not os.access(directory, os.W_OK):
            raise ValueError(f"checkpoint_dir={os.fspath(self.directory)!r} is not writable")
        self.fingerprint_ = run_fingerprint(net, X, y, ignore=_NOT_IN_FINGERPRINT)
        self.path_ = directory / f"fit-{self.fingerprint_[:24]}.pt"
        self._remove_abandoned(directory)
        # a process killed while writing this run's checkpoint left its temporary file
        for stale in directory.glob(f".{self.path_.name}.*.tmp"):
            with contextlib.suppress(OSError):
                stale.unlink()
        if self.path_.is_file():
            with contextlib.suppress(OSError):
                os.utime(self.path_)  # resumed now: not abandoned, to a fit starting meanwhile
            self._state = self._read()

    def _remove_abandoned(self, directory: Path) -> None:
        """Delete other runs' checkpoints (and temporary files) older than ``max_age_days``."""
        if self.max_age_days is None:
            return
        if not isinstance(self.max_age_days, numbers.Real) or not self.max_age_days > 0:
            raise ValueError(f"max_age_days={self.max_age_days!r} must be a positive number of "
                             "days, or None to keep every checkpoint")
        oldest = time.time() - self.max_age_days * 86400
        for path in directory.iterdir():
            name = _OURS.fullmatch(path.name)
            if name is None or path == self.path_:
                continue
            with contextlib.suppress(OSError):  # gone already: another fit removed it
                if path.stat().st_mtime < oldest and (name[1] or _is_checkpoint(path)):
                    path.unlink()

    def _read(self) -> dict[str, Any] | None:
        """The checkpoint's state; ``None`` (start afresh, with a warning) if it is damaged."""
        name = str(self.path_)
        try:
            outer = load_weights_only(self.path_, what="training checkpoint")
        except ValueError as exc:  # cut short or overwritten: this run's file, unreadable
            warnings.warn(f"{exc}; training from the start", RuntimeWarning, stacklevel=4)
            return None
        try:
            check_format("fit-checkpoint", outer.get("format") if isinstance(outer, dict) else None,
                         name, "training from the start")
        except FormatError as exc:
            warnings.warn(str(exc), RuntimeWarning, stacklevel=4)
            return None
        payload = outer.get("payload")
        payload = payload.numpy().tobytes() if isinstance(payload, torch.Tensor) else None
        if payload is None or digest(payload) != outer.get("sha256"):
            # bytes changed on disk would resume into another model: never resume from it
            warnings.warn(f"the training checkpoint {name!r} fails its checksum (damaged); "
                          "training from the start", RuntimeWarning, stacklevel=4)
            return None
        state = load_weights_only(io.BytesIO(payload), what="training checkpoint", name=name)
        if state.get("fingerprint") != self.fingerprint_:
            raise ValueError(f"{name!r} belongs to another run; delete it to train from the "
                             "start")
        return state

    def on_epoch_begin(self, net: Any, **kwargs: Any) -> None:
        if self.path_ is None:
            return
        if len(net.history) > net.max_epochs:
            # resumed: skorch runs max_epochs epochs, of which the checkpoint held some; a
            # KeyboardInterrupt is how skorch's callbacks end training (as EarlyStopping)
            net.history.pop()
            raise KeyboardInterrupt
        if self._state is not None:  # the other callbacks' on_train_begin reset them
            _restore_callbacks(net, self._state)
            restore_rng(self._state["rng"])
            self._state = None
        elif len(net.history) > 1:
            self._save(net)  # the epoch that just ended, complete with every callback's record

    def _save(self, net: Any) -> None:
        done = net.history.to_list()[:-1]  # the row of the epoch that is beginning is not done
        buffer = io.BytesIO()
        torch.save({
            "fingerprint": self.fingerprint_,
            "epoch": len(done),
            "module": net.module_.state_dict(),
            "optimizer": net.optimizer_.state_dict(),
            "history": json.dumps(done),
            "callbacks": {name: _fitted_state(cb) for name, cb in net.callbacks_
                          if cb is not self},
            "start_rng": self._start_rng,
            "rng": capture_rng(),
        }, buffer)
        payload = buffer.getvalue()
        # the checksum covers every byte a resumed fit would read
        # as a uint8 tensor: stored verbatim (pickle protocol 2 would re-encode bytes as text)
        atomic_save({"format": format_tag("fit-checkpoint"), "sha256": digest(payload),
                     "payload": torch.frombuffer(bytearray(payload), dtype=torch.uint8)},
                    self.path_)

    def on_train_end(self, net: Any, **kwargs: Any) -> None:
        # skorch ends training alike after early stopping and after Ctrl-C (both a
        # KeyboardInterrupt); only a completed run has no more use for its file
        if self.path_ is not None and _completed(net):
            with contextlib.suppress(OSError):
                self.path_.unlink()
        self.path_ = None


def _fitted_state(callback: Any) -> dict[str, Any]:
    """A callback's fitted attributes (``name_``) that a file can hold without pickle."""
    state: dict[str, Any] = {}
    for name, value in vars(callback).items():
        if not name.endswith("_") or name.startswith("_"):
            continue
        if not isinstance(value, type) and callable(getattr(value, "state_dict", None)):
            state[name] = {"state_dict": value.state_dict()}
        elif isinstance(value, (bool, np.bool_, str)):
            state[name] = {"value": value if isinstance(value, str) else bool(value)}
        elif isinstance(value, (int, float, np.integer, np.floating)):  # NumPy's as Python's
            state[name] = {"value": value.item() if isinstance(value, np.generic) else value}
        elif value is None or isinstance(value, torch.Tensor) or (
                isinstance(value, dict) and all(isinstance(v, torch.Tensor)
                                                for v in value.values())):
            state[name] = {"value": value}
    return state


def _restore_callbacks(net: Any, state: dict[str, Any]) -> None:
    """Put back the callbacks' fitted state a checkpoint holds."""
    saved = state["callbacks"]
    for name, cb in net.callbacks_:
        for attr, entry in saved.get(name, {}).items():
            if "state_dict" in entry:
                getattr(cb, attr).load_state_dict(entry["state_dict"])
            else:
                setattr(cb, attr, entry["value"])
    # building a scheduler with last_epoch > -1 stepped the learning rates: put them back
    net.optimizer_.load_state_dict(state["optimizer"])


def _is_checkpoint(path: Path) -> bool:
    """Does ``path`` begin as :meth:`TrainingCheckpoint._save` writes (reading a few bytes)?"""
    try:
        with zipfile.ZipFile(path) as zf:  # torch's format: the pickle comes first
            first = zf.infolist()[0]
            with zf.open(first) as fh:
                head = fh.read(128)
    except Exception:  # unreadable, or not a zip: not a file to delete
        return False
    return first.filename.endswith("/data.pkl") and b"sklearn_transfer.fit-checkpoint/" in head


def _completed(net: Any) -> bool:
    """All epochs ran, or early stopping ended the training (not a user's Ctrl-C).

    Early stopping leaves its count of epochs without improvement (its fitted
    ``misses_``) at its ``patience``; a Ctrl-C does not.
    """
    if len(net.history) >= net.max_epochs:
        return True
    return any(isinstance(cb, EarlyStopping) and cb.misses_ == cb.patience
               for _, cb in net.callbacks_)
