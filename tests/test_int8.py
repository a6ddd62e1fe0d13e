"""precision="int8": NNCF-quantized codes, calibrated on the images given to fit."""

from __future__ import annotations

import numpy as np
import pytest

from sklearn_transfer import CNNFeatureTransformer, FeatureCache

from .conftest import colour_images, make_tiny_backbone, run_python, skip_without

skip_without("nncf", "precision='int8' needs the int8 extra (NNCF)")


def tiny(**params) -> CNNFeatureTransformer:
    return CNNFeatureTransformer(make_tiny_backbone(), progress=False, **params)


def test_int8_codes_follow_the_float_codes_and_their_calibration_is_their_identity(tmp_path):
    X = colour_images(48, size=32)
    int8 = tiny(precision="int8", memory=tmp_path).fit(X)
    assert int8.computation_.precision == "int8" and int8.computation_.engine == "openvino"
    codes = int8.transform(X)
    exact = tiny(precision="float32", engine="torch").fit().transform(X)
    assert np.corrcoef(codes.ravel(), exact.ravel())[0, 1] > 0.98
    # other calibration images: other codes, kept apart in the cache
    other = tiny(precision="int8", memory=tmp_path).fit(X[:24])
    assert other.computation_.key != int8.computation_.key
    assert int8.computation_.describe()["calibration"] != other.computation_.describe()[
        "calibration"]
    other.transform(X)
    assert len(FeatureCache(tmp_path).info().computations) == 2
    # the same calibration again: the same computation, read back from the cache
    again = tiny(precision="int8", memory=tmp_path).fit(X)
    assert again.computation_.key == int8.computation_.key
    np.testing.assert_array_equal(again.transform(X), codes)


def test_int8_needs_images_at_fit_and_openvino():
    with pytest.raises(ValueError, match=r"precision='int8' calibrates its quantization on "
                                         r"the images given to fit: call fit\(X\)"):
        tiny(precision="int8").fit()
    with pytest.raises(ValueError, match="precision='int8' runs in OpenVINO on the CPU"):
        tiny(precision="int8", engine="torch").fit(colour_images(4, size=32))


def test_without_nncf_the_error_names_the_extra_and_nothing_phones_home(tmp_path):
    result = run_python(f"""
        import json, os, socket, sys
        os.environ["HOME"] = {str(tmp_path)!r}
        def no_socket(*a, **k):
            with open({str(tmp_path / "sockets.log")!r}, "a") as f:  # a child reports too
                f.write(repr(a) + "\\n")
            raise OSError("sockets are disabled in this test")
        socket.socket.connect = no_socket
        socket.getaddrinfo = no_socket
        from tests.conftest import colour_images, make_tiny_backbone
        from sklearn_transfer import CNNFeatureTransformer
        X = colour_images(8, size=32)
        fitted = CNNFeatureTransformer(make_tiny_backbone(), precision="int8").fit(X)
        shape = list(fitted.transform(X).shape)
        sys.modules["nncf"] = None  # as if the extra were not installed
        try:
            CNNFeatureTransformer(make_tiny_backbone(), precision="int8").fit(X[:4])
            message = None
        except ImportError as exc:
            message = str(exc)
        print(json.dumps({{"shape": shape, "message": message}}))
    """)
    assert result["shape"] == [8, 24]
    assert result["message"].startswith("precision='int8' needs NNCF: pip install "
                                        "'sklearn-transfer[int8]'")
    # no connection tried, no ~/intel telemetry id written
    assert sorted(p.name for p in tmp_path.iterdir()) == []
