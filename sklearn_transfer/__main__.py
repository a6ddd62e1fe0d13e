"""The command line: ``python -m sklearn_transfer extract SRC --out DIR``.

``extract`` runs :func:`~sklearn_transfer.extract_codes` over a folder (or
a list of paths in a text file), locally or on a Dask scheduler, with a
progress bar, and prints a summary; run the same command again to resume a
stopped job. ``python -m sklearn_transfer extract --help`` lists the options.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from sklearn_transfer.computation import POOLINGS
from sklearn_transfer.engines import ENGINES
from sklearn_transfer.images import ImageLoadError
from sklearn_transfer.runtime import PRECISIONS


def _stage(text: str) -> int | str:
    try:
        return int(text)
    except ValueError:
        return text


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sklearn_transfer",
                                     description="Transfer learning on images.")
    commands = parser.add_subparsers(dest="command", required=True)
    extract = commands.add_parser(
        "extract", help="CNN codes of an image collection, to a resumable Parquet dataset",
        description="Write the CNN codes of every image under SRC to a Parquet dataset in "
                    "--out (see sklearn_transfer.extract_codes). Stopped anywhere, the same "
                    "command resumes: it computes only the partitions not yet written.")
    extract.add_argument("src", metavar="SRC",
                         help="a folder (every image file under it) or a text file with one "
                              "image path per line")
    extract.add_argument("--out", required=True, metavar="DIR", help="the dataset's directory")
    extract.add_argument("--scheduler", metavar="ADDRESS",
                         help="a Dask scheduler (tcp://host:8786) to run the partitions on; "
                              "default: this process")
    extract.add_argument("--class-folders", action="store_true",
                         help="SRC/CLASS/*: store each image's folder name as its label")
    extract.add_argument("--backbone", default="efficientnet_lite0")
    extract.add_argument("--weights", default="pretrained",
                         help="'pretrained', 'none' (random) or a weights file")
    extract.add_argument("--stage", nargs="+", type=_stage, default=[-1],
                         help="stage indices or names (several: concatenated); default -1")
    extract.add_argument("--pooling", default="avg", choices=POOLINGS)
    extract.add_argument("--engine", default="auto", choices=ENGINES)
    extract.add_argument("--precision", default="auto", choices=PRECISIONS)
    extract.add_argument("--device", default="auto")
    extract.add_argument("--batch-size", type=int, default=16)
    extract.add_argument("--partition-size", type=int, default=1000)
    extract.add_argument("--on-error", default="skip", choices=["skip", "raise"],
                         help="an unreadable image: recorded in the failures and skipped "
                              "(default), or the end of the job")
    extract.add_argument("--memory", metavar="DIR",
                         help="a FeatureCache directory (codes and converted networks reused "
                              "across runs)")
    return parser


def _images(src: str, class_folders: bool) -> tuple[object, object]:
    from sklearn_transfer import load_image_folder

    path = Path(src)
    if class_folders:
        return load_image_folder(path)
    if path.is_file():
        lines = [line.strip() for line in path.read_text().splitlines()]
        return [line for line in lines if line], None
    return src, None


def extract(args: argparse.Namespace) -> int:
    """Run the ``extract`` command; returns the exit status."""
    from sklearn_transfer import CNNFeatureTransformer, extract_codes

    weights = None if args.weights.lower() == "none" else args.weights
    transformer = CNNFeatureTransformer(
        args.backbone, weights=weights,
        stage=args.stage if len(args.stage) > 1 else args.stage[0],
        pooling=args.pooling, engine=args.engine, precision=args.precision,
        device=args.device, batch_size=args.batch_size, memory=args.memory, progress=False)
    images, labels = _images(args.src, args.class_folders)
    client = None
    if args.scheduler:
        from distributed import Client

        client = Client(args.scheduler)
    try:
        summary = extract_codes(images, args.out, transformer, labels=labels, client=client,
                                partition_size=args.partition_size, on_error=args.on_error,
                                progress=True)
    finally:
        if client is not None:
            client.close()
    done = summary.n_images_computed
    rate = f"{done / summary.seconds:.1f} images/s" if done else "nothing left to compute"
    print(f"{summary.out}: {summary.n_images} images in {summary.n_partitions} partitions; "
          f"this run computed {done} images ({summary.n_computed} partitions) in "
          f"{summary.seconds:.1f} s, {rate}; {summary.n_failed} images could not be read"
          + (" (read_codes(out).failures lists them)" if summary.n_failed else ""))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m sklearn_transfer``."""
    args = _parser().parse_args(argv)
    try:
        return extract(args)
    except (ImageLoadError, ValueError, ImportError, OSError) as exc:
        # the library's errors name the offending item: they are the message, not a traceback
        print(f"python -m sklearn_transfer {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
