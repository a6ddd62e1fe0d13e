"""The codes dataset read by standard readers, and protected against loss and silent mixing.

Real files, real concurrent processes and real Dask clusters: two jobs racing
for one directory, images changed between runs, partition files copied where
they do not belong, damaged files and manifests, labels Parquet cannot store,
clients that cannot work, and a disk that fills up.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import time
import warnings

import numpy as np
import pytest
from PIL import Image

from sklearn_transfer import extract, extract_codes, iter_codes, read_codes
from tests.conftest import REPO
from tests.test_extract import N, pngs, tiny  # noqa: F401 (pngs is a fixture)


def part(out, index):
    (found,) = out.glob(f"part-{index:05d}-*.parquet")
    return found


@pytest.fixture
def dataset(pngs, tmp_path):  # noqa: F811
    out = tmp_path / "codes"
    extract_codes(pngs, out, tiny(), partition_size=8)
    return out


# ------------------------------------------------------------------- standard readers


def test_pandas_pyarrow_and_dask_read_the_directory_as_it_is(pngs, tmp_path):  # noqa: F811
    pandas = pytest.importorskip("pandas")
    import pyarrow.dataset as ds

    out = tmp_path / "codes"
    pngs[7].write_bytes(b"not an image")
    with pytest.warns(UserWarning, match="1 of 30 images could not be read"):
        extract_codes(pngs, out, tiny(), labels=np.arange(N) % 3, partition_size=8)
    stored = read_codes(out)
    frame = pandas.read_parquet(out)
    assert len(frame) == N and frame["index"].tolist() == list(range(N))
    good = frame[frame["error"].isna()]
    np.testing.assert_array_equal(np.stack(good["codes"].to_numpy()), stored.codes)
    assert frame.loc[7, "codes"] is None and "Pillow" in frame.loc[7, "error"]
    table = ds.dataset(out).to_table()
    assert table.num_rows == N and table.column("label").to_pylist() == (np.arange(N) % 3).tolist()
    dask_dataframe = pytest.importorskip("dask.dataframe")
    lazy = dask_dataframe.read_parquet(out).compute()
    assert sorted(lazy["index"].tolist()) == list(range(N))


# ------------------------------------------------------------------------- data loss


def test_two_jobs_started_together_into_one_directory_never_mix(pngs, tmp_path):  # noqa: F811
    child = textwrap.dedent("""
        import sys, time
        from pathlib import Path
        sys.path.insert(0, sys.argv[1])
        from tests.test_extract import tiny
        from sklearn_transfer import extract_codes
        out, go, images = Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4:]
        tf = tiny()
        while not go.exists():
            time.sleep(0.001)
        try:
            extract_codes(images, out, tf, partition_size=4, progress=False)
            print("done")
        except ValueError as exc:
            print("refused:", exc)
    """)
    first, second = [str(p) for p in pngs[:12]], [str(p) for p in pngs[12:]]
    for trial in range(3):
        out, go = tmp_path / f"codes{trial}", tmp_path / f"go{trial}"
        procs = [subprocess.Popen([sys.executable, "-c", child, str(REPO), str(out), str(go),
                                   *images], cwd=REPO, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
                 for images in (first, second)]
        time.sleep(3)  # both imported and waiting
        go.touch()
        results = [p.communicate(timeout=120) for p in procs]
        said = [stdout.strip().splitlines()[-1] for stdout, _ in results]
        assert sorted(s.split(":")[0] for s in said) == ["done", "refused"], results
        assert "another job" in next(s for s in said if s.startswith("refused"))
        winner = first if said[0] == "done" else second
        assert read_codes(out).paths.tolist() == winner  # one job's images, each once


# --------------------------------------------------------------- silent wrong results


def test_a_rerun_after_images_changed_computes_their_partitions_again(
        pngs, dataset):  # noqa: F811
    before = read_codes(dataset).codes
    Image.fromarray(np.full((24, 24, 3), 250, np.uint8)).save(pngs[10])  # partition 1
    with pytest.warns(UserWarning, match=r"the image files of 1 partitions changed .*"
                                         r"part-00001-.*computing them again"):
        summary = extract_codes(pngs, dataset, tiny(), partition_size=8)
    assert summary.n_computed == 1
    after = read_codes(dataset).codes
    np.testing.assert_array_equal(after, tiny().transform(pngs))
    assert not np.array_equal(after[10], before[10])
    np.testing.assert_array_equal(np.delete(after, 10, 0), np.delete(before, 10, 0))


def test_a_partition_from_elsewhere_is_refused_and_computed_again(pngs, dataset,  # noqa: F811
                                                                  tmp_path):
    shutil.copy(part(dataset, 0), part(dataset, 1))  # one partition copied over another
    with pytest.raises(ValueError, match=r"part-00001-.*' does not belong here \(its start is "
                                         r"'0', not '8'\); run the same extract_codes call"):
        read_codes(dataset)
    with pytest.warns(RuntimeWarning, match="part-00001-.* does not belong here .* moved to "
                                            "'.damaged-"):
        assert extract_codes(pngs, dataset, tiny(), partition_size=8).n_computed == 1
    assert read_codes(dataset).indices.tolist() == list(range(N))
    # the same partition of another job of the same computation
    other = tmp_path / "other"
    extract_codes(pngs, other, tiny(), labels=[0] * N, partition_size=8)
    shutil.copy(part(other, 2), part(dataset, 2))
    with pytest.raises(ValueError, match=r"part-00002-.*does not belong here \(its job is"):
        read_codes(dataset)
    with pytest.warns(RuntimeWarning, match="part-00002-.*does not belong here"):
        extract_codes(pngs, dataset, tiny(), partition_size=8)
    np.testing.assert_array_equal(read_codes(dataset).codes, tiny().transform(pngs))


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_a_damaged_partition_is_named_and_a_rerun_recovers(pngs, dataset, damage):  # noqa: F811
    target = part(dataset, 2)
    data = target.read_bytes()
    target.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"x" * 500,
                        "empty": b""}[damage])
    for call in (lambda: read_codes(dataset), lambda: iter_codes(dataset),
                 lambda: read_codes(dataset, tiny())):
        with pytest.raises(ValueError, match=r"part-00002-.*' cannot be read as Parquet .*run "
                                             "the same extract_codes call again"):
            call()
    with pytest.warns(RuntimeWarning, match="part-00002-.*cannot be read as Parquet"):
        summary = extract_codes(pngs, dataset, tiny(), partition_size=8, retry_failed=True)
    assert summary.n_computed == 1
    np.testing.assert_array_equal(read_codes(dataset).codes, tiny().transform(pngs))


def test_a_damaged_or_edited_manifest_is_named(pngs, dataset):  # noqa: F811
    manifest = dataset / "_manifest.json"
    good = json.loads(manifest.read_text())
    for text, says in [("{not json", "is damaged \\(not a JSON object\\)"),
                       ("[1, 2]", "is damaged \\(not a JSON object\\)"),
                       (json.dumps({**good, "n_images": "30"}), "its 'n_images' is '30'"),
                       (json.dumps({**good, "partition_size": 0}), "its 'partition_size' is 0"),
                       (json.dumps({k: v for k, v in good.items() if k != "labels"}),
                        "its 'labels' is None")]:
        manifest.write_text(text)
        for call in (lambda: read_codes(dataset),
                     lambda: extract_codes(pngs, dataset, tiny(), partition_size=8)):
            with pytest.raises(ValueError, match=f"_manifest.json' {says}|_manifest.json' is "
                                                 f"damaged: {says}"):
                call()


def test_labels_are_checked_before_any_work(pngs, tmp_path):  # noqa: F811
    out = tmp_path / "codes"
    with pytest.raises(ValueError, match="labels mix strings and numbers"):
        extract_codes(pngs, out, tiny(), labels=[0, "b"] * (N // 2))
    huge = [1] * N
    huge[6] = 2 ** 70
    with pytest.raises(ValueError, match=r"labels cannot be stored in Parquet \(labels\[6\] = "):
        extract_codes(pngs, out, tiny(), labels=huge)
    assert not list(out.glob("part-*"))


def test_unclear_arguments_are_named(pngs, tmp_path):  # noqa: F811
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ValueError, match="out='.*a-file' is a file, not a directory"):
        extract_codes(pngs, tmp_path / "a-file", tiny())
    with pytest.raises(ValueError, match="retry_failed must be True or False; got 'yes'"):
        extract_codes(pngs, tmp_path / "c", tiny(), retry_failed="yes")


def test_a_full_disk_names_the_partition_it_was_writing(pngs, tmp_path):  # noqa: F811
    disk = tmp_path / "small-disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"a small tmpfs cannot be mounted here ({mounted.stderr.strip()})")
    try:
        (disk / "filler").write_bytes(bytes(48 * 1024))  # room for the manifest, not the codes
        with pytest.raises(OSError, match=r"\[Errno 28\] could not write the partition "
                                          r"'.*small-disk/codes/part-\d+-.*\.parquet'"):
            extract_codes(pngs * 20, disk / "codes", tiny(), partition_size=200)
    finally:
        subprocess.run(["umount", str(disk)], check=True)


# ------------------------------------------------------------ clients that cannot work


def test_a_closed_client_or_a_cluster_without_workers_is_named(pngs, tmp_path,  # noqa: F811
                                                               monkeypatch):
    distributed = pytest.importorskip("distributed")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cluster = distributed.LocalCluster(n_workers=0, processes=False,
                                           dashboard_address=":0")
    client = distributed.Client(cluster)
    try:
        monkeypatch.setattr(extract, "WORKER_WAIT_S", 1.0)
        started = time.monotonic()
        with pytest.raises(ValueError, match="has no worker to run the partitions: none joined "
                                             "within 1 s"):
            extract_codes(pngs, tmp_path / "c", tiny(), client=client)
        assert time.monotonic() - started < 10
    finally:
        client.close()
        cluster.close()
    with pytest.raises(ValueError, match="is closed: connect a new dask.distributed.Client"):
        extract_codes(pngs, tmp_path / "c", tiny(), client=client)
    assert not list((tmp_path / "c").glob("part-*"))
