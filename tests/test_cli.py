"""python -m sklearn_transfer extract: the big job from a shell, resumable, with a summary."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from sklearn_transfer import CNNFeatureTransformer, read_codes
from sklearn_transfer.__main__ import main
from tests.conftest import REPO, colour_images


@pytest.fixture
def class_folders(tmp_path):
    root = tmp_path / "images"
    for i, arr in enumerate(colour_images(6, size=48)):
        folder = root / ("red" if i % 2 == 0 else "green")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(folder / f"{i}.png")
    return root


@pytest.mark.weights
def test_extract_writes_the_codes_and_a_rerun_resumes(class_folders, tmp_path):
    out = tmp_path / "codes"
    command = [sys.executable, "-m", "sklearn_transfer", "extract", str(class_folders),
               "--out", str(out), "--class-folders", "--engine", "torch",
               "--precision", "float32", "--stage", "-2", "-1", "--partition-size", "4"]
    first = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "6 images in 2 partitions; this run computed 6 images (2 partitions)" in first.stdout
    assert "images/s" in first.stdout
    stored = read_codes(out)
    paths = sorted(str(p) for p in class_folders.rglob("*.png"))
    tf = CNNFeatureTransformer(stage=[-2, -1], engine="torch", precision="float32",
                               progress=False).fit()
    assert stored.paths.tolist() == paths
    assert stored.labels.tolist() == [p.split("/")[-2] for p in paths]
    # float32 in another process, batches and thread count: rounding differs in the 6th digit
    np.testing.assert_allclose(stored.codes, tf.transform(paths), rtol=1e-5, atol=1e-5)

    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "this run computed 0 images (0 partitions)" in again.stdout
    assert "nothing left to compute" in again.stdout


def test_a_bad_image_or_option_is_one_line_naming_it(class_folders, tmp_path, capsys):
    (class_folders / "red" / "0.png").write_bytes(b"")
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(sorted(str(p) for p in class_folders.rglob("*.png"))) + "\n")
    options = ["--backbone", "mobilenet_v2", "--weights", "none", "--engine", "torch"]
    with pytest.warns(UserWarning, match="1 of 6 images could not be read"):
        status = main(["extract", str(listing), "--out", str(tmp_path / "skipped"), *options])
    assert status == 0
    assert "1 images could not be read (read_codes(out).failures" in capsys.readouterr().out
    status = main(["extract", str(listing), "--out", str(tmp_path / "codes"), *options,
                   "--on-error", "raise"])
    err = capsys.readouterr().err
    assert status == 1 and "Traceback" not in err
    last = err.strip().splitlines()[-1]  # after the progress bar
    assert last.startswith("python -m sklearn_transfer extract: error: image file ")
    assert "0.png' (index 3) is empty" in last
    with pytest.raises(SystemExit) as exit_:
        main(["extract", str(listing), "--out", str(tmp_path / "codes"), "--pooling", "mean"])
    assert exit_.value.code == 2
    assert "invalid choice: 'mean'" in capsys.readouterr().err


@pytest.mark.weights
def test_extract_on_a_scheduler_matches_a_local_run(class_folders, tmp_path, dask_client,
                                                    capsys):
    options = ["--backbone", "mobilenet_v2", "--engine", "torch", "--partition-size", "3"]
    assert main(["extract", str(class_folders), "--out", str(tmp_path / "local"), *options]) == 0
    address = dask_client.scheduler.address
    assert main(["extract", str(class_folders), "--out", str(tmp_path / "dask"),
                 "--scheduler", address, *options]) == 0
    assert "this run computed 6 images (2 partitions)" in capsys.readouterr().out
    local, on_dask = read_codes(tmp_path / "local"), read_codes(tmp_path / "dask")
    assert on_dask.paths.tolist() == local.paths.tolist()
    assert local.codes.std() > 0.1  # genuine codes, not zeros
    np.testing.assert_allclose(on_dask.codes, local.codes, atol=1e-5)
