"""Training survives a crash (checkpoint_dir), and random_state makes fits reproducible."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV

import sklearn_transfer.checkpoint as checkpoint_module
from sklearn_transfer import CNNFeatureTransformer, FineTunedClassifier

from .conftest import REPO, colour_images, make_tiny_backbone

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny(**params) -> FineTunedClassifier:
    # augmentation, dropout, a cosine schedule and early stopping's best weights are all
    # on: each is state a resumed fit must restore
    defaults = dict(backbone=make_tiny_backbone(), freeze_depth=1, max_epochs=4, batch_size=8,
                    lr=1e-2, patience=None, random_state=0, verbose=0)
    return FineTunedClassifier(**{**defaults, **params})


def data(n: int = 24):
    return colour_images(n, size=40), np.array(["red", "green"] * (n // 2))


def without_timings(history) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in ("dur", "batches")}
            for row in history.to_list()]


def checkpoints(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# ------------------------------------------------------------------ crash and resume

CHILD = textwrap.dedent("""
    import json, sys, time
    import numpy as np, torch
    torch.set_num_threads(1)
    from sklearn_transfer import FineTunedClassifier
    from tests.conftest import colour_images, make_tiny_backbone

    checkpoint_dir, out, pause_marker = sys.argv[1], sys.argv[2], sys.argv[3]
    knobs = json.loads(sys.argv[4])
    epochs_seen = []
    original = FineTunedClassifier.train_step

    def train_step(self, batch, **kwargs):
        # not a parameter: the killed and the resumed process are the same run
        epochs_seen.append(len(self.history))
        result = original(self, batch, **kwargs)
        if pause_marker != "-" and len(self.history) == 3:
            open(pause_marker, "w").close()  # mid-epoch 3: epochs 1 and 2 are saved
            time.sleep(300)
        return result

    FineTunedClassifier.train_step = train_step
    X = colour_images(24, size=40)
    y = np.array(["red", "green"] * 12)
    clf = FineTunedClassifier(make_tiny_backbone(), freeze_depth=1, max_epochs=4,
                              batch_size=8, lr=1e-2, patience=None, random_state=0,
                              verbose=0, checkpoint_dir=checkpoint_dir, **knobs).fit(X, y)
    np.save(out + ".npy", clf.predict_proba(X))
    torch.save(clf.module_.state_dict(), out + ".pt")
    print(json.dumps({"epochs_trained": sorted(set(epochs_seen)),
                      "valid_loss": clf.history[:, "valid_loss"]}))
""")


# the recipe knobs with state of their own: MixUp draws from NumPy's global RNG, the weight
# average and the warm-up schedule live in callbacks
KNOBS = {"mixup": {"mixup_alpha": 0.4, "cutmix_alpha": 1.0}, "ema": 0.8, "warmup_epochs": 1}


@pytest.mark.parametrize("knobs", [{}, KNOBS], ids=["default", "mixup-ema-warmup"])
def test_a_fit_killed_mid_epoch_resumes_to_the_uninterrupted_result(tmp_path, knobs):
    X, y = data()
    reference = tiny(**knobs).fit(X, y)  # uninterrupted, in this process, without checkpoints
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    ckpt = tmp_path / "ckpt"
    marker = tmp_path / "mid-epoch-3"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, str(script), str(ckpt), str(tmp_path / "out")]
    args = json.dumps(knobs)

    killed = subprocess.Popen([*cmd, str(marker), args], env=env, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert killed.poll() is None, killed.communicate()[1].decode()[-2000:]
        assert time.monotonic() < deadline, "the first fit never reached epoch 3"
        time.sleep(0.05)
    saved = checkpoints(ckpt)
    assert len(saved) == 1 and saved[0].startswith("fit-"), saved
    killed.send_signal(signal.SIGKILL)
    killed.communicate(timeout=30)
    assert killed.returncode == -signal.SIGKILL
    assert checkpoints(ckpt) == saved  # no temporary file left half-written

    resumed = subprocess.run([*cmd, "-", args], env=env, cwd=REPO, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    report = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert report["epochs_trained"] == [3, 4]  # epochs 1-2 came from the checkpoint
    assert report["valid_loss"] == reference.history[:, "valid_loss"]
    proba = np.load(tmp_path / "out.npy")
    np.testing.assert_array_equal(proba, reference.predict_proba(X))
    weights = torch.load(tmp_path / "out.pt", weights_only=True)
    expected = reference.module_.state_dict()
    assert weights.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(weights[key], value), key
    assert checkpoints(ckpt) == []  # a completed fit removes its checkpoint


class Crash(Exception):
    pass


def crash_in_epoch(monkeypatch, epoch: int) -> None:
    original = FineTunedClassifier.train_step

    def train_step(self, batch, **kwargs):
        if len(self.history) == epoch:
            raise Crash(f"crash in epoch {epoch}")
        return original(self, batch, **kwargs)

    monkeypatch.setattr(FineTunedClassifier, "train_step", train_step)


def crashed_fit(directory, epoch: int, monkeypatch, X, y, **params) -> list[str]:
    """A checkpointed fit that crashes in ``epoch``; the checkpoint files it leaves."""
    with monkeypatch.context() as patch:
        crash_in_epoch(patch, epoch)
        with pytest.raises(Crash):
            tiny(checkpoint_dir=directory, **params).fit(X, y)
    return checkpoints(directory)


def test_resume_is_exact_with_dataloader_workers_and_early_stopping(tmp_path, monkeypatch):
    X, y = data()
    y = np.random.RandomState(1).permutation(y)  # shuffled labels: validation loss wobbles
    params = dict(iterator_train__num_workers=1, patience=2, max_epochs=8, lr=0.05)
    reference = tiny(checkpoint_dir=tmp_path / "ref", **params).fit(X, y)
    n_epochs = len(reference.history)
    best = reference.history[:, "valid_loss_best"]
    # stopped early, after two epochs without improvement
    assert n_epochs < 8 and best[-2:] == [False, False] and best[-3], best
    # the crash hits the stopping epoch: the best weights (two epochs back) and the count
    # of epochs without improvement (1) can only come from the checkpoint
    saved = crashed_fit(tmp_path / "run", n_epochs, monkeypatch, X, y, **params)
    assert len(saved) == 1  # kept after a failed fit
    resumed = tiny(checkpoint_dir=tmp_path / "run", **params).fit(X, y)
    assert resumed.history[:, "valid_loss"] == reference.history[:, "valid_loss"]
    # the whole history, best-epoch marks included, is the uninterrupted run's (but timings)
    assert without_timings(resumed.history) == without_timings(reference.history)
    np.testing.assert_array_equal(resumed.predict_proba(X), reference.predict_proba(X))
    assert checkpoints(tmp_path / "run") == [] and checkpoints(tmp_path / "ref") == []


def test_another_run_does_not_resume_and_grid_searches_can_share_the_directory(
        tmp_path, monkeypatch):
    X, y = data()
    first = crashed_fit(tmp_path, 3, monkeypatch, X, y)
    # another learning rate, or other data, is another run: trained from the start
    other = tiny(checkpoint_dir=tmp_path, lr=0.02).fit(X, y)
    np.testing.assert_array_equal(other.predict_proba(X),
                                  tiny(lr=0.02).fit(X, y).predict_proba(X))
    X2 = X.copy()
    X2[0, 0, 0] ^= 1
    assert len(tiny(checkpoint_dir=tmp_path).fit(X2, y).history) == 4
    assert checkpoints(tmp_path) == first  # the interrupted run's file is untouched
    search = GridSearchCV(tiny(checkpoint_dir=tmp_path, max_epochs=2),
                          {"lr": [0.01, 0.03]}, cv=2).fit(X, y)
    plain = GridSearchCV(tiny(max_epochs=2), {"lr": [0.01, 0.03]}, cv=2).fit(X, y)
    np.testing.assert_array_equal(search.cv_results_["mean_test_score"],
                                  plain.cv_results_["mean_test_score"])
    assert checkpoints(tmp_path) == first
    assert clone(tiny(checkpoint_dir=tmp_path)).checkpoint_dir == tmp_path


class RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # the plain pickle written below
def test_a_checkpoint_holding_pickled_objects_is_refused(tmp_path, monkeypatch):
    X, y = data()
    (name,) = crashed_fit(tmp_path, 2, monkeypatch, X, y)
    state = torch.load(tmp_path / name, weights_only=True)
    state["history"] = RunsCode()
    torch.save(state, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    expected = tiny().fit(X, y).predict_proba(X)
    # never unpickled: the run starts afresh
    with pytest.warns(RuntimeWarning, match="pickled Python objects, which are refused .*"
                                            "training from the start"):
        fresh = tiny(checkpoint_dir=tmp_path).fit(X, y)
    assert not (tmp_path / "pwned").exists()
    np.testing.assert_array_equal(fresh.predict_proba(X), expected)
    crashed_fit(tmp_path, 2, monkeypatch, X, y)
    (tmp_path / name).write_bytes(pickle.dumps({"format": "something"}))
    with pytest.warns(RuntimeWarning, match="pickled Python objects|not a training checkpoint"):
        tiny(checkpoint_dir=tmp_path).fit(X, y)


def test_a_write_interrupted_half_way_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    X, y = data()
    (name,) = crashed_fit(tmp_path, 3, monkeypatch, X, y)
    before = (tmp_path / name).read_bytes()
    real_save = torch.save

    def save_half_then_die(obj, fh):
        real_save(obj, fh)
        fh.truncate(100)  # the disk filled up, the process was killed ...
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", save_half_then_die)
    with pytest.raises(OSError, match="No space"):
        tiny(checkpoint_dir=tmp_path).fit(X, y)  # resumes, fails saving epoch 3
    assert checkpoints(tmp_path) == [name]  # no temporary file left behind
    assert (tmp_path / name).read_bytes() == before
    monkeypatch.undo()
    resumed = tiny(checkpoint_dir=tmp_path).fit(X, y)
    np.testing.assert_array_equal(resumed.predict_proba(X), tiny().fit(X, y).predict_proba(X))


def test_ctrl_c_keeps_the_checkpoint_and_continuations_write_none(tmp_path, monkeypatch):
    X, y = data()
    original = FineTunedClassifier.train_step

    def interrupted(self, batch, **kwargs):
        if len(self.history) == 3:
            raise KeyboardInterrupt  # skorch ends the fit as after early stopping
        return original(self, batch, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(FineTunedClassifier, "train_step", interrupted)
        stopped = tiny(checkpoint_dir=tmp_path).fit(X, y)
    assert len(stopped.history) == 3 and len(checkpoints(tmp_path)) == 1  # not completed
    resumed = tiny(checkpoint_dir=tmp_path).fit(X, y)
    np.testing.assert_array_equal(resumed.predict_proba(X), tiny().fit(X, y).predict_proba(X))
    assert checkpoints(tmp_path) == []
    # training on after the fit is another run: nothing is written, nothing is deleted
    written = []
    monkeypatch.setattr(checkpoint_module, "atomic_save", lambda obj, path: written.append(path))
    resumed.partial_fit(X, y)
    assert len(resumed.history) == 8 and written == [] and checkpoints(tmp_path) == []


def test_bad_checkpoint_dir_is_named(tmp_path):
    X, y = data()
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="checkpoint_dir=.*file.*cannot be created"):
        tiny(checkpoint_dir=tmp_path / "file" / "sub").fit(X, y)


# -------------------------------------------------------------------- reproducibility


def test_grid_search_with_random_state_is_reproducible():
    X, y = data(32)
    grid = {"lr": [0.003, 0.03], "freeze_depth": [1, 2]}

    def search():
        return GridSearchCV(tiny(max_epochs=2), grid, cv=2).fit(X, y)

    a, b = search(), search()
    assert a.best_params_ == b.best_params_
    for key in ("split0_test_score", "split1_test_score", "mean_test_score"):
        np.testing.assert_array_equal(a.cv_results_[key], b.cv_results_[key])
    np.testing.assert_array_equal(a.predict_proba(X), b.predict_proba(X))
    np.testing.assert_array_equal(a.predict(X), b.predict(X))


@pytest.mark.parametrize("persistent", [True, False])
def test_dataloader_workers_are_seeded(persistent):
    X, y = data()
    params = dict(max_epochs=2, iterator_train__num_workers=2,
                  iterator_train__persistent_workers=persistent)
    a = tiny(**params).fit(X, y)
    b = tiny(**params).fit(X, y)
    np.testing.assert_array_equal(a.predict_proba(X), b.predict_proba(X))
    assert a.history[:, "train_loss"] == b.history[:, "train_loss"]


def test_feature_transformer_is_reproducible_with_workers():
    X = colour_images(12, size=40, seed=3)
    codes = [CNNFeatureTransformer(make_tiny_backbone(), num_workers=w, progress=False)
             .fit().transform(X) for w in (0, 2, 2)]
    np.testing.assert_array_equal(codes[0], codes[1])
    np.testing.assert_array_equal(codes[1], codes[2])


def test_a_damaged_checkpoint_is_never_resumed_from(tmp_path, monkeypatch):
    X, y = data()
    (name,) = crashed_fit(tmp_path, 3, monkeypatch, X, y)
    path = tmp_path / name
    whole = path.read_bytes()
    # bytes overwritten inside the training state: still a loadable file
    payload = torch.load(path, weights_only=True)["payload"].numpy().tobytes()
    middle = whole.index(payload[:256]) + len(payload) // 2
    path.write_bytes(whole[:middle] + bytes(64) + whole[middle + 64:])
    with pytest.warns(RuntimeWarning, match="fails its checksum .* training from the start"):
        fresh = tiny(checkpoint_dir=tmp_path).fit(X, y)
    expected = tiny().fit(X, y).predict_proba(X)
    np.testing.assert_array_equal(fresh.predict_proba(X), expected)
    assert checkpoints(tmp_path) == []
    # cut short: not even loadable
    (name,) = crashed_fit(tmp_path, 3, monkeypatch, X, y)
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.warns(RuntimeWarning, match="could not read the training checkpoint .* "
                                            "training from the start"):
        fresh = tiny(checkpoint_dir=tmp_path).fit(X, y)
    np.testing.assert_array_equal(fresh.predict_proba(X), expected)


def test_a_temporary_file_left_by_a_killed_write_is_cleaned_up(tmp_path, monkeypatch):
    X, y = data()
    (name,) = crashed_fit(tmp_path, 3, monkeypatch, X, y)
    (tmp_path / f".{name}.abc123.tmp").write_bytes(b"")  # what a SIGKILL mid-write leaves
    (tmp_path / ".fit-other-run.pt.x.tmp").write_bytes(b"")  # another run's: not ours
    tiny(checkpoint_dir=tmp_path).fit(X, y)
    assert checkpoints(tmp_path) == [".fit-other-run.pt.x.tmp"]


# ------------------------------------------------------------ abandoned runs' checkpoints

WEEK_AND_A_DAY_AGO = time.time() - 8 * 86400


def test_checkpoints_of_runs_abandoned_for_a_week_are_removed(tmp_path, monkeypatch):
    X, y = data()
    (name,) = crashed_fit(tmp_path, 2, monkeypatch, X, y)
    real = (tmp_path / name).read_bytes()
    files = {  # name -> bytes, and whether a run opening the directory may delete it
        "fit-" + "a" * 24 + ".pt": (real, True),  # another run, abandoned a week ago
        ".fit-" + "a" * 24 + ".pt.k2v_9x0q.tmp": (b"", True),  # its killed write
        "fit-" + "b" * 24 + ".pt": (real, False),  # a day old: may be resumed, or running
        "fit-" + "c" * 24 + ".pt": (b"not ours", False),  # our name, not our format
        "best-model.pt": (real, False),  # our format, a name the user chose
        ".fit-other.pt.x.tmp": (b"", False),
    }
    for file, (content, _) in files.items():
        (tmp_path / file).write_bytes(content)
        stamp = time.time() - 86400 if file.startswith("fit-b") else WEEK_AND_A_DAY_AGO
        os.utime(tmp_path / file, (stamp, stamp))
    # kept when the policy is off: every file stays, the run's own completes and goes
    clf = tiny(checkpoint_dir=tmp_path, max_epochs=1, callbacks__checkpoint__max_age_days=None)
    clf.fit(X, y)
    assert checkpoints(tmp_path) == sorted([name, *files])
    # another run opens the directory: the abandoned files of the library go, and nothing else
    tiny(checkpoint_dir=tmp_path, max_epochs=1).fit(X, y)
    assert checkpoints(tmp_path) == sorted([name, *[f for f, (_, go) in files.items() if not go]])
    # the interrupted run itself, however old its file, resumes from it
    os.utime(tmp_path / name, (WEEK_AND_A_DAY_AGO, WEEK_AND_A_DAY_AGO))
    resumed = tiny(checkpoint_dir=tmp_path).fit(X, y)
    assert dict(resumed.callbacks_)["checkpoint"].resumed_epochs_ == 1
    np.testing.assert_array_equal(resumed.predict_proba(X), tiny().fit(X, y).predict_proba(X))
    with pytest.raises(ValueError, match="max_age_days=0 must be a positive number of days"):
        tiny(checkpoint_dir=tmp_path, callbacks__checkpoint__max_age_days=0).fit(X, y)


def test_a_resumed_run_keeps_its_old_checkpoint_while_other_fits_start(tmp_path, monkeypatch):
    X, y = data()
    (name,) = crashed_fit(tmp_path, 3, monkeypatch, X, y)
    os.utime(tmp_path / name, (WEEK_AND_A_DAY_AGO, WEEK_AND_A_DAY_AGO))
    original = FineTunedClassifier.train_step
    seen = []

    def another_fit_starts(self, batch, **kwargs):
        if self.checkpoint_dir is not None and len(self.history) == 3 and not seen:
            # a fit of another run opens the directory while this one resumes (epoch 3, before
            # its first new checkpoint): the resumed run's file is not abandoned
            seen.append(tiny(checkpoint_dir=tmp_path, max_epochs=1, lr=0.03).fit(X, y))
            seen.append(checkpoints(tmp_path))
        return original(self, batch, **kwargs)

    monkeypatch.setattr(FineTunedClassifier, "train_step", another_fit_starts)
    resumed = tiny(checkpoint_dir=tmp_path).fit(X, y)
    assert seen[1] == [name]
    assert dict(resumed.callbacks_)["checkpoint"].resumed_epochs_ == 2
    assert checkpoints(tmp_path) == []
