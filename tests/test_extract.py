"""extract_codes, read_codes, iter_codes: resumable Parquet codes, local or on Dask."""

from __future__ import annotations

import functools
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import traceback
import uuid
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from sklearn_transfer import (
    CNNFeatureTransformer,
    ImageLoadError,
    extract_codes,
    iter_codes,
    read_codes,
)
from sklearn_transfer.identity import image_keys
from tests.conftest import REPO, colour_images, local_cluster, make_tiny_backbone

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
    assert json.loads((out / "_manifest.json").read_text())["computation"] == key
    first = pq.read_table(out / f"part-00000-{key[:16]}.parquet")
    assert first.schema.metadata[b"sklearn_transfer.computation"].decode() == key
    assert first.column_names == ["index", "path", "key", "codes", "error"]
    assert first.schema.metadata[b"sklearn_transfer.n_failed"] == b"0"

    stored = read_codes(out, tf)
    assert stored.codes.dtype == np.float32 and stored.codes.shape == (N, tf.n_features_out_)
    np.testing.assert_array_equal(stored.codes, tf.transform(pngs))
    assert stored.paths.tolist() == [str(p) for p in pngs]
    assert stored.keys.tolist() == image_keys(pngs)
    assert stored.labels is None and stored.computation == key
    assert stored.indices.tolist() == list(range(N)) and stored.failures == ()
    assert summary.n_failed == 0
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


def test_on_error_raise_stops_the_run_and_the_rerun_computes_only_the_rest(pngs, tmp_path):
    tf = tiny()
    out = tmp_path / "codes"
    good = pngs[20].read_bytes()
    pngs[20].write_text("not an image")
    with pytest.raises(ImageLoadError, match=r"img20\.png' \(index 20\) is not an image") as err:
        extract_codes(pngs, out, tf, partition_size=8, on_error="raise")
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


def test_unreadable_images_are_recorded_and_the_others_keep_their_codes(pngs, tmp_path):
    tf = tiny()
    out = tmp_path / "codes"
    originals = {i: pngs[i].read_bytes() for i in (5, 13, 20)}
    pngs[5].unlink()
    pngs[13].write_bytes(b"")
    pngs[20].write_text("not an image")
    with pytest.warns(UserWarning, match=r"3 of 30 images could not be read .*img05\.png' "
                                         r"\(index 5\) does not exist"):
        summary = extract_codes(pngs, out, tf, partition_size=8)  # on_error="skip"
    assert (summary.n_computed, summary.n_failed) == (4, 3)

    stored = read_codes(out, tf)
    good = [i for i in range(N) if i not in originals]
    assert stored.indices.tolist() == good and stored.paths.tolist() == [str(pngs[i]) for i in good]
    # the good images of a batch with a bad one keep their codes (that batch holds fewer images)
    np.testing.assert_allclose(stored.codes, tf.transform([pngs[i] for i in good]), atol=1e-5)
    assert [(f.index, f.path) for f in stored.failures] == [(i, str(pngs[i])) for i in originals]
    reasons = [f.reason for f in stored.failures]
    assert reasons[0].endswith("img05.png' (index 5) does not exist")
    assert reasons[1].endswith("img13.png' (index 13) is empty (0 bytes)")
    assert reasons[2].endswith("img20.png' (index 20) is not an image Pillow can read")
    raw = pq.read_table(out / f"part-00001-{tf.computation_.key[:16]}.parquet")
    assert raw.schema.metadata[b"sklearn_transfer.n_failed"] == b"1"
    row = raw.slice(13 - 8, 1).to_pylist()[0]
    assert row["codes"] is None and row["key"] is not None and "is empty" in row["error"]
    assert pq.read_table(out / f"part-00000-{tf.computation_.key[:16]}.parquet").column(
        "key")[5].as_py() is None  # a missing file has no content
    streamed = list(iter_codes(out, batch_size=8))
    assert [f.index for b in streamed for f in b.failures] == [5, 13, 20]
    np.testing.assert_array_equal(np.concatenate([b.codes for b in streamed]), stored.codes)

    # a rerun does not retry failures: the job is complete
    again = extract_codes(pngs, out, tf, partition_size=8)
    assert (again.n_computed, again.n_failed) == (0, 3)
    # fixed, and asked to: only the partitions that hold failures are computed again
    for i, data in originals.items():
        pngs[i].write_bytes(data)
    before = mtimes(out)
    # rewriting the files changed the partitions that held them: said, and computed again
    with pytest.warns(UserWarning, match="the image files of 3 partitions changed"):
        retried = extract_codes(pngs, out, tf, partition_size=8, retry_failed=True)
    assert (retried.n_computed, retried.n_failed) == (3, 0)
    after = mtimes(out)
    assert [k for k in before if before[k] == after[k]] == [
        f"part-00003-{tf.computation_.key[:16]}.parquet"]
    np.testing.assert_array_equal(read_codes(out).codes, tf.transform(pngs))


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
    manifest = json.loads((out / "_manifest.json").read_text())
    (out / "_manifest.json").write_text(json.dumps({**manifest, "format": 1}))
    for call in (lambda: read_codes(out), lambda: extract_codes(pngs, out, tiny(),
                                                                partition_size=8)):
        with pytest.raises(ValueError, match="has format 1, which this version of "
                                             "sklearn_transfer .* does not read"):
            call()


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
    with pytest.raises(ValueError, match="on_error must be 'skip' or 'raise'; got 'ignore'"):
        extract_codes(pngs, tmp_path / "c", tiny(), on_error="ignore")
    with pytest.raises(ValueError, match="images='memory://no-such-folder/' is not a folder"):
        extract_codes("memory://no-such-folder/", tmp_path / "c", tiny())


# ------------------------------------------------------------------------------ URLs


@pytest.fixture
def http_root(pngs):
    """The images' folder served over HTTP on 127.0.0.1 (a real server, in a thread)."""
    pytest.importorskip("aiohttp", reason="fsspec reads http:// URLs with aiohttp")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(pngs[0].parent))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        yield f"http://127.0.0.1:{server.server_address[1]}/"
        server.shutdown()
        thread.join()


def refused_url() -> str:
    """A URL on a 127.0.0.1 port that nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/img.png"


def test_codes_from_http_and_memory_urls_equal_those_of_the_files(pngs, http_root, tmp_path):
    fsspec = pytest.importorskip("fsspec")
    tf = tiny()
    extract_codes(pngs, tmp_path / "local", tf, partition_size=8)
    local = read_codes(tmp_path / "local")

    urls = [http_root + p.name for p in pngs]
    extract_codes(urls, tmp_path / "http", tf, partition_size=8)
    over_http = read_codes(tmp_path / "http")
    np.testing.assert_array_equal(over_http.codes, local.codes)
    assert over_http.paths.tolist() == urls  # URLs are stored as given
    assert over_http.keys.tolist() == local.keys.tolist()  # a URL's key is its bytes'

    folder = f"memory://sklearn-transfer-{uuid.uuid4().hex}/images"
    memory = fsspec.filesystem("memory")
    for p in pngs:
        memory.pipe(f"{folder}/{p.name}", p.read_bytes())
    try:
        extract_codes(folder + "/", tmp_path / "memory", tf, partition_size=8)  # a folder URL
        in_memory = read_codes(tmp_path / "memory")
        np.testing.assert_array_equal(in_memory.codes, local.codes)
        assert [u.rsplit("/", 1)[1] for u in in_memory.paths] == [p.name for p in pngs]
        # transform takes URLs too, through the same loader
        np.testing.assert_array_equal(tf.transform(urls[:8]), local.codes[:8])
        np.testing.assert_array_equal(tf.transform(list(in_memory.paths[:8])), local.codes[:8])
        np.testing.assert_array_equal(tf.transform([p.as_uri() for p in pngs[:8]]),
                                      local.codes[:8])  # file:// URLs are the local files
        assert image_keys(urls[:3]) == image_keys(pngs[:3])
    finally:
        memory.rm(folder, recursive=True)


def test_a_404_and_a_refused_connection_name_the_url_and_its_index(pngs, http_root, tmp_path):
    tf = tiny()
    missing, refused = http_root + "no-such-image.png", refused_url()
    urls = [http_root + p.name for p in pngs[:3]] + [missing, refused]
    with pytest.raises(FileNotFoundError) as err:
        tf.transform(urls)
    assert str(err.value) == f"image URL {missing!r} (index 3) does not exist"
    with pytest.raises(ImageLoadError, match=r"image URL '.*' \(index 1\) could not be read "
                                             r"\(ClientConnectorError: Cannot connect") as err:
        tf.transform(urls[:1] + [refused])
    assert (err.value.index, err.value.item) == (1, refused)
    assert "aiohttp" not in "".join(traceback.format_exception(err.value))  # no internals

    with pytest.raises(FileNotFoundError, match=r"no-such-image\.png' \(index 3\) does not"):
        extract_codes(urls, tmp_path / "raise", tf, on_error="raise")
    with pytest.warns(UserWarning, match="2 of 5 images could not be read"):
        summary = extract_codes(urls, tmp_path / "skip", tf)
    assert summary.n_failed == 2
    stored = read_codes(tmp_path / "skip")
    assert stored.indices.tolist() == [0, 1, 2]
    assert [(f.index, f.path) for f in stored.failures] == [(3, missing), (4, refused)]
    assert "Cannot connect to host 127.0.0.1" in stored.failures[1].reason


def test_a_missing_protocol_package_stops_even_a_skipping_job(pngs, tmp_path):
    try:
        import s3fs  # noqa: F401
        pytest.skip("s3fs is installed: s3:// URLs can be read here")
    except ImportError:
        pass
    with pytest.raises(ImportError, match=r"image URL 's3://bucket/a\.png' \(index 1\): "
                                          r"Install s3fs"):
        extract_codes([pngs[0], "s3://bucket/a.png"], tmp_path / "codes", tiny())
    assert not list((tmp_path / "codes").glob("part-*"))


# ------------------------------------------------------------------------------ on Dask


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    # its own cluster: the tests below check what its workers hold, and one kills a worker
    with local_cluster(tmp_path_factory.mktemp("dask")) as client:
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
    from sklearn_transfer import engines

    held = client.run(lambda: [key for key, _, _ in engines._ENGINES])
    assert all(keys == [tf.computation_.key] for keys in held.values() if keys)


def test_a_bad_image_on_a_worker_comes_back_as_the_library_error(client, pngs, tmp_path):
    tf = tiny()
    out = tmp_path / "codes"
    good = pngs[13].read_bytes()
    pngs[13].write_bytes(b"")
    with pytest.raises(ImageLoadError, match=r"img13\.png' \(index 13\) is empty") as err:
        extract_codes(pngs, out, tf, partition_size=8, client=client, on_error="raise")
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


def test_a_cluster_reads_http_urls(client, pngs, http_root, tmp_path):
    tf = tiny()
    urls = [http_root + p.name for p in pngs]
    extract_codes(urls, tmp_path / "dask", tf, partition_size=8, client=client)
    np.testing.assert_array_equal(read_codes(tmp_path / "dask").codes, tf.transform(pngs))


def test_a_worker_killed_mid_job_leaves_every_image_exactly_once(client, pngs, tmp_path):
    """SIGKILL of a real worker process: Dask runs its task again elsewhere; the atomic
    partition files make each image appear once. (Last of the module: a worker restarts.)"""
    tf = tiny()
    out = tmp_path / "codes"
    pids = client.run(os.getpid)
    victim = sorted(pids.values())[0]
    seen = {}

    def kill_when_some_partitions_are_written():
        while len(list(out.glob("part-*.parquet"))) < 3:
            time.sleep(0.0005)
        seen["at_kill"] = len(list(out.glob("part-*.parquet")))
        os.kill(victim, signal.SIGKILL)

    killer = threading.Thread(target=kill_when_some_partitions_are_written, daemon=True)
    killer.start()
    # one image per partition: 30 tasks, so the kill lands mid-job
    summary = extract_codes(pngs, out, tf, partition_size=1, client=client)
    killer.join(timeout=10)
    assert seen and seen["at_kill"] < N, "the job ended before the kill"
    assert victim not in client.run(os.getpid).values()  # the worker really died
    assert summary.n_computed == N and summary.n_failed == 0
    stored = read_codes(out)
    assert stored.paths.tolist() == [str(p) for p in pngs]  # each image once, in order
    assert len(mtimes(out)) == N
    np.testing.assert_allclose(stored.codes, tf.transform(pngs), atol=1e-5)
