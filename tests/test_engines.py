"""Engines: OpenVINO computes torch's codes, precision and engine are in the key, fallbacks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from sklearn_transfer import (
    Backbone,
    CNNFeatureTransformer,
    DataConfig,
    engines,
    load_image_folder,
)
from sklearn_transfer.runtime import Runtime, native_precision

from .conftest import colour_images, make_tiny_backbone, real_dataset, run_python


def tiny(**params) -> CNNFeatureTransformer:
    params.setdefault("progress", False)
    return CNNFeatureTransformer(backbone=make_tiny_backbone(), **params)


@pytest.mark.parametrize("pooling", ["avg", "max", "avgmax", "catavgmax"])
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("stage", [0, [1, -1]])
def test_openvino_computes_every_stage_pooling_and_relu_as_torch(stage, pooling, relu):
    X = colour_images(5, size=40)
    params = dict(stage=stage, pooling=pooling, relu=relu, precision="float32")
    ref = tiny(engine="torch", **params).fit().transform(X)
    tf = tiny(engine="openvino", **params).fit()
    assert tf.computation_.engine == "openvino"
    np.testing.assert_allclose(tf.transform(X), ref, rtol=0, atol=1e-5)


@pytest.mark.weights
def test_pretrained_codes_of_openvino_float32_match_torch_and_bfloat16_stays_close():
    X, _ = load_image_folder(real_dataset("hymenoptera_data/val"))
    X = X[::10]
    ref = CNNFeatureTransformer(engine="torch", precision="float32").fit().transform(X)
    exact = CNNFeatureTransformer(engine="openvino", precision="float32").fit().transform(X)
    assert np.abs(exact - ref).max() <= 1e-4
    if native_precision(torch.device("cpu")) == "bfloat16":
        low = CNNFeatureTransformer(engine="openvino", precision="bfloat16").fit().transform(X)
        cosine = (low * ref).sum(1) / np.linalg.norm(low, axis=1) / np.linalg.norm(ref, axis=1)
        assert cosine.min() > 0.99


def test_auto_is_the_fastest_installed_engine_and_native_precision_and_says_so():
    tf = tiny().fit()
    assert tf.computation_.engine == "openvino"
    assert tf.computation_.precision == native_precision(torch.device("cpu"))
    text = repr(tf.computation_)
    assert f"precision='{tf.computation_.precision}'" in text and "engine='openvino'" in text


def test_engine_and_precision_are_part_of_the_key():
    keys = {tiny(engine=e, precision=p).fit().computation_.key
            for e in ("torch", "openvino") for p in ("float32", "bfloat16")}
    assert len(keys) == 4


def test_openvino_refuses_what_it_cannot_run():
    with pytest.raises(ValueError, match="engine='openvino' runs precision 'float32' or "
                                         "'bfloat16', not 'float16'"):
        tiny(engine="openvino", precision="float16").fit()
    with pytest.raises(ValueError, match="'engine' parameter .* Got 'onnx'"):
        tiny(engine="onnx").fit()
    # auto with a precision OpenVINO does not run is torch
    assert tiny(precision="float16").fit().computation_.engine == "torch"


class DataDependent(nn.Module):
    """Python control flow on the data: a trace would fix one branch for all images."""

    def forward(self, x):
        return x * 2 if x.mean() > 0 else x - 1


def test_a_network_openvino_would_trace_wrongly_falls_back_to_torch_with_a_warning():
    net = Backbone([("stem", nn.Conv2d(3, 4, 3)), ("odd", DataDependent())],
                   DataConfig(input_size=16), name="odd-net")
    with pytest.warns(RuntimeWarning, match="OpenVINO could not convert odd-net .*"
                                            "computing the codes with torch instead"):
        tf = CNNFeatureTransformer(net, precision="float32").fit()
    assert tf.computation_.engine == "torch"
    X = colour_images(3, size=16)
    ref = CNNFeatureTransformer(net, engine="torch", precision="float32").fit()
    np.testing.assert_array_equal(tf.transform(X), ref.transform(X))
    assert tf.computation_ == ref.computation_


def test_a_missing_openvino_falls_back_to_torch():
    result = run_python("""
        import json, sys, warnings
        sys.modules["openvino"] = None  # as if it were not installed
        import numpy as np
        from tests.conftest import make_tiny_backbone
        from sklearn_transfer import CNNFeatureTransformer
        auto = CNNFeatureTransformer(make_tiny_backbone()).fit()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            asked = CNNFeatureTransformer(make_tiny_backbone(), engine="openvino").fit()
        codes = asked.transform(np.zeros((2, 32, 32, 3), np.uint8))
        print(json.dumps({"auto": auto.computation_.engine, "asked": asked.computation_.engine,
                          "warnings": [str(w.message) for w in caught],
                          "finite": bool(np.isfinite(codes).all())}))
    """)
    assert result["auto"] == result["asked"] == "torch" and result["finite"]
    assert len(result["warnings"]) == 1
    assert "OpenVINO is not installed" in result["warnings"][0]


def test_the_converted_network_is_kept_in_the_cache_directory(tmp_path, monkeypatch):
    X = colour_images(4, size=32)
    first = tiny(memory=tmp_path).fit()
    kept = list((tmp_path / "engines").glob("openvino-*/network.xml"))
    assert [p.parent.name for p in kept] == [f"openvino-{first.computation_.key}"]
    codes = first.transform(X)

    def no_conversion(*args):
        raise AssertionError("converted again")

    # a later process: nothing compiled in memory, the converted form read from disk
    monkeypatch.setattr(engines, "_ENGINES", type(engines._ENGINES)())
    monkeypatch.setattr(engines, "convert", no_conversion)
    again = tiny(memory=tmp_path).fit()
    assert again.computation_.engine == "openvino"
    np.testing.assert_array_equal(again.transform(X), codes)


def test_a_damaged_converted_network_is_converted_again(tmp_path, monkeypatch):
    first = tiny(memory=tmp_path).fit()
    xml = next((tmp_path / "engines").glob("openvino-*/network.xml"))
    xml.write_text("<net>damaged")
    monkeypatch.setattr(engines, "_ENGINES", type(engines._ENGINES)())
    with pytest.warns(RuntimeWarning, match="converted network in .* cannot be used .* "
                      "converting it again"):
        again = tiny(memory=tmp_path).fit()
    X = colour_images(2, size=32)
    np.testing.assert_array_equal(again.transform(X), first.transform(X))
    assert "<net>damaged" not in xml.read_text()  # kept again, whole


def test_a_converted_network_with_flipped_bytes_is_never_trusted(tmp_path, monkeypatch):
    """Same size, other bytes: its digests say so before any code is computed with it."""
    X = colour_images(3, size=32)
    first = tiny(memory=tmp_path, precision="float32").fit()
    expected = first.transform(X)
    weights = next((tmp_path / "engines").glob("openvino-*/network.bin"))
    data = bytearray(weights.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = bytes(64)
    weights.write_bytes(bytes(data))
    monkeypatch.setattr(engines, "_ENGINES", type(engines._ENGINES)())  # a later process
    with pytest.warns(RuntimeWarning, match=r"network.bin' is not the file converted \(its "
                      "SHA-256 differs"):
        again = tiny(memory=tmp_path, precision="float32").fit()
    np.testing.assert_array_equal(again.transform(X), expected)
    assert weights.read_bytes() != bytes(data)  # converted and kept again


def test_a_pickled_transformer_rebuilds_its_engine():
    import pickle

    tf = tiny().fit()
    X = colour_images(2, size=32)
    again = pickle.loads(pickle.dumps(tf))
    assert not [name for name in vars(again) if name.startswith("_")]  # no engine travels
    np.testing.assert_array_equal(again.transform(X), tf.transform(X))


def test_openvino_pins_its_threads_only_when_it_has_every_core():
    # processes sharing the cores (Dask workers) must not all pin to the first ones
    from sklearn_transfer.runtime import usable_cores

    tf = tiny(engine="openvino", precision="float32").fit()
    runtime = Runtime.from_device("cpu", "float32")
    before = torch.get_num_threads()
    try:
        for threads in sorted({1, usable_cores()}):
            torch.set_num_threads(threads)
            engine = engines.engine_for(tf.computation_, runtime.device, tf.backbone_)
            pinned = engine.compiled.get_property("ENABLE_CPU_PINNING")
            assert pinned == (threads >= usable_cores()), (threads, pinned)
    finally:
        torch.set_num_threads(before)


def test_runtime_resolves_auto_precision_per_device():
    assert Runtime.from_device("cpu", "auto").precision == native_precision(torch.device("cpu"))
    assert Runtime.from_device("cpu", "float32").precision == "float32"
    with pytest.raises(ValueError, match="precision='half' is not one of"):
        Runtime.from_device("cpu", "half")


def test_threads_sharing_a_fitted_transformer_get_their_own_codes():
    from concurrent.futures import ThreadPoolExecutor

    tf = tiny(precision="float32").fit()
    batches = [colour_images(6, size=32, seed=seed) for seed in range(8)]
    expected = [tf.transform(X) for X in batches]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(tf.transform, batches))
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("engine", ["torch", "openvino"])
def test_tta_averages_the_codes_of_each_image_and_its_mirror(engine):
    X = colour_images(4, size=32)
    params = dict(engine=engine, precision="float32")
    plain = tiny(**params).fit()
    both = tiny(tta=True, **params).fit()
    expected = (plain.transform(X) + plain.transform(X[:, :, ::-1])) / 2
    np.testing.assert_allclose(both.transform(X), expected, rtol=0, atol=1e-5)
    assert both.computation_.engine == engine and both.computation_.tta
    assert both.computation_.key != plain.computation_.key


@pytest.mark.parametrize("engine", ["torch", "openvino"])
def test_map_gives_each_batch_its_codes_in_order_with_its_tag(engine):
    tf = tiny(engine=engine, precision="float32").fit()
    runtime = Runtime.from_device("cpu", "float32")
    run = engines.engine_for(tf.computation_, runtime.device, tf.backbone_)
    images = torch.from_numpy(colour_images(11, size=32)).permute(0, 3, 1, 2)
    batches = [(images[i: i + 3], f"batch {i}") for i in range(0, 11, 3)]  # more than streams
    got = list(run.map(iter(batches)))
    assert [tag for _, tag in got] == [tag for _, tag in batches]
    for (codes, _), (x, _) in zip(got, batches, strict=True):
        np.testing.assert_array_equal(codes, run(x))

    def failing():  # a bad image mid-stream: its error, and the engine still serves
        yield batches[0]
        yield batches[1]
        raise ValueError("image 7 is corrupt")

    with pytest.raises(ValueError, match="image 7"):
        list(run.map(failing()))
    stream = run.map(iter(batches))
    next(stream)
    stream.close()  # left early: the requests in flight are waited for
    np.testing.assert_array_equal(run(batches[2][0]), got[2][0])
