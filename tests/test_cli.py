"""python -m sklearn_transfer: fit, predict, evaluate and extract from a shell, with summaries
and one-line errors."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from sklearn_transfer import CNNFeatureTransformer, read_codes
from sklearn_transfer.__main__ import main
from tests.conftest import REPO, colour_images, real_dataset, skip_without


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


# ------------------------------------------------------------------ fit, predict, evaluate


def cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m sklearn_transfer ARGS`` in a fresh process of this checkout."""
    return subprocess.run([sys.executable, "-m", "sklearn_transfer", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def one_line_error(run: subprocess.CompletedProcess, command: str) -> str:
    """The last stderr line of a failed command, checked to be its one-line error."""
    assert run.returncode == 1, (run.returncode, run.stderr[-3000:])
    assert "Traceback" not in run.stderr
    last = run.stderr.strip().splitlines()[-1]  # after a progress bar, if any
    assert last.startswith(f"python -m sklearn_transfer {command}: error: "), run.stderr
    return last


@pytest.fixture(scope="module")
def codes_model(tmp_path_factory):
    """A codes pipeline on a named network (random weights, torch engine: fast), saved."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    from sklearn_transfer.persistence import dump

    root = tmp_path_factory.mktemp("model")
    X, y = colour_images(8, size=48, seed=3), np.array(["red", "green"] * 4)
    model = make_pipeline(CNNFeatureTransformer("mobilenet_v2", weights=None, engine="torch",
                                                progress=False), LogisticRegression())
    dump(model.fit(X, y), root / "model.zip")
    return root / "model.zip"


def test_predict_streams_rows_and_skips_a_bad_image(class_folders, codes_model, tmp_path,
                                                    capsys):
    from sklearn_transfer.persistence import load

    paths = sorted(str(p) for p in class_folders.rglob("*.png"))
    (class_folders / "green" / "3.png").write_bytes(b"not an image")
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(paths) + "\n\n")
    out = tmp_path / "predictions.csv"
    with pytest.warns(UserWarning, match="1 of 6 images could not be read"):
        # chunks of 2: the bad image's chunk is predicted again without it
        status = main(["predict", str(codes_model), str(listing), "--out", str(out),
                       "--chunk-size", "2"])
    assert status == 0
    summary = capsys.readouterr().out.strip()
    assert summary.startswith(f"{out}: 6 images, 2 classes; 1 could not be read (the error "
                              "column of their rows says why);")
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == ["path", "label", "green", "red", "error"]
    assert [r["path"] for r in rows] == paths
    bad = paths.index(str(class_folders / "green" / "3.png"))
    assert rows[bad]["label"] == rows[bad]["green"] == rows[bad]["red"] == ""
    assert rows[bad]["error"] == f"image file '{paths[bad]}' (index {bad}) is not an image " \
                                 "Pillow can read"
    good = [p for p in paths if p != paths[bad]]
    model = load(codes_model)
    np.testing.assert_array_equal([r["label"] for r in rows if not r["error"]],
                                  model.predict(good))
    np.testing.assert_allclose([[float(r["green"]), float(r["red"])] for r in rows
                                if not r["error"]], model.predict_proba(good), rtol=1e-6)
    # the folder itself, to Parquet: the same rows
    with pytest.warns(UserWarning, match="1 of 6 images"):
        assert main(["predict", str(codes_model), str(class_folders), "--out",
                     str(tmp_path / "p.parquet")]) == 0
    table = pq.read_table(tmp_path / "p.parquet").to_pylist()
    assert [r["path"] for r in table] == paths
    assert [r["label"] for r in table] == [r["label"] or None for r in rows]
    assert table[bad]["green"] is None and table[bad]["error"] == rows[bad]["error"]
    np.testing.assert_allclose([r["red"] for r in table if r["label"]],
                               [float(r["red"]) for r in rows if r["label"]])
    # on_error="raise": one line naming the image by its index in SRC, and no output file
    status = main(["predict", str(codes_model), str(listing), "--out",
                   str(tmp_path / "raised.csv"), "--chunk-size", "2", "--on-error", "raise"])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert status == 1 and last == (f"python -m sklearn_transfer predict: error: image file "
                                    f"'{paths[bad]}' (index {bad}) is not an image Pillow can "
                                    "read")
    assert not (tmp_path / "raised.csv").exists()


def test_predict_fails_when_every_image_failed(codes_model, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text(f"{tmp_path / 'gone.png'}\n{listing}\n")
    run = cli("predict", codes_model, listing, "--out", tmp_path / "p.csv")
    last = one_line_error(run, "predict")
    assert last.endswith(f"none of the 2 images could be read (the first: image file "
                         f"'{tmp_path / 'gone.png'}' (index 0) does not exist)")
    # the rows say why, and the warning is one line too
    assert "python -m sklearn_transfer predict: warning: 2 of 2 images could not" in run.stderr
    errors = [r["error"] for r in csv.DictReader((tmp_path / "p.csv").open())]
    assert errors[0].endswith("(index 0) does not exist")
    assert errors[1].endswith("(index 1) is not an image Pillow can read")


def test_missing_files_and_bad_arguments_are_one_line(codes_model, class_folders, tmp_path,
                                                      capsys):
    jpeg = tmp_path / "photo.jpg"
    Image.fromarray(colour_images(1, size=32)[0]).save(jpeg)
    missing = tmp_path / "missing"
    cases = [  # (arguments, the end of the error line)
        (["extract", jpeg, "--out", tmp_path / "codes"],
         f"'{jpeg}' is not a text file listing image paths (one per line): it is a JPEG image; "
         "pass a folder of images or such a list"),
        (["predict", missing / "model.zip", class_folders, "--out", tmp_path / "p.csv"],
         f"model file '{missing / 'model.zip'}' does not exist"),
        (["predict", codes_model, jpeg, "--out", tmp_path / "p.csv"],
         f"'{jpeg}' is not a text file listing image paths (one per line): it is a JPEG image; "
         "pass a folder of images or such a list"),
        (["predict", codes_model, missing, "--out", tmp_path / "p.csv"],
         f"'{missing}' does not exist (expected a folder of images or a text file with one "
         "image path per line)"),
        (["predict", codes_model, class_folders, "--out", tmp_path / "p.json"],
         f"the output '{tmp_path / 'p.json'}' must end in .csv or .parquet"),
        (["predict", codes_model, class_folders, "--out", missing / "p.csv"],
         f"cannot write '{missing / 'p.csv'}': its folder does not exist"),
        (["fit", missing, "--out", tmp_path / "m.zip"],
         f"image folder '{missing}' does not exist or is not a folder"),
        (["fit", class_folders, "--out", missing / "m.zip"],
         f"cannot write MODEL '{missing / 'm.zip'}': its folder does not exist"),
        (["evaluate", codes_model, missing, "--report", tmp_path / "report"],
         f"image folder '{missing}' does not exist or is not a folder"),
        (["evaluate", missing / "model.zip", class_folders, "--report", tmp_path / "report"],
         f"model file '{missing / 'model.zip'}' does not exist"),
    ]
    for args, expected in cases:
        assert main(list(map(str, args))) == 1
        err = capsys.readouterr().err
        assert "Traceback" not in err
        assert err == f"python -m sklearn_transfer {args[0]}: error: {expected}\n", args
    # the same from a shell: exit status 1, one line
    for args, expected in cases[:2]:
        assert one_line_error(cli(*args), args[0]).endswith(expected)
    # options argparse refuses: its usage and exit status 2
    run = cli("fit", class_folders, "--out", tmp_path / "m.zip", "--max-epochs", "2")
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1] == (
        "python -m sklearn_transfer fit: error: argument --max-epochs: applies to --strategy "
        "finetune, not codes")
    for args, expected in [
            (["predict", codes_model, class_folders, "--out", "p.csv", "--chunk-size", "0"],
             "argument --chunk-size: expected a positive int, got '0'"),
            (["fit", class_folders, "--out", "m.zip", "--strategy", "finetune",
              "--freeze-depth", "some"],
             "argument --freeze-depth: expected an integer or 'all', got 'some'"),
            (["fit", class_folders, "--out", "m.zip", "--strategy", "codes",
              "--time-budget", "60"],
             "argument --time-budget: applies to --strategy auto, not codes")]:
        with pytest.raises(SystemExit) as exit_:
            main(list(map(str, args)))
        assert exit_.value.code == 2
        assert capsys.readouterr().err.strip().endswith(expected)
    assert not (tmp_path / "p.csv").exists() and not (tmp_path / "m.zip").exists()


def test_list_files_that_are_not_utf8_text_are_named(codes_model, tmp_path, capsys):
    listing = tmp_path / "latin1.txt"
    listing.write_bytes("caf\u00e9.png\n".encode("latin-1"))
    assert main(["predict", str(codes_model), str(listing), "--out",
                 str(tmp_path / "p.csv")]) == 1
    assert capsys.readouterr().err.strip().endswith(
        f"'{listing}' is not a text file listing image paths (one per line): it is not UTF-8 "
        "text; pass a folder of images or such a list")
    # past the first 8 KB: the line is named
    listing.write_bytes(b"a.png\n" * 2000 + "caf\u00e9.png\n".encode("latin-1"))
    assert main(["extract", str(listing), "--out", str(tmp_path / "codes")]) == 1
    assert capsys.readouterr().err.strip().endswith(
        f"'{listing}': line 2001 is not UTF-8 text; a list of image paths is a UTF-8 text "
        "file, one path per line")


def test_extract_fails_when_every_image_failed(tmp_path, capsys):
    listing = tmp_path / "list.txt"
    listing.write_text(f"{tmp_path / 'a.png'}\n{tmp_path / 'b.png'}\n")
    with pytest.warns(UserWarning, match="2 of 2 images could not be read"):
        status = main(["extract", str(listing), "--out", str(tmp_path / "codes"),
                       "--backbone", "mobilenet_v2", "--weights", "none", "--engine", "torch"])
    captured = capsys.readouterr()
    assert status == 1 and "2 images could not be read" in captured.out
    assert captured.err.strip().splitlines()[-1] == (
        "python -m sklearn_transfer extract: error: none of the 2 images could be read; "
        "read_codes(out).failures lists why")


def test_export_refuses_an_existing_folder_in_one_line(codes_model, tmp_path, capsys):
    (tmp_path / "exported").mkdir()
    assert main(["export", str(codes_model), "--out", str(tmp_path / "exported")]) == 1
    assert "exported' exists: export writes a new folder" in capsys.readouterr().err


def test_fit_finetune_then_predict_matches_the_saved_model(class_folders, tmp_path):
    from sklearn_transfer import FineTunedClassifier
    from sklearn_transfer.persistence import load

    model = tmp_path / "finetuned.zip"
    run = cli("fit", class_folders, "--out", model, "--strategy", "finetune", "--backbone",
              "mobilenet_v2", "--weights", "none", "--max-epochs", "1", "--freeze-depth", "-1",
              "--random-state", "0")
    assert run.returncode == 0, run.stderr[-3000:]
    assert re.fullmatch(rf"{model}: finetune on mobilenet_v2 \(1 epochs\), fitted on 6 images of "
                        r"2 classes "
                        r"\(green, red\) in [\d.]+ s; [\d.]+ MB",
                        run.stdout.strip().splitlines()[-1])
    loaded = load(model)
    assert isinstance(loaded, FineTunedClassifier) and loaded.freeze_depth == -1
    assert loaded.callbacks is None and loaded.verbose == 0  # the display was for the fit
    run = cli("predict", model, class_folders, "--out", tmp_path / "p.csv")
    assert run.returncode == 0, run.stderr[-3000:]
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    paths = [r["path"] for r in rows]
    np.testing.assert_array_equal([r["label"] for r in rows], loaded.predict(paths))
    np.testing.assert_allclose([[float(r["green"]), float(r["red"])] for r in rows],
                               loaded.predict_proba(paths), atol=1e-6)


@pytest.mark.weights
def test_fit_auto_saves_the_searchs_best_estimator(class_folders, tmp_path):
    from sklearn.pipeline import Pipeline

    from sklearn_transfer.persistence import load

    model = tmp_path / "auto.zip"
    run = cli("fit", class_folders, "--out", model, "--strategy", "auto", "--backbone",
              "mobilenet_v2", "--time-budget", "1", "--memory", tmp_path / "cache")
    assert run.returncode == 0, run.stderr[-3000:]
    # the first candidate always runs; the budget is spent by then
    assert "[StrategySearchCV] codes {'head__C': 0.01}: " in run.stdout
    assert re.search(r"auto chose codes \{'head__C': 0.01\} \(CV accuracy [\d.]+; 1 of 11 "
                     r"candidates ran, 10 skipped by --time-budget 1\), fitted on 6 images",
                     run.stdout)
    loaded = load(model)
    assert isinstance(loaded, Pipeline) and loaded.get_params()["head__C"] == 0.01
    assert loaded.get_params()["codes__memory"] == str(tmp_path / "cache")


def hymenoptera_subset(root: Path, per_class: dict) -> dict:
    """A few real hymenoptera images per split and class, copied into ``root/SPLIT/CLASS``."""
    source = real_dataset("hymenoptera_data")
    for split, n in per_class.items():
        for cls in ("ants", "bees"):
            (root / split / cls).mkdir(parents=True)
            for path in sorted((source / split / cls).glob("*.jpg"))[:n]:
                shutil.copy(path, root / split / cls / path.name)
    return {split: root / split for split in per_class}


@pytest.mark.data
@pytest.mark.weights
def test_fit_predict_evaluate_on_real_images(tmp_path):
    """The whole job from a shell on a few dozen hymenoptera images (issue 28)."""
    from sklearn_transfer.persistence import load

    data = hymenoptera_subset(tmp_path / "data", {"train": 12, "val": 8})
    model, cache = tmp_path / "model.zip", tmp_path / "cache"
    run = cli("fit", data["train"], "--out", model, "--memory", cache)
    assert run.returncode == 0, run.stderr[-3000:]
    assert re.fullmatch(rf"{model}: codes on efficientnet_lite0, fitted on 24 images of 2 "
                        r"classes \(ants, bees\) in [\d.]+ s; [\d.]+ MB", run.stdout.strip())
    assert "CNN codes: 100%" in run.stderr  # a progress bar

    run = cli("predict", model, data["val"], "--out", tmp_path / "val.csv")
    assert run.returncode == 0, run.stderr[-3000:]
    assert re.fullmatch(rf"{tmp_path / 'val.csv'}: 16 images, 2 classes; 0 could not be read; "
                        r"[\d.]+ s, [\d.]+ images/s", run.stdout.strip())
    rows = list(csv.DictReader((tmp_path / "val.csv").open()))
    paths = [r["path"] for r in rows]
    assert paths == sorted(str(p) for p in data["val"].rglob("*.jpg"))
    loaded = load(model)
    np.testing.assert_array_equal([r["label"] for r in rows], loaded.predict(paths))
    np.testing.assert_allclose([[float(r["ants"]), float(r["bees"])] for r in rows],
                               loaded.predict_proba(paths), atol=1e-5)

    report = tmp_path / "report"
    run = cli("evaluate", model, data["val"], "--report", report)
    assert run.returncode == 0, run.stderr[-3000:]
    truth = [Path(p).parent.name for p in paths]
    accuracy = np.mean([r["label"] == t for r, t in zip(rows, truth, strict=True)])
    assert run.stdout.strip() == (
        f"{report}: accuracy {accuracy:.3f} on 16 images of 2 classes; report.txt, "
        "report.json, confusion_matrix.png, top_losses.png")
    assert accuracy >= 0.75  # real codes on real photos, not chance
    summary = json.loads((report / "report.json").read_text())
    assert summary["accuracy"] == pytest.approx(accuracy) and summary["n_images"] == 16
    assert summary["classification_report"]["bees"]["support"] == 8
    assert np.sum(summary["confusion_matrix"]) == 16
    assert len(summary["top_losses"]) == 16
    assert {row["path"] for row in summary["top_losses"]} == set(paths)
    losses = [row["loss"] for row in summary["top_losses"]]
    assert losses == sorted(losses, reverse=True)
    errors = sum(r["label"] != t for r, t in zip(rows, truth, strict=True))
    assert sum(pair["count"] for pair in summary["most_confused"]) == errors
    assert "accuracy: " in (report / "report.txt").read_text()
    for png in ("confusion_matrix.png", "top_losses.png"):
        with Image.open(report / png) as im:
            assert im.format == "PNG" and min(im.size) > 200

    skip_without("openvino", "export writes an OpenVINO network")
    from sklearn_transfer import load_exported

    run = cli("export", model, "--out", tmp_path / "exported")
    assert run.returncode == 0, run.stderr[-3000:]
    assert re.fullmatch(rf"{tmp_path / 'exported'}: Pipeline as one OpenVINO network, 2 "
                        r"classes, [\d.]+ MB \(model.bin SHA-256 [0-9a-f]{12}…\)",
                        run.stdout.strip())
    exported = load_exported(tmp_path / "exported")  # at the model's precision, bfloat16 here
    np.testing.assert_allclose(exported.predict_proba(paths), loaded.predict_proba(paths),
                               atol=0.02)
