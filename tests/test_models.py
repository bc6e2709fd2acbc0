"""The model registry and every registered architecture."""

from __future__ import annotations

import inspect

import pytest
import torch
from pydantic import ValidationError

from cifarlab.config import PRESETS, ModelConfig, preset
from cifarlab.studies import STUDIES
from cifarlab.sweep import expand
from models import MODELS, OPTION_CHECKS, build_model, check_options, model_names


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(
        ValueError, match="unknown model 'resnet'.*fast, seed-baseline, seed-deep, seed-wide"
    ):
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


# ---------------------------------------------------------------------------------------------
# Options are validated when the config is made
# ---------------------------------------------------------------------------------------------


def test_even_kernel_fails_when_the_config_is_made():
    with pytest.raises(ValidationError, match=r"model\.options\.kernel_size: must be odd, got 4"):
        preset("seed-baseline", model={"options": {"kernel_size": 4}})


def test_unknown_option_names_it_and_the_valid_ones():
    with pytest.raises(
        ValidationError,
        match=r"model\.options\.depth: .*no option depth; its "
        r"options: kernel_size, pool_kernel, pool_stride, channels, hidden",
    ):
        preset("seed-baseline", model={"options": {"depth": 3}})
    with pytest.raises(ValidationError, match="no option kernel_size; its options: widths"):
        ModelConfig(name="fast", options={"kernel_size": 3})


@pytest.mark.parametrize(
    "name,options,message",
    [
        ("seed-baseline", {"kernel_size": 0}, "kernel_size: must be at least 1, got 0"),
        (
            "seed-baseline",
            {"kernel_size": "3"},
            "kernel_size: must be an integer, got '3' \\(str\\)",
        ),
        ("seed-baseline", {"kernel_size": 3.0}, "kernel_size: must be an integer"),
        ("seed-baseline", {"channels": 0}, "channels: must be a positive integer, got 0"),
        ("seed-baseline", {"hidden": -5}, "hidden: must be a positive integer, got -5"),
        ("seed-baseline", {"pool_kernel": 40}, "pool_kernel: must be between 1 and 32, got 40"),
        ("seed-baseline", {"pool_stride": 0}, "pool_stride: must be a positive integer"),
        ("seed-baseline", {"num_classes": 100}, "num_classes: must be 10"),
        ("seed-deep", {"kernel_size": 2}, "kernel_size: must be odd, got 2"),
        ("seed-wide", {"widths": [64] * 6}, "widths: must have 1 to 5 entries, got 6"),
        ("seed-wide", {"hidden": True}, "hidden: must be an integer, got True"),
        ("fast", {"widths": [64, 128]}, "widths: must have 3 entries, got 2"),
        ("fast", {"widths": [64, 0, 128]}, "widths: entry 1 must be a positive integer, got 0"),
        ("fast", {"widths": "64,128,128"}, "widths: must be a list of 3 positive integers"),
    ],
)
def test_bad_option_values_name_the_field(name, options, message):
    with pytest.raises(ValidationError, match=rf"model\.options\.{message}"):
        ModelConfig(name=name, options=options)
    with pytest.raises(ValueError, match=message):  # build_model applies the same checks
        build_model(name, **options)


def test_every_problem_is_reported_at_once():
    with pytest.raises(ValueError, match=r"kernel_size: must be odd.*; model\.options\.hidden"):
        check_options("seed-baseline", {"kernel_size": 4, "hidden": 0})


def test_valid_options_pass():
    ModelConfig(
        name="seed-baseline", options={"kernel_size": 5, "pool_kernel": 2, "pool_stride": 2}
    )
    ModelConfig(name="seed-deep", options={"kernel_size": 1})
    ModelConfig(name="seed-wide", options={"widths": [32, 64], "hidden": 128})
    ModelConfig(name="fast", options={"widths": (16, 32, 32)})
    for name in PRESETS:
        preset(name)
    for study in STUDIES.values():
        assert expand(study.preset, study.grid)


def test_every_option_of_every_model_has_a_check():
    for name, factory in MODELS.items():
        params = [p for p in inspect.signature(factory).parameters if p != "self"]
        assert set(params) <= set(OPTION_CHECKS[name]), name
