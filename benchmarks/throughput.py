"""Images/s of CNN-code extraction, four ways, on the same real JPEGs in one run.

(a) ``CNNFeatureTransformer.transform`` from the JPEG files;
(b) the classic tutorial loop: torchvision ``ImageFolder`` + ``DataLoader`` +
    ``ToTensor``/``Normalize`` + the same network in the default (contiguous)
    layout, float32, under ``torch.no_grad``;
(c) a one-image-at-a-time loop (decode, preprocess, forward a batch of one);
(d) the network alone on already decoded and resized tensors: the ceiling.

Run::

    python benchmarks/throughput.py --data ../shared/data/cats_and_dogs_filtered/val -n 320
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sklearn_transfer import CNNFeatureTransformer, load_image_folder
from sklearn_transfer.computation import CodesExtractor

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
    args = parser.parse_args()
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

    tf = CNNFeatureTransformer(args.backbone, batch_size=args.batch_size, progress=False).fit()
    net = tf.backbone_
    cfg = net.data_config
    print(f"{n} images from {data}; backbone {args.backbone} ({cfg.input_size} px); "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor()}")

    # the same module the transformer runs: channels_last, inference mode
    fast = tf.computation_.extractor(net).to(memory_format=torch.channels_last).eval()

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

    # (d): decode everything first, then time the network alone
    decoded = torch.stack([tutorial_tf(Image.open(p).convert("RGB")) for p in X])
    decoded = decoded.contiguous(memory_format=torch.channels_last)

    def run_d():
        with torch.inference_mode():
            for i in range(0, n, args.batch_size):
                fast(decoded[i: i + args.batch_size])

    # warm-up: one batch each, so first-call allocations are not timed
    with torch.inference_mode():
        fast(decoded[: args.batch_size])
        plain(decoded[: args.batch_size].contiguous())

    runs = {"a_transformer": lambda: tf.transform(X), "b_tutorial_loop": run_b,
            "c_one_at_a_time": run_c, "d_model_only": run_d}
    # interleaved rounds, best of each: a passing load on a noisy machine hits one
    # round of one method, not the comparison
    times = {k: float("inf") for k in runs}
    for _ in range(args.repeat):
        for k, fn in runs.items():
            times[k] = min(times[k], timed(fn))
    shutil.rmtree(tmp)
    rate = {k: n / v for k, v in times.items()}
    for k, v in rate.items():
        print(f"{k:18s} {v:7.1f} images/s  ({times[k]:.1f} s)")
    ratios = {
        "a/d (target >= 0.85)": rate["a_transformer"] / rate["d_model_only"],
        "a/b (target >= 1.5)": rate["a_transformer"] / rate["b_tutorial_loop"],
        "a/c": rate["a_transformer"] / rate["c_one_at_a_time"],
    }
    for k, v in ratios.items():
        print(f"{k:22s} {v:5.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"n": n, "images_per_s": rate,
                                               "ratios": ratios}, indent=2))


def get_plain(name: str):
    """A fresh copy of the backbone in torch's default memory layout."""
    from sklearn_transfer import get_backbone

    return get_backbone(name).eval()


if __name__ == "__main__":
    main()
