"""StrategySearchCV on the real datasets: which strategy wins where, within a time budget.

For every ``NAME/{train,val}`` dataset under the data folder (and
scikit-learn's digits), ``StrategySearchCV(strategies="auto", cv=3,
time_budget=...)`` cross-validates the strategies on ``train`` only; the
chosen one is refitted on all of ``train`` and scored once on ``val``. To
check that cross-validation chose well, the best setting of every other
strategy that ran is also refitted on ``train`` and scored on ``val`` (that
refit is the benchmark's, not the search's: a user pays only for the chosen
one).
Writes ``results.json``, ``results.md`` (the tables README shows) and one
score-against-cost plot per dataset to ``--out``.

Run::

    python benchmarks/strategy_search.py --out benchmarks/results/strategy
    python benchmarks/strategy_search.py --datasets hymenoptera_data --budget 900
    python benchmarks/strategy_search.py --out benchmarks/results/strategy --replot
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import describe  # noqa: E402
from benchmarks.suite import DIGITS, digits, find_datasets  # noqa: E402


def fmt_params(params: dict) -> str:
    return ", ".join(f"{k.split('__')[-1]}={v}" for k, v in params.items()) or "-"


def plot(cv_results: dict, name: str, n_train: int, budget: float, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sklearn_transfer.strategy import plot_cv_results

    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    plot_cv_results(cv_results, budget, ax=ax)
    ax.set_title(f"{name}: {n_train} train images, budget {budget:.0f} s")
    fig.tight_layout()
    fig.savefig(out / f"{name}.png", dpi=110)
    plt.close(fig)


def replot(out: Path) -> None:
    """Draw the plots of ``out/results.json`` again, with the budget of the command that ran."""
    saved = json.loads((out / "results.json").read_text())
    budget = parser().parse_args(shlex.split(saved["meta"]["command"])[2:]).budget
    for r in saved["results"]:
        columns = {k: [row[k] for row in r["rows"]] for k in (
            "strategy", "status", "mean_test_score", "std_test_score", "rank_test_score",
            "total_seconds", "estimated_seconds")}
        plot(columns, r["dataset"], r["n_train"], budget, out)


def run_one(d, budget: float, out: Path) -> dict:
    from sklearn.base import clone

    from sklearn_transfer import StrategySearchCV
    from sklearn_transfer.strategy import auto_strategies

    with tempfile.TemporaryDirectory(prefix="strategy-bench-") as memory:
        t0 = time.perf_counter()
        # the same cache for the search and the per-strategy refits below
        search = StrategySearchCV(cv=3, time_budget=budget, memory=memory, random_state=0,
                                  verbose=1)
        # one BLAS thread for the heads (two made LogisticRegression on codes far slower here)
        with threadpool_limits(limits=1, user_api="blas"):
            search.fit(d.X_train, d.y_train)
            total = time.perf_counter() - t0
            val = float(search.score(d.X_val, d.y_val))
            res = search.cv_results_
            strategies = auto_strategies(memory=memory, random_state=0)
            val_of = {search.best_strategy_: val}
            for name in dict.fromkeys(res["strategy"]):
                done = np.flatnonzero((res["strategy"] == name) & (res["status"] == "done"))
                if name in val_of or len(done) == 0:
                    continue
                best = done[np.argmin(res["rank_test_score"][done])]  # the search's own order
                estimator = clone(strategies[name][0]).set_params(**res["params"][best])
                print(f"   refit of {name} for its val accuracy", flush=True)
                val_of[name] = float(estimator.fit(d.X_train, d.y_train).score(d.X_val, d.y_val))
    rows = []
    for i in range(len(res["params"])):
        rows.append({
            "strategy": res["strategy"][i], "params": fmt_params(res["params"][i]),
            "status": res["status"][i],
            "mean_test_score": float(res["mean_test_score"][i]),
            "std_test_score": float(res["std_test_score"][i]),
            "rank_test_score": int(res["rank_test_score"][i]),
            "total_seconds": float(res["total_seconds"][i]),
            "estimated_seconds": float(res["estimated_seconds"][i]),
            "images_per_s": float(res["images_per_s"][i]),
            "val_accuracy_of_strategy": val_of.get(res["strategy"][i]),
        })
    plot(search.cv_results_, d.name, len(d.y_train), budget, out)
    return {"dataset": d.name, "n_train": len(d.y_train), "n_val": len(d.y_val),
            "best_strategy": search.best_strategy_, "best_params": fmt_params(search.best_params_),
            "best_cv_score": search.best_score_, "val_accuracy": val,
            "best_val_of_tried": max(val_of.values()), "codes_val": val_of.get("codes"),
            "search_and_refit_s": total, "refit_s": search.refit_time_, "rows": rows}


def markdown(results: list[dict], meta: dict) -> str:
    lines = [f"command: `{meta['command']}`  ", f"machine: {meta['machine']}  ",
             f"load average at start/end: {meta['load_start']:.2f} / {meta['load_end']:.2f}",
             "", "| dataset | train | chosen | CV accuracy | val accuracy | "
             "best val of the strategies tried | codes val | search + refit s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        codes = "-" if r["codes_val"] is None else f"{r['codes_val']:.3f}"
        lines.append(f"| {r['dataset']} | {r['n_train']} | {r['best_strategy']} "
                     f"({r['best_params']}) | {r['best_cv_score']:.3f} | "
                     f"{r['val_accuracy']:.3f} | {r['best_val_of_tried']:.3f} | {codes} | "
                     f"{r['search_and_refit_s']:.0f} |")
    for r in results:
        lines += ["", f"**{r['dataset']}** (`cv_results_`, best setting per strategy; "
                  "skipped = estimated to break the budget)", "",
                  "| strategy | best setting | CV accuracy | val accuracy (refit) | "
                  "seconds (all its settings) | estimated s | img/s |",
                  "|---|---|---|---|---|---|---|"]
        best, seconds = {}, {}
        for row in r["rows"]:
            s = row["strategy"]
            if s not in best or row["rank_test_score"] < best[s][0]:
                best[s] = (row["rank_test_score"], row)
            if not np.isnan(row["total_seconds"]):
                seconds[s] = seconds.get(s, 0.0) + row["total_seconds"]
        for s, (_, row) in best.items():
            score = ("skipped" if row["status"] == "skipped"
                     else f"{row['mean_test_score']:.3f} ± {row['std_test_score']:.3f}")
            secs = f"{seconds[s]:.0f}" if s in seconds else "-"
            est = "-" if np.isnan(row["estimated_seconds"]) else f"{row['estimated_seconds']:.0f}"
            ips = "-" if np.isnan(row["images_per_s"]) else f"{row['images_per_s']:.0f}"
            vacc = row.get("val_accuracy_of_strategy")
            vacc = "-" if vacc is None else f"{vacc:.3f}"
            lines.append(f"| {s} | {row['params']} | {score} | {vacc} | {secs} | {est} | "
                         f"{ips} |")
    return "\n".join(lines) + "\n"


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="?", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--datasets", nargs="+", help="names under DATA (default: all), "
                        f"or {DIGITS}")
    parser.add_argument("--budget", type=float, default=300.0,
                        help="time_budget of each search, seconds (default 300)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "latest"
                                             / "strategy"))
    parser.add_argument("--replot", action="store_true",
                        help="only draw the plots of OUT/results.json again")
    return parser


def main() -> None:
    args = parser().parse_args()
    out = Path(args.out)
    if args.replot:
        replot(out)
        return
    out.mkdir(parents=True, exist_ok=True)
    names = [n for n in (args.datasets or []) if n != DIGITS]
    datasets = find_datasets(Path(args.data), False, names) if names or not args.datasets \
        else []
    datasets = [d for d in datasets if d.name != DIGITS]
    if not args.datasets or DIGITS in args.datasets:
        datasets.append(digits())

    meta = {"command": "python " + shlex.join([os.path.relpath(__file__), *sys.argv[1:]]),
            "machine": describe(),
            "load_start": os.getloadavg()[0]}
    results = []
    for d in datasets:
        print(f"== {d.name}: {len(d.y_train)} train, {len(d.y_val)} val", flush=True)
        results.append(run_one(d, args.budget, out))
        meta["load_end"] = os.getloadavg()[0]
        (out / "results.json").write_text(json.dumps({"meta": meta, "results": results},
                                                     indent=1, default=str))
        (out / "results.md").write_text(markdown(results, meta))
    print(markdown(results, meta))


if __name__ == "__main__":
    main()
