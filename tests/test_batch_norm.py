"""fusedgrad.batch_norm against a float64 F.batch_norm reference (mirrors ops/batch_norm.py;
the fused epilogues: test_batch_norm_fused.py; the launcher and kernels: test_bn_launch.py;
argument checks: test_bn_validate.py)."""

import pytest
import torch
import torch.nn.functional as F

import fusedgrad as fg

from bn_reference import reference, run_and_compare
from helpers import DEVICE, assert_close, rel_err

# Shapes: each family, odd sizes, and shapes that split a channel over several programs.
FP32_CASES = [
    ((6, 5), "contiguous"),              # (N, C): rows fold into one channel-inner range
    ((3, 5), "contiguous"),              # N = 3 (with two values per channel dx is exactly 0)
    ((4, 3, 37), "contiguous"),          # (N, C, L), prime L
    ((4, 3, 37), "c_major"),             # channel-major storage: spatial-inner, folded rows
    ((2, 7, 5, 3), "contiguous"),        # N = 2, prime C
    ((3, 4, 6, 5), "channels_last"),     # NHWC read in place
    ((2, 1, 7, 9), "contiguous"),        # C = 1
    ((2, 1, 7, 9), "channels_last"),     # C = 1, channels_last
    ((16, 6, 1, 1), "contiguous"),       # H*W = 1 (folds to rows)
    ((5, 3, 4, 4), "sliced_n"),          # non-dense (every other sample): copied
    ((3, 4, 5, 6), "sliced_c"),          # non-dense: copied to contiguous
    ((3, 4, 5, 6), "transposed"),        # dense but not collapsible: copied
    ((2, 3, 3, 4, 5), "contiguous"),     # 3-D
    ((2, 3, 3, 4, 5), "channels_last_3d"),
    ((4, 3, 40, 40), "contiguous"),      # several splits per channel: merge path
    ((8, 4, 16, 16), "channels_last"),   # several splits per channel block, channel-inner
    ((3, 70, 5, 5), "channels_last"),    # C = 70 > 64: several channel blocks of 128 lanes
    ((2, 40, 7, 7), "contiguous"),       # many channels, tiny 7x7 spatial
]


@pytest.mark.parametrize("shape,layout", FP32_CASES)
def test_train_fp32(shape, layout):
    run_and_compare(shape, layout, torch.float32, training=True)


@pytest.mark.parametrize("shape,layout", [
    ((4, 3, 37), "contiguous"), ((3, 4, 6, 5), "channels_last"), ((5, 3, 4, 4), "sliced_n"),
    ((2, 3, 3, 4, 5), "channels_last_3d"),
])
def test_eval_fp32(shape, layout):
    run_and_compare(shape, layout, torch.float32, training=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape,layout", [
    ((4, 3, 9, 7), "contiguous"), ((3, 5, 6, 7), "channels_last"), ((6, 5), "contiguous"),
])
@pytest.mark.parametrize("training", [True, False])
def test_dtypes(dtype, shape, layout, training):
    # Half inputs use float32 weight, bias and running statistics (mixed precision).
    run_and_compare(shape, layout, dtype, training=training)


@pytest.mark.parametrize("affine,running,training", [
    (False, True, True), (True, False, True), (False, False, True),
    (False, True, False),  # eval without parameters: dx only, no reduction pass
])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_affine_and_running_options(affine, running, training, layout):
    run_and_compare((3, 4, 5, 6), layout, torch.float32, training=training, affine=affine,
                     running=running)


@pytest.mark.parametrize("training", [True, False])
def test_strided_parameters_and_expanded_grad(training):
    # A strided weight view, a strided running_var view (updated in place through a copy),
    # and a gradient with stride 0 along N (y.sum(0) feeds the loss).
    x = torch.randn(3, 4, 5, 6, device=DEVICE).requires_grad_()
    wbase = torch.randn(4, 2, device=DEVICE).requires_grad_()
    w = wbase[:, 0]
    rbuf = torch.rand(4, 2, device=DEVICE) + 0.5
    rm, rv = torch.randn(4, device=DEVICE), rbuf[:, 1]
    assert not w.is_contiguous() and not rv.is_contiguous()
    v = torch.randn(4, 5, 6, device=DEVICE)
    ref = reference(x, w, None, rm, rv, training, 0.1, 1e-5, v.expand(3, 4, 5, 6))
    y = fg.batch_norm(x, rm, rv, w, None, training=training)
    (y.sum(0) * v).sum().backward()
    assert_close(y, ref["y"], torch.float32, "y")
    assert_close(x.grad, ref["dx"], torch.float32, "dx")
    assert_close(wbase.grad[:, 0], ref["dw"], torch.float32, "dweight")
    assert_close(rbuf[:, 1], ref["rv"], torch.float32, "running_var (strided, in place)")


@pytest.mark.parametrize("momentum,eps", [(0.0, 1e-5), (1.0, 1e-3), (0.3, 0.1)])
def test_momentum_and_eps(momentum, eps):
    run_and_compare((4, 3, 5, 6), "contiguous", torch.float32, training=True,
                     momentum=momentum, eps=eps)


def test_weight_without_bias_and_half_weights():
    # weight without bias; and an all-half module's fp16 weight and buffers.
    x = torch.randn(4, 3, 5, 6, device=DEVICE).half().requires_grad_()
    w = torch.randn(3, device=DEVICE).half().requires_grad_()
    rm, rv = torch.zeros(3, device=DEVICE).half(), torch.ones(3, device=DEVICE).half()
    dy = torch.randn_like(x)
    ref = reference(x, w, None, rm, rv, True, 0.1, 1e-5, dy)
    y = fg.batch_norm(x, rm, rv, w, None, training=True)
    y.backward(dy)
    assert rm.dtype == torch.float16 and w.grad.dtype == torch.float16
    for name, out in (("y", y), ("dx", x.grad), ("dw", w.grad), ("rm", rm), ("rv", rv)):
        assert_close(out, ref[name], torch.float16, name)


def test_cancellation_keeps_variance():
    # Large mean, tiny spread: a one-pass E[x^2] - E[x]^2 in fp32 would lose every digit.
    x = 100 + 0.01 * torch.randn(4, 3, 40, 40, device=DEVICE)
    for layout in ("contiguous", "channels_last"):
        xx = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x
        rm, rv = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
        y = fg.batch_norm(xx, rm, rv, training=True, momentum=1.0)
        ref = reference(x, None, None, torch.zeros(3), torch.ones(3), True, 1.0, 1e-5,
                         torch.ones_like(x))
        assert_close(rv, ref["rv"], torch.float32, f"running_var ({layout})")
        assert_close(rm, ref["rm"], torch.float32, f"running_mean ({layout})")
        # y = (x - mean) / std: the fp32 mean itself is only known to ulp(100)/2 = 3.8e-6, i.e.
        # 3.8e-4 of a std: that bounds any fp32 implementation's y (torch's included).
        assert rel_err(y, ref["y"]) < 1e-3


def test_deterministic():
    x = torch.randn(4, 3, 40, 40, device=DEVICE, requires_grad=True)
    w = torch.randn(3, device=DEVICE, requires_grad=True)
    outs = []
    for _ in range(2):
        x.grad = w.grad = None
        y = fg.batch_norm(x, None, None, w, None, training=True)
        y.backward(torch.ones_like(y) * torch.arange(40.0, device=DEVICE))
        outs.append((y.detach().clone(), x.grad.clone(), w.grad.clone()))
    for a, b in zip(outs[0], outs[1], strict=True):
        assert torch.equal(a, b)


def test_empty_batch():
    x = torch.randn(0, 3, 4, 5, device=DEVICE, requires_grad=True)
    w = torch.randn(3, device=DEVICE, requires_grad=True)
    b = torch.randn(3, device=DEVICE, requires_grad=True)
    rm, rv = torch.randn(3, device=DEVICE), torch.rand(3, device=DEVICE)
    rm0, rv0 = rm.clone(), rv.clone()
    y = fg.batch_norm(x, rm, rv, w, b, training=True)
    assert y.shape == x.shape
    y.sum().backward()
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.compat
def test_gradcheck(training):
    x = torch.randn(3, 2, 5, device=DEVICE, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, device=DEVICE, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, device=DEVICE, dtype=torch.float64, requires_grad=True)
    rm = torch.randn(2, device=DEVICE, dtype=torch.float64)
    rv = torch.rand(2, device=DEVICE, dtype=torch.float64) + 0.5

    def fn(x, w, b):
        # momentum 0 keeps the buffers fixed between gradcheck's evaluations.
        return fg.batch_norm(x, rm, rv, w, b, training=training, momentum=0.0)

    assert torch.autograd.gradcheck(fn, (x, w, b))


def test_opcheck():
    from torch.library import opcheck

    x = torch.randn(3, 4, 5, 6, device=DEVICE, requires_grad=True)
    xcl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(4, device=DEVICE, requires_grad=True)
    b = torch.randn(4, device=DEVICE, requires_grad=True)
    rm, rv = torch.randn(4, device=DEVICE), torch.rand(4, device=DEVICE) + 0.5
    nbt = torch.tensor(3, device=DEVICE)
    mean, invstd = torch.ops.fusedgrad.batch_norm_stats(x.detach(), rm.clone(), rv.clone(),
                                                        None, 0.1, False, 1e-5)
    for xin in (x, xcl):
        opcheck(torch.ops.fusedgrad.batch_norm_stats,
                (xin.detach(), rm.clone(), rv.clone(), nbt, 0.0, True, 1e-5))
        opcheck(torch.ops.fusedgrad.batch_norm_stats,
                (xin.detach(), None, None, None, 0.1, False, 1e-5))
        opcheck(torch.ops.fusedgrad.batch_norm_train, (xin, w, b, mean, invstd, 1e-5))
        opcheck(torch.ops.fusedgrad.batch_norm_train, (xin, None, None, mean, invstd, 1e-5))
        opcheck(torch.ops.fusedgrad.batch_norm_eval, (xin, w, b, rm, rv, 1e-5))
        opcheck(torch.ops.fusedgrad.batch_norm_backward,
                (torch.randn_like(xin), xin.detach(), w.detach(), mean, invstd, False, True,
                 1e-5, True, True))
        opcheck(torch.ops.fusedgrad.batch_norm_backward,
                (torch.randn_like(xin), xin.detach(), None, rm, rv, True, False, 1e-5, True,
                 False))


@pytest.mark.compat
def test_compile_fullgraph_training_step():
    # On CPU (interpreter) aot_eager traces with fake tensors without a C++ compiler.
    backend = "inductor" if DEVICE == "cuda" else "aot_eager"
    C = 4
    w = torch.randn(C, device=DEVICE, requires_grad=True)
    b = torch.randn(C, device=DEVICE, requires_grad=True)
    rm, rv = torch.zeros(C, device=DEVICE), torch.ones(C, device=DEVICE)

    def step(x):
        y = fg.batch_norm(x, rm, rv, w, b, training=True, momentum=0.1)
        return (y * y).sum()

    compiled = torch.compile(step, fullgraph=True, backend=backend)
    x = torch.randn(3, C, 5, 6, device=DEVICE).contiguous(memory_format=torch.channels_last)
    loss = compiled(x)
    loss.backward()
    ref = reference(x, w, b, torch.zeros(C), torch.ones(C), True, 0.1, 1e-5,
                     2 * F.batch_norm(x.double().cpu(), None, None, w.detach().double().cpu(),
                                      b.detach().double().cpu(), training=True))
    assert_close(w.grad, ref["dw"], torch.float32, "dweight")
    assert_close(rv, ref["rv"], torch.float32, "running_var")


# ----------------------------------------------------------------------------- reviewer findings


def test_eval_backward_after_running_stats_update():
    # An eval forward, then a training forward updating the same buffers in place, then the
    # eval graph's backward: works (as torch's) and uses the statistics of the eval forward.
    shape = (4, 3, 5)
    x = (torch.randn(shape, device=DEVICE) * 2 + 1).requires_grad_()
    w = torch.randn(3, device=DEVICE).requires_grad_()
    b = torch.randn(3, device=DEVICE).requires_grad_()
    rm, rv = torch.randn(3, device=DEVICE), torch.rand(3, device=DEVICE) + 0.5
    rm0, rv0 = rm.clone(), rv.clone()
    dy = torch.randn(shape, device=DEVICE)
    y = fg.batch_norm(x, rm, rv, w, b, training=False)
    fg.batch_norm(torch.randn(shape, device=DEVICE) * 3 - 2, rm, rv, training=True, momentum=0.5)
    assert not torch.equal(rm, rm0) and not torch.equal(rv, rv0)
    y.backward(dy)
    ref = reference(x, w, b, rm0, rv0, False, 0.1, 1e-5, dy)
    assert_close(x.grad, ref["dx"], torch.float32, "dx")
    assert_close(w.grad, ref["dw"], torch.float32, "dweight")
    assert_close(b.grad, ref["db"], torch.float32, "dbias")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_large_mean_end_to_end(layout):
    # Through the op: x = 1000 + 0.01 * z with z on the fp32 grid of 1000 (multiples of 2^-14)
    # and summing to exactly 0 per channel, so the fp32 batch mean is exactly 1000 and dx's
    # only error is the kernels' arithmetic. (For arbitrary data the fp32 rounding of the mean
    # itself, ulp(mean) / 2 / std / sqrt(m), bounds every fp32 implementation, torch's too.)
    # The uncentred dx had relative error ~3e-4 here.
    shape = (4, 3, 8, 8)
    k = torch.round(torch.randn(shape, device=DEVICE) * 0.01 * 2**14)
    k -= torch.round(k.mean(dim=(0, 2, 3)))[None, :, None, None]
    k[0, :, -1, -1] -= k.sum(dim=(0, 2, 3))  # the remainder (at most m / 2) on one element
    x = 1000 + k * 2.0**-14
    assert torch.equal(x.double().mean(dim=(0, 2, 3)), torch.full((3,), 1000.0).double())
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    w = torch.randn(3, device=DEVICE).requires_grad_()
    dy = torch.randn(shape, device=DEVICE)
    ref = reference(x, w, None, None, None, True, 0.1, 1e-5, dy)
    fg.batch_norm(x, None, None, w, None, training=True).backward(dy)
    assert_close(x.grad, ref["dx"], torch.float32, "dx")
    assert_close(w.grad, ref["dw"], torch.float32, "dweight")


def test_double_backward_raises_clearly():
    x = torch.randn(4, 3, 5, device=DEVICE, requires_grad=True)
    w = torch.randn(3, device=DEVICE, requires_grad=True)
    for training in (True, False):
        rm, rv = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
        y = fg.batch_norm(x, rm, rv, w, None, training=training)
        # create_graph=True alone is fine; differentiating the gradient is not.
        (gx,) = torch.autograd.grad((y ** 3).sum(), x, create_graph=True)
        with pytest.raises(RuntimeError, match="double backward .* not supported"):
            gx.sum().backward()
