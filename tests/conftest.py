"""Shared fixtures: tiny made-up images, a tiny backbone, the real datasets."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from sklearn_transfer import Backbone, DataConfig

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("SKLEARN_TRANSFER_DATA", REPO.parent / "shared" / "data"))


def real_dataset(name: str) -> Path:
    """Path of a dataset in ../shared/data, or skip the test saying why."""
    path = DATA_DIR / name
    if not path.is_dir():
        pytest.skip(
            f"real dataset {name!r} not found at {path}: set SKLEARN_TRANSFER_DATA to the "
            "folder holding it (the project's ../shared/data)"
        )
    return path


def skip_without(module: str, reason: str) -> None:
    """Skip unless ``module`` is installed, without importing it: OpenVINO and NNCF imported
    here (outside the library's telemetry-free import) would send usage events from every
    later conversion of the test session."""
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed: {reason}", allow_module_level=True)


def make_tiny_backbone(seed: int = 0) -> Backbone:
    """A 3-stage network that runs in microseconds, with BatchNorm like real ones."""
    torch.manual_seed(seed)
    stages = [
        ("stem", nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8),
                               nn.ReLU())),
        ("block", nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16))),
        ("head", nn.Sequential(nn.Conv2d(16, 24, 1), nn.ReLU())),
    ]
    return Backbone(stages, DataConfig(input_size=32, crop_pct=1.0), name="tiny",
                    weights_id=f"tiny-seed{seed}")


@contextlib.contextmanager
def local_cluster(directory: Path):
    """A real 2-process LocalCluster (2 single-threaded workers) and its client."""
    distributed = pytest.importorskip("distributed")
    import logging

    import sklearn_transfer

    # the workers must import this checkout, not another installed copy; the scheduler's
    # HTTP server on any free port (its default 8787 is taken by a second cluster)
    with distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
            silence_logs=logging.ERROR, env={"PYTHONPATH": str(REPO)},
            local_directory=str(directory)) as cluster, distributed.Client(cluster) as client:
        here = os.path.dirname(sklearn_transfer.__file__)
        assert set(client.run(lambda: os.path.dirname(sklearn_transfer.__file__)).values()) \
            == {here}
        yield client


@pytest.fixture(scope="session")
def dask_client(tmp_path_factory):
    """A cluster shared by the tests that only need one (see :func:`local_cluster`)."""
    with local_cluster(tmp_path_factory.mktemp("dask")) as client:
        yield client


@pytest.fixture
def one_torch_thread(request):
    """One intra-op torch thread: tiny networks run faster on it (far faster on a busy
    machine), with the reduction order of subprocesses and Dask workers, so that results
    compare bit for bit. Tests marked ``data`` (real networks) keep every thread."""
    if request.node.get_closest_marker("data"):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_backbone() -> Backbone:
    return make_tiny_backbone()


def run_python(code: str) -> dict:
    """Run ``code`` in a fresh interpreter from the repository; its last line of output is JSON."""
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def colour_images(n: int, size: int = 40, seed: int = 0) -> np.ndarray:
    """``n`` uint8 RGB images: two classes told apart by their dominant colour."""
    rng = np.random.RandomState(seed)
    imgs = rng.randint(0, 90, (n, size, size, 3)).astype(np.uint8)
    for i in range(n):
        imgs[i, ..., i % 2] += 150
    return imgs


@pytest.fixture
def image_files(tmp_path: Path) -> list[Path]:
    """Eight small JPEG/PNG files on disk."""
    paths = []
    for i, arr in enumerate(colour_images(8)):
        path = tmp_path / f"img{i}.{'jpg' if i % 2 else 'png'}"
        Image.fromarray(arr).save(path)
        paths.append(path)
    return paths


# ---------------------------------------------------------------- damaged image files


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """The ``(type, body)`` chunks of PNG ``data``."""
    chunks, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        chunks.append((data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]))
        pos += 12 + length
    return chunks


def png_from_chunks(chunks: list[tuple[bytes, bytes]]) -> bytes:
    """A PNG of these chunks, with valid CRCs (so only the damage we made is there)."""
    out = b"\x89PNG\r\n\x1a\n"
    for kind, body in chunks:
        crc = struct.pack(">I", zlib.crc32(kind + body))
        out += struct.pack(">I", len(body)) + kind + body + crc
    return out


def png_with_rows_cut(data: bytes, keep: float = 0.5) -> bytes:
    """PNG ``data`` whose image data holds only the first ``keep`` of its rows, as a complete
    zlib stream followed by IEND: structurally a whole file."""
    chunks = png_chunks(data)
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    idat = (b"IDAT", zlib.compress(raw[:int(len(raw) * keep)]))
    return png_from_chunks([c for c in chunks if c[0] not in (b"IDAT", b"IEND")]
                           + [idat, (b"IEND", b"")])


def jpeg_cut_with_end_marker(data: bytes) -> bytes:
    """JPEG ``data`` cut halfway through its entropy-coded data, then closed with EOI."""
    return data[: len(data) // 2] + b"\xff\xd9"


def noise_image(size: tuple[int, int] = (64, 48), seed: int = 0) -> Image.Image:
    """An RGB image of noise (large JPEG/PNG data, so that a cut lands inside the pixels)."""
    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (size[1], size[0], 3),
                                                               np.uint8))
