"""The callbacks of a fine-tuning recipe, each a plain skorch :class:`~skorch.callbacks.Callback`.

* :class:`FiniteLoss` stops a diverging fit, naming the learning rate;
* :class:`WeightEMA` keeps timm's moving average of the weights;
* :func:`warmup_schedule` is the learning-rate policy of skorch's
  ``LRScheduler`` for a linear warm-up then cosine annealing.

The crash-safe checkpoint is :class:`~sklearn_transfer.checkpoint.TrainingCheckpoint`.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from skorch.callbacks import Callback

__all__ = ["FiniteLoss", "WeightEMA", "warmup_schedule"]


class FiniteLoss(Callback):
    """Stop training when a training batch's loss is not finite, naming the epoch.

    A diverging fit (a learning rate too large for the network) otherwise
    goes on with NaN weights and ends as a model that predicts one class.
    """

    def on_batch_end(self, net: Any, batch: Any = None, training: bool = False,
                     loss: Any = None, **kwargs: Any) -> None:
        if training and loss is not None and not torch.isfinite(loss.detach()).all():
            raise FloatingPointError(
                f"the training loss became {float(loss.detach())} in epoch "
                f"{len(net.history)}: the fit diverged; use a smaller learning rate "
                f"(lr={net.lr!r}, backbone_lr_mult={getattr(net, 'backbone_lr_mult', None)!r})")


class WeightEMA(Callback):
    """An exponential moving average of the weights, which replaces them when training ends.

    After every training step, timm's :class:`timm.utils.ModelEmaV3` updates
    ``ema = decay * ema + (1 - decay) * weights`` over the module's
    parameters and floating-point buffers (BatchNorm statistics), starting
    from the weights training starts with. Training and the validation
    scores of each epoch use the trained weights; at the end of training
    (after early stopping, or ``max_epochs``) the average is loaded into the
    module, which ``predict`` then uses. The average averages over about
    ``1 / (1 - decay)`` steps: keep that well below the number of training
    steps (``max_epochs * n_train / batch_size``), or it stays close to
    the starting weights and their fresh head.

    :class:`~sklearn_transfer.checkpoint.TrainingCheckpoint` saves and
    restores the average (``ema_``, as every callback's fitted state), so a
    resumed fit ends with the same one.

    Parameters
    ----------
    decay : float in (0, 1), default=0.99
    """

    def __init__(self, decay: float = 0.99) -> None:
        self.decay = decay

    def initialize(self) -> WeightEMA:
        self.ema_: Any = None
        return self

    def on_train_begin(self, net: Any, **kwargs: Any) -> None:
        from timm.utils import ModelEmaV3

        self.ema_ = ModelEmaV3(net.module_, decay=self.decay)

    def on_batch_end(self, net: Any, training: bool = False, **kwargs: Any) -> None:
        if training and self.ema_ is not None:
            self.ema_.update(net.module_)

    def on_train_end(self, net: Any, **kwargs: Any) -> None:
        if self.ema_ is not None:
            net.module_.load_state_dict(self.ema_.module.state_dict())
        self.ema_ = None  # a training-time copy of the network: not kept in the model


def warmup_schedule(optimizer: torch.optim.Optimizer, warmup_epochs: int, max_epochs: int,
                    cosine: bool = True, last_epoch: int = -1) -> Any:
    """Linear learning-rate warm-up, then cosine annealing (or the full rate) per epoch.

    Epoch ``e <= warmup_epochs`` trains at ``e / (warmup_epochs + 1)`` of each
    group's rate (torch's ``LinearLR``), the next epochs at the full rate,
    annealed over the remaining ``max_epochs - warmup_epochs`` epochs by
    ``CosineAnnealingLR`` (joined with ``SequentialLR``) when ``cosine``.
    A policy for skorch's ``LRScheduler``, which passes ``last_epoch``.

    Examples
    --------
    >>> import torch
    >>> from sklearn_transfer.callbacks import warmup_schedule
    >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    >>> schedule = warmup_schedule(opt, warmup_epochs=2, max_epochs=4)
    >>> lrs = []
    >>> for _ in range(4):
    ...     lrs.append(round(opt.param_groups[0]["lr"], 4))
    ...     opt.step()
    ...     schedule.step()
    >>> lrs
    [0.3333, 0.6667, 1.0, 0.5]
    """
    from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

    schedule: Any = LinearLR(optimizer, start_factor=1 / (warmup_epochs + 1), end_factor=1.0,
                             total_iters=warmup_epochs)
    if cosine:
        anneal = CosineAnnealingLR(optimizer, T_max=max_epochs - warmup_epochs)
        schedule = SequentialLR(optimizer, [schedule, anneal], milestones=[warmup_epochs])
    with warnings.catch_warnings():  # stepping before optimizer.step() is the point here
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(last_epoch + 1):  # training continued (partial_fit): where it was
            schedule.step()
    return schedule
