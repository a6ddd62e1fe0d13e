"""The feature cache, checked by counting the images a tiny network really sees.

Every forward pass goes through :class:`CountingConv`, whose counters live on
the class so that they survive the deep copies ``fit`` and ``clone`` make.
Work in other processes (a second run, two concurrent writers, a process
killed while writing) runs this file as a script (see the bottom), which
prints what it computed as JSON.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.base import clone
from sklearn.experimental import enable_halving_search_cv  # noqa: F401
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import (
    GridSearchCV,
    HalvingGridSearchCV,
    cross_val_predict,
    cross_val_score,
)
from sklearn.pipeline import Pipeline
from sklearn.svm import LinearSVC
from torch import nn

from sklearn_transfer import Backbone, CNNFeatureTransformer, DataConfig, FeatureCache
from sklearn_transfer.backbones import get_backbone
from sklearn_transfer.cache import DB_NAME
from sklearn_transfer.identity import image_keys

HERE = Path(__file__).resolve()
N_IMAGES = 20
# child processes: one thread each, so that two of them do not fight over the cores
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


class CountingConv(nn.Conv2d):
    """A convolution that counts the images passing through it."""

    images = 0
    calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        type(self).calls += 1
        type(self).images += int(x.shape[0])
        return super().forward(x)

    @classmethod
    def reset(cls) -> None:
        cls.images = cls.calls = 0


@pytest.fixture(autouse=True)
def _fresh_counts():
    CountingConv.reset()


def tiny_modules(seed: int = 0) -> list[tuple[str, nn.Module]]:
    """Two conv stages whose arithmetic is exact.

    CPU convolutions round differently for different batch sizes (in the last
    bit), so codes computed in one batch composition and read back in another
    would differ for a reason that has nothing to do with the cache. With
    integer inputs (see :data:`EXACT`) and weights that are small integers
    times powers of two, every sum here is exact, whatever the order: any
    difference between cached and fresh codes is then the cache's fault.
    """
    g = torch.Generator().manual_seed(seed)  # the same weights in every process
    conv1, conv2 = CountingConv(3, 8, 3, stride=2), nn.Conv2d(8, 16, 3, stride=2)
    with torch.no_grad():
        for conv, scale in ((conv1, 2.0**-4), (conv2, 2.0**-8)):
            conv.weight.copy_(torch.randint(-1, 2, conv.weight.shape, generator=g) * scale)
            conv.bias.copy_(torch.randint(-2, 3, conv.bias.shape, generator=g) * scale)
    return [("conv1", nn.Sequential(conv1, nn.ReLU())), ("conv2", nn.Sequential(conv2, nn.ReLU()))]


# pixels stay integers after normalisation (255 * 1/255 is exactly 1.0 in float32), and a
# 16 px input keeps every sum below 2**24, where float32 integers are exact
EXACT = {"mean": (0.0, 0.0, 0.0), "std": (1 / 255,) * 3, "crop_pct": 1.0}


def tiny_backbone(seed: int = 0, input_size: int = 16) -> Backbone:
    net = Backbone(tiny_modules(seed), DataConfig(input_size=input_size, **EXACT), name="tiny")
    counts = CountingConv.images, CountingConv.calls
    _ = net.widths  # probed once here; fit's deep copies inherit it, so every count is real
    CountingConv.images, CountingConv.calls = counts  # the probe is not an image
    return net


def transformer(memory=None, **params) -> CNNFeatureTransformer:
    params.setdefault("backbone", tiny_backbone())
    params.setdefault("batch_size", 4)
    # torch runs the counting convolution (a compiled engine would not count), in exact float32
    params.setdefault("engine", "torch")
    params.setdefault("precision", "float32")
    return CNNFeatureTransformer(memory=memory, **params)


def write_images(folder: Path, n: int = N_IMAGES, seed: int = 0) -> tuple[list[str], np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(seed)
    paths = []
    for i in range(n):
        path = folder / f"img{i:03d}.png"
        Image.fromarray(rng.randint(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths, np.arange(n) % 2


def head_search(memory, stage=-1, n_jobs=None) -> GridSearchCV:
    """5-fold search over 6 head settings: two C grids and the head step itself."""
    pipe = Pipeline([("codes", transformer(memory, stage=stage)),
                     ("head", LogisticRegression())])
    grid = [
        {"head": [LogisticRegression(max_iter=500)], "head__C": [0.1, 1.0, 10.0]},
        {"head": [LinearSVC(random_state=0)], "head__C": [0.01, 0.1, 1.0]},
    ]
    return GridSearchCV(pipe, grid, cv=5, n_jobs=n_jobs)


def run_child(*args: str, timeout: float = 120) -> dict:
    proc = subprocess.run([sys.executable, str(HERE), *args], capture_output=True, text=True,
                          timeout=timeout, env=CHILD_ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def rows(cache_dir: Path) -> list[tuple]:
    with sqlite3.connect(Path(cache_dir) / DB_NAME) as conn:
        return conn.execute("SELECT config, image, n_features, checksum, data FROM codes"
                            ).fetchall()


def integrity(cache_dir: Path) -> str:
    with sqlite3.connect(Path(cache_dir) / DB_NAME) as conn:
        return conn.execute("PRAGMA integrity_check").fetchone()[0]


# ----------------------------------------------------------------- grid searches


def test_grid_search_computes_each_image_once_and_matches_no_cache(tmp_path):
    X, y = write_images(tmp_path / "img")
    plain = head_search(None).fit(X, y)
    # 30 fold fits (train + test images each) and the refit: every image 31 times
    assert CountingConv.images == 31 * N_IMAGES

    CountingConv.reset()
    cached = head_search(tmp_path / "cache").fit(X, y)
    assert CountingConv.images == N_IMAGES
    np.testing.assert_array_equal(cached.cv_results_["mean_test_score"],
                                  plain.cv_results_["mean_test_score"])
    assert FeatureCache(tmp_path / "cache").info().entries == N_IMAGES


def test_new_process_computes_nothing_then_stage_and_file_changes_recompute(tmp_path):
    X, y = write_images(tmp_path / "img")
    cache = tmp_path / "cache"
    search = head_search(cache).fit(X, y)
    assert CountingConv.images == N_IMAGES

    # a second run in a new process: same search, same cache, no forward pass at all
    child = run_child("grid", str(tmp_path / "img"), str(cache))
    assert child["images"] == 0
    assert child["mean_test_score"] == search.cv_results_["mean_test_score"].tolist()
    # a user's nn.Module is identified by its content, the same in every process
    assert child["module_weights_id"] == get_backbone(nn.Sequential(*dict(
        tiny_modules()).values())).weights_id

    CountingConv.reset()
    head_search(cache, stage="conv1").fit(X, y)
    assert CountingConv.images == N_IMAGES  # another stage: other codes

    CountingConv.reset()
    fitted = transformer(cache).fit()
    before = fitted.transform(X)
    assert CountingConv.images == 0
    Image.fromarray(np.full((32, 32, 3), 7, dtype=np.uint8)).save(X[3])  # same path, new pixels
    after = fitted.transform(X)
    assert CountingConv.images == 1
    np.testing.assert_array_equal(after, transformer().fit().transform(X))
    assert not np.array_equal(after[3], before[3])
    np.testing.assert_array_equal(np.delete(after, 3, 0), np.delete(before, 3, 0))


def test_other_model_selection_tools_share_the_cache(tmp_path):
    X, y = write_images(tmp_path / "img", n=24)
    cache = tmp_path / "cache"
    pipe = Pipeline([("codes", transformer(cache)), ("head", LogisticRegression())])
    scores = cross_val_score(pipe, X, y, cv=3)
    assert CountingConv.images == 24
    cross_val_predict(pipe, X, y, cv=4)
    halving = HalvingGridSearchCV(pipe, {"head__C": [0.1, 1.0, 10.0, 100.0]}, cv=2, factor=2,
                                  min_resources=8, random_state=0).fit(X, y)
    assert halving.n_resources_ == [8, 16]
    assert CountingConv.images == 24
    CountingConv.reset()
    np.testing.assert_array_equal(
        scores, cross_val_score(clone(pipe).set_params(codes__memory=None), X, y, cv=3))
    assert CountingConv.images == 3 * 24


# ------------------------------------------------------------------------ keys


def test_key_covers_what_changes_codes_and_nothing_else(tmp_path):
    X, _ = write_images(tmp_path / "img", n=6)
    cache = tmp_path / "cache"

    def computed(**params) -> int:
        CountingConv.reset()
        out = transformer(cache, **params).fit().transform(X)
        np.testing.assert_array_equal(out, transformer(**params).fit().transform(X))
        return CountingConv.images - 6  # minus the no-cache reference just computed

    assert computed() == 6
    # what does not change codes reuses them
    assert computed(batch_size=1) == 0
    assert computed(progress=True, num_workers=0) == 0
    # what does recomputes, once
    for params in ({"pooling": "max"}, {"relu": False}, {"stage": "conv1"},
                   {"stage": ["conv1", "conv2"]}, {"backbone": tiny_backbone(seed=1)},
                   {"backbone": tiny_backbone(input_size=20)}):
        assert computed(**params) == 6, params
        assert computed(**params) == 0, params
    # a Backbone keeps its default weights_id ("custom"): the tensors still tell
    changed = tiny_backbone()
    with torch.no_grad():
        changed.stages[1][0].bias.add_(0.5)
    assert changed.weights_id == tiny_backbone().weights_id
    assert computed(backbone=changed) == 6


def test_user_module_identity_is_its_content():
    def module(seed: int = 0) -> nn.Module:
        return nn.Sequential(*dict(tiny_modules(seed)).values())

    a, b = get_backbone(module()), get_backbone(module())
    assert a.weights_id == b.weights_id and a.weights_id.startswith("module:")
    assert get_backbone(module(seed=1)).weights_id != a.weights_id
    changed = module()
    with torch.no_grad():
        changed[0][0].weight[0, 0, 0, 0] += 1e-3
    assert get_backbone(changed).weights_id != a.weights_id


def test_array_inputs_are_keyed_by_content_and_duplicates_computed_once(tmp_path):
    rng = np.random.RandomState(1)
    images = rng.randint(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    X = np.concatenate([images, images[:2]])  # 7 images, 5 distinct
    fitted = transformer(tmp_path / "cache").fit()
    out = fitted.transform(X)
    assert CountingConv.images == 5
    np.testing.assert_array_equal(out[5:], out[:2])
    CountingConv.reset()
    reference = transformer().fit().transform(X)
    np.testing.assert_array_equal(out, reference)
    CountingConv.reset()
    # a fresh copy of the same pixels is found (content, not identity); the same
    # picture as floats in [0, 1] is another byte string, so another key
    np.testing.assert_array_equal(fitted.transform(images.copy()), reference[:5])
    assert CountingConv.images == 0
    assert image_keys(images)[0] != image_keys(images.astype(np.float32) / 255)[0]


def _sha(path: str) -> bytes:
    import hashlib

    return hashlib.sha256(b"file:" + Path(path).read_bytes()).digest()


def test_unchanged_files_are_read_once_per_process_and_changes_always_seen(
        tmp_path, monkeypatch):
    from sklearn_transfer import identity as images

    monkeypatch.setattr(images, "_FILE_KEYS", {})
    monkeypatch.setattr(images, "_SETTLED_NS", 0)  # as if the files were old
    X, _ = write_images(tmp_path / "img", n=3)
    time.sleep(0.05)
    reads = []
    real_open = open

    def counting_open(file, *args, **kwargs):
        reads.append(str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(images, "open", counting_open, raising=False)
    first = image_keys(X)
    assert first == [_sha(p) for p in X] and len(reads) == 3
    assert image_keys(X) == first and len(reads) == 3  # nothing read again

    # same size, same mtime (set back), other bytes: the change time still tells
    st = os.stat(X[1])
    data = bytearray(Path(X[1]).read_bytes())
    data[-20] ^= 0xFF
    Path(X[1]).write_bytes(bytes(data))
    os.utime(X[1], ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(X[1]).st_size == st.st_size
    again = image_keys(X)
    assert again[1] == _sha(X[1]) != first[1]
    assert again[0] == first[0] and again[2] == first[2]


def test_files_changed_too_recently_to_trust_their_times_are_not_remembered(
        tmp_path, monkeypatch):
    from sklearn_transfer import identity as images

    monkeypatch.setattr(images, "_FILE_KEYS", {})
    X, _ = write_images(tmp_path / "img", n=2)  # written just now: within _SETTLED_NS
    assert image_keys(X) == [_sha(p) for p in X]
    assert images._FILE_KEYS == {}


def test_a_file_rewritten_during_a_transform_is_not_stored_under_its_old_key(
        tmp_path, monkeypatch):
    from sklearn_transfer import cache as cache_module

    X, _ = write_images(tmp_path / "img", n=3)
    original = Path(X[1]).read_bytes()
    expected = transformer().fit().transform(X)
    real_keys = cache_module.image_keys

    def keys_then_rewrite(source):  # the file changes after its look-up, before decoding
        keys = real_keys(source)
        Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(X[1])
        return keys

    monkeypatch.setattr(cache_module, "image_keys", keys_then_rewrite)
    out = transformer(tmp_path / "cache").fit().transform(X)
    np.testing.assert_array_equal(out, transformer().fit().transform(X))  # the new picture's
    assert FeatureCache(tmp_path / "cache").info().entries == 2
    monkeypatch.undo()
    Path(X[1]).write_bytes(original)
    CountingConv.reset()
    again = transformer(tmp_path / "cache").fit().transform(X)
    assert CountingConv.images == 1  # computed afresh, not the rewritten picture's codes
    np.testing.assert_array_equal(again, expected)


@pytest.mark.parametrize("special", ["fifo", "/dev/zero"])
def test_special_files_are_refused_before_hashing_reads_them(tmp_path, special):
    X, _ = write_images(tmp_path / "img", n=3)
    if special == "fifo":
        bad = str(tmp_path / "pipe.png")
        os.mkfifo(bad)  # opening it for reading would block forever
    else:
        bad = special  # reading it would never end
    signal.signal(signal.SIGALRM, lambda *a: (_ for _ in ()).throw(TimeoutError(special)))
    signal.alarm(30)
    try:
        with pytest.raises(ValueError, match=rf"{bad!r} \(index 2\) is a .*not a regular file"):
            transformer(tmp_path / "cache").fit().transform([X[0], X[1], bad])
    finally:
        signal.alarm(0)


# ------------------------------------------------------------- processes, crashes


def test_two_processes_writing_overlapping_images_get_exact_codes(tmp_path):
    X, _ = write_images(tmp_path / "img", n=45)
    cache, go = tmp_path / "cache", tmp_path / "go"
    outs = [tmp_path / "a.npy", tmp_path / "b.npy"]
    spans = [(0, 30), (15, 45)]
    procs = [
        subprocess.Popen([sys.executable, str(HERE), "transform", str(tmp_path / "img"),
                          str(cache), f"{lo}:{hi}", str(out), str(go)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=CHILD_ENV)
        for (lo, hi), out in zip(spans, outs, strict=True)
    ]
    # both are past their imports before either starts, so their writes interleave
    deadline = time.time() + 120
    while not all(Path(f"{out}.ready").exists() for out in outs):
        assert time.time() < deadline and all(p.poll() is None for p in procs), [
            p.communicate()[1][-2000:] for p in procs if p.poll() is not None]
        time.sleep(0.05)
    go.touch()
    reports = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=120)
        assert p.returncode == 0, stderr[-3000:]
        reports.append(json.loads(stdout.strip().splitlines()[-1]))

    reference = transformer().fit().transform(X)
    for (lo, hi), out in zip(spans, outs, strict=True):
        np.testing.assert_array_equal(np.load(out), reference[lo:hi])
    # their transforms overlapped in time (so did their writes, one transaction per batch)
    (a_start, a_end), (b_start, b_end) = ((r["start"], r["end"]) for r in reports)
    assert a_start < b_end and b_start < a_end, reports
    # together they computed each of the 45 at least once and the 15 shared ones at most twice
    assert 45 <= sum(r["images"] for r in reports) <= 60
    assert integrity(cache) == "ok"
    assert len(rows(cache)) == 45
    CountingConv.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no entry fails its checksum
        np.testing.assert_array_equal(transformer(cache).fit().transform(X), reference)
    assert CountingConv.images == 0


def test_process_killed_inside_a_write_transaction_leaves_no_valid_looking_entry(tmp_path):
    X, _ = write_images(tmp_path / "img")
    cache = tmp_path / "cache"
    # batches of 4: the child commits 2 batches, then SIGKILLs itself after the 3rd
    # batch's rows are inserted and before its COMMIT
    proc = subprocess.run([sys.executable, str(HERE), "killed-writer", str(tmp_path / "img"),
                           str(cache), "3"], capture_output=True, text=True, timeout=120,
                          env=CHILD_ENV)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert Path(f"{cache / DB_NAME}-wal").exists()  # the log the dead writer left behind
    assert integrity(cache) == "ok"
    assert len(rows(cache)) == 8

    reference = transformer().fit().transform(X)
    CountingConv.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = transformer(cache).fit().transform(X)
    np.testing.assert_array_equal(out, reference)
    assert CountingConv.images == N_IMAGES - 8
    assert len(rows(cache)) == N_IMAGES


def test_process_killed_at_a_random_moment_of_a_write_storm(tmp_path):
    cache = tmp_path / "cache"
    proc = subprocess.Popen([sys.executable, str(HERE), "write-storm", str(cache)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=CHILD_ENV)
    progress = tmp_path / "cache" / "storm-started"
    deadline = time.time() + 120
    while not progress.exists():
        assert time.time() < deadline and proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.02)
    time.sleep(0.3 + np.random.RandomState().uniform(0, 0.5))  # mid-storm, at no set point
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL

    assert integrity(cache) == "ok"
    stored = rows(cache)
    assert len(stored) > 0
    keys = [i.to_bytes(4, 'little') * 8 for i in range(len(stored) + 64)]
    found = FeatureCache(cache).lookup("storm", keys, n_features=1024)
    assert len(found) == len(stored)  # every committed row reads back as valid...
    for i, codes in found.items():  # ...and holds exactly what was written for its key
        np.testing.assert_array_equal(codes, storm_codes(i))


def test_damaged_entries_are_detected_recomputed_and_repaired(tmp_path):
    X, _ = write_images(tmp_path / "img", n=8)
    cache = tmp_path / "cache"
    reference = transformer(cache).fit().transform(X)
    assert CountingConv.images == 8
    # what a failing disk or a half-copied file could leave: SQLite cannot see it
    with sqlite3.connect(cache / DB_NAME) as conn:
        (rid, data), (rid2, data2) = conn.execute(
            "SELECT rowid, data FROM codes ORDER BY rowid LIMIT 2").fetchall()
        flipped = bytearray(data)
        flipped[5] ^= 0x10
        conn.execute("UPDATE codes SET data = ? WHERE rowid = ?", (bytes(flipped), rid))
        conn.execute("UPDATE codes SET data = ? WHERE rowid = ?", (data2[:-4], rid2))
    CountingConv.reset()
    with pytest.warns(RuntimeWarning, match="2 entries .* failed their integrity check"):
        out = transformer(cache).fit().transform(X)
    np.testing.assert_array_equal(out, reference)
    assert CountingConv.images == 2
    CountingConv.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(transformer(cache).fit().transform(X), reference)
    assert CountingConv.images == 0


def _checkpointed(cache_dir: Path) -> bytes:
    """The database file's bytes with every committed row in it (the log folded in)."""
    with sqlite3.connect(Path(cache_dir) / DB_NAME) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return (Path(cache_dir) / DB_NAME).read_bytes()


@pytest.mark.parametrize("damage", ["truncated", "header_overwritten"])
def test_a_damaged_database_file_is_set_aside_and_a_fresh_one_used(tmp_path, damage):
    X, _ = write_images(tmp_path / "img", n=N_IMAGES)
    cache = tmp_path / "cache"
    reference = transformer(cache).fit().transform(X)
    data = _checkpointed(cache)
    damaged = data[: len(data) // 2] if damage == "truncated" else b"x" * 100 + data[100:]
    (cache / DB_NAME).write_bytes(damaged)
    CountingConv.reset()
    with pytest.warns(RuntimeWarning, match=rf"{DB_NAME}' is damaged .* moved to "):
        out = transformer(cache).fit().transform(X)
    np.testing.assert_array_equal(out, reference)
    assert CountingConv.images == N_IMAGES  # nothing read from the damaged file
    assert integrity(cache) == "ok" and len(rows(cache)) == N_IMAGES
    set_aside = [p for p in cache.iterdir() if ".damaged-" in p.name]
    assert set_aside and any(p.read_bytes() == damaged for p in set_aside)  # kept, not lost


def test_clear_always_works_even_on_a_damaged_file(tmp_path):
    X, _ = write_images(tmp_path / "img", n=N_IMAGES)
    cache = FeatureCache(tmp_path / "cache")
    transformer(cache).fit().transform(X)
    data = _checkpointed(cache.directory)
    cache.path.write_bytes(data[: len(data) // 2])
    with pytest.warns(RuntimeWarning, match="is damaged"):
        assert cache.clear() == 0
    assert cache.info().entries == 0
    CountingConv.reset()
    transformer(cache).fit().transform(X[:4])
    assert CountingConv.images == 4 and cache.info().entries == 4


@contextlib.contextmanager
def full_filesystem(path: Path):
    """A real, full 64 kB tmpfs at ``path`` (root only; skips otherwise)."""
    path.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(path)],
        capture_output=True).returncode == 0
    if not mounted:
        pytest.skip("a full file system needs mounting a small tmpfs, which needs root")
    try:
        with contextlib.suppress(OSError), open(path / "filler", "wb", buffering=0) as fh:
            while True:  # until the disk says it is full
                fh.write(b"\0" * 4096)
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_a_full_disk_at_fit_is_named_and_codes_are_computed_without_storing(tmp_path):
    X, _ = write_images(tmp_path / "img", n=6)
    reference = transformer().fit().transform(X)
    with full_filesystem(tmp_path / "full") as full:
        with pytest.warns(RuntimeWarning, match=rf"directory '{full / 'cache'}' is full"):
            fitted = transformer(full / "cache").fit()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = fitted.transform(X)
        np.testing.assert_array_equal(out, reference)
        assert len(caught) == 1 and "without storing them" in str(caught[0].message)


# ---------------------------------------------------------------- housekeeping


def test_info_and_clear(tmp_path):
    X, _ = write_images(tmp_path / "img", n=6)
    cache = FeatureCache(tmp_path / "cache")
    assert cache.info().entries == 0 and cache.clear() == 0
    assert not (tmp_path / "cache").exists()  # looking creates nothing
    transformer(cache).fit().transform(X)
    transformer(cache, pooling="catavgmax").fit().transform(X[:4])
    info = cache.info()
    assert info.entries == 10
    assert info.nbytes == 6 * 16 * 4 + 4 * 32 * 4
    assert info.disk_bytes >= info.nbytes
    by_pool = {c["pooling"]: c for c in info.computations}
    assert by_pool["avg"]["entries"] == 6 and by_pool["catavgmax"]["entries"] == 4
    assert by_pool["avg"]["backbone"] == "tiny" and by_pool["avg"]["stage_names"] == ["conv2"]
    assert "10 entries" in str(info)

    assert cache.clear() == 10
    assert cache.info().entries == 0 and cache.info().nbytes == 0
    CountingConv.reset()
    transformer(cache).fit().transform(X)
    assert CountingConv.images == 6


def test_cache_pickles_and_clones_as_its_path(tmp_path):
    import pickle

    cache = FeatureCache(tmp_path / "c")
    assert pickle.loads(pickle.dumps(cache)) == cache
    est = transformer(cache)
    assert clone(est).memory == cache
    assert not (tmp_path / "c").exists()  # nothing is created before fit


def test_bad_memory_parameters_are_named(tmp_path):
    with pytest.raises(ValueError, match="'memory' parameter .* Got 42"):
        transformer(42).fit()
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="exists and is not a directory"):
        transformer(tmp_path / "file").fit()


@contextlib.contextmanager
def unprivileged():
    """Run as user "nobody" when the tests run as root, who may write anywhere."""
    if os.geteuid() != 0:
        yield
        return
    os.seteuid(65534)  # the real uid stays root, so it can be restored
    try:
        yield
    finally:
        os.seteuid(0)


def test_unwritable_directory_is_a_clear_error_at_fit():
    base = Path(tempfile.mkdtemp())  # under /tmp, which every user may traverse
    try:
        base.chmod(0o755)
        locked = base / "locked"
        locked.mkdir(mode=0o555)
        locked.chmod(0o555)
        for target in (locked, locked / "cache"):  # an existing one, one to create
            with unprivileged(), pytest.raises(PermissionError) as info:
                transformer(target).fit()
            message = str(info.value)
            assert f"directory {str(target)!r} is not writable" in message
            assert "memory=None" in message
    finally:
        shutil.rmtree(base)


# ------------------------------------------------------- work in other processes


def storm_codes(i: int) -> np.ndarray:
    return np.full(1024, i, dtype=np.float32) + np.arange(1024, dtype=np.float32) / 1024


def _child(mode: str, args: list[str]) -> dict:
    if mode == "grid":
        folder, cache = args
        X = sorted(str(p) for p in Path(folder).glob("*.png"))
        y = np.arange(len(X)) % 2
        search = head_search(cache).fit(X, y)
        module_id = get_backbone(nn.Sequential(*dict(tiny_modules()).values())).weights_id
        return {"images": CountingConv.images, "module_weights_id": module_id,
                "mean_test_score": search.cv_results_["mean_test_score"].tolist()}
    if mode == "transform":
        folder, cache, span, out, go = args
        lo, hi = map(int, span.split(":"))
        X = sorted(str(p) for p in Path(folder).glob("*.png"))[lo:hi]
        fitted = transformer(cache, batch_size=3).fit()
        Path(f"{out}.ready").touch()
        while not Path(go).exists():
            time.sleep(0.01)
        start = time.time()
        codes = fitted.transform(X)
        end = time.time()
        np.save(out, codes)
        return {"images": CountingConv.images, "start": start, "end": end}
    if mode == "killed-writer":
        folder, cache, fatal = args
        calls = []
        original = FeatureCache._insert

        def insert_then_die(conn, rows):
            original(conn, rows)
            calls.append(1)
            if len(calls) == int(fatal):
                os.kill(os.getpid(), signal.SIGKILL)  # the transaction is open: no COMMIT

        FeatureCache._insert = staticmethod(insert_then_die)
        X = sorted(str(p) for p in Path(folder).glob("*.png"))
        transformer(cache).fit().transform(X)
        return {"error": "not killed"}
    if mode == "write-storm":
        (cache,) = args
        store = FeatureCache(cache)
        store.check_writable()
        i = 0
        while True:  # batches of 16 rows of 4 kB, each in its own transaction
            keys = [k.to_bytes(4, 'little') * 8 for k in range(i, i + 16)]
            store.store("storm", keys, np.stack([storm_codes(k) for k in range(i, i + 16)]))
            if i == 0:
                (Path(cache) / "storm-started").touch()
            i += 16
    raise ValueError(mode)


if __name__ == "__main__":
    print(json.dumps(_child(sys.argv[1], sys.argv[2:])), flush=True)
    # skip interpreter teardown, which these tests do not check: once in CI, a child
    # that had reported hung in it until the test's timeout
    os._exit(0)
