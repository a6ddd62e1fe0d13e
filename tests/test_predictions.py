"""Predictions over image files, streamed chunk by chunk to CSV or Parquet."""

from __future__ import annotations

import csv
import itertools
import tracemalloc

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.svm import LinearSVC

from sklearn_transfer import CNNFeatureTransformer
from sklearn_transfer.predictions import iter_image_paths, predict_chunks, write_predictions

from .conftest import colour_images, make_tiny_backbone


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    paths = []
    for i, arr in enumerate(colour_images(8, size=40)):
        paths.append(str(root / f"{i}.png"))
        Image.fromarray(arr).save(paths[-1])
    return paths


def codes_pipeline(head, images, labels=("red", "green")):
    tf = CNNFeatureTransformer(make_tiny_backbone(), engine="torch", progress=False)
    return make_pipeline(tf, head).fit(images, list(labels) * (len(images) // 2))


def test_paths_are_read_a_chunk_at_a_time(images):
    model = codes_pipeline(LogisticRegression(), images)
    consumed = []

    def listing():
        for path in itertools.cycle(images):
            consumed.append(path)
            yield path

    chunks = predict_chunks(model, listing(), chunk_size=3)
    paths, values, errors = next(chunks)
    assert len(consumed) == 3 and paths == images[:3] and errors == [None] * 3
    np.testing.assert_array_equal(values, model.predict_proba(images[:3]))
    next(chunks)
    assert len(consumed) == 6
    with pytest.raises(ValueError, match="chunk_size must be a positive integer; got 0"):
        predict_chunks(model, images, chunk_size=0)  # checked at the call, not at the first chunk


def test_any_number_of_paths_needs_the_memory_of_a_chunk(images, tmp_path):
    """Every path streams from the list file to the output; none is held (all missing here:
    they are found by their metadata, so the test spends its time in the streaming)."""
    n = 300_000
    listing = tmp_path / "list.txt"
    with listing.open("w") as fh:
        for i in range(n):
            fh.write(f"{tmp_path}/missing/{i:07d}/a-long-enough-file-name-{i}.jpg\n")
    model = codes_pipeline(LogisticRegression(), images)
    tracemalloc.start()
    try:
        with pytest.warns(UserWarning, match=f"{n} of {n} images could not be read"):
            summary = write_predictions(model, iter_image_paths(listing), tmp_path / "p.parquet",
                                        progress=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert summary.n_images == summary.n_failed == n
    # the paths alone take about 30 MB as Python strings
    assert peak < 8e6, peak
    table = pq.read_table(tmp_path / "p.parquet", columns=["path", "error"])
    assert table.num_rows == n
    assert table["error"][n - 1].as_py() == (f"image file '{tmp_path}/missing/0299999/a-long-"
                                             f"enough-file-name-299999.jpg' (index {n - 1}) does "
                                             "not exist")


def test_a_model_without_probabilities_writes_labels(images, tmp_path):
    model = codes_pipeline(LinearSVC(), images)
    write_predictions(model, images, tmp_path / "p.csv", progress=False)
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    assert list(rows[0]) == ["path", "label", "error"]
    assert [r["label"] for r in rows] == model.predict(images).tolist()
    write_predictions(model, images, tmp_path / "p.parquet", progress=False)
    assert pq.read_table(tmp_path / "p.parquet").column_names == ["path", "label", "error"]
    # integer labels keep their type in both formats
    model = codes_pipeline(LinearSVC(), images, labels=(3, 7))
    for name in ("i.csv", "i.parquet"):
        write_predictions(model, images, tmp_path / name, progress=False)
    assert [int(r["label"]) for r in csv.DictReader((tmp_path / "i.csv").open())] == \
        pq.read_table(tmp_path / "i.parquet")["label"].to_pylist() == model.predict(images).tolist()


def test_integer_classes_and_classes_named_like_a_column(images, tmp_path):
    model = codes_pipeline(LogisticRegression(), images, labels=(3, 7))
    write_predictions(model, images, tmp_path / "p.parquet", progress=False)
    table = pq.read_table(tmp_path / "p.parquet")
    assert table.column_names == ["path", "label", "3", "7", "error"]
    assert table["label"].to_pylist() == model.predict(images).tolist()
    np.testing.assert_allclose(np.column_stack([table["3"], table["7"]]),
                               model.predict_proba(images))
    model = codes_pipeline(LogisticRegression(), images, labels=("label", "other"))
    with pytest.raises(ValueError, match=r"the classes \['label', 'other'\] cannot each name a "
                       r"probability column: \['label'\] would repeat a column name"):
        write_predictions(model, images, tmp_path / "q.csv", progress=False)
    assert not (tmp_path / "q.csv").exists()


def test_a_folder_is_walked_in_sorted_order(tmp_path):
    for name in ("b/2.png", "b/1.JPG", "a/z.png", "a/notes.txt", "c.png", "a/sub/0.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    assert [p[len(str(tmp_path)) + 1:] for p in iter_image_paths(tmp_path)] == [
        "c.png", "a/z.png", "a/sub/0.png", "b/1.JPG", "b/2.png"]
