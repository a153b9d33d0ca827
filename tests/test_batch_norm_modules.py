"""fusedgrad.BatchNorm1d/2d/3d vs torch's modules
(mirrors ops/batch_norm_modules.py)."""

import pytest
import torch

import fusedgrad as fg

from helpers import DEVICE, assert_close

MODULES = {1: (torch.nn.BatchNorm1d, fg.BatchNorm1d), 2: (torch.nn.BatchNorm2d, fg.BatchNorm2d),
           3: (torch.nn.BatchNorm3d, fg.BatchNorm3d)}
SHAPES = {1: (6, 4, 9), 2: (4, 4, 5, 6), 3: (2, 4, 3, 4, 5)}


def _pair(dims, **kwargs):
    torch_cls, fused_cls = MODULES[dims]
    ref = torch_cls(4, device=DEVICE, **kwargs)
    fused = fused_cls(4, device=DEVICE, **kwargs)
    if ref.affine:  # non-trivial parameters, identical in both
        with torch.no_grad():
            ref.weight.normal_()
            ref.bias.normal_()
    fused.load_state_dict(ref.state_dict())
    return ref, fused


def _compare_steps(ref, fused, shape, memory_format=torch.contiguous_format, steps=3):
    """Three training steps then one eval step: same outputs, grads and buffers."""
    for step in range(steps + 1):
        if step == steps:
            ref.eval()
            fused.eval()
        x = (torch.randn(shape, device=DEVICE) * 3 + 2).contiguous(memory_format=memory_format)
        xr = x.clone().requires_grad_()
        xf = x.clone().requires_grad_()
        yr, yf = ref(xr), fused(xf)
        assert yf.stride() == yr.stride()
        dy = torch.randn_like(yr)
        yr.backward(dy)
        yf.backward(dy)
        what = f"step {step}"
        assert_close(yf, yr, torch.float32, f"{what} y")
        assert_close(xf.grad, xr.grad, torch.float32, f"{what} dx")
        for name, p in ref.named_parameters():
            assert_close(dict(fused.named_parameters())[name].grad, p.grad, torch.float32,
                         f"{what} grad {name}")
        ref_buffers = dict(ref.named_buffers())
        for name, buf in fused.named_buffers():
            if buf.is_floating_point():
                assert_close(buf, ref_buffers[name], torch.float32, f"{what} {name}")
            else:
                assert torch.equal(buf, ref_buffers[name]), name


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("kwargs", [
    {}, {"momentum": None}, {"affine": False}, {"track_running_stats": False},
])
def test_module_matches_torch(dims, kwargs):
    ref, fused = _pair(dims, **kwargs)
    assert isinstance(fused, MODULES[dims][0])
    _compare_steps(ref, fused, SHAPES[dims])


@pytest.mark.parametrize("dims,fmt", [(2, torch.channels_last), (3, torch.channels_last_3d)])
@pytest.mark.compat
def test_module_channels_last(dims, fmt):
    ref, fused = _pair(dims, momentum=None)
    _compare_steps(ref, fused, SHAPES[dims], memory_format=fmt)


def test_batchnorm1d_2d_input():
    ref, fused = _pair(1)
    _compare_steps(ref, fused, (7, 4))


def test_input_dim_check_as_torch():
    with pytest.raises(ValueError, match="expected 4D input"):
        fg.BatchNorm2d(4, device=DEVICE)(torch.randn(2, 4, 3, device=DEVICE))


def test_state_dict_round_trips():
    ref, fused = _pair(2)
    _compare_steps(ref, fused, SHAPES[2], steps=2)  # non-trivial buffers and parameters
    # fused -> torch and torch -> fused, both strict.
    back = torch.nn.BatchNorm2d(4, device=DEVICE)
    back.load_state_dict(fused.state_dict())
    again = fg.BatchNorm2d(4, device=DEVICE)
    again.load_state_dict(ref.state_dict())
    assert fused.state_dict().keys() == ref.state_dict().keys()
    for a, b in zip(back.state_dict().values(), fused.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(again.state_dict().values(), ref.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_compile_module_momentum_none():
    # torch.compile(fullgraph=True) through a module whose momentum=None factor is read on
    # the device; torch's own module would need the host value of num_batches_tracked.
    backend = "inductor" if DEVICE == "cuda" else "aot_eager"
    ref, fused = _pair(2, momentum=None)
    compiled = torch.compile(fused, fullgraph=True, backend=backend)
    for _ in range(2):
        x = torch.randn(SHAPES[2], device=DEVICE)
        yr, yf = ref(x), compiled(x)
        yr.square().sum().backward()
        yf.square().sum().backward()
        assert_close(yf, yr, torch.float32, "y")
    assert_close(fused.weight.grad, ref.weight.grad, torch.float32, "dweight")
    assert_close(fused.running_var, ref.running_var, torch.float32, "running_var")
    assert torch.equal(fused.num_batches_tracked, ref.num_batches_tracked)
