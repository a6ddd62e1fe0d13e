"""The benchmark suite runs end to end on tiny made-up folders (so CI catches a broken one)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from benchmarks.suite import (
    LATEST,
    REPO,
    RESULTS,
    STRATEGIES,
    Dataset,
    default_out,
    find_datasets,
    output_folder,
    run,
)

from .conftest import colour_images


def make_folders(root, name="toy"):
    for split, n in (("train", 16), ("val", 8)):
        for i, arr in enumerate(colour_images(n, size=48, seed=len(split))):
            folder = root / name / split / ("red" if i % 2 == 0 else "green")
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(folder / f"{i}.jpg")


def test_suite_runs_every_strategy_and_writes_json_table_and_plots(tmp_path):
    make_folders(tmp_path / "data")
    out = tmp_path / "results"
    table = run(["--data", str(tmp_path / "data"), "--quick", "--out", str(out)],
                progress=lambda s: None)
    saved = json.loads((out / "results.json").read_text())
    got = [(r["dataset"], r["strategy"]) for r in saved["results"]]
    assert got == [("toy", s) for s in STRATEGIES]
    for r in saved["results"]:
        assert 0.0 <= r["accuracy"] <= 1.0 and r["n_train"] == 16 and r["n_val"] == 8
    # the linear heads on CNN codes separate two colours perfectly
    codes = [r for r in saved["results"] if r["strategy"].startswith("codes_")]
    assert all(r["accuracy"] == 1.0 for r in codes)
    assert "| toy (n=16/8) | codes_logreg |" in table
    assert (out / "results.md").read_text() == table
    assert (out / "accuracy.png").stat().st_size > 0
    assert (out / "learning_curves.png").stat().st_size > 0
    # the plots are redrawn from results.json alone, as README's committed ones were
    for png in ("accuracy.png", "learning_curves.png"):
        (out / png).unlink()
    subprocess.run([sys.executable, "-m", "benchmarks", "plot", str(out)], cwd=REPO, check=True)
    assert (out / "accuracy.png").stat().st_size > 0
    assert (out / "learning_curves.png").stat().st_size > 0


def test_without_a_data_folder_the_suite_uses_scikit_learns_digits(tmp_path):
    (d,) = find_datasets(tmp_path / "absent", quick=True, names=None)
    assert d.name == "sklearn_digits" and d.X_train.dtype == np.uint8
    assert len(np.unique(d.y_train)) == 10 and len(d.y_train) == 80


def test_large_sets_are_scored_on_a_stated_stratified_val_subset():
    from benchmarks.suite import cap_val, plan_for

    y = np.repeat(np.arange(10), 1000)
    big = Dataset("big", np.arange(12000), np.arange(12000) % 10, np.arange(10000), y)
    plan = plan_for(big, quick=False)
    capped = cap_val(big, plan.max_val)
    assert plan.max_val == 2000 and plan.freeze_grid is None
    assert len(capped.y_val) == 2000 and np.bincount(capped.y_val).tolist() == [200] * 10
    assert "2000 of the 10000 val images" in capped.note
    small = Dataset("small", np.arange(200), np.arange(200) % 2, np.arange(100), y[:100])
    assert cap_val(small, plan_for(small, quick=False).max_val) is small


def test_only_the_full_run_writes_the_report_readme_quotes():
    digits, toy = (Dataset(name, *[np.arange(4)] * 4) for name in ("sklearn_digits", "toy"))
    assert default_out([toy], quick=False, subset=False) == RESULTS
    assert default_out([toy], quick=False, subset=True) == RESULTS / "partial"
    assert default_out([digits], quick=False, subset=False) == LATEST
    assert default_out([toy], quick=True, subset=False) == RESULTS / "quick"


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)


def _in_a_git_checkout() -> bool:
    return shutil.which("git") is not None and _git("rev-parse", "--git-dir").returncode == 0


@pytest.mark.skipif(not _in_a_git_checkout(), reason="not a git checkout (or no git)")
@pytest.mark.parametrize(("argv", "expected"), [
    ([], LATEST),                                            # README's main job, as typed
    (["--quick"], RESULTS / "quick"),
    (["--data", "DATA", "--datasets", "toy"], RESULTS / "partial"),
    (["--data", "DATA", "--strategies", "codes_logreg"], RESULTS / "partial"),
    (["--data", "DATA", "--quick"], RESULTS / "quick"),
], ids=["main job", "quick", "dataset subset", "strategy subset", "quick with data"])
def test_the_main_job_and_smoke_runs_write_where_git_status_stays_clean(argv, expected,
                                                                        tmp_path):
    make_folders(tmp_path / "data")
    out = output_folder([str(tmp_path / "data") if a == "DATA" else a for a in argv])
    assert out == expected
    rel = out.relative_to(REPO).as_posix()
    # the folder and every file the run writes there are git-ignored ...
    for path in (f"{rel}/", f"{rel}/results.json", f"{rel}/results.md", f"{rel}/accuracy.png",
                 f"{rel}/learning_curves.png", f"{rel}/cache/sklearn_transfer_codes.sqlite3"):
        assert _git("check-ignore", "-q", path).returncode == 0, f"{path} is not git-ignored"
    # ... and it holds no committed file the run could overwrite
    assert _git("ls-files", "--", rel).stdout == ""


@pytest.mark.skipif(not _in_a_git_checkout(), reason="not a git checkout (or no git)")
def test_the_committed_digits_report_is_written_only_when_asked(tmp_path):
    committed = RESULTS / "digits"
    assert _git("ls-files", "--", "benchmarks/results/digits").stdout  # README links it
    assert output_folder([]) != committed
    assert output_folder(["--out", str(committed)]) == committed
    assert output_folder(["--out", str(tmp_path)]) == tmp_path


def test_a_misspelt_dataset_name_is_an_error_naming_what_exists(tmp_path):
    make_folders(tmp_path / "data")
    with pytest.raises(ValueError, match=r"\['tyo'\] not found .*available: \['toy'\]"):
        find_datasets(tmp_path / "data", quick=True, names=["tyo"])
