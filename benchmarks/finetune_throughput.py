"""Training throughput of FineTunedClassifier vs a hand-written PyTorch loop, in one run.

Both train the same network (the default backbone with a new head and the
default freeze depth), with the same batch size, augmentation (the backbone's
``train_transform``), data pipeline (``ImageDataset`` + ``collate_images``,
channels_last uint8 batches), AdamW with the same two learning-rate groups
and no validation. Epochs alternate between the two so that a change in the
machine's load hits both alike; the first epoch of each is a warm-up.

    python benchmarks/finetune_throughput.py            # 192 images, 5 timed epochs each
    python benchmarks/finetune_throughput.py -n 512 --epochs 3

FineTunedClassifier runs three ways: with its defaults (``precision="auto"``:
bfloat16 on CPUs that have it; ``engine="auto"``: the frozen stages through
OpenVINO), with ``engine="torch"`` at the same precision, and in float32 in
torch, like the loop. Prints images/s per epoch and the ratios float32 torch /
hand-written (target >= 0.95), defaults / engine="torch" (target >= 1.8) and
engine="torch" / float32 (target >= 1.35); then predict_proba images/s of the
defaults (the whole fitted network through the engine) against
engine="torch" (target >= 1.8).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from machine import describe
from torch import nn

from sklearn_transfer import FineTunedClassifier, get_backbone, load_image_folder
from sklearn_transfer.batches import ImageDataset, collate_images
from sklearn_transfer.network import FineTuneModule, resolve_freeze_depth

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SKLEARN_TRANSFER_DATA", ROOT.parent / "shared" / "data"))


def hand_written(X, y, args):
    """The loop one would write by hand: the same work, nothing else."""
    torch.manual_seed(0)
    backbone = get_backbone(args.backbone)
    depth = resolve_freeze_depth(args.freeze_depth, backbone)
    model = FineTuneModule(backbone, 2, depth, head_dropout=0.2)
    model = model.to(memory_format=torch.channels_last)
    pretrained = [p for n, p in model.named_parameters() if p.requires_grad
                  and n.startswith("backbone.")]
    head = list(model.head.parameters())
    optimizer = torch.optim.AdamW([{"params": pretrained, "lr": 1e-4}, {"params": head}],
                                  lr=1e-3)
    config = backbone.data_config
    # the estimator's default augmentation (augment=True)
    dataset = ImageDataset(X, config, targets=y, augment=True)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True,
                                         collate_fn=collate_images)
    loss_fn = nn.CrossEntropyLoss()

    def epoch() -> float:
        start = time.perf_counter()
        model.train()
        for xb, yb in loader:
            optimizer.zero_grad()
            loss = loss_fn(model(xb), yb)
            loss.backward()
            optimizer.step()
        return len(dataset) / (time.perf_counter() - start)

    return epoch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DATA / "cats_and_dogs_filtered" / "train"))
    parser.add_argument("-n", type=int, default=192, help="images (half from each class)")
    parser.add_argument("--epochs", type=int, default=5, help="timed epochs of each")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--freeze-depth", default=FineTunedClassifier().freeze_depth,
                        type=lambda s: s if s == "all" else int(s))
    args = parser.parse_args()

    X, y = load_image_folder(args.data)
    classes = np.unique(y)[:2]
    rng = np.random.RandomState(0)
    take = np.concatenate([rng.choice(np.flatnonzero(y == c), args.n // 2, replace=False)
                           for c in classes])
    X, y = X[take], y[take]
    y_index = (y == classes[1]).astype(np.int64)
    print(describe())
    print(f"{len(X)} images from {args.data}, batch {args.batch_size}, backbone "
          f"{args.backbone}, freeze_depth={args.freeze_depth}")

    def classifier(**params) -> FineTunedClassifier:
        return FineTunedClassifier(args.backbone, freeze_depth=args.freeze_depth,
                                   batch_size=args.batch_size, max_epochs=1, train_split=None,
                                   verbose=0, random_state=0, **params)

    default = classifier()
    native = default._runtime().precision
    nets = {f"defaults ({native})": default, f"engine='torch' ({native})":
            classifier(engine="torch"),
            "float32 torch": classifier(precision="float32", engine="torch")}

    def skorch_epoch(clf: FineTunedClassifier):
        def run() -> float:
            start = time.perf_counter()
            if clf.initialized_:
                clf.partial_fit(X, y)
            else:
                clf.fit(X, y)
            return len(X) / (time.perf_counter() - start)
        return run

    epochs = {f"FineTunedClassifier {k}": skorch_epoch(v) for k, v in nets.items()}
    epochs["hand-written loop (float32)"] = hand_written(X, y_index, args)
    for run in epochs.values():  # warm-up: first-touch allocations, file cache
        run()
    rates = {name: [] for name in epochs}
    for _ in range(args.epochs):
        for name, run in epochs.items():
            rates[name].append(run())
    width = max(map(len, rates)) + 2
    print(f"{'':{width}}" + "".join(f"epoch {i + 1:<4}" for i in range(args.epochs))
          + "  median img/s")
    for name, values in rates.items():
        print(f"{name:{width}}" + "".join(f"{v:<10.2f}" for v in values)
              + f"  {statistics.median(values):.2f}")
    # total images over total time: steadier than a median of few epochs on a busy machine
    overall = {k: len(v) / sum(1 / r for r in v) for k, v in rates.items()}
    names = list(rates)
    for a, b, target in ((names[2], names[3], 0.95), (names[0], names[1], 1.8),
                         (names[1], names[2], 1.35)):
        median = statistics.median(rates[a]) / statistics.median(rates[b])
        print(f"ratio {a} / {b}: median {median:.3f}, overall {overall[a] / overall[b]:.3f} "
              f"(target >= {target})")

    # predictions of the fitted models: images decoded and resized as always, then the
    # whole network (through the engine with the defaults)
    predict = {}
    for name in list(nets)[:2]:
        clf = nets[name]
        clf.predict_proba(X[: args.batch_size])  # warm-up: the conversion, first allocations
        predict[name] = []
        for _ in range(3):
            start = time.perf_counter()
            clf.predict_proba(X)
            predict[name].append(len(X) / (time.perf_counter() - start))
    for name, values in predict.items():
        print(f"predict_proba img/s, FineTunedClassifier {name:28} "
              + " ".join(f"{v:.1f}" for v in values) + f"  median {statistics.median(values):.1f}")
    a, b = (statistics.median(v) for v in predict.values())
    print(f"ratio predict defaults / engine='torch': {a / b:.3f} (target >= 1.8)")
    print(f"load average now {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
