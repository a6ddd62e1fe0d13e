"""The corpus of bad inputs, through every entry point, with and without worker processes.

Each case either works correctly or raises a clear ``ValueError``/``TypeError``/
``FileNotFoundError`` naming the item and its index, in the caller's process,
within seconds. ``docs/bad_inputs.md`` is the table of this behaviour; keep both in step.
"""

from __future__ import annotations

import os
import signal
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from sklearn_transfer import CNNFeatureTransformer, FineTunedClassifier

from .conftest import (
    jpeg_cut_with_end_marker,
    make_tiny_backbone,
    noise_image,
    png_chunks,
    png_from_chunks,
    png_with_rows_cut,
)

GOOD = 6  # good images put before each bad one, so that the bad one has index GOOD


@dataclass
class Case:
    name: str
    make: Callable[[Path], Any]  # -> the bad item (or the whole X when whole=True)
    expect: Any  # "ok" or (error type, [words the message must contain])
    whole: bool = False  # the case is a whole X rather than one item among good ones


def _file(name: str, data: bytes) -> Callable[[Path], Path]:
    def make(d: Path) -> Path:
        (d / name).write_bytes(data)
        return d / name
    return make


def _saved(name: str, image: Callable[[], Image.Image], **save) -> Callable[[Path], Path]:
    def make(d: Path) -> Path:
        image().save(d / name, **save)
        return d / name
    return make


def _truncated(d: Path) -> Path:
    noise = np.random.RandomState(0).randint(0, 255, (64, 64, 3), np.uint8)
    Image.fromarray(noise).save(d / "whole.jpg", quality=95)
    data = (d / "whole.jpg").read_bytes()
    (d / "truncated.jpg").write_bytes(data[: len(data) // 2])
    return d / "truncated.jpg"


def _damaged(name: str, damage: Callable[[bytes], bytes]) -> Callable[[Path], Path]:
    """A file ``name`` holding a noise image saved in its format, then ``damage``d."""
    def make(d: Path) -> Path:
        whole = d / f"whole{Path(name).suffix}"
        noise_image().save(whole, quality=95)
        (d / name).write_bytes(damage(whole.read_bytes()))
        return d / name
    return make


def _taller_jpeg(data: bytes) -> bytes:  # the SOF0 header claims 3x the rows stored
    i = data.index(b"\xff\xc0") + 5
    return data[:i] + struct.pack(">H", 3 * struct.unpack(">H", data[i:i + 2])[0]) + data[i + 2:]


def _junk_before_end(data: bytes) -> bytes:  # harmless, and common in the wild
    return data[:-2] + b"\0\0" + data[-2:]


def _png_zlib_cut(data: bytes) -> bytes:  # the zlib stream cut halfway, IEND kept
    chunks = [(k, b[: len(b) // 2] if k == b"IDAT" else b) for k, b in png_chunks(data)]
    return png_from_chunks(chunks)


def _taller_png(data: bytes) -> bytes:  # IHDR claims 3x the rows stored
    chunks = png_chunks(data)
    ihdr = chunks[0][1]
    height = struct.pack(">I", 3 * struct.unpack(">I", ihdr[4:8])[0])
    return png_from_chunks([(b"IHDR", ihdr[:4] + height + ihdr[8:])] + chunks[1:])


def _palette_transparent() -> Image.Image:
    im = Image.new("P", (20, 20), 0)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    im.info["transparency"] = 0
    return im


def _animated(d: Path) -> Path:
    frames = [Image.new("P", (20, 20), i) for i in range(3)]
    frames[0].save(d / "anim.gif", save_all=True, append_images=frames[1:])
    return d / "anim.gif"


def _exif_rotated(d: Path) -> Path:
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (30, 20), (0, 200, 0)).save(d / "rotated.jpg", exif=exif)
    return d / "rotated.jpg"


def _fifo(d: Path) -> Path:
    os.mkfifo(d / "pipe.jpg")  # opening it for reading blocks until someone writes
    return d / "pipe.jpg"


def _bomb(d: Path) -> Path:
    Image.new("L", (400, 400)).save(d / "bomb.png")
    return d / "bomb.png"


OK = "ok"
CASES = [
    Case("missing path", lambda d: d / "nowhere.jpg", (FileNotFoundError, ["nowhere.jpg",
                                                                          "index 6"])),
    Case("directory", lambda d: d, (ValueError, ["index 6", "directory"])),
    Case("zero-byte file", _file("zero.jpg", b""), (ValueError, ["zero.jpg", "index 6",
                                                                  "empty"])),
    Case("truncated JPEG", _truncated, (ValueError, ["truncated.jpg", "index 6", "truncated"])),
    Case("JPEG cut and closed with an end marker",
         _damaged("closed.jpg", jpeg_cut_with_end_marker),
         (ValueError, ["closed.jpg", "index 6", "premature end of data segment", "truncated"])),
    Case("JPEG header claiming more rows than stored", _damaged("tall.jpg", _taller_jpeg),
         (ValueError, ["tall.jpg", "index 6", "truncated"])),
    Case("JPEG with junk before its end marker", _damaged("junk.jpg", _junk_before_end), OK),
    Case("PNG whose rows stop early", _damaged("rows.png", png_with_rows_cut),
         (ValueError, ["rows.png", "index 6", "before the last row"])),
    Case("PNG whose zlib stream is cut", _damaged("zcut.png", _png_zlib_cut),
         (ValueError, ["zcut.png", "index 6", "truncated"])),
    Case("PNG header claiming more rows than stored", _damaged("tall.png", _taller_png),
         (ValueError, ["tall.png", "index 6", "before the last row"])),
    Case("text file named .jpg", _file("text.jpg", b"just some text\n"),
         (ValueError, ["text.jpg", "index 6", "not an image"])),
    Case("PNG with alpha", _saved("alpha.png", lambda: Image.new("RGBA", (20, 20),
                                                                   (255, 0, 0, 100))), OK),
    Case("palette PNG with transparency", _saved("pal.png", _palette_transparent,
                                                 transparency=0), OK),
    Case("CMYK JPEG", _saved("cmyk.jpg", lambda: Image.new("CMYK", (20, 20),
                                                           (0, 255, 255, 0))), OK),
    Case("16-bit grayscale PNG", _saved("g16.png", lambda: Image.fromarray(
        np.full((20, 20), 50000, np.uint16))), OK),
    Case("1x1 image", _saved("one.png", lambda: Image.new("RGB", (1, 1), (9, 9, 9))), OK),
    Case("decompression bomb", _bomb, (ValueError, ["bomb.png", "index 6", "too large"])),
    Case("animated GIF", _animated, OK),
    Case("EXIF rotation", _exif_rotated, OK),
    Case("float array with NaN", lambda d: np.full((20, 20, 3), np.nan),
         (ValueError, ["index 6", "NaN"])),
    Case("float values outside [0, 1]", lambda d: np.full((20, 20, 3), 3.0),
         (ValueError, ["index 6", "[0, 1]"])),
    Case("uint8 array of the wrong rank", lambda d: np.zeros((2, 20, 20, 3), np.uint8),
         (ValueError, ["index 6", "shape"])),
    Case("channels-first numpy batch", lambda d: np.zeros((8, 3, 20, 20), np.uint8),
         (ValueError, ["channels-first", "transpose(0, 2, 3, 1)"]), whole=True),
    Case("empty input", lambda d: [], (ValueError, ["no images"]), whole=True),
    Case("mixed paths and arrays", lambda d: np.zeros((20, 20, 3), np.uint8), OK),
    Case("non-string, non-path object", lambda d: {"not": "an image"},
         (TypeError, ["index 6", "dict"])),
    Case("named pipe (FIFO)", _fifo, (ValueError, ["pipe.jpg", "index 6", "named pipe"])),
    Case("device file", lambda d: Path("/dev/zero"), (ValueError, ["/dev/zero", "index 6",
                                                                  "device"])),
]


def good_items(d: Path) -> list:
    items = []
    for i in range(GOOD):
        arr = np.full((24, 24, 3), 40, np.uint8)
        arr[..., i % 2] = 220
        Image.fromarray(arr).save(d / f"good{i}.png")
        items.append(d / f"good{i}.png")
    return items


def build_X(case: Case, d: Path) -> Any:
    bad = case.make(d)
    if case.whole:
        return bad
    return good_items(d) + [bad, good_items(d)[0]]


def labels(n: int) -> np.ndarray:
    return np.array(["ant", "bee"] * (n // 2 + 1))[:n]


def tiny_classifier(workers: int) -> FineTunedClassifier:
    return FineTunedClassifier(make_tiny_backbone(), freeze_depth=1, max_epochs=1,
                               batch_size=4, train_split=None, random_state=0, verbose=0,
                               iterator_train__num_workers=workers,
                               iterator_valid__num_workers=workers)


def check(case: Case, fn: Callable[[], Any], n_out: int | None) -> None:
    # a hang is a failure too: give every case a few seconds at most
    signal.signal(signal.SIGALRM, lambda *a: (_ for _ in ()).throw(TimeoutError(case.name)))
    signal.alarm(60)
    try:
        if case.expect == OK:
            out = fn()
            if n_out is not None:
                assert len(out) == n_out
                if isinstance(out, np.ndarray) and out.dtype.kind == "f":
                    assert np.isfinite(out).all()
            return
        error, words = case.expect
        with pytest.raises(error) as info:
            fn()
        message = str(info.value)
        for word in words:
            assert word in message, f"{case.name}: {word!r} not in {message!r}"
        assert "Traceback" not in message and "DataLoader worker" not in message
    finally:
        signal.alarm(0)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_transform(case, workers, tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 100)
    tf = CNNFeatureTransformer(make_tiny_backbone(), num_workers=workers, progress=False).fit()
    X = build_X(case, tmp_path)
    check(case, lambda: tf.transform(X), None if case.whole else GOOD + 2)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_finetune_fit_and_predict(case, workers, tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 100)
    X = build_X(case, tmp_path)
    n = GOOD + 2 if not case.whole else max(len(X), 2)
    check(case, lambda: tiny_classifier(workers).fit(X, labels(n)), None)
    fitted = tiny_classifier(workers).fit(good_items(tmp_path), labels(GOOD))
    check(case, lambda: fitted.predict(X), None if case.whole else GOOD + 2)


def test_label_problems_are_clear_errors(tmp_path):
    X = good_items(tmp_path)
    with pytest.raises(ValueError, match="class"):
        tiny_classifier(0).fit(X, np.array(["ant"] * GOOD))  # a single class
    with pytest.raises(ValueError, match=r"\b6\b.*\b5\b|\b5\b.*\b6\b"):
        tiny_classifier(0).fit(X, labels(5))  # y shorter than X
    fitted = tiny_classifier(0).fit(X, labels(GOOD))
    # score with labels never seen in fit: they simply count as wrong (as in scikit-learn)
    score = fitted.score(X, np.array(["wasp"] * GOOD))
    assert score == 0.0
    pred = fitted.predict(X)
    assert set(pred) <= {"ant", "bee"} and pred.dtype.kind == "U"


def test_float_tensor_batches_are_checked_per_item(tmp_path):
    X = torch.rand(4, 3, 20, 20)
    X[2, 0, 0, 0] = float("nan")
    tf = CNNFeatureTransformer(make_tiny_backbone(), progress=False).fit()
    with pytest.raises(ValueError, match="index 2.*NaN"):
        tf.transform(X)
