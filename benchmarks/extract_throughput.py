"""extract_codes in this process vs on a LocalCluster vs plain transform, in one run.

    python benchmarks/extract_throughput.py                 # 320 cats-and-dogs val JPEGs
    python benchmarks/extract_throughput.py -n 640 --partition-size 160
    python benchmarks/extract_throughput.py --images cifar10_subset/train -n 10000 \
        --partition-size 1000 --repeats 1 --clusters 1x1,2x1 --memory-sizes 1000,10000

Every variant runs the default ``CNNFeatureTransformer()`` (fitted once, the
same computation) on the same JPEGs, writing a fresh dataset each time:

* ``transform``: one ``transform(paths)`` call, nothing written;
* ``local``: ``extract_codes(client=None)``;
* ``dask AxB``: ``extract_codes(client=...)`` on a ``LocalCluster`` of A
  worker processes with B threads each; its start-up and a first (cold)
  run on one partition, where the workers build the network and compile the
  engine, are printed apart.

The variants then run in ``--repeats`` interleaved rounds and the best run
of each counts, as the machine may be shared. With ``--memory-sizes``, a
new cluster of each shape (fresh worker processes) then does one run per size,
and the peak resident memory of each worker process (``ru_maxrss``) is
printed: flat in the number of images means the workers hold a partition at
a time, not the job.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import resource
import tempfile
import time
from pathlib import Path

import torch
from machine import describe

from sklearn_transfer import CNNFeatureTransformer, extract_codes
from sklearn_transfer.runtime import usable_cores

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SKLEARN_TRANSFER_DATA", ROOT.parent / "shared" / "data"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", default="cats_and_dogs_filtered/val",
                        help="folder of class folders under the data folder "
                        "(default cats_and_dogs_filtered/val)")
    parser.add_argument("-n", type=int, default=320, help="images (default 320)")
    parser.add_argument("--partition-size", type=int, default=80)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clusters", default="1x1,2x1,1x2",
                        help="LocalCluster shapes WORKERSxTHREADS (default 1x1,2x1,1x2)")
    parser.add_argument("--memory-sizes", default="",
                        help="comma-separated image counts for the peak-memory runs "
                        "(default: none)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()

    paths = sorted(str(p) for p in (DATA / args.images).glob("*/*.jpg"))[: args.n]
    if len(paths) < args.n:
        raise SystemExit(f"{DATA / args.images} holds {len(paths)} JPEGs, fewer than -n {args.n}")
    sizes = [int(v) for v in args.memory_sizes.split(",") if v]
    print(describe(), flush=True)
    tf = CNNFeatureTransformer(progress=False).fit()
    tf.transform(paths[:16])  # warm-up: engine compiled, files in the page cache
    print(f"{len(paths)} images, {tf.computation_}, torch threads {torch.get_num_threads()}, "
          f"cores {usable_cores()}")
    tmp = Path(tempfile.mkdtemp())

    def local():
        extract_codes(paths, tempfile.mkdtemp(dir=tmp), tf, partition_size=args.partition_size)

    variants = {"transform": lambda: tf.transform(paths), "local": local}
    with contextlib.ExitStack() as stack:
        for shape in args.clusters.split(","):
            started = time.perf_counter()
            client = stack.enter_context(_cluster(shape, tmp))
            up = time.perf_counter() - started

            def run(client=client, n=None):
                extract_codes(paths[:n], tempfile.mkdtemp(dir=tmp), tf,
                              partition_size=args.partition_size, client=client)

            # cold: the workers import torch, build the network, convert and compile it
            cold = _seconds(lambda run=run: run(n=args.partition_size))
            print(f"LocalCluster {shape}: up in {up:.1f} s, first run on "
                  f"{args.partition_size} images {cold:.1f} s", flush=True)
            variants[f"dask {shape}"] = run
        # rounds interleave the variants, so that the load of a shared machine hits all alike
        seconds: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.repeats):
            for name, fn in variants.items():
                seconds[name].append(_seconds(fn))
                print(f"{name}: {seconds[name][-1]:.1f} s", flush=True)
    peaks: dict[str, dict[int, list[float]]] = {}
    for shape in args.clusters.split(","):
        for n in sizes:
            with _cluster(shape, tmp) as client:
                extract_codes(paths[:n], tempfile.mkdtemp(dir=tmp), tf,
                              partition_size=args.partition_size, client=client)
                rss = client.run(lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
            peaks.setdefault(f"dask {shape}", {})[n] = sorted(v / 1024 for v in rss.values())
            print(f"dask {shape}, {n} images on fresh workers: peak RSS per worker "
                  + ", ".join(f"{v:.0f} MiB" for v in peaks[f"dask {shape}"][n]), flush=True)
    rates = {name: len(paths) / min(times) for name, times in seconds.items()}
    for name, rate in rates.items():
        print(f"{name:>10}: best {min(seconds[name]):5.2f} s  {rate:6.1f} img/s  "
              f"(runs: {', '.join(f'{t:.2f}' for t in seconds[name])} s)")
    print(json.dumps({k: round(v, 1) for k, v in rates.items()}))
    ratios = {k: round(rates["transform"] / v, 2) for k, v in rates.items()}
    print("time relative to transform (1.0 = as fast):", ratios)
    print(f"load average at end {os.getloadavg()[0]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"images": args.images, "n": len(paths), "partition_size": args.partition_size,
             "seconds": seconds, "images_per_s": rates, "time_vs_transform": ratios,
             "peak_rss_mib_per_worker": peaks, "cores": usable_cores()}, indent=1))


@contextlib.contextmanager
def _cluster(shape: str, tmp: Path):
    from distributed import Client, LocalCluster

    workers, threads = (int(v) for v in shape.split("x"))
    with LocalCluster(n_workers=workers, threads_per_worker=threads, processes=True,
                      dashboard_address=":0", silence_logs=logging.ERROR,
                      local_directory=str(tmp)) as cluster, Client(cluster) as client:
        client.wait_for_workers(workers)
        yield client


def _seconds(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


if __name__ == "__main__":
    main()
