"""extract_codes, read_codes, iter_codes: resumable Parquet codes, local or on Dask."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
import traceback
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

import sklearn_transfer
from sklearn_transfer import (
    CNNFeatureTransformer,
    ImageLoadError,
    extract_codes,
    iter_codes,
    read_codes,
)
from sklearn_transfer.cache import image_keys
from tests.conftest import REPO, colour_images, make_tiny_backbone

N = 30  # images; with partition_size=8: partitions of 8, 8, 8 and 6


def tiny(**params) -> CNNFeatureTransformer:
    # batch_size divides partition_size: transform(paths) batches the images as the partitions
    # do, so their codes agree bit for bit
    params = {"engine": "torch", "progress": False, "batch_size": 4, **params}
    return CNNFeatureTransformer(make_tiny_backbone(), **params).fit()


@pytest.fixture
def pngs(tmp_path: Path) -> list[Path]:
    folder = tmp_path / "images"
    folder.mkdir()
    paths = []
    for i, arr in enumerate(colour_images(N, size=24)):
        paths.append(folder / f"img{i:02d}.png")
        Image.fromarray(arr).save(paths[-1])
    return paths


def mtimes(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}


def test_a_local_run_writes_what_transform_computes(pngs, tmp_path):
    tf = tiny()
    out = tmp_path / "codes"
    summary = extract_codes(pngs, out, tf, partition_size=8)
    assert (summary.n_images, summary.n_partitions, summary.n_computed) == (N, 4, 4)
    key = tf.computation_.key
    assert sorted(mtimes(out)) == [f"part-{i:05d}-{key[:16]}.parquet" for i in range(4)]
    assert json.loads((out / "manifest.json").read_text())["computation"] == key
    first = pq.read_table(out / f"part-00000-{key[:16]}.parquet")
    assert first.schema.metadata[b"sklearn_transfer.computation"].decode() == key
    assert first.column_names == ["index", "path", "key", "codes"]

    stored = read_codes(out, tf)
    assert stored.codes.dtype == np.float32 and stored.codes.shape == (N, tf.n_features_out_)
    np.testing.assert_array_equal(stored.codes, tf.transform(pngs))
    assert stored.paths.tolist() == [str(p) for p in pngs]
    assert stored.keys.tolist() == image_keys(pngs)
    assert stored.labels is None and stored.computation == key
    # a folder lists its image files in sorted order: the same job, nothing left to compute
    assert extract_codes(pngs[0].parent, out, tf, partition_size=8).n_computed == 0


def test_labels_are_stored_and_codes_stream_in_batches(pngs, tmp_path):
    tf = tiny()
    labels = np.array(["cat", "dog"] * (N // 2))
    extract_codes(pngs, tmp_path / "codes", tf, labels=labels, partition_size=8)
    stored = read_codes(tmp_path / "codes")
    assert stored.labels.tolist() == labels.tolist()
    batches = list(iter_codes(tmp_path / "codes", tf, batch_size=5))
    assert max(len(b.codes) for b in batches) == 5
    np.testing.assert_array_equal(np.concatenate([b.codes for b in batches]), stored.codes)
    assert np.concatenate([b.labels for b in batches]).tolist() == labels.tolist()
    assert np.concatenate([b.paths for b in batches]).tolist() == stored.paths.tolist()


def test_a_bad_image_stops_the_run_and_the_rerun_computes_only_the_rest(pngs, tmp_path):
    tf = tiny()
    out = tmp_path / "codes"
    good = pngs[20].read_bytes()
    pngs[20].write_text("not an image")
    with pytest.raises(ImageLoadError, match=r"img20\.png' \(index 20\) is not an image") as err:
        extract_codes(pngs, out, tf, partition_size=8)
    assert err.value.index == 20
    written = mtimes(out)
    assert len(written) == 2  # partitions 0 and 1; 2 holds the bad image, 3 was never reached
    assert not list(out.glob(".*"))  # no temporary file left behind

    pngs[20].write_bytes(good)
    assert extract_codes(pngs, out, tf, partition_size=8).n_computed == 2
    assert {k: v for k, v in mtimes(out).items() if k in written} == written  # untouched
    stored = read_codes(out)
    assert len(stored.paths) == len(set(stored.paths)) == N
    np.testing.assert_array_equal(stored.codes, tf.transform(pngs))


def test_a_run_killed_mid_job_is_resumed_without_duplicates(pngs, tmp_path):
    out = tmp_path / "codes"
    # SIGKILL (no cleanup at all) from inside, as soon as two partitions are on disk
    code = f"""
        import os, signal, sys, threading, time
        from pathlib import Path
        sys.path.insert(0, {str(REPO)!r})
        from tests.test_extract import tiny
        from sklearn_transfer import extract_codes
        out = Path({str(out)!r})
        def kill_when_two_partitions():
            while len(list(out.glob("part-*.parquet"))) < 2:
                time.sleep(0.0005)
            os.kill(os.getpid(), signal.SIGKILL)
        threading.Thread(target=kill_when_two_partitions, daemon=True).start()
        extract_codes({[str(p) for p in pngs]!r}, out, tiny(), partition_size=2)
        time.sleep(60)  # finished before the kill: the test says so
    """
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    written = mtimes(out)
    assert 2 <= len(written) < N // 2, "the run was not interrupted mid-job"
    with pytest.raises(ValueError, match="incomplete: .* partitions missing"):
        read_codes(out)
    with pytest.raises(ValueError, match="incomplete"):
        iter_codes(out)  # refused at the call, before any batch

    debris = out / ".part-00014-x.parquet.abc.tmp"  # as a kill during a write leaves it
    debris.write_bytes(b"PAR1 half a file")
    os.utime(debris, (time.time() - 3600,) * 2)
    tf = tiny()
    summary = extract_codes(pngs, out, tf, partition_size=2)
    assert summary.n_computed == N // 2 - len(written)
    assert not list(out.glob(".*.tmp"))
    assert {k: v for k, v in mtimes(out).items() if k in written} == written
    stored = read_codes(out)
    assert stored.paths.tolist() == [str(p) for p in pngs]  # each image once, in order
    extract_codes(pngs, tmp_path / "uninterrupted", tf, partition_size=2)
    np.testing.assert_array_equal(stored.codes, read_codes(tmp_path / "uninterrupted").codes)


def test_another_computation_or_job_is_refused(pngs, tmp_path):
    out = tmp_path / "codes"
    extract_codes(pngs, out, tiny(), partition_size=8)
    other = tiny(stage="block")
    both = r"stages=\['head'\] .*, not tiny stages=\['block'\]"
    with pytest.raises(ValueError, match=f"holds codes of another computation: tiny {both}"):
        extract_codes(pngs, out, other, partition_size=8)
    with pytest.raises(ValueError, match=f"another computation: tiny {both}"):
        read_codes(out, other)
    with pytest.raises(ValueError, match="another job .*partition_size differs: 8 there, 5 here"):
        extract_codes(pngs, out, tiny(), partition_size=5)
    with pytest.raises(ValueError, match="another job .*number of images differs: 30 there"):
        extract_codes(pngs[:-1], out, tiny(), partition_size=8)
    with pytest.raises(ValueError, match="another job .*image list or labels differs"):
        extract_codes(pngs, out, tiny(), labels=[0] * N, partition_size=8)


def test_parameters_are_checked(pngs, tmp_path):
    with pytest.raises(ValueError, match="partition_size must be a positive integer; got 0"):
        extract_codes(pngs, tmp_path / "c", tiny(), partition_size=0)
    with pytest.raises(ValueError, match=r"labels must be 1-D with one label per image \(30\)"):
        extract_codes(pngs, tmp_path / "c", tiny(), labels=[1, 2])
    with pytest.raises(TypeError, match=r"images\[1\] is a ndarray; extract_codes takes file"):
        extract_codes([pngs[0], np.zeros((8, 8, 3))], tmp_path / "c", tiny())
    with pytest.raises(TypeError, match="client must be a dask.distributed.Client or None"):
        extract_codes(pngs, tmp_path / "c", tiny(), client="tcp://127.0.0.1:8786")
    with pytest.raises(FileNotFoundError, match="holds no codes dataset"):
        read_codes(tmp_path / "nothing")
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        iter_codes(tmp_path / "nothing", batch_size=0)


# ------------------------------------------------------------------------------ on Dask


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    distributed = pytest.importorskip("distributed")
    # the workers must import this checkout, not another installed copy
    with distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
            silence_logs=logging.ERROR, env={"PYTHONPATH": str(REPO)},
            local_directory=str(tmp_path_factory.mktemp("dask"))) as cluster, \
            distributed.Client(cluster) as client:
        here = os.path.dirname(sklearn_transfer.__file__)
        assert set(client.run(lambda: os.path.dirname(sklearn_transfer.__file__)).values()) \
            == {here}
        yield client


def test_a_cluster_writes_the_codes_of_a_local_run(client, pngs, tmp_path):
    tf = tiny()
    extract_codes(pngs, tmp_path / "local", tf, partition_size=8)
    summary = extract_codes(pngs, tmp_path / "dask", tf, partition_size=8, client=client)
    assert summary.n_computed == 4
    local, on_dask = read_codes(tmp_path / "local"), read_codes(tmp_path / "dask")
    np.testing.assert_array_equal(on_dask.codes, local.codes)
    assert on_dask.paths.tolist() == local.paths.tolist()
    assert on_dask.keys.tolist() == local.keys.tolist()
    # 2 cores, 2 single-threaded workers: one engine thread each
    import torch

    assert set(client.run(torch.get_num_threads).values()) == {1}
    # each worker built the network once for this computation
    from sklearn_transfer import extract

    held = client.run(lambda: list(extract._TRANSFORMERS))
    assert set(map(tuple, held.values())) <= {(tf.computation_.key,)}


def test_a_bad_image_on_a_worker_comes_back_as_the_library_error(client, pngs, tmp_path):
    tf = tiny()
    out = tmp_path / "codes"
    good = pngs[13].read_bytes()
    pngs[13].write_bytes(b"")
    with pytest.raises(ImageLoadError, match=r"img13\.png' \(index 13\) is empty") as err:
        extract_codes(pngs, out, tf, partition_size=8, client=client)
    frames = "".join(traceback.format_tb(err.tb))
    assert "batches.py" not in frames and "features.py" not in frames  # no worker traceback
    time.sleep(0.5)  # let the other worker finish or cancel its partition
    written = mtimes(out)
    assert f"part-00001-{tf.computation_.key[:16]}.parquet" not in written
    pngs[13].write_bytes(good)
    summary = extract_codes(pngs, out, tf, partition_size=8, client=client)
    assert summary.n_computed == 4 - len(written)
    assert {k: v for k, v in mtimes(out).items() if k in written} == written
    np.testing.assert_array_equal(read_codes(out).codes, tf.transform(pngs))


def test_an_unfitted_transformer_is_cloned_and_stays_unfitted(pngs, tmp_path):
    unfitted = CNNFeatureTransformer(make_tiny_backbone(), engine="torch", progress=False,
                                     batch_size=4)
    extract_codes(pngs, tmp_path / "codes", unfitted, partition_size=8)
    assert not hasattr(unfitted, "computation_")
    stored = read_codes(tmp_path / "codes", unfitted)  # resolved as extract_codes did
    np.testing.assert_array_equal(stored.codes, tiny().transform(pngs))
