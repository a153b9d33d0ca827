"""Float64 reference for fusedgrad.batch_norm (torch's F.batch_norm on upcast inputs), the
layouts the tests pass, and the compare-everything helper shared by the BatchNorm tests."""

import torch
import torch.nn.functional as F

import fusedgrad as fg

from helpers import DEVICE, assert_close

PARAM_DTYPE = {torch.float32: torch.float32, torch.float16: torch.float32,
               torch.bfloat16: torch.float32, torch.float64: torch.float64}


def make_input(shape, layout, dtype):
    """Fresh random input (mean 1, std 2) of `shape` in the named memory layout."""
    if layout == "sliced_n":  # every other sample: non-dense, read through a copy
        base = torch.randn((2 * shape[0],) + shape[1:], device=DEVICE) * 2 + 1
        x = base[::2]
    elif layout == "sliced_c":  # every other channel: non-dense, read through a copy
        base = torch.randn((shape[0], 2 * shape[1]) + shape[2:], device=DEVICE) * 2 + 1
        x = base[:, ::2]
    elif layout == "transposed":  # spatial dims swapped: strides do not collapse
        x = (torch.randn(shape[:2] + (shape[3], shape[2]), device=DEVICE) * 2 + 1)
        x = x.transpose(2, 3)
    elif layout == "c_major":  # channel-major storage of an (N, C, L) tensor
        x = (torch.randn((shape[1], shape[0]) + shape[2:], device=DEVICE) * 2 + 1)
        x = x.transpose(0, 1)
    else:
        x = torch.randn(shape, device=DEVICE) * 2 + 1
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        elif layout == "channels_last_3d":
            x = x.contiguous(memory_format=torch.channels_last_3d)
    # float32 keeps the view itself (.to is a no-op); other dtypes use dense layouts only.
    x = x.to(dtype)
    assert tuple(x.shape) == tuple(shape)
    return x


# Layouts the kernels read in place (the output then has the input's strides).
READ_IN_PLACE = ("contiguous", "channels_last", "channels_last_3d", "c_major")


def reference(x, weight, bias, running_mean, running_var, training, momentum, eps, dy):
    """float64 outputs, grads and running buffers from torch's F.batch_norm."""
    xr = x.detach().double().requires_grad_()
    wr = weight.detach().double().requires_grad_() if weight is not None else None
    br = bias.detach().double().requires_grad_() if bias is not None else None
    rm = running_mean.double() if running_mean is not None else None
    rv = running_var.double() if running_var is not None else None
    y = F.batch_norm(xr, rm, rv, wr, br, training=training, momentum=momentum, eps=eps)
    y.backward(dy.double())
    return dict(y=y, dx=xr.grad, dw=wr.grad if wr is not None else None,
                db=br.grad if br is not None else None, rm=rm, rv=rv)


def run_and_compare(shape, layout, dtype, training, affine=True, running=True,
                     momentum=0.1, eps=1e-5, factor=1.0):
    x = make_input(shape, layout, dtype).requires_grad_()
    C = shape[1]
    pdt = PARAM_DTYPE[dtype]
    weight = torch.randn(C, device=DEVICE, dtype=pdt).requires_grad_() if affine else None
    bias = torch.randn(C, device=DEVICE, dtype=pdt).requires_grad_() if affine else None
    rm = torch.randn(C, device=DEVICE, dtype=pdt) if running else None
    rv = (torch.rand(C, device=DEVICE, dtype=pdt) + 0.5) if running else None
    ref = reference(x, weight, bias, rm, rv, training, momentum, eps,
                     dy := torch.randn(shape, device=DEVICE).to(dtype))
    y = fg.batch_norm(x, rm, rv, weight, bias, training=training, momentum=momentum, eps=eps)
    assert y.dtype == dtype and y.shape == x.shape
    if layout in READ_IN_PLACE:
        assert y.stride() == x.stride(), "output must keep the input's memory format"
    y.backward(dy)
    assert_close(y, ref["y"], dtype, "y", factor)
    assert_close(x.grad, ref["dx"], dtype, "dx", factor)
    if affine:
        assert weight.grad.dtype == pdt and bias.grad.dtype == pdt
        assert_close(weight.grad, ref["dw"], dtype, "dweight", factor)
        assert_close(bias.grad, ref["db"], dtype, "dbias", factor)
    if running:
        # Running statistics are computed in the float32 (float64) accumulation dtype.
        assert_close(rm, ref["rm"], pdt, "running_mean", factor)
        assert_close(rv, ref["rv"], pdt, "running_var", factor)
