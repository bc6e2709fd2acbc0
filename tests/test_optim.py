"""Muon for the conv filters, Nesterov SGD for the rest: the maths, the grouping, the config."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from cifarlab.config import preset
from cifarlab.optim import MuonSGD, orthogonalize
from cifarlab.train import make_optimizer
from models import build_model


@pytest.mark.parametrize("shape", [(64, 216), (128, 1152), (300, 40)])
def test_orthogonalize_flattens_the_spectrum(shape):
    g = torch.randn(*shape) @ torch.diag(torch.logspace(0, 2, shape[1]))  # condition 100
    s = torch.linalg.svdvals(orthogonalize(g))
    assert orthogonalize(g).shape == g.shape
    # The input's singular values span two decades; the output's lie near 1.
    assert 0.5 < s.min() and s.max() < 1.3, s


def test_muon_groups_filters_and_leaves_the_rest_to_sgd():
    model = build_model("fast", widths=(16, 32, 32))
    cfg = preset("fast-cpu", train={"optimizer": "muon", "muon_lr": 0.1}).train
    opt = make_optimizer(model, cfg)
    muon = [g for g in opt.param_groups if g["muon"]]
    assert len(muon) == 1 and muon[0]["lr"] == pytest.approx(0.1)
    assert muon[0]["lr_scale"] * cfg.lr == pytest.approx(0.1)  # what the schedule multiplies
    filters = {id(p) for p in muon[0]["params"]}
    convs = [m.weight for m in model.modules()
             if isinstance(m, torch.nn.Conv2d) and m.weight.requires_grad]
    assert filters == {id(p) for p in convs} and len(convs) == 6
    assert not model.whiten.weight.requires_grad  # frozen: in no group
    rest = [p for g in opt.param_groups if not g["muon"] for p in g["params"]]
    assert {id(p) for p in rest} == {id(p) for p in model.parameters()
                                     if p.requires_grad and id(p) not in filters}


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
    assert 0.5 * 0.05 < s.min() and s.max() < 1.3 * 0.05
    direction = -moved.flatten() @ w.grad.reshape(-1)
    assert direction > 0  # it descends


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
        MuonSGD([{"params": [torch.nn.Parameter(torch.zeros(3, 3))], "muon": True}],
                lr=0.1, momentum=0.5)


def test_muon_needs_the_fast_net():
    with pytest.raises(ValidationError, match="optimizer 'muon' needs a BatchNorm"):
        preset("seed-baseline", train={"optimizer": "muon"})
