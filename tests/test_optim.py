"""Muon for the conv filters, Nesterov SGD for the rest: the maths, the grouping, the config."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from cifarlab.config import preset
from cifarlab.optim import MuonSGD, make_optimizer, orthogonalize
from models import build_model


@pytest.mark.parametrize("shape", [(64, 216), (128, 1152), (300, 40)])
def test_orthogonalize_flattens_the_spectrum(shape):
    # Columns scaled over two decades: a spread-out spectrum (most for the tall shape).
    g = torch.randn(*shape) @ torch.diag(torch.logspace(0, 2, shape[1]))
    s = torch.linalg.svdvals(orthogonalize(g))
    assert orthogonalize(g).shape == g.shape
    assert torch.linalg.svdvals(g).max() > 4 * torch.linalg.svdvals(g).min()
    # Whatever the input's spread, the output's singular values lie near 1.
    assert s.min() > 0.5 and s.max() < 1.3, s


def test_muon_groups_filters_and_leaves_the_rest_to_sgd():
    model = build_model("fast", widths=(16, 32, 32))
    cfg = preset("fast-cpu", train={"optimizer": "muon", "muon_lr": 0.1}).train
    opt = make_optimizer(model, cfg)
    muon = [g for g in opt.param_groups if g["muon"]]
    assert len(muon) == 1 and muon[0]["lr"] == pytest.approx(0.1)
    assert muon[0]["momentum"] == cfg.muon_momentum and muon[0]["weight_decay"] == 0
    sgd = [g for g in opt.param_groups if not g["muon"]]
    assert all(g["momentum"] == cfg.momentum for g in sgd)
    assert sorted(g["weight_decay"] for g in sgd) == pytest.approx(
        sorted([cfg.weight_decay, cfg.weight_decay / cfg.bias_lr_scale])
    )
    assert muon[0]["lr_scale"] * cfg.lr == pytest.approx(0.1)  # what the schedule multiplies
    filters = {id(p) for p in muon[0]["params"]}
    convs = [
        m.weight
        for m in model.modules()
        if isinstance(m, torch.nn.Conv2d) and m.weight.requires_grad
    ]
    assert filters == {id(p) for p in convs} and len(convs) == 6
    assert not model.whiten.weight.requires_grad  # frozen: in no group
    rest = [p for g in opt.param_groups if not g["muon"] for p in g["params"]]
    assert {id(p) for p in rest} == {
        id(p) for p in model.parameters() if p.requires_grad and id(p) not in filters
    }


def test_muon_step_keeps_filter_norm_and_moves_by_lr():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(32, 16, 3, 3))
    opt = MuonSGD([{"params": [w], "muon": True}], lr=0.05, momentum=0.0)
    w.grad = torch.randn_like(w)
    before = w.detach().clone()
    opt.step()
    rescaled = before * math.sqrt(32) / before.norm()
    moved = (w.detach() - rescaled).reshape(32, -1)
    # One step with momentum 0 is lr times the orthogonalized gradient: singular values ~lr.
    s = torch.linalg.svdvals(moved)
    assert s.min() > 0.5 * 0.05 and s.max() < 1.3 * 0.05
    direction = -moved.flatten() @ w.grad.reshape(-1)
    assert direction > 0  # it descends


def test_muon_steps_follow_nesterov_momentum():
    # Three steps against the update written out: buf = m*buf + g, d = g + m*buf,
    # w <- w * sqrt(out) / |w| - lr * orthogonalize(d).
    torch.manual_seed(1)
    w = torch.nn.Parameter(torch.randn(16, 8, 3, 3))
    ref, buf = w.detach().clone(), torch.zeros(16, 8 * 9)
    opt = MuonSGD([{"params": [w], "muon": True}], lr=0.1, momentum=0.6)
    for _ in range(3):
        grad = torch.randn_like(w)
        w.grad = grad.clone()
        opt.step()
        g = grad.reshape(16, -1)
        buf = 0.6 * buf + g
        ref = ref * math.sqrt(16) / ref.norm()
        ref = ref - 0.1 * orthogonalize(g + 0.6 * buf).view_as(ref)
    assert torch.allclose(w, ref, atol=1e-5)


def test_muon_settings_are_part_of_a_muon_config_only():
    from cifarlab.experiment import config_hash

    sgd = preset("fast-cpu")
    assert config_hash(sgd) == config_hash(preset("fast-cpu", train={"muon_lr": 0.1}))
    muon = preset("fast-cpu", train={"optimizer": "muon"})
    assert config_hash(muon) != config_hash(
        preset("fast-cpu", train={"optimizer": "muon", "muon_lr": 0.1})
    )


def test_sgd_groups_match_torch_sgd_with_nesterov():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(10, 5))
    b = torch.nn.Parameter(a.detach().clone())
    ours = MuonSGD([{"params": [a], "weight_decay": 0.01}], lr=0.1, momentum=0.85)
    ref = torch.optim.SGD([b], lr=0.1, momentum=0.85, nesterov=True, weight_decay=0.01)
    for _ in range(4):
        grad = torch.randn(10, 5)
        a.grad, b.grad = grad.clone(), grad.clone()
        ours.step()
        ref.step()
    assert torch.allclose(a, b, atol=1e-6)


def test_a_muon_group_takes_filters_only():
    with pytest.raises(ValueError, match="4-D"):
        MuonSGD(
            [{"params": [torch.nn.Parameter(torch.zeros(3, 3))], "muon": True}],
            lr=0.1,
            momentum=0.5,
        )


def test_muon_needs_the_fast_net():
    with pytest.raises(ValidationError, match="optimizer 'muon' needs a BatchNorm"):
        preset("seed-baseline", train={"optimizer": "muon"})
