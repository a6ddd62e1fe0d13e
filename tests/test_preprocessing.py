"""The preprocessing that belongs to the weights is the one timm and torchvision apply."""

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_sample_images
from torchvision import transforms as T

from sklearn_transfer.preprocessing import DataConfig


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    """Real photos of several shapes: landscape, portrait, and one smaller than the crop."""
    china, flower = load_sample_images().images
    return [Image.fromarray(china), Image.fromarray(flower).transpose(Image.Transpose.ROTATE_90),
            Image.fromarray(china).resize((180, 120))]


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear", "lanczos"])
def test_the_evaluation_transform_is_torchvisions_resize_and_centre_crop(photos, interpolation):
    config = DataConfig(input_size=224, crop_pct=0.875, interpolation=interpolation)
    reference = T.Compose([
        T.Resize(config.resize_size, interpolation=T.InterpolationMode(interpolation)),
        T.CenterCrop(config.input_size), T.PILToTensor()])
    for im in photos:
        got = config.eval_transform()(im)
        assert got.dtype == torch.uint8 and got.shape == (3, 224, 224)
        diff = (got.int() - reference(im).int()).abs()
        if interpolation == "lanczos":  # a filter only Pillow has: Pillow resamples
            assert diff.max() == 0
        else:  # torch's uint8 kernels round some sums the other way than Pillow's
            assert diff.max() <= 2 and diff.float().mean() < 0.02, (diff.max(), diff.mean())


def test_the_training_transform_gives_tensors_of_the_input_size(photos):
    out = DataConfig(input_size=64).train_transform(rotation=10)(photos[0])
    assert out.dtype == torch.uint8 and out.shape == (3, 64, 64)
    assert np.ptp(out.numpy()) > 0
