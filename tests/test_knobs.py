"""The fine-tuning recipe knobs: label smoothing, MixUp/CutMix, layer decay, warm-up, EMA, TTA.

Each is checked on real (tiny) training against its definition, not only accepted.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV
from skorch.callbacks import Callback
from skorch.dataset import ValidSplit
from timm.loss import SoftTargetCrossEntropy

from sklearn_transfer import FineTunedClassifier
from sklearn_transfer.batches import MixBatch

from .conftest import colour_images
from .test_finetune import tiny, two_colours
from .test_multilabel import bright_channels

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Losses:
    """Records every get_loss call of a fit: (logits, targets, training)."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple[torch.Tensor, torch.Tensor, bool]] = []
        original = FineTunedClassifier.get_loss

        def get_loss(net, y_pred, y_true, X=None, training=False):
            loss = original(net, y_pred, y_true, X=X, training=training)
            self.calls.append((y_pred.detach(), torch.as_tensor(y_true), training, loss.detach()))
            return loss

        monkeypatch.setattr(FineTunedClassifier, "get_loss", get_loss)

    def training(self):
        return [c for c in self.calls if c[2]]

    def validation(self):
        return [c for c in self.calls if not c[2]]


# ------------------------------------------------------------------- label smoothing


def test_label_smoothing_is_the_routed_cross_entropy_option(monkeypatch):
    X, y = two_colours(24)
    losses = Losses(monkeypatch)
    clf = tiny(max_epochs=1, criterion__label_smoothing=0.2).fit(X, y)
    assert clf.criterion_.label_smoothing == 0.2
    # the loss as defined: (1 - eps) * cross-entropy + eps * mean over classes of -log p
    for logits, target, _, loss in losses.calls:
        logp = torch.log_softmax(logits, dim=1)
        nll = -logp[torch.arange(len(target)), target]
        expected = (0.8 * nll + 0.2 * -logp.mean(dim=1)).mean()
        assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    # a multi-label Y trains with BCEWithLogitsLoss, which has no such option
    X, Y = bright_channels(16)
    with pytest.raises(ValueError, match="label_smoothing is an option of CrossEntropyLoss.*"
                                         "BCEWithLogitsLoss, which has none"):
        tiny(criterion__label_smoothing=0.1).fit(X, Y)


# ------------------------------------------------------------------------ MixUp/CutMix


class Mixed:
    """Records the batches before and after mixing."""

    def __init__(self, monkeypatch):
        self.batches: list[tuple] = []
        original = MixBatch.__call__

        def mixed(mix, x, y):
            before = (x.clone(), torch.as_tensor(y).clone())
            out = original(mix, x, y)
            self.batches.append((*before, *out))
            return out

        monkeypatch.setattr(MixBatch, "__call__", mixed)


def test_mixup_trains_on_mixed_images_and_soft_targets_and_validates_on_clean_ones(monkeypatch):
    X, y = two_colours(30)  # 24 training images: batches of 8, 8, 7 (an odd one)
    split = ValidSplit(0.2, stratified=True, random_state=0)
    plain = tiny(max_epochs=2, train_split=split).fit(X, y)
    losses, mixed = Losses(monkeypatch), Mixed(monkeypatch)
    clf = tiny(max_epochs=2, train_split=split, mixup=0.4).fit(X, y)
    assert len(mixed.batches) == 6
    checked = 0
    for x, target, x_mixed, soft in mixed.batches:
        # timm's batch-mode MixUp: one lambda, each image blended with its mirror in the batch
        n = len(x) - len(x) % 2
        onehot = torch.nn.functional.one_hot(target, 2).float()
        lam = float(soft[0] @ onehot[0]) if target[0] != target[n - 1] else None
        np.testing.assert_allclose(soft.sum(1), 1.0, rtol=1e-6)
        if lam is not None:
            expected = lam * onehot[:n] + (1 - lam) * onehot[:n].flip(0)
            torch.testing.assert_close(soft[:n], expected)
            torch.testing.assert_close(x_mixed[:n], lam * x[:n].float()
                                       + (1 - lam) * x[:n].float().flip(0))
            checked += 0 < lam < 1
        if n < len(x):  # the odd image out is left as it was
            torch.testing.assert_close(x_mixed[n:], x[n:].float())
            torch.testing.assert_close(soft[n:], onehot[n:])
    assert checked >= 3
    # the training loss is the soft-target cross-entropy of those targets (timm's)
    train = losses.training()
    for (logits, target, _, loss), (*_, soft) in zip(train, mixed.batches, strict=True):
        torch.testing.assert_close(target, soft)
        assert float(loss) == pytest.approx(float(SoftTargetCrossEntropy()(logits, soft)),
                                            rel=1e-5)
    assert clf.history_[:, "train_loss"] != plain.history_[:, "train_loss"]
    # validation: class indices, the plain loss; the accuracy compares indices as before
    for logits, target, _, loss in losses.validation():
        assert target.dtype == torch.int64 and target.ndim == 1
        assert float(loss) == pytest.approx(float(torch.nn.functional.cross_entropy(
            logits, target)), rel=1e-5)
    assert all(0 <= a <= 1 for a in clf.history_[:, "valid_acc"])


def test_cutmix_with_class_weights_and_label_smoothing(monkeypatch):
    X, y = two_colours(24)
    y[:6] = "red"
    losses, mixed = Losses(monkeypatch), Mixed(monkeypatch)
    clf = tiny(max_epochs=1, train_split=None, class_weight="balanced",
               criterion__label_smoothing=0.1,
               mixup={"mixup_alpha": 0.0, "cutmix_alpha": 1.0}).fit(X, y)
    weight, pasted = clf.criterion_.weight, 0
    for (logits, soft, _, loss), (x, _, x_mixed, _) in zip(losses.training(), mixed.batches,
                                                          strict=True):
        # CutMix pastes a box of the mirror image: every pixel is one of the two images'
        same, other = x_mixed == x.float(), x_mixed == x.float().flip(0)
        assert (same | other).all()
        pasted += bool((~same).any())
        # one loss for weighted, smoothed, soft targets: torch's cross-entropy with
        # probabilities (smoothing the mixed target towards uniform, as timm's Mixup does)
        smoothed = 0.9 * soft + 0.1 / 2
        expected = -(weight * smoothed * torch.log_softmax(logits, 1)).sum(1).mean()
        assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    assert pasted >= 2
    assert not torch.equal(weight, torch.ones(2))


def test_mixup_of_a_multi_label_y(monkeypatch):
    X, Y = bright_channels(32)
    mixed = Mixed(monkeypatch)
    clf = tiny(max_epochs=1, lr=5e-2, mixup={"mixup_alpha": 0.4, "mode": "elem"}).fit(X, Y)
    for _, target, _, soft in mixed.batches:
        assert soft.shape == target.shape and ((soft >= 0) & (soft <= 1)).all()
    assert any(((soft > 0) & (soft < 1)).any() for *_, soft in mixed.batches)
    assert clf.predict(X).shape == Y.shape


# ---------------------------------------------------------------------- layer decay


def test_layer_decay_gives_each_stage_its_learning_rate():
    X, y = two_colours(16)
    clf = tiny(lr=0.02, backbone_lr_mult=0.5, layer_decay=0.5, lr_schedule=None,
               max_epochs=1).fit(X, y)
    lr = {id(p): g["lr"] for g in clf.optimizer_.param_groups for p in g["params"]}
    stages = clf.module_.backbone.stages
    # head: lr; stage k from the top: lr * backbone_lr_mult * layer_decay ** k
    assert {lr[id(p)] for p in clf.module_.head.parameters()} == {0.02}
    assert {lr[id(p)] for p in stages[2].parameters()} == {0.02 * 0.5 * 0.5}
    assert {lr[id(p)] for p in stages[1].parameters()} == {0.02 * 0.5 * 0.25}
    # the frozen stem is in no group; the head stays group 0 (skorch's event_lr)
    assert not any(id(p) in lr for p in stages[0].parameters())
    assert clf.optimizer_.param_groups[0]["lr"] == 0.02
    assert len(clf.optimizer_.param_groups) == 3
    # timm's recipe: the last stage at lr * decay (backbone_lr_mult=1), everything trained
    clf = tiny(lr=0.01, backbone_lr_mult=1.0, layer_decay=0.75, freeze_depth=0,
               lr_schedule=None, max_epochs=1).fit(X, y)
    rates = [g["lr"] for g in clf.optimizer_.param_groups]
    assert rates == pytest.approx([0.01, 0.01 * 0.75 ** 3, 0.01 * 0.75 ** 2, 0.01 * 0.75])


# --------------------------------------------------------------------------- warm-up


@pytest.mark.parametrize("schedule", ["cosine", None])
def test_warmup_ramps_the_learning_rate_linearly_then_follows_the_schedule(schedule):
    X, y = two_colours(16)
    clf = tiny(lr=0.03, warmup_epochs=2, max_epochs=5, patience=None, lr_schedule=schedule,
               train_split=None).fit(X, y)
    after = [0.03, 0.0225, 0.0075] if schedule else [0.03] * 3  # cosine over epochs 3-5
    assert clf.history_[:, "event_lr"] == pytest.approx([0.01, 0.02, *after])
    # every group follows the ramp: the backbone keeps its ratio to the head
    groups = clf.optimizer_.param_groups
    assert groups[1]["lr"] == pytest.approx(groups[0]["lr"] * 0.1)


# ------------------------------------------------------------------------------- EMA


class Trajectory(Callback):
    """The module's state at the start of training and after every training step."""

    def initialize(self):
        self.states = []
        return self

    def on_train_begin(self, net, **kwargs):
        self.states = [self.snapshot(net)]

    def on_batch_end(self, net, training=False, **kwargs):
        if training:
            self.states.append(self.snapshot(net))

    @staticmethod
    def snapshot(net):
        return {k: v.detach().clone() for k, v in net.module_.state_dict().items()}


def test_ema_ends_with_the_moving_average_of_the_trajectory():
    X, y = two_colours(24)
    trajectory = Trajectory()
    clf = tiny(ema=0.8, max_epochs=2, lr_schedule=None, train_split=None,
               callbacks=[("trajectory", trajectory)]).fit(X, y)
    states = trajectory.states
    assert len(states) == 7  # the start, then 3 steps in each of 2 epochs
    final = clf.module_.state_dict()
    for key, value in final.items():
        if not value.is_floating_point():  # step counts are copied, not averaged
            assert torch.equal(value, states[-1][key])
            continue
        ema = states[0][key].double()
        for state in states[1:]:
            ema = 0.8 * ema + 0.2 * state[key].double()
        torch.testing.assert_close(value.double(), ema, rtol=1e-5, atol=1e-6)
    head = "head.1.weight"
    assert not torch.allclose(final[head], states[-1][head])  # not the last step's weights
    assert dict(clf.callbacks_)["ema"].ema_ is None  # the copy is not kept in the model
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(clf)).predict_proba(X),
                                  clf.predict_proba(X))


def test_ema_with_validation_keeps_the_average_not_the_best_epoch():
    X, y = two_colours(30)
    clf = tiny(ema=0.5, max_epochs=3, patience=None).fit(X, y)
    stopping = dict(clf.callbacks_)["early_stopping"]
    assert not stopping.load_best  # the average replaces the weights: no best copies kept
    names = [name for name, _ in clf.callbacks_]
    assert names.index("ema") > names.index("early_stopping")
    assert clf.score(X, y) >= 0.9


# ------------------------------------------------------------------------------- TTA


def test_tta_averages_the_probabilities_of_the_image_and_its_mirror():
    X = colour_images(24, size=32)  # the network's input size: no resizing
    y = np.array(["red", "green"] * 12)
    clf = tiny(max_epochs=2, tta=True).fit(X, y)
    proba = clf.predict_proba(X)
    plain = clone(clf).set_params(tta=False)
    assert plain.get_params()["tta"] is False
    clf.set_params(tta=False)
    by_hand = (clf.predict_proba(X) + clf.predict_proba(X[:, :, ::-1])) / 2
    np.testing.assert_allclose(proba, by_hand, rtol=1e-5, atol=1e-6)
    assert not np.allclose(proba, clf.predict_proba(X), atol=1e-6)
    # a mirror-symmetric image: TTA predicts what the plain view does
    symmetric = np.concatenate([X[:, :, :16], X[:, :, :16][:, :, ::-1]], axis=2)
    with_tta = clf.set_params(tta=True).predict_proba(symmetric)
    np.testing.assert_allclose(with_tta, clf.set_params(tta=False).predict_proba(symmetric),
                               rtol=1e-5, atol=1e-6)
    clf.set_params(tta=True)
    assert np.array_equal(clf.predict(X), clf.classes_[proba.argmax(1)])


def test_tta_is_a_prediction_knob_it_trains_the_same_weights():
    X, y = two_colours(24)
    a, b = tiny(max_epochs=2).fit(X, y), tiny(max_epochs=2, tta=True).fit(X, y)
    assert a.history_[:, "train_loss"] == b.history_[:, "train_loss"]
    assert a.history_[:, "valid_loss"] == b.history_[:, "valid_loss"]
    for key, value in a.module_.state_dict().items():
        assert torch.equal(value, b.module_.state_dict()[key]), key


def test_tta_of_a_multi_label_y():
    X, Y = bright_channels(24)
    clf = tiny(max_epochs=1, tta=True).fit(X, Y)
    proba = clf.predict_proba(X)
    assert proba.shape == Y.shape and ((proba > 0) & (proba < 1)).all()


# ------------------------------------------------------------ scikit-learn citizens


def test_knobs_are_validated_at_fit():
    X, y = two_colours(12)
    bad = [
        (dict(mixup=0), "'mixup' parameter"),
        (dict(mixup="yes"), "'mixup' parameter"),
        (dict(mixup={"label_smoothing": 0.1}), "'label_smoothing' is set from "
                                               "criterion__label_smoothing"),
        (dict(mixup={"num_classes": 3}), "'num_classes' is set from"),
        (dict(mixup={"alpha": 1.0}), "'alpha' is not an option of timm's Mixup"),
        (dict(mixup={"mixup_alpha": 0.0}), "mixes nothing"),
        (dict(mixup={"mode": "pairs"}), "mode must be"),
        (dict(layer_decay=0), "'layer_decay' parameter"),
        (dict(layer_decay=1.5), "'layer_decay' parameter"),
        (dict(warmup_epochs=-1), "'warmup_epochs' parameter"),
        (dict(warmup_epochs=1.5), "'warmup_epochs' parameter"),
        (dict(warmup_epochs=4, max_epochs=4), "warmup_epochs=4 leaves no epoch"),
        (dict(ema=1.0), "'ema' parameter"),
        (dict(ema=0), "'ema' parameter"),
        (dict(tta="yes"), "'tta' parameter"),
    ]
    for params, message in bad:
        with pytest.raises(ValueError, match=message):
            tiny(**params).fit(X, y)


def test_knobs_clone_pickle_and_grid_search():
    X, y = two_colours(24)
    knobs = dict(mixup={"cutmix_alpha": 1.0}, layer_decay=0.8, warmup_epochs=1, ema=0.7,
                 tta=True)
    clf = tiny(max_epochs=2, **knobs)
    params = clf.get_params(deep=False)
    fresh = clone(clf)
    assert all(fresh.get_params()[k] == v for k, v in knobs.items())
    clf.fit(X, y)
    assert all(clf.get_params(deep=False)[k] is params[k] for k in knobs)  # untouched
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(clf)).predict_proba(X),
                                  clf.predict_proba(X))
    search = GridSearchCV(tiny(max_epochs=2), {"mixup": [None, 0.4], "ema": [None, 0.7],
                                               "tta": [False, True]}, cv=2).fit(X, y)
    assert np.isfinite(search.cv_results_["mean_test_score"]).all()
    assert len(search.cv_results_["params"]) == 8
