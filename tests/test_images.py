"""Images module: every accepted input becomes the right RGB image; bad ones get clear errors."""

from __future__ import annotations

import io
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from sklearn_transfer.batches import ImageDataset, collate_images, iterate_batches
from sklearn_transfer.images import (
    ImageLoadError,
    _png_rows_missing,
    as_image_source,
    load_image_folder,
)
from sklearn_transfer.preprocessing import DataConfig

from .conftest import jpeg_cut_with_end_marker, noise_image, png_from_chunks, png_with_rows_cut


def rgb(src, i=0):
    return np.asarray(as_image_source(src).load(i))


def test_every_input_kind_gives_the_same_rgb_pixels(tmp_path):
    arr = np.random.RandomState(0).randint(0, 256, (2, 9, 7, 3), dtype=np.uint8)
    path = tmp_path / "a.png"
    Image.fromarray(arr[0]).save(path)
    expected = arr[0]
    variants = {
        "str path": [str(path)],
        "Path": [path],
        "object array of paths": np.array([str(path)], dtype=object),
        "PIL": [Image.fromarray(arr[0])],
        "uint8 NHWC": arr,
        "float NHWC in [0, 1]": arr.astype(np.float64) / 255.0,
        "torch uint8 NCHW": torch.from_numpy(arr).permute(0, 3, 1, 2),
        "torch float NCHW": torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255.0,
        "list of HWC arrays": list(arr),
        "mixed list": [path, arr[1]],
    }
    for name, X in variants.items():
        got = rgb(X)
        assert got.shape == (9, 7, 3), name
        np.testing.assert_array_equal(got, expected, err_msg=name)


def test_modes_become_rgb(tmp_path):
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    # grayscale array (n, H, W) and (H, W, 1) repeat the channel
    assert (rgb(gray[None]) == gray[..., None]).all()
    assert (rgb([gray[..., None]]) == gray[..., None]).all()
    # RGBA: fully transparent pixels become white, opaque ones keep their colour
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[:2, :, :3] = (10, 20, 30)
    rgba[:2, :, 3] = 255
    out = rgb([Image.fromarray(rgba, "RGBA")])
    assert (out[:2] == (10, 20, 30)).all() and (out[2:] == 255).all()
    # palette PNG with a transparent index
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    pal.putpixel((0, 0), 1)
    pal.info["transparency"] = 0
    pal.save(tmp_path / "p.png", transparency=0)
    out = rgb([tmp_path / "p.png"])
    assert tuple(out[0, 0]) == (0, 255, 0) and tuple(out[3, 3]) == (255, 255, 255)
    # CMYK JPEG
    Image.new("CMYK", (6, 6), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    out = rgb([tmp_path / "c.jpg"]).astype(int)
    assert out[..., 0].mean() > 200 and out[..., 1:].mean() < 60  # red
    # 16-bit grayscale PNG keeps its full range, scaled to 8 bits
    g16 = (np.arange(16, dtype=np.uint16).reshape(4, 4) * 4369)  # 0 .. 65535
    Image.fromarray(g16).save(tmp_path / "g16.png")
    out = rgb([tmp_path / "g16.png"])
    assert out[0, 0, 0] == 0 and out[3, 3, 0] == 255 and (out[..., 0] == out[..., 2]).all()


def test_exif_orientation_is_applied(tmp_path):
    im = Image.new("RGB", (20, 10), (200, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise when shown
    im.save(tmp_path / "r.jpg", exif=exif)
    assert as_image_source([tmp_path / "r.jpg"]).load(0).size == (10, 20)


def test_draft_decodes_large_jpegs_at_reduced_scale_but_not_below_the_request(tmp_path):
    Image.new("RGB", (2000, 1200), (0, 0, 255)).save(tmp_path / "big.jpg")
    im = as_image_source([tmp_path / "big.jpg"]).load(0, draft_size=256)
    assert min(im.size) >= 256 and max(im.size) <= 1000


@pytest.mark.parametrize("mode, save", [("RGB", {}), ("RGB", {"progressive": True}),
                                        ("RGB", {"subsampling": 0}), ("L", {}), ("CMYK", {})])
def test_jpeg_pixels_are_those_of_pillows_draft_decode(tmp_path, mode, save):
    # JPEGs are decoded by libjpeg-turbo through simplejpeg: the pixels (and so the codes)
    # must be those Pillow gave, at every draft scale
    exif = Image.Exif()
    exif[0x0112] = 6
    noise_image((300, 170)).convert(mode).save(tmp_path / "a.jpg", exif=exif, **save)
    for draft in (None, 100, 60, 20):
        with Image.open(tmp_path / "a.jpg") as im:
            if draft:
                im.draft("RGB", (draft, draft))
            expected = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
        got = rgb([tmp_path / "a.jpg"]) if draft is None else np.asarray(
            as_image_source([tmp_path / "a.jpg"]).load(0, draft))
        np.testing.assert_array_equal(got, expected, err_msg=f"draft_size={draft}")


def test_junk_before_a_jpegs_end_marker_is_harmless(tmp_path):
    noise_image().save(tmp_path / "a.jpg")
    data = (tmp_path / "a.jpg").read_bytes()
    _write(tmp_path / "junk.jpg", data[:-2] + b"\0\0" + data[-2:])
    np.testing.assert_array_equal(rgb([tmp_path / "junk.jpg"]), rgb([tmp_path / "a.jpg"]))


def _adam7_png(arr):  # Pillow does not write interlaced PNGs
    raw = b""
    for x0, y0, dx, dy in ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4),
                           (1, 0, 2, 2), (0, 1, 1, 2)):
        raw += b"".join(b"\0" + row.tobytes() for row in arr[y0::dy, x0::dx] if row.size)
    ihdr = struct.pack(">IIBBBBB", arr.shape[1], arr.shape[0], 8, 2, 0, 0, 1)
    return png_from_chunks([(b"IHDR", ihdr), (b"IDAT", zlib.compress(raw)), (b"IEND", b"")])


def _png(arr, mode):
    if mode == "interlaced":
        return _adam7_png(arr)
    out = io.BytesIO()
    if mode == "I;16":
        Image.fromarray(arr[..., 0].astype(np.uint16) * 257).save(out, "PNG")
    else:
        Image.fromarray(arr).convert(mode).save(out, "PNG")
    return out.getvalue()


@pytest.mark.parametrize("mode", ["1", "L", "P", "LA", "RGB", "RGBA", "I;16", "interlaced"])
def test_pngs_decode_whole_and_refuse_rows_cut_short(tmp_path, mode):
    # every pixel layout, so that the count of bytes the rows need is right for each
    for size in ((64, 48), (13, 3)):  # 13x3 leaves some of the seven interlaced passes empty
        arr = np.asarray(noise_image(size))
        whole = _png(arr, mode)
        with Image.open(io.BytesIO(whole)) as im:
            assert im.mode == {"interlaced": "RGB"}.get(mode, mode)
            if mode in ("RGB", "interlaced"):
                np.testing.assert_array_equal(np.asarray(im), arr)
        assert not _png_rows_missing(whole)
        assert _png_rows_missing(png_with_rows_cut(whole, 1 - 1e-9))  # one byte short
    assert rgb([_write(tmp_path / "a.png", whole)]).shape == (3, 13, 3)
    # Pillow raises for some cuts itself ("image file is truncated") and leaves the rows of
    # others blank, depending on where its reads fall: both are errors naming the file
    cut = png_with_rows_cut(_png(np.asarray(noise_image((64, 48))), mode), 0.5)
    with pytest.raises(ImageLoadError, match=r"cut.png' \(index 0\).*truncated or corrupt"):
        rgb([_write(tmp_path / "cut.png", cut)])


@pytest.mark.parametrize(
    "make, error, words",
    [
        (lambda d: d / "missing.jpg", FileNotFoundError, ["missing.jpg", "index 1", "exist"]),
        (lambda d: d, ImageLoadError, ["index 1", "directory"]),
        (lambda d: _write(d / "empty.jpg", b""), ImageLoadError, ["empty.jpg", "empty"]),
        (lambda d: _write(d / "t.jpg", b"hello, not an image"), ImageLoadError,
         ["t.jpg", "not an image"]),
        (lambda d: _truncated_jpeg(d), ImageLoadError, ["trunc.jpg", "index 1", "truncated"]),
        (lambda d: _closed_jpeg(d, progressive=False), ImageLoadError,
         ["closed.jpg", "index 1", "premature end of data segment", "truncated"]),
        (lambda d: _closed_jpeg(d, progressive=True), ImageLoadError,
         ["closed.jpg", "index 1", "truncated"]),
    ],
    ids=["missing", "directory", "zero-byte", "text-as-jpg", "truncated", "cut-closed",
         "progressive-cut-closed"],
)
def test_bad_files_name_the_file_and_index(tmp_path, make, error, words):
    good = tmp_path / "good.png"
    Image.new("RGB", (4, 4)).save(good)
    bad = make(tmp_path)
    with pytest.raises(error) as info:
        as_image_source([good, bad]).load(1)
    for word in words:
        assert word in str(info.value)


def _write(path, data):
    path.write_bytes(data)
    return path


def _truncated_jpeg(d):
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (64, 64, 3), np.uint8)).save(
        d / "full.jpg", quality=95)
    data = (d / "full.jpg").read_bytes()
    return _write(d / "trunc.jpg", data[: len(data) // 2])


def _closed_jpeg(d, progressive):
    noise_image().save(d / "full.jpg", quality=95, progressive=progressive)
    return _write(d / "closed.jpg", jpeg_cut_with_end_marker((d / "full.jpg").read_bytes()))


@pytest.mark.parametrize(
    "X, error, words",
    [
        (np.full((2, 4, 4, 3), np.nan), ImageLoadError, ["index 0", "NaN"]),
        (np.concatenate([np.zeros((1, 4, 4, 3)), np.full((1, 4, 4, 3), 2.0)]), ImageLoadError,
         ["index 1", "[0, 1]"]),
        (np.zeros((2, 3, 8, 8), np.uint8), ValueError, ["channels-first", "transpose"]),
        (np.zeros((8, 8), np.uint8), ValueError, ["(n, H, W)"]),
        (np.zeros((0, 8, 8, 3), np.uint8), ValueError, ["no images"]),
        ([], ValueError, ["no images"]),
        ("a.jpg", TypeError, ["single path"]),
        ([Image.new("RGB", (2, 2)), 42], TypeError, ["index 1", "int"]),
        (torch.zeros(2, 8, 8, 3), ValueError, ["channels first"]),
    ],
    ids=["nan", "out-of-range", "channels-first", "wrong-rank", "empty-array", "empty-list",
         "single-path", "non-image-object", "tensor-channels-last"],
)
def test_bad_collections_fail_fast_and_clearly(X, error, words):
    with pytest.raises(error) as info:
        as_image_source(X)
    for word in words:
        assert word in str(info.value)


def test_worker_errors_are_raised_cleanly_in_the_caller(tmp_path):
    paths = []
    for i in range(4):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{i}.png")
        paths.append(tmp_path / f"{i}.png")
    (tmp_path / "2.png").write_bytes(b"garbage")
    dataset = ImageDataset(paths, DataConfig(input_size=8, crop_pct=1.0))
    for workers in (0, 1):
        loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=workers,
                                             collate_fn=collate_images)
        with pytest.raises(ImageLoadError) as info:
            list(iterate_batches(loader, prefetch=2 if workers == 0 else 0))
        assert "2.png" in str(info.value) and info.value.index == 2
        assert "Traceback" not in str(info.value) and "DataLoader worker" not in str(info.value)


def test_batches_are_channels_last_uint8(image_files):
    dataset = ImageDataset(image_files, DataConfig(input_size=40, crop_pct=1.0))
    xb, yb = collate_images([dataset[0], dataset[1]])
    assert xb.dtype == torch.uint8 and xb.shape == (2, 3, 40, 40)
    assert xb.is_contiguous(memory_format=torch.channels_last)
    assert yb.tolist() == [0, 1]


def test_load_image_folder_lists_images_with_class_names(tmp_path):
    for cls, n in (("cats", 2), ("dogs", 3)):
        (tmp_path / cls).mkdir()
        for i in range(n):
            Image.new("RGB", (4, 4)).save(tmp_path / cls / f"{i}.jpg")
    (tmp_path / "dogs" / "notes.txt").write_text("not an image")
    X, y = load_image_folder(tmp_path)
    assert list(y) == ["cats"] * 2 + ["dogs"] * 3
    assert all(str(p).endswith(".jpg") for p in X)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_image_folder(tmp_path / "nowhere")


@pytest.mark.parametrize("content", ["other_formats", "only_subfolders"])
def test_a_class_folder_without_images_is_named_not_dropped(tmp_path, content):
    (tmp_path / "cats").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "cats" / "0.jpg")
    (tmp_path / "dogs").mkdir()
    if content == "other_formats":
        for name in ("0.heic", "1.ico", "2.jfif"):
            (tmp_path / "dogs" / name).write_bytes(b"\0" * 16)
    else:
        (tmp_path / "dogs" / "more").mkdir()
        Image.new("RGB", (4, 4)).save(tmp_path / "dogs" / "more" / "0.jpg")
    with pytest.raises(ValueError, match=r"class folder\(s\) \[.*dogs'\] hold no image file"):
        load_image_folder(tmp_path)


def test_a_nan_holding_pil_image_names_its_index():
    nan = Image.fromarray(np.full((8, 8), np.nan, np.float32), "F")
    source = as_image_source([np.zeros((8, 8, 3), np.uint8), nan])
    with pytest.raises(ImageLoadError, match="image at index 1 contains NaN") as info:
        source.load(1)
    assert "None" not in str(info.value)


def test_an_image_over_pillows_pixel_limit_but_under_its_refusal_warns(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 100)
    Image.new("RGB", (150, 100)).save(tmp_path / "big.png")  # 1.5x the limit: decoded
    source = as_image_source([tmp_path / "big.png"])
    with pytest.warns(RuntimeWarning, match=r"big.png' \(index 0\) has 150x100 pixels"):
        assert source.load(0).size == (150, 100)


def test_an_oversized_jpeg_decodes_at_the_draft_scale_and_warns_only_in_full(tmp_path,
                                                                             monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 100)
    noise_image((160, 100)).save(tmp_path / "big.jpg")  # 1.6x the limit
    source = as_image_source([tmp_path / "big.jpg"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert source.load(0, draft_size=50).size == (80, 50)  # at 1/2: a quarter the memory
    with pytest.warns(RuntimeWarning, match=r"big.jpg' \(index 0\) has 160x100 pixels"):
        assert source.load(0).size == (160, 100)
