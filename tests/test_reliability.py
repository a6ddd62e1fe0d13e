"""Reliability of the feature path: odd real-world files, no network, bounded memory."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sklearn_transfer import Backbone, CNNFeatureTransformer, FineTunedClassifier

from .conftest import make_tiny_backbone, run_python


def tiny(**params) -> CNNFeatureTransformer:
    return CNNFeatureTransformer(backbone=make_tiny_backbone(), progress=False, **params)


def test_odd_but_valid_images_all_give_codes(tmp_path):
    """1x1 pixel, animated GIF (first frame), RGBA, palette, CMYK, 16-bit, EXIF-rotated."""
    Image.new("RGB", (1, 1), (255, 0, 0)).save(tmp_path / "one.png")
    frames = [Image.new("P", (16, 16), i) for i in range(3)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    Image.new("RGBA", (16, 16), (0, 0, 255, 128)).save(tmp_path / "alpha.png")
    Image.new("CMYK", (16, 16), (0, 0, 0, 255)).save(tmp_path / "cmyk.jpg")
    Image.fromarray(np.full((16, 16), 40000, np.uint16)).save(tmp_path / "g16.png")
    exif = Image.Exif()
    exif[0x0112] = 8
    Image.new("RGB", (30, 10)).save(tmp_path / "rot.jpg", exif=exif)
    files = sorted(tmp_path.iterdir())
    for workers in (0, 2):
        codes = tiny(num_workers=workers).fit().transform(files)
        assert codes.shape == (len(files), 24) and np.isfinite(codes).all()


def test_decompression_bomb_is_refused_with_the_file_named(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    Image.new("L", (400, 400)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 100)  # 400² is > 2x the limit
    with pytest.raises(ValueError, match=r"bomb\.png.*index 0.*too large"):
        tiny().fit().transform([path])


def test_import_offline_backbones_and_the_engine_open_no_socket(tmp_path):
    """Nothing phones home: not the import, the weights, nor OpenVINO (whose telemetry would
    send from a child process and write an id under the home directory)."""
    result = run_python(f"""
        import json, os, socket
        os.environ["HOME"] = {str(tmp_path)!r}
        log = {str(tmp_path / "sockets.log")!r}
        class NoSocket(socket.socket):
            def __init__(self, *a, **k):
                with open(log, "a") as f:  # a file: forked children report too
                    f.write(repr(a) + "\\n")
                raise OSError("sockets are disabled in this test")
        def no_lookup(*a, **k):
            with open(log, "a") as f:
                f.write(repr(a) + "\\n")
            raise OSError("name lookups are disabled in this test")
        socket.socket = NoSocket
        socket.getaddrinfo = no_lookup
        import numpy as np
        import sklearn_transfer
        from sklearn_transfer import CNNFeatureTransformer, available_backbones, get_backbone
        for name in available_backbones():
            get_backbone(name)
        tf = CNNFeatureTransformer().fit()
        codes = tf.transform(np.zeros((1, 32, 32, 3), np.uint8))
        print(json.dumps({{"engine": tf.computation_.engine, "shape": list(codes.shape)}}))
    """)
    assert result == {"engine": "openvino", "shape": [1, 1280]}
    assert not (tmp_path / "sockets.log").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no ~/intel telemetry id


def test_memory_stays_bounded_while_transforming_thousands_of_images(tmp_path):
    """2,000 images at 224 px would hold 300 MB of pixels; the transformer keeps a batch."""
    result = run_python(f"""
        import json, resource
        import numpy as np
        from PIL import Image
        from tests.conftest import make_tiny_backbone
        from sklearn_transfer import CNNFeatureTransformer
        from sklearn_transfer.backbones import DataConfig
        paths = []
        for i in range(8):
            p = {str(tmp_path)!r} + f"/{{i}}.png"
            Image.fromarray(np.full((240, 240, 3), i * 30, np.uint8)).save(p)
            paths.append(p)
        X = np.array(paths * 250, dtype=object)  # 2,000 files to decode
        net = make_tiny_backbone()
        net.data_config = DataConfig(input_size=224, crop_pct=1.0)
        tf = CNNFeatureTransformer(net, batch_size=32, progress=False).fit()
        tf.transform(X[:64])
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        codes = tf.transform(X)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({{"growth_mb": (after - before) / 1024, "rows": len(codes)}}))
    """)
    print(result)
    assert result["rows"] == 2000
    assert result["growth_mb"] < 100, result  # all pixels at once would be >= 300 MB


def test_transform_is_deterministic():
    X = np.random.RandomState(0).randint(0, 256, (4, 40, 40, 3), dtype=np.uint8)
    a = tiny().fit().transform(X)
    b = tiny().fit().transform(X)
    np.testing.assert_array_equal(a, b)


class OutOfMemoryAbove(torch.nn.Module):
    """Raises CUDA's out-of-memory error on batches larger than ``limit``, as a GPU would."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.limit:
            raise torch.cuda.OutOfMemoryError(
                "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 4.00 GiB total)")
        return x


def greedy_backbone(limit: int = 2) -> Backbone:
    net = make_tiny_backbone()
    net.stages[1].append(OutOfMemoryAbove(limit))
    return net


def test_gpu_out_of_memory_names_batch_size():
    X = np.random.RandomState(0).randint(0, 256, (6, 40, 40, 3), dtype=np.uint8)
    # torch raises the out-of-memory error (a compiled engine would not run this module)
    tf = CNNFeatureTransformer(greedy_backbone(), batch_size=4, progress=False,
                               engine="torch").fit()
    with pytest.raises(torch.cuda.OutOfMemoryError,
                       match=r"batch of 4 images \(batch_size=4\): lower batch_size "
                             r"\(e\.g\. batch_size=2\).*Tried to allocate 2\.00 GiB") as info:
        tf.transform(X)
    assert isinstance(info.value.__cause__, torch.cuda.OutOfMemoryError)
    # the advice works: a batch that fits
    assert tf.set_params(batch_size=2).transform(X).shape == (6, 24)


def test_gpu_out_of_memory_while_fine_tuning_names_batch_size():
    X = np.random.RandomState(0).randint(0, 256, (8, 40, 40, 3), dtype=np.uint8)
    y = np.array([0, 1] * 4)
    params = dict(freeze_depth=1, max_epochs=1, train_split=None, verbose=0, random_state=0)
    with pytest.raises(torch.cuda.OutOfMemoryError,
                       match=r"batch of 4 images \(batch_size=4\): lower batch_size.*"
                             r"or freeze more stages"):
        FineTunedClassifier(greedy_backbone(), batch_size=4, **params).fit(X, y)
    with pytest.raises(torch.cuda.OutOfMemoryError,
                       match=r"\(iterator_train__batch_size=3\): lower "
                             r"iterator_train__batch_size \(e\.g\. iterator_train__batch_size=1\)"):
        FineTunedClassifier(greedy_backbone(), batch_size=2, iterator_train__batch_size=3,
                            **params).fit(X, y)
    # the advice works for training; prediction with larger batches names their parameter
    clf = FineTunedClassifier(greedy_backbone(), batch_size=2, iterator_valid__batch_size=5,
                              **params).fit(X, y)
    with pytest.raises(torch.cuda.OutOfMemoryError,
                       match=r"batch of 5 images \(iterator_valid__batch_size=5\)"):
        clf.predict(X)
    assert clf.predict(X[:2]).shape == (2,)
