"""Images/s of CNN-code extraction, several ways, on the same real JPEGs in one run.

* ``CNNFeatureTransformer.transform`` from the JPEG files, with the defaults
  (``engine="auto"``, ``precision="auto"``) and on the exact torch path
  (``engine="torch", precision="float32"``);
* the classic tutorial loop: torchvision ``ImageFolder`` + ``DataLoader`` +
  the same network in the default (contiguous) layout, float32, under
  ``torch.no_grad``;
* a one-image-at-a-time loop (decode, preprocess, forward a batch of one);
* the network alone on already decoded and resized tensors, in every
  installed engine and native precision: the ceilings.

Run::

    python benchmarks/throughput.py --data ../shared/data/cats_and_dogs_filtered/val -n 320
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from machine import describe
from PIL import Image

from sklearn_transfer import CNNFeatureTransformer, load_image_folder
from sklearn_transfer.batches import ImageDataset
from sklearn_transfer.computation import CodesExtractor
from sklearn_transfer.engines import available_engines, engine_for
from sklearn_transfer.runtime import native_precision

ROOT = Path(__file__).resolve().parents[1]


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data",
                        default=str(ROOT.parent / "shared/data/cats_and_dogs_filtered/val"))
    parser.add_argument("-n", type=int, default=320, help="images (taken evenly from classes)")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--batch-size", type=int, default=16, help="the transformer default")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers for (b)")
    parser.add_argument("--repeat", type=int, default=2, help="interleaved rounds (best kept)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument("--int8", action="store_true",
                        help="also precision='int8', calibrated on the same images (needs NNCF)")
    args = parser.parse_args()
    machine = describe()  # the load as the run starts
    data = Path(args.data)
    if not data.is_dir():
        sys.exit(f"no image folder at {data}: pass --data ROOT/CLASS/*.jpg")

    X, y = load_image_folder(data)
    take = np.concatenate([np.flatnonzero(y == c)[: args.n // len(set(y))] for c in sorted(set(y))])
    X = X[take]
    n = len(X)
    # (b) needs an ImageFolder tree holding exactly these files: link them
    tmp = Path(tempfile.mkdtemp())
    for path, label in zip(X, y[take], strict=True):
        (tmp / label).mkdir(exist_ok=True)
        (tmp / label / Path(path).name).symlink_to(Path(path).resolve())

    def transformer(**params) -> CNNFeatureTransformer:
        return CNNFeatureTransformer(args.backbone, batch_size=args.batch_size, progress=False,
                                     **params).fit()

    t0 = time.perf_counter()
    tf = transformer()  # the defaults: engine="auto", precision="auto"
    first_fit = time.perf_counter() - t0
    eager = transformer(engine="torch", precision="float32")  # the exact torch path
    int8 = None
    if args.int8:  # calibrated on these images, as a user would
        int8 = CNNFeatureTransformer(args.backbone, batch_size=args.batch_size, progress=False,
                                     precision="int8").fit(X)
    net = tf.backbone_
    cfg = net.data_config
    default = f"{tf.computation_.engine} {tf.computation_.precision}"
    print(f"{n} images from {data}; backbone {args.backbone} ({cfg.input_size} px); "
          f"{machine}")
    print(f"defaults resolved to engine={tf.computation_.engine!r}, "
          f"precision={tf.computation_.precision!r}; first fit (conversion included) "
          f"{first_fit:.1f} s")

    # (b) tutorial: plain module (contiguous layout), float normalisation in ToTensor/Normalize
    from torchvision import datasets
    from torchvision import transforms as T

    plain = CodesExtractor(get_plain(args.backbone), [-1 % net.num_stages], "avg", True).eval()
    tutorial_tf = T.Compose([
        T.Resize(cfg.resize_size, interpolation=T.InterpolationMode(cfg.interpolation)),
        T.CenterCrop(cfg.input_size),
        T.PILToTensor(),  # uint8: `plain` normalises inside, like every Backbone
    ])
    folder = datasets.ImageFolder(tmp, transform=tutorial_tf)
    loader = torch.utils.data.DataLoader(folder, batch_size=args.batch_size,
                                         num_workers=args.workers)

    def run_b():
        with torch.no_grad():
            for xb, _ in loader:
                plain(xb)

    def run_c():
        with torch.no_grad():
            for path in X:
                with Image.open(path) as im:
                    x = tutorial_tf(im.convert("RGB"))
                plain(x[None])

    # the network alone, each engine and precision, on images decoded beforehand: the ceilings
    decoded = torch.stack([tutorial_tf(Image.open(p).convert("RGB")) for p in X])
    decoded = decoded.contiguous(memory_format=torch.channels_last)
    precisions = ["float32"] + (["bfloat16"] if native_precision(torch.device("cpu"))
                                == "bfloat16" else [])
    alone = {}
    for engine in available_engines():
        for precision in precisions:
            computation = dataclasses.replace(tf.computation_, engine=engine, precision=precision)
            alone[f"{engine} {precision}"] = engine_for(computation, "cpu", copy.deepcopy(net))

    def network_alone(engine):
        def run():  # as the transformer runs it: engine.map over the batches
            batches = ((decoded[i: i + args.batch_size], i) for i in range(0, n, args.batch_size))
            for _ in engine.map(batches):
                pass
        return run

    for engine in alone.values():  # warm-up: first-call allocations are not timed
        engine(decoded[: args.batch_size])
    with torch.inference_mode():
        plain(decoded[: args.batch_size].contiguous())

    dataset = ImageDataset(X, cfg)

    def decoding_alone():  # reading, decoding and resizing as the pipeline does, one core
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for i in range(n):
                dataset[i]
        finally:
            torch.set_num_threads(threads)

    runs = {"transform (defaults)": lambda: tf.transform(X),
            "transform (torch float32)": lambda: eager.transform(X),
            "tutorial loop": run_b, "one at a time": run_c,
            "decoding alone (one thread)": decoding_alone}
    if int8 is not None:
        runs["transform (int8)"] = lambda: int8.transform(X)
        alone["openvino int8"] = engine_for(int8.computation_, "cpu")  # quantized at fit
    runs.update({f"network alone, {k}": network_alone(e) for k, e in alone.items()})
    # interleaved rounds, best of each: a passing load on a noisy machine hits one
    # round of one method, not the comparison
    times = {k: float("inf") for k in runs}
    for _ in range(args.repeat):
        for k, fn in runs.items():
            times[k] = min(times[k], timed(fn))
    shutil.rmtree(tmp)
    rate = {k: n / v for k, v in times.items()}
    for k, v in rate.items():
        print(f"{k:34s} {v:7.1f} images/s  ({times[k]:.1f} s)")
    a = rate["transform (defaults)"]
    ratios = {
        f"defaults / network alone ({default}) (target >= 0.8)":
            a / rate[f"network alone, {default}"],
        "defaults / torch float32 transform (target >= 2.0)": a / rate["transform (torch float32)"],
        "defaults / tutorial loop": a / rate["tutorial loop"],
        "torch float32 transform / its network alone":
            rate["transform (torch float32)"] / rate["network alone, torch float32"],
    }
    if int8 is not None:
        ratios["int8 transform / defaults (target >= 1.3)"] = rate["transform (int8)"] / a
        ratios["int8 network alone / defaults' network alone"] = (
            rate["network alone, openvino int8"] / rate[f"network alone, {default}"])
    for k, v in ratios.items():
        print(f"{k:58s} {v:5.2f}")
    if args.json:
        figures = {"n": n, "defaults": default, "first_fit_s": first_fit, "images_per_s": rate,
                   "ratios": ratios, "machine": machine, "load": os.getloadavg()[0]}
        Path(args.json).write_text(json.dumps(figures, indent=2))
        Path(args.json).with_suffix(".md").write_text(markdown(figures, sys.argv[1:]))


#: what each measured way is, for the Markdown table
WAYS = {
    "transform (defaults)": "`CNNFeatureTransformer().transform` from the files (defaults: {})",
    "transform (torch float32)":
        '`CNNFeatureTransformer(engine="torch", precision="float32").transform`',
    "transform (int8)": '`CNNFeatureTransformer(precision="int8").transform`',
    "tutorial loop": "tutorial loop: `ImageFolder` + `DataLoader` + the network in float32",
    "one at a time": "one image at a time",
    "decoding alone (one thread)": "decoding alone: reading, decoding and resizing, one thread",
}


def markdown(figures: dict, argv: list[str]) -> str:
    """The table of ``figures`` (as written to the JSON file), with the command that made it."""
    command = shlex.join(["python", "benchmarks/throughput.py", *argv])
    lines = [f"Command: `{command}`  ", f"Machine: {figures['machine']}", "",
             "| way | images/s |", "|---|---|"]
    for way, rate in figures["images_per_s"].items():
        name = WAYS.get(way, way).format(figures["defaults"])
        lines.append(f"| {name} | {'**' if way == 'transform (defaults)' else ''}{rate:.1f}"
                     f"{'**' if way == 'transform (defaults)' else ''} |")
    lines += ["", "| ratio | |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in figures["ratios"].items()]
    lines += ["", f"{figures['n']} real JPEGs, best of the interleaved rounds; load average at "
                  f"the end {figures.get('load', float('nan')):.1f}.", ""]
    return "\n".join(lines)


def get_plain(name: str):
    """A fresh copy of the backbone in torch's default memory layout."""
    from sklearn_transfer import get_backbone

    return get_backbone(name).eval()


if __name__ == "__main__":
    main()
