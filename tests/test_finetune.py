"""FineTunedClassifier: real fine-tuning, freezing that holds, a scikit-learn and skorch citizen."""

from __future__ import annotations

import pickle
import random

import joblib
import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.model_selection import GridSearchCV
from sklearn.utils.class_weight import compute_class_weight
from skorch.callbacks import Callback
from skorch.dataset import ValidSplit

from sklearn_transfer import Backbone, FineTunedClassifier, get_backbone, load_image_folder
from sklearn_transfer.finetune import DEFAULT_DEVICE
from sklearn_transfer.images import ImageLoadError
from sklearn_transfer.network import FineTuneModule

from .conftest import colour_images, make_tiny_backbone, real_dataset

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny(**params) -> FineTunedClassifier:
    params.setdefault("backbone", make_tiny_backbone())
    params.setdefault("freeze_depth", 1)
    params.setdefault("max_epochs", 4)
    params.setdefault("batch_size", 8)
    params.setdefault("lr", 1e-2)
    params.setdefault("verbose", 0)
    params.setdefault("random_state", 0)
    return FineTunedClassifier(**params)


def two_colours(n: int = 40, seed: int = 0, labels=("red", "green")):
    X = colour_images(n, size=40, seed=seed)
    y = np.array([labels[i % 2] for i in range(n)])
    return X, y


def bn_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()
            if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}


# ------------------------------------------------------------------ it learns


def test_fine_tunes_tiny_images_with_string_labels(capsys):
    X, y = two_colours(48)
    clf = tiny(verbose=1, max_epochs=5).fit(X, y)
    table = capsys.readouterr().out
    # skorch's epoch table, with the default callbacks
    for column in ("epoch", "train_loss", "valid_loss", "valid_acc", "dur"):
        assert column in table
    assert list(clf.classes_) == ["green", "red"]
    pred = clf.predict(X)
    assert pred.dtype == y.dtype and set(pred) <= {"red", "green"}
    proba = clf.predict_proba(X)
    assert proba.shape == (48, 2) and proba.dtype == np.float32
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-6)
    assert np.array_equal(pred, clf.classes_[proba.argmax(axis=1)])
    X_new, y_new = two_colours(20, seed=1)
    assert clf.score(X_new, y_new) >= 0.9
    # the validation accuracy compares indices with indices (not labels with indices)
    assert max(clf.history_[:, "valid_acc"]) >= 0.8
    assert len(clf.history_) <= 5


def test_non_contiguous_integer_labels_and_three_classes():
    X = colour_images(60, size=40)
    X[2::3] = X[2::3] // 3  # a third class: dark images
    y = np.array([7, 42, -3])[np.arange(60) % 3]
    clf = tiny(max_epochs=6).fit(X, y)
    assert list(clf.classes_) == [-3, 7, 42]
    pred = clf.predict(X)
    assert pred.dtype.kind == "i" and set(pred) <= {-3, 7, 42}
    assert clf.predict_proba(X).shape == (60, 3)
    assert clf.score(X, y) > 0.6


def test_paths_and_pil_images_are_accepted(tmp_path):
    X, y = two_colours(16)
    paths = []
    for i, arr in enumerate(X):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(arr).save(paths[-1])
    clf = tiny(max_epochs=1, train_split=None).fit(paths, list(y))
    pils = [Image.open(p) for p in paths[:4]]
    np.testing.assert_allclose(clf.predict_proba(pils), clf.predict_proba(paths[:4]), atol=1e-6)
    np.testing.assert_allclose(clf.predict_proba(X[:4]), clf.predict_proba(paths[:4]), atol=1e-6)


# -------------------------------------------------------------------- freezing


def test_frozen_stages_keep_batchnorm_statistics_and_get_no_gradients():
    original = make_tiny_backbone()
    before = bn_state(original)
    X, y = two_colours(32)
    clf = tiny(backbone=original, freeze_depth=1, max_epochs=2, patience=None).fit(X, y)
    net = clf.module_.backbone
    after = bn_state(net)
    frozen = {k for k in before if k.startswith("stages.0.")}
    trained = {k for k in before if k.startswith("stages.1.")}
    assert frozen and trained
    for key in frozen:  # bit-identical, although skorch called module.train() every epoch
        assert torch.equal(before[key], after[key]), key
    for key in trained:
        assert not torch.equal(before[key], after[key]), key
    # frozen weights: no gradients, unchanged, never handed to the optimizer
    frozen_params = list(net.stages[0].parameters())
    assert all(not p.requires_grad and p.grad is None for p in frozen_params)
    for p, q in zip(frozen_params, original.stages[0].parameters(), strict=True):
        assert torch.equal(p, q)
    in_optimizer = {id(p) for g in clf.optimizer_.param_groups for p in g["params"]}
    assert not in_optimizer & {id(p) for p in frozen_params}
    trainable = [p for p in clf.module_.parameters() if p.requires_grad]
    assert in_optimizer == {id(p) for p in trainable}
    # frozen stages stay in eval mode whatever train() is called on
    clf.module_.train()
    assert not any(m.training for m in net.stages[0].modules())
    assert all(m.training for m in net.stages[1].modules())
    # the user's module was copied, not trained in place
    assert all(torch.equal(before[k], v) for k, v in bn_state(original).items())


@pytest.mark.parametrize("depth, frozen", [(0, 0), (2, 2), (3, 3), ("all", 3), (-1, 2)])
def test_freeze_depth_values(depth, frozen):
    X, y = two_colours(16)
    clf = tiny(freeze_depth=depth, max_epochs=1, train_split=None).fit(X, y)
    assert clf.freeze_depth_ == frozen
    stages = clf.module_.backbone.stages
    for i, stage in enumerate(stages):
        assert all(p.requires_grad == (i >= frozen) for p in stage.parameters())
    groups = clf.optimizer_.param_groups
    n_pretrained = sum(p.numel() for s in stages[frozen:] for p in s.parameters())
    n_head = sum(p.numel() for p in clf.module_.head.parameters())
    assert sum(p.numel() for g in groups for p in g["params"]) == n_pretrained + n_head


@pytest.mark.parametrize("depth", [4, -4, "some", True, 1.5, None])
def test_bad_freeze_depth_names_the_parameter_and_the_stages(depth):
    X, y = two_colours(8)
    with pytest.raises(ValueError, match="freeze_depth") as info:
        tiny(freeze_depth=depth).fit(X, y)
    if depth in (4, -4):
        assert "['stem', 'block', 'head']" in str(info.value)


def test_smaller_learning_rate_for_pretrained_layers_and_routed_parameters():
    X, y = two_colours(16)
    clf = tiny(lr=0.02, backbone_lr_mult=0.25, lr_schedule=None, max_epochs=1,
               optimizer__weight_decay=0.05, callbacks__early_stopping__patience=7,
               iterator_train__drop_last=True).fit(X, y)
    assert lr_by_part(clf) == {"head": {0.02}, "backbone": {0.02 * 0.25}}
    # through skorch's own param_groups: the head is group 0, whose rate skorch records
    assert [g["lr"] for g in clf.optimizer_.param_groups] == [0.02, 0.02 * 0.25]
    assert all(g["weight_decay"] == 0.05 for g in clf.optimizer_.param_groups)
    assert isinstance(clf.optimizer_, torch.optim.AdamW)
    assert dict(clf.callbacks_)["early_stopping"].patience == 7
    assert dict(clf.callbacks_)["early_stopping"].load_best
    # explicit param groups take precedence over the multiplier
    clf = tiny(max_epochs=1, lr_schedule=None,
               optimizer__param_groups=[("head.*", {"lr": 0.5}), ("backbone.stages.2.*",
                                                                  {"lr": 0.1})]).fit(X, y)
    assert lr_by_part(clf) == {"head": {0.5}, "backbone": {0.1, 1e-2 * 0.1}}


def lr_by_part(clf) -> dict[str, set[float]]:
    """The learning rates the optimizer gives the head's and the backbone's parameters."""
    lr = {id(p): g["lr"] for g in clf.optimizer_.param_groups for p in g["params"]}
    return {part: {lr[id(p)] for p in getattr(clf.module_, part).parameters() if p.requires_grad}
            for part in ("head", "backbone")}


def test_cosine_schedule_and_best_validation_weights_are_restored():
    X, y = two_colours(40)
    split = ValidSplit(0.25, stratified=True, random_state=0)
    clf = tiny(max_epochs=4, lr=0.05, patience=None, train_split=split).fit(X, y)
    history = clf.history_
    # cosine annealing from lr towards 0 over max_epochs; the head's rate is recorded
    assert clf.optimizer_.param_groups[0]["lr"] < 0.05
    assert history[0, "event_lr"] == 0.05 and history[-1, "event_lr"] < 0.05
    # the weights kept are those of the best validation epoch: recompute its loss
    _, valid = clf.get_split_datasets(X, y)
    proba = clf.predict_proba(valid)
    targets = np.array([valid[i][1] for i in range(len(valid))])
    loss = -np.mean(np.log(proba[np.arange(len(targets)), targets]))
    assert loss == pytest.approx(min(history[:, "valid_loss"]), rel=1e-4)


def test_augmentation_for_training_plain_transform_for_validation():
    X, y = two_colours(20)
    clf = tiny(max_epochs=1, augment={"rotation": 10, "zoom": 0.1}).fit(X, y)
    train, valid = clf.get_split_datasets(X, y)
    names = [type(t).__name__ for t in train.dataset.transform.transforms]
    assert names == ["RandomAffine", "RandomResizedCrop", "RandomHorizontalFlip", "PILToTensor"]
    assert type(valid.dataset.transform).__name__ == "ResizeCenterCrop"
    plain = tiny(max_epochs=1, augment=False).fit(X, y)
    train, _ = plain.get_split_datasets(X, y)
    assert type(train.dataset.transform).__name__ == "ResizeCenterCrop"
    with pytest.raises(ValueError, match="augment=.*unknown option.*'shear'"):
        tiny(augment={"shear": 3}).fit(X, y)


def test_class_weights():
    X, y = two_colours(30)
    y[:12] = "red"  # unbalanced: 21 red, 9 green
    clf = tiny(class_weight="balanced", max_epochs=1).fit(X, y)
    expected = compute_class_weight("balanced", classes=np.array(["green", "red"]), y=y)
    np.testing.assert_allclose(clf.criterion_.weight.numpy(), expected, rtol=1e-6)
    clf = tiny(class_weight={"green": 3.0}, max_epochs=1).fit(X, y)
    np.testing.assert_allclose(clf.criterion_.weight.numpy(), [3.0, 1.0])
    with pytest.raises(ValueError, match="class_weight names label"):
        tiny(class_weight={"blue": 2.0}).fit(X, y)


# ------------------------------------------------------------ input checking


def test_clear_errors():
    X, y = two_colours(12)
    with pytest.raises(NotFittedError):
        tiny().predict(X)
    with pytest.raises(ValueError, match="12 images but y has 11"):
        tiny().fit(X, y[:11])
    with pytest.raises(ValueError, match="single class"):
        tiny().fit(X, ["a"] * 12)
    with pytest.raises(ValueError, match="continuous"):
        tiny().fit(X, np.linspace(0, 1, 12))
    # scikit-learn's parameter validation names the parameter and the value
    with pytest.raises(ValueError, match="'lr_schedule' parameter .* Got 'linear'"):
        tiny(lr_schedule="linear").fit(X, y)
    with pytest.raises(ValueError, match="'backbone_lr_mult' parameter .* Got -1"):
        tiny(backbone_lr_mult=-1).fit(X, y)
    with pytest.raises(ValueError, match="'max_epochs' parameter .* Got 0"):
        tiny(max_epochs=0).fit(X, y)
    for name, value in (("lr", float("inf")), ("backbone_lr_mult", float("inf")),
                        ("backbone_lr_mult", float("nan"))):  # a diverging fit: refused
        with pytest.raises(ValueError, match=rf"{name}\b.*(Got {value}|must be finite)"):
            tiny(**{name: value}).fit(X, y)
    with pytest.raises(ValueError, match="device='auto' is not a device skorch"):
        tiny(device="auto").fit(X, y)  # the default already is the machine's device
    with pytest.raises(ValueError, match="train_split=None"):
        tiny().fit(X[:3], y[:3])  # too few images for a stratified validation split
    with pytest.raises(ValueError, match="unexpected argument.*iterator_train_shuffle"):
        tiny(iterator_train_shuffle=True).fit(X, y)  # skorch's own check of routed names
    # the head's options are the module's, validated by it
    with pytest.raises(ValueError, match="'head_dropout' parameter of FineTuneModule .* Got 1"):
        tiny(module__head_dropout=1).fit(X, y)
    with pytest.raises(ValueError, match="'head_hidden' parameter of FineTuneModule .* Got 0"):
        tiny(module__head_hidden=0).fit(X, y)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device='cuda' was asked for but no CUDA GPU"):
            tiny(device="cuda").fit(X, y)
    clf = tiny(max_epochs=1).fit(X, y)
    with pytest.raises(ValueError, match="not in the classes seen"):
        clf.partial_fit(X, np.array(["blue"] * 12))


def test_a_bad_file_in_a_worker_is_raised_naming_it(tmp_path):
    X, y = two_colours(8)
    paths = []
    for i, arr in enumerate(X):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(arr).save(paths[-1])
    (tmp_path / "3.png").write_bytes(b"not a png")
    # (persistent workers, the default with num_workers > 0, raise the same error
    # but torch then waits ~5 s for the busy worker to shut down)
    clf = tiny(max_epochs=1, train_split=None, iterator_train__num_workers=1,
               iterator_train__persistent_workers=False)
    with pytest.raises(ImageLoadError, match="3.png"):
        clf.fit(paths, y)
    paths[5] = tmp_path / "missing.png"
    with pytest.raises(FileNotFoundError, match="missing.png"):
        tiny(max_epochs=1, train_split=None).fit(paths[4:], y[4:])


# ------------------------------------------------------- scikit-learn citizen


def test_params_are_untouched_and_clone_is_fresh():
    X, y = two_colours(16)
    clf = tiny(max_epochs=1, iterator_train__num_workers=0)
    params = clf.get_params(deep=False)
    # the device default is a plain value; the module class is skorch's routed component
    assert params["device"] == DEFAULT_DEVICE and params["module"] is FineTuneModule
    assert params["iterator_train__num_workers"] == 0
    clf.fit(X, y)
    after = clf.get_params(deep=False)
    assert after.keys() == params.keys()
    assert all(after[k] is params[k] for k in params)  # fit rewrote nothing
    fresh = clone(clf)
    with pytest.raises(NotFittedError):
        fresh.predict(X)
    assert not hasattr(fresh, "classes_")
    assert fresh.get_params(deep=False).keys() == params.keys()
    assert "freeze_depth=1" in repr(fresh)
    # a module as backbone can be set like any parameter (grid searches over networks)
    other = make_tiny_backbone(seed=1)
    assert fresh.set_params(backbone=other).backbone is other


def test_pickle_and_joblib_round_trips_predict_identically(tmp_path):
    X, y = two_colours(16)
    clf = tiny(max_epochs=1).fit(X, y)
    expected = clf.predict_proba(X)
    restored = pickle.loads(pickle.dumps(clf))
    np.testing.assert_array_equal(restored.predict_proba(X), expected)
    assert restored.get_params()["device"] == clf.device == DEFAULT_DEVICE
    joblib.dump(clf, tmp_path / "clf.joblib")
    loaded = joblib.load(tmp_path / "clf.joblib")
    np.testing.assert_array_equal(loaded.predict_proba(X), expected)
    assert np.array_equal(loaded.predict(X), clf.predict(X))
    # a loaded model can go on training
    loaded.partial_fit(X, y)


def test_a_model_pickled_on_a_gpu_machine_loads_on_a_cpu_only_one(monkeypatch):
    # Simulated: every tensor the net moved to the device is written as a CUDA tensor, as
    # on a GPU machine (the user's own module stays where it was); this machine has none.
    import torch.serialization

    backbone = make_tiny_backbone()
    X, y = two_colours(16)
    clf = tiny(backbone=backbone, max_epochs=2).fit(X, y)  # early stopping's best weights,
    expected = clf.predict_proba(X)                          # the scheduler's optimizer, ...
    users = {t.untyped_storage().data_ptr() for t in [*backbone.parameters(),
                                                      *backbone.buffers()]}
    with monkeypatch.context() as patch:
        patch.setattr(torch.serialization, "location_tag",
                      lambda storage: "cpu" if storage.data_ptr() in users else "cuda:0")
        blob = pickle.dumps(clf)
        clf.device = "cuda"  # a net asked for CUDA explicitly: skorch maps it, and says so
        explicit = pickle.dumps(clf)
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the CUDA tensors would load on it")
    restored = pickle.loads(blob)
    assert restored.device == DEFAULT_DEVICE
    np.testing.assert_array_equal(restored.predict_proba(X), expected)
    scheduler = dict(restored.callbacks_)["lr_scheduler"].lr_scheduler_
    assert scheduler.optimizer is restored.optimizer_  # one optimizer, as before pickling
    restored.partial_fit(X, y)
    with pytest.warns(UserWarning, match="available"):  # skorch: CUDA asked, none here
        mapped = pickle.loads(explicit)
    assert str(mapped.device) == "cpu"
    np.testing.assert_array_equal(mapped.predict_proba(X), expected)


def test_skorch_methods_that_move_tensors_work_on_the_default_device(tmp_path):
    X, y = two_colours(16)
    clf = tiny(max_epochs=1).fit(X, y)
    batch = torch.from_numpy(X[:4]).permute(0, 3, 1, 2)
    assert clf.get_loss(clf.infer(batch), torch.tensor([0, 1, 0, 1])).ndim == 0
    clf.save_params(f_params=tmp_path / "params.pt")
    other = tiny(max_epochs=1, random_state=1).fit(X, y)
    other.load_params(f_params=tmp_path / "params.pt")
    np.testing.assert_array_equal(other.predict_proba(X), clf.predict_proba(X))
    clf.set_params(module__head_dropout=0.5)  # skorch re-initialises the module
    assert clf.module_.head[0].p == 0.5
    assert clf.fit(X, y).predict(X).shape == (16,)
    assert clf.device == other.device == DEFAULT_DEVICE


def test_random_state_makes_fits_identical_and_leaves_global_rngs_alone():
    X, y = two_colours(24)
    a, b, c = (tiny(max_epochs=2, random_state=s) for s in (7, 7, 8))
    torch.manual_seed(123)
    np.random.seed(123)  # noqa: NPY002
    random.seed(123)
    a.fit(X, y)
    after = (torch.rand(1).item(), np.random.rand(), random.random())  # noqa: NPY002
    b.fit(X, y)
    np.testing.assert_array_equal(a.predict_proba(X), b.predict_proba(X))
    c.fit(X, y)
    assert not np.array_equal(a.predict_proba(X), c.predict_proba(X))
    torch.manual_seed(123)
    np.random.seed(123)  # noqa: NPY002
    random.seed(123)
    assert after == (torch.rand(1).item(), np.random.rand(), random.random())  # noqa: NPY002


def test_gradient_scaler_path_trains():
    # The CUDA path (float16 autocast + GradScaler) exercised on the CPU, which
    # supports both: same code, only the device differs.
    X, y = two_colours(24)
    clf = tiny(max_epochs=3, train_split=None, lr_schedule=None, precision="float16").fit(X, y)
    losses = clf.history_[:, "train_loss"]
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    assert "grad_scaler_" not in vars(clf)  # a training-time helper, not pickled


class StartsFromPretrained(Callback):
    """Checks, at the start of every fit, that the backbone holds the pretrained weights."""

    fits: list[int] = []  # class attribute: GridSearchCV clones (deep-copies) callbacks

    def __init__(self, reference=None):
        self.reference = reference

    def on_train_begin(self, net, **kwargs):
        state = net.module_.backbone.state_dict()
        for key, value in self.reference.items():
            assert torch.equal(state[key].cpu(), value), key
        type(self).fits.append(net.freeze_depth_)


def run_grid_search(estimator, X, y, depths, reference) -> GridSearchCV:
    """Grid search over freeze_depth, checking every fit starts from ``reference``."""
    StartsFromPretrained.fits = []
    estimator.set_params(callbacks=[("check", StartsFromPretrained(reference))])
    search = GridSearchCV(estimator, {"freeze_depth": depths}, cv=2).fit(X, y)
    # every candidate x fold, and the refit, began with the pretrained weights
    expected = [d for d in depths for _ in range(2)] + [search.best_params_["freeze_depth"]]
    resolve = {"all": len(estimator.backbone.stages) if isinstance(estimator.backbone, Backbone)
               else 9}
    assert sorted(StartsFromPretrained.fits) == sorted(resolve.get(d, d) for d in expected)
    assert np.isfinite(search.cv_results_["mean_test_score"]).all()
    return search


def test_grid_search_over_freeze_depth_starts_every_fit_from_the_pretrained_weights():
    backbone = make_tiny_backbone()
    reference = {k: v.clone() for k, v in backbone.state_dict().items()}
    X, y = two_colours(24)
    search = run_grid_search(tiny(backbone=backbone, max_epochs=2), X, y, [0, 1, 2, "all"],
                             reference)
    assert search.best_estimator_.score(X, y) >= 0.8


@pytest.mark.data
@pytest.mark.weights
def test_grid_search_over_freeze_depth_on_real_images():
    root = real_dataset("hymenoptera_data")
    X, y = load_image_folder(root / "train")
    rng = np.random.RandomState(0)
    take = np.concatenate([rng.choice(np.flatnonzero(y == c), 4, replace=False)
                           for c in ("ants", "bees")])
    reference = {k: v.clone() for k, v in get_backbone("efficientnet_lite0").state_dict().items()
                 if not k.startswith("classifier.")}
    estimator = FineTunedClassifier(max_epochs=1, verbose=0, random_state=0, train_split=None)
    run_grid_search(estimator, X[take], y[take], [6, "all"], reference)


# ------------------------------------------------------------------ real data


@pytest.mark.data
@pytest.mark.weights
def test_hymenoptera_fine_tuning_reaches_093():
    root = real_dataset("hymenoptera_data")
    X_train, y_train = load_image_folder(root / "train")
    X_val, y_val = load_image_folder(root / "val")
    # default settings but two epochs: 244 images overfit after the first or second
    clf = FineTunedClassifier(max_epochs=2, random_state=0, verbose=0)
    clf.fit(X_train, y_train)
    assert len(clf.history_) <= 5
    accuracy = clf.score(X_val, y_val)
    print(f"hymenoptera val accuracy after fine-tuning: {accuracy:.4f}")
    assert accuracy >= 0.93, accuracy
    # the frozen stages still hold exactly the pretrained weights and statistics
    pretrained = get_backbone("efficientnet_lite0").state_dict()
    tuned = clf.module_.backbone.state_dict()
    frozen = [k for k in pretrained if k.startswith(tuple(
        f"stages.{i}." for i in range(clf.freeze_depth_)))]
    assert clf.freeze_depth_ == 7 and frozen
    assert all(torch.equal(tuned[k].cpu(), pretrained[k]) for k in frozen)


def test_a_diverging_fit_stops_naming_the_epoch_and_a_smaller_learning_rate():
    X, y = two_colours(24)
    with pytest.raises(FloatingPointError, match=r"loss became nan in epoch 1: .*smaller "
                                                 r"learning rate \(lr=100000000.0"):
        tiny(freeze_depth=0, lr=1e8, backbone_lr_mult=1.0).fit(X, y)


def test_sample_weight_is_refused_clearly():
    X, y = two_colours(8)
    with pytest.raises(TypeError, match="takes no sample_weight.*class_weight"):
        tiny(max_epochs=1).fit(X, y, sample_weight=np.ones(8))


def test_parameters_set_after_fit_are_validated_at_predict():
    X, y = two_colours(8)
    clf = tiny(max_epochs=1, train_split=None).fit(X, y)
    with pytest.raises(ValueError, match="'batch_size' parameter .* Got -4"):
        clf.set_params(batch_size=-4).predict(X)


def test_class_weights_and_label_types_are_checked_before_training():
    X, y = two_colours(12)
    for bad in (-1.0, 0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"class_weight\['red'\]=.*: a class weight must be "
                                             "a finite positive number"):
            tiny(class_weight={"red": bad, "green": 1.0}).fit(X, y)
    with pytest.raises(ValueError, match="Mix of label input types"):
        tiny().fit(X, [0, "green"] * 6)
