"""extract_codes in this process vs on a LocalCluster vs plain transform, in one run.

    python benchmarks/extract_throughput.py                 # 320 cats-and-dogs val JPEGs
    python benchmarks/extract_throughput.py -n 640 --partition-size 160

Every variant runs the default ``CNNFeatureTransformer()`` (fitted once, the
same computation) on the same JPEGs, writing a fresh dataset each time:

* ``transform``: one ``transform(paths)`` call, nothing written;
* ``local``: ``extract_codes(client=None)``;
* ``dask AxB``: ``extract_codes(client=...)`` on a ``LocalCluster`` of A
  worker processes with B threads each; its start-up and its first (cold)
  run, where the workers build the network and compile the engine, are
  printed apart.

The variants then run in ``--repeats`` interleaved rounds and the best run
of each counts, as the machine may be shared.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import torch

from sklearn_transfer import CNNFeatureTransformer, extract_codes

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SKLEARN_TRANSFER_DATA", ROOT.parent / "shared" / "data"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=320, help="images (default 320)")
    parser.add_argument("--partition-size", type=int, default=80)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clusters", default="1x1,2x1,1x2",
                        help="LocalCluster shapes WORKERSxTHREADS (default 1x1,2x1,1x2)")
    args = parser.parse_args()
    from distributed import Client, LocalCluster

    val = DATA / "cats_and_dogs_filtered" / "val"
    paths = sorted(str(p) for p in val.glob("*/*.jpg"))[: args.n]
    tf = CNNFeatureTransformer(progress=False).fit()
    tf.transform(paths[:16])  # warm-up: engine compiled, files in the page cache
    print(f"{len(paths)} images, {tf.computation_}, torch threads {torch.get_num_threads()}, "
          f"cores {len(os.sched_getaffinity(0))}")
    tmp = Path(tempfile.mkdtemp())

    def local():
        extract_codes(paths, tempfile.mkdtemp(dir=tmp), tf, partition_size=args.partition_size)

    variants = {"transform": lambda: tf.transform(paths), "local": local}
    with contextlib.ExitStack() as stack:
        for shape in args.clusters.split(","):
            workers, threads = (int(v) for v in shape.split("x"))
            started = time.perf_counter()
            cluster = stack.enter_context(LocalCluster(
                n_workers=workers, threads_per_worker=threads, processes=True,
                dashboard_address=None, silence_logs=logging.ERROR, local_directory=str(tmp)))
            client = stack.enter_context(Client(cluster))
            client.wait_for_workers(workers)
            up = time.perf_counter() - started

            def run(client=client):
                extract_codes(paths, tempfile.mkdtemp(dir=tmp), tf,
                              partition_size=args.partition_size, client=client)

            # cold: the workers import torch, build the network, convert and compile it
            cold = _seconds(run)
            print(f"LocalCluster {shape}: up in {up:.1f} s, first run {cold:.1f} s "
                  f"({len(paths) / cold:.1f} img/s)", flush=True)
            variants[f"dask {shape}"] = run
        # rounds interleave the variants, so that the load of a shared machine hits all alike
        seconds: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.repeats):
            for name, fn in variants.items():
                seconds[name].append(_seconds(fn))
    rates = {name: len(paths) / min(times) for name, times in seconds.items()}
    for name, rate in rates.items():
        print(f"{name:>10}: best {min(seconds[name]):5.2f} s  {rate:6.1f} img/s  "
              f"(runs: {', '.join(f'{t:.2f}' for t in seconds[name])} s)")
    print(json.dumps({k: round(v, 1) for k, v in rates.items()}))
    print("ratios to transform:", {k: round(v / rates["transform"], 2) for k, v in rates.items()})


def _seconds(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


if __name__ == "__main__":
    main()
