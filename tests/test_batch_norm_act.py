"""fusedgrad.BatchNormAct2d / SyncBatchNormAct2d vs torch's BatchNorm2d followed by the same
dropout and activation modules (mirrors ops/batch_norm_act.py). timm's own class is compared
in test_batch_norm_timm.py (extras)."""

import copy
from functools import partial

import pytest
import torch
from torch import nn

import fusedgrad as fg
from fusedgrad.batch_norm import FUSED_ACTIVATIONS
from fusedgrad.batch_norm_act import create_act, fused_activation

from helpers import DEVICE, assert_close

C = 4
SHAPE = (4, C, 5, 6)


class Shift(nn.Module):
    """A deterministic stand-in for a dropout layer: moves values across zero, so applying
    it after the activation instead of before shows."""

    def forward(self, x):
        return x - 0.5


def _reference(fused: fg.BatchNormAct2d) -> nn.Module:
    """torch.nn.BatchNorm2d then fused's own drop and act modules (copies), same state."""
    bn = nn.BatchNorm2d(C, eps=fused.eps, momentum=fused.momentum, affine=fused.affine,
                        track_running_stats=fused.track_running_stats, device=DEVICE)
    bn.load_state_dict({k: v for k, v in fused.state_dict().items()
                        if not k.startswith(("act.", "drop."))})
    return nn.Sequential(bn, copy.deepcopy(fused.drop), copy.deepcopy(fused.act))


def _randomise(module):
    with torch.no_grad():
        module.weight.uniform_(0.5, 1.5)
        module.bias.normal_()


def _compare(fused, ref, memory_format=torch.contiguous_format, steps=2):
    """Training steps then one eval step: outputs, input and parameter gradients, buffers."""
    ref_bn = ref[0]
    for step in range(steps + 1):
        if step == steps:
            fused.eval()
            ref.eval()
        x = (torch.randn(SHAPE, device=DEVICE) * 2 + 0.5).contiguous(memory_format=memory_format)
        xf, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
        yf, yr = fused(xf), ref(xr)
        assert yf.stride() == yr.stride()
        dy = torch.randn_like(yr)
        yf.backward(dy)
        yr.backward(dy)
        what = f"step {step}"
        assert_close(yf, yr, torch.float32, f"{what} y")
        assert_close(xf.grad, xr.grad, torch.float32, f"{what} dx")
        if fused.affine:
            assert_close(fused.weight.grad, ref_bn.weight.grad, torch.float32, f"{what} dw")
            assert_close(fused.bias.grad, ref_bn.bias.grad, torch.float32, f"{what} db")
            fused.weight.grad = fused.bias.grad = ref_bn.weight.grad = ref_bn.bias.grad = None
        if fused.track_running_stats:
            assert_close(fused.running_mean, ref_bn.running_mean, torch.float32, "running_mean")
            assert_close(fused.running_var, ref_bn.running_var, torch.float32, "running_var")
            assert torch.equal(fused.num_batches_tracked, ref_bn.num_batches_tracked)


# Every activation the op may fuse, and some it never does (run as modules after the kernel).
ACTS = {
    "relu": dict(act_layer=nn.ReLU),
    "silu": dict(act_layer="silu"),
    "gelu": dict(act_layer=nn.GELU),
    "gelu_tanh": dict(act_layer="gelu_tanh"),
    "leaky_relu": dict(act_layer="leaky_relu"),                          # torch's slope
    "leaky_relu_0.2": dict(act_layer=nn.LeakyReLU, act_kwargs={"negative_slope": 0.2}),
    "hardswish": dict(act_layer="hard_swish"),
    "mish": dict(act_layer=nn.Mish),                                     # never fused
    "no_act": dict(apply_act=False),
}


@pytest.mark.parametrize("act", list(ACTS))
def test_matches_batchnorm_then_activation(act):
    fused = fg.BatchNormAct2d(C, device=DEVICE, **ACTS[act])
    _randomise(fused)
    _compare(fused, _reference(fused))


@pytest.mark.parametrize("kwargs", [
    {"momentum": None}, {"affine": False}, {"track_running_stats": False},
])
def test_batchnorm_options(kwargs):
    fused = fg.BatchNormAct2d(C, device=DEVICE, act_layer="silu", **kwargs)
    if fused.affine:
        _randomise(fused)
    _compare(fused, _reference(fused))


def test_channels_last():
    fused = fg.BatchNormAct2d(C, device=DEVICE, act_layer=nn.ReLU)
    _randomise(fused)
    _compare(fused, _reference(fused), memory_format=torch.channels_last)


def test_drop_layer_runs_before_the_activation():
    # With a drop layer the activation cannot be fused into the kernel (drop sits between).
    fused = fg.BatchNormAct2d(C, device=DEVICE, act_layer=nn.ReLU, drop_layer=Shift)
    _randomise(fused)
    assert type(fused.drop) is Shift
    x = torch.randn(SHAPE, device=DEVICE)
    assert (fused(x) >= 0).all()  # relu(shift(.)), not shift(relu(.))
    _compare(fused, _reference(fused))


def _act_calls(module, x):
    calls = []
    handle = module.act.register_forward_hook(lambda *_: calls.append(1))
    module(x)
    handle.remove()
    return len(calls)


@pytest.mark.parametrize("act,op_args", [
    ("relu", ("relu", None)), ("silu", ("silu", None)), ("gelu", ("gelu", None)),
    ("gelu_tanh", ("gelu_tanh", None)), ("hardswish", ("hardswish", None)),
    ("leaky_relu_0.2", ("leaky_relu", 0.2)), ("mish", None),
])
def test_fused_activation_skips_the_module(act, op_args):
    # Fused activations run inside the kernel (the act module is not called); the others
    # run as the module. Which are fused is fusedgrad.batch_norm.FUSED_ACTIVATIONS.
    fused = fg.BatchNormAct2d(C, device=DEVICE, **ACTS[act])
    x = torch.randn(SHAPE, device=DEVICE)
    expect_fused = op_args is not None and op_args[0] in FUSED_ACTIVATIONS
    assert fused_activation(fused.act) == (op_args if expect_fused else None)
    assert _act_calls(fused, x) == (0 if expect_fused else 1)
    fused.drop = Shift()  # something between norm and act: never fused
    assert _act_calls(fused, x) == 1


def test_activation_subclass_is_not_fused():
    # A subclass may override forward: never treated as the base activation.
    class MyReLU(nn.ReLU):
        def forward(self, x):
            return super().forward(x) * 2

    assert fused_activation(MyReLU()) is None
    fused = fg.BatchNormAct2d(C, device=DEVICE, act_layer=MyReLU)
    _compare(fused, _reference(fused))


def test_constructor_as_timm():
    m = fg.BatchNormAct2d(C, act_layer="leaky_relu", act_kwargs={"negative_slope": 0.3},
                          inplace=False, drop_layer=partial(nn.Dropout, 0.25), device=DEVICE)
    assert isinstance(m, nn.BatchNorm2d)
    assert type(m.act) is nn.LeakyReLU and m.act.negative_slope == 0.3 and not m.act.inplace
    assert type(m.drop) is nn.Dropout and m.drop.p == 0.25
    assert type(fg.BatchNormAct2d(C).act) is nn.ReLU and fg.BatchNormAct2d(C).act.inplace
    assert type(fg.BatchNormAct2d(C, apply_act=False).act) is nn.Identity
    assert type(fg.BatchNormAct2d(C, act_layer=None).act) is nn.Identity
    # GELU takes no `inplace`: built without it, as timm does.
    assert type(create_act("gelu", inplace=True)) is nn.GELU
    assert create_act("gelu_tanh").approximate == "tanh"
    # Same keys as BatchNorm2d plus the activation's own parameters.
    prelu = fg.BatchNormAct2d(C, act_layer=nn.PReLU)
    assert list(prelu.state_dict()) == list(nn.BatchNorm2d(C).state_dict()) + ["act.weight"]


def test_unknown_activation_name():
    with pytest.raises(ValueError, match="act_layer"):
        fg.BatchNormAct2d(C, act_layer="no_such_activation")


def test_input_dim_check():
    with pytest.raises(ValueError, match="expected 4D input"):
        fg.BatchNormAct2d(C, device=DEVICE)(torch.randn(2, C, 3, device=DEVICE))


def test_replacing_act_after_construction():
    # The fused/unfused choice follows the act module present at each forward.
    fused = fg.BatchNormAct2d(C, device=DEVICE, act_layer=nn.ReLU)
    _randomise(fused)
    fused.act = nn.Tanh()
    _compare(fused, _reference(fused))


def test_sync_module_outside_distributed_is_batchnorm_act():
    # No process group: SyncBatchNormAct2d computes what BatchNormAct2d does.
    sync = fg.SyncBatchNormAct2d(C, device=DEVICE, act_layer="silu")
    assert isinstance(sync, nn.SyncBatchNorm) and type(sync.act) is nn.SiLU
    _randomise(sync)
    _compare(sync, _reference(sync))


def test_compile_fullgraph():
    backend = "inductor" if DEVICE == "cuda" else "aot_eager"
    fused = fg.BatchNormAct2d(C, device=DEVICE, act_layer=nn.SiLU, momentum=None)
    _randomise(fused)
    ref = _reference(fused)
    compiled = torch.compile(fused, fullgraph=True, backend=backend)
    x = torch.randn(SHAPE, device=DEVICE)
    yf, yr = compiled(x), ref(x)
    yf.square().sum().backward()
    yr.square().sum().backward()
    assert_close(yf, yr, torch.float32, "y")
    assert_close(fused.weight.grad, ref[0].weight.grad, torch.float32, "dweight")
    assert_close(fused.running_var, ref[0].running_var, torch.float32, "running_var")
