"""The model registry and every registered architecture."""

from __future__ import annotations

import pytest
import torch

from models import build_model, model_names


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown model 'resnet'.*fast, seed-baseline, seed-deep, seed-wide"):
        build_model("resnet")


def test_unknown_option_is_named():
    with pytest.raises(ValueError, match="no option depth.*kernel_size"):
        build_model("seed-baseline", depth=3)


@pytest.mark.parametrize("name", model_names())
def test_output_shape(name):
    model = build_model(name)
    if hasattr(model, "init_from_data"):
        model.init_from_data(torch.randn(64, 3, 32, 32))
    out = model(torch.randn(4, 3, 32, 32))
    assert out.shape == (4, 10)


@pytest.mark.parametrize("pool,expected_inputs", [((3, 1), 18 * 32 * 32), ((2, 2), 18 * 16 * 16)])
def test_seed_baseline_pooling_variants(pool, expected_inputs):
    model = build_model("seed-baseline", pool_kernel=pool[0], pool_stride=pool[1])
    assert model.classifier[1].in_features == expected_inputs
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_seed_deep_kernel_size_applies_to_every_conv():
    model = build_model("seed-deep", kernel_size=1)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [18, 64, 128, 18]
    assert all(c.kernel_size == (1, 1) for c in convs)


def test_fast_whitening_decorrelates_patches():
    torch.manual_seed(0)
    mix = torch.randn(3, 3)
    images = torch.einsum("ij,njhw->nihw", mix, torch.randn(200, 3, 32, 32))  # correlated channels
    model = build_model("fast", widths=(16, 32, 32))
    model.init_from_data(images)
    out = torch.nn.functional.conv2d(images, model.whiten.weight[:12])  # (N, 12, 31, 31)
    flat = out.permute(1, 0, 2, 3).reshape(12, -1)
    cov = torch.cov(flat)
    assert torch.allclose(cov, torch.eye(12), atol=0.05)
    assert not model.whiten.weight.requires_grad
