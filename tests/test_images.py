"""Images module: every accepted input becomes the right RGB image; bad ones get clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sklearn_transfer.batches import ImageDataset, collate_images, iterate_batches
from sklearn_transfer.images import ImageLoadError, as_image_source, load_image_folder
from sklearn_transfer.preprocessing import DataConfig


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


@pytest.mark.parametrize(
    "make, error, words",
    [
        (lambda d: d / "missing.jpg", FileNotFoundError, ["missing.jpg", "index 1", "exist"]),
        (lambda d: d, ImageLoadError, ["index 1", "directory"]),
        (lambda d: _write(d / "empty.jpg", b""), ImageLoadError, ["empty.jpg", "empty"]),
        (lambda d: _write(d / "t.jpg", b"hello, not an image"), ImageLoadError,
         ["t.jpg", "not an image"]),
        (lambda d: _truncated_jpeg(d), ImageLoadError, ["trunc.jpg", "index 1", "truncated"]),
    ],
    ids=["missing", "directory", "zero-byte", "text-as-jpg", "truncated"],
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
