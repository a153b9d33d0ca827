"""timm integration (extras): fusedgrad.BatchNormAct2d vs timm's, convert_batchnorm on timm's
efficientnet_b0 and resnet50, convert_sync_batchnorm on timm layers over 2 gloo ranks
(mirrors ops/batch_norm_act.py and ops/batch_norm_convert.py on timm's modules)."""

import copy
from functools import partial

import pytest
import torch
from torch import nn

import fusedgrad as fg

from extras import require
from helpers import DEVICE, REL_TOL, assert_close, rel_err

pytestmark = pytest.mark.extras

C = 4


def _timm_layers():
    return require("timm").layers


def _randomise_norms(model, seed=0):
    """Non-trivial affine parameters (timm zero-initialises some BatchNorm weights, which would
    leave whole branches with exactly zero gradients)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
    return model


# timm's constructor arguments: fused activations, unfused ones, act_kwargs, a drop layer,
# no activation, activation given by name.
TIMM_ARGS = [
    dict(),                                                         # ReLU, inplace
    dict(act_layer="silu"),
    dict(act_layer="gelu_tanh"),
    dict(act_layer=nn.LeakyReLU, act_kwargs={"negative_slope": 0.2}, inplace=False),
    dict(act_layer="mish"),
    dict(act_layer=nn.PReLU),                                       # a parameter: act.weight
    dict(act_layer="hard_swish", drop_layer=partial(nn.Dropout, 0.0)),
    dict(apply_act=False),
    dict(momentum=None, affine=False),
]


@pytest.mark.parametrize("kwargs", TIMM_ARGS)
def test_batchnormact2d_is_a_drop_in_for_timms(kwargs):
    ours = fg.BatchNormAct2d(C, device=DEVICE, **kwargs)
    theirs = _timm_layers().BatchNormAct2d(C, device=DEVICE, **kwargs)
    assert type(ours.act) is type(theirs.act) and type(ours.drop) is type(theirs.drop)
    assert repr(ours.act) == repr(theirs.act)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    _randomise_norms(theirs)
    ours.load_state_dict(theirs.state_dict())   # timm -> fusedgrad, strict
    theirs.load_state_dict(ours.state_dict())   # and back
    for step in range(3):
        if step == 2:
            ours.eval()
            theirs.eval()
        x = torch.randn(3, C, 5, 4, device=DEVICE).to(memory_format=torch.channels_last)
        xo, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
        yo, yt = ours(xo), theirs(xt)
        dy = torch.randn_like(yt)
        yo.backward(dy)
        yt.backward(dy)
        assert_close(yo, yt, torch.float32, f"step {step} y")
        assert_close(xo.grad, xt.grad, torch.float32, f"step {step} dx")
        for name, p in theirs.named_parameters():
            assert_close(dict(ours.named_parameters())[name].grad, p.grad, torch.float32,
                         f"step {step} grad {name}")
        for name, b in theirs.named_buffers():
            got = dict(ours.named_buffers())[name]
            assert torch.equal(got, b) if not b.is_floating_point() else \
                rel_err(got, b) <= REL_TOL[torch.float32], name


def _norm_layers(model):
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) or "BatchNorm" in type(m).__name__]


# Small inputs keep the interpreter fast; batch 4 at 32x32 still leaves 4 values per channel in
# the last (1x1) stage: with 2, a training-mode BatchNorm's input gradient is exactly zero and
# everything upstream of it would compare rounding noise.
MODELS = {"efficientnet_b0": (4, 3, 32, 32), "resnet50": (4, 3, 32, 32)}


@pytest.mark.parametrize("name", list(MODELS))
def test_convert_timm_model(name):
    """Every normalisation layer converted; one training step (channels_last) matches the
    unconverted model: output, input and parameter gradients, running statistics.

    Both run in float64: these deep networks amplify per-layer rounding by ~1e5-1e8 at such
    small batches (torch's own float32 model is 1e-3 from its float64 run), so a float32
    comparison could only be judged against torch's own error. In float64 the amplified
    rounding stays ~1e-8 while a wrong layer shows as O(1); the tolerance is the float32
    entry of the table."""
    timm = require("timm")
    torch.manual_seed(0)
    model = _randomise_norms(timm.create_model(name, pretrained=False))
    model = model.to(DEVICE, torch.float64).to(memory_format=torch.channels_last)
    ref = copy.deepcopy(model)
    norms = _norm_layers(model)
    fused, report = fg.convert_batchnorm(model, report=True)
    assert report.left == [] and [p for p, _, _ in report.converted] == norms
    assert {new for _, _, new in report.converted} <= {
        "fusedgrad.batch_norm_modules.BatchNorm2d", "fusedgrad.batch_norm_act.BatchNormAct2d"}
    x = torch.randn(MODELS[name], device=DEVICE, dtype=torch.float64)
    x = x.to(memory_format=torch.channels_last)
    xf, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    yf, yr = fused(xf), ref(xr)
    dy = torch.randn_like(yr)
    yf.backward(dy)
    yr.backward(dy)
    tol = torch.float32
    assert_close(yf, yr, tol, "logits")
    assert_close(xf.grad, xr.grad, tol, "input gradient")
    grads_f = dict((k, p.grad) for k, p in fused.named_parameters())
    scale = torch.cat([p.grad.flatten() for p in ref.parameters()]).norm()
    for k, p in ref.named_parameters():
        # Biases of a BatchNorm whose output only reaches later BatchNorms have an exactly
        # zero gradient: both models hold rounding noise there, judged against the
        # gradient's overall scale instead of its own (zero) norm.
        denom = max(p.grad.norm(), scale * 1e-6)
        err = (grads_f[k] - p.grad).norm() / denom
        assert err <= REL_TOL[tol], f"grad {k}: {err:.3e}"
    buffers_f = dict(fused.named_buffers())
    for k, b in ref.named_buffers():
        if b.is_floating_point():
            assert_close(buffers_f[k], b, tol, k)
        else:
            assert torch.equal(buffers_f[k], b), k


def test_frozen_batch_norms_left_working():
    # timm's freeze helper makes torchvision's FrozenBatchNorm2d and timm's
    # FrozenBatchNormAct2d; convert_batchnorm leaves both (their type is what timm's
    # unfreeze helper looks for) and says why.
    timm_layers = _timm_layers()
    net = nn.Sequential(nn.BatchNorm2d(C), timm_layers.BatchNormAct2d(C, act_layer="silu"),
                        nn.Sequential(nn.BatchNorm2d(C)))
    _randomise_norms(net)
    frozen = timm_layers.freeze_batch_norm_2d(net[:2])
    net = nn.Sequential(*frozen, net[2]).eval()
    kinds = [type(m).__name__ for m in net[:2]]
    assert kinds == ["FrozenBatchNorm2d", "FrozenBatchNormAct2d"]
    x = torch.randn(2, C, 3, 3)
    expected = net(x)
    out, report = fg.convert_batchnorm(net, report=True)
    assert [type(m).__name__ for m in out[:2]] == kinds
    assert [p for p, _, _ in report.left] == ["0", "1"]
    assert all("frozen" in why for _, _, why in report.left)
    assert [p for p, _, _ in report.converted] == ["2.0"]
    assert_close(out(x), expected, torch.float32, "eval output")
    # timm's unfreeze helper still recognises them.
    thawed = timm_layers.unfreeze_batch_norm_2d(out)
    assert type(thawed[0]) is nn.BatchNorm2d


def test_convert_sync_batchnorm_keeps_timms_activation():
    # torch's converter, and fusedgrad's before, replaced timm's BatchNormAct2d by a plain
    # SyncBatchNorm: the ReLU vanished and the output went negative.
    timm_bn = _timm_layers().BatchNormAct2d(C, act_layer=nn.ReLU)
    act = timm_bn.act
    out = fg.convert_sync_batchnorm(nn.Sequential(timm_bn))[0]
    assert type(out) is fg.SyncBatchNormAct2d and out.act is act
    x = torch.randn(3, C, 4, 4)
    y = out(x)
    assert (y >= 0).all() and (y > 0).any()
    assert_close(y, timm_bn(x), torch.float32, "y")


def build_timm_block():
    """Conv + timm BatchNormAct2d (ReLU) + timm's InvertedResidual (BatchNormAct2d with SiLU,
    SiLU and none, skip connection): seeded, identical in every process."""
    timm = require("timm")
    from timm.models._efficientnet_blocks import InvertedResidual

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, C, 3, padding=1, bias=False),
                        timm.layers.BatchNormAct2d(C, act_layer=nn.ReLU),
                        InvertedResidual(C, C, exp_ratio=2.0, act_layer=nn.SiLU))
    return _randomise_norms(net)


def test_convert_sync_batchnorm_timm_two_ranks():
    from test_batch_norm_convert import check_sync_matches_one_process

    require("timm")  # here, so that a missing extra skips instead of failing in the workers

    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, 3, 5, 5, generator=gen)
    dy = torch.randn(2, 4, C, 5, 5, generator=gen)
    results = check_sync_matches_one_process(build_timm_block, x, dy)
    kinds = results[0][2]
    assert "SyncBatchNormAct2d" in kinds and "BatchNormAct2d" not in kinds
    assert "SiLU" in kinds and "ReLU" in kinds  # activations kept
