"""fusedgrad.batch_norm's fused epilogue, act(bn(x) + residual), against float64 torch
(mirrors the activation/residual part of ops/batch_norm.py and kernels/batch_norm.py)."""

import pytest
import torch
import torch.nn.functional as F

import fusedgrad as fg
from fusedgrad.batch_norm import FUSED_ACTIVATIONS, batch_norm_tracked

from helpers import DEVICE, assert_close

PARAM_DTYPE = {torch.float32: torch.float32, torch.float16: torch.float32,
               torch.bfloat16: torch.float32, torch.float64: torch.float64}
ACTIVATIONS = ["identity", "relu", "silu", "gelu", "gelu_tanh", "leaky_relu", "hardswish"]


def _torch_act(z, activation, slope):
    return {
        "identity": lambda t: t,
        "relu": F.relu,
        "silu": F.silu,
        "gelu": F.gelu,
        "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
        "leaky_relu": lambda t: F.leaky_relu(t, slope),
        "hardswish": F.hardswish,
    }[activation](z)


def _make(shape, layout, dtype):
    # Mean 0.3, std 1.5 before normalisation; the normalised values straddle every
    # activation's kinks (0 for relu, +-3 for hardswish) with random data.
    x = torch.randn(shape, device=DEVICE) * 1.5 + 0.3
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x.to(dtype)


def _run(shape, layout, dtype, training, activation, with_residual, affine=True,
         momentum=0.1, slope=None, factor=1.0):
    """Forward + backward of fg.batch_norm with the epilogue, compared with float64 torch:
    output, dx, d(residual), dweight, dbias and the running statistics."""
    C = shape[1]
    pdt = PARAM_DTYPE[dtype]
    x = _make(shape, layout, dtype).requires_grad_()
    res = _make(shape, layout, dtype).requires_grad_() if with_residual else None
    w = (torch.rand(C, device=DEVICE, dtype=pdt) + 0.5).requires_grad_() if affine else None
    b = (torch.randn(C, device=DEVICE, dtype=pdt) * 0.5).requires_grad_() if affine else None
    rm = torch.randn(C, device=DEVICE, dtype=pdt) * 0.2
    rv = torch.rand(C, device=DEVICE, dtype=pdt) + 0.5
    dy = torch.randn(shape, device=DEVICE).to(dtype)
    param = slope if activation == "leaky_relu" else None
    ref_slope = 0.01 if slope is None else slope

    leaves = [t.detach().double().requires_grad_() if t is not None else None
              for t in (x, res, w, b)]
    xr, rr, wr, br = leaves
    rmr, rvr = rm.double(), rv.double()
    z = F.batch_norm(xr, rmr, rvr, wr, br, training=training, momentum=momentum, eps=1e-5)
    if rr is not None:
        z = z + rr
    yr = _torch_act(z, activation, ref_slope)
    yr.backward(dy.double())

    y = fg.batch_norm(x, rm, rv, w, b, training=training, momentum=momentum, eps=1e-5,
                      activation=activation, residual=res, activation_param=param)
    assert y.dtype == dtype and y.shape == x.shape
    if layout == "channels_last":
        assert y.stride() == x.stride()
    y.backward(dy)
    assert_close(y, yr, dtype, f"y ({activation})", factor)
    assert_close(x.grad, xr.grad, dtype, f"dx ({activation})", factor)
    if with_residual:
        assert res.grad.dtype == dtype
        assert_close(res.grad, rr.grad, dtype, f"dresidual ({activation})", factor)
    if affine:
        assert_close(w.grad, wr.grad, dtype, f"dweight ({activation})", factor)
        assert_close(b.grad, br.grad, dtype, f"dbias ({activation})", factor)
    assert_close(rm, rmr, pdt, "running_mean")
    assert_close(rv, rvr, pdt, "running_var")


# Each activation, with and without the residual, in both orientations of the kernels
# (spatial-inner NCHW, channel-inner channels_last); small shapes that still split a
# channel over several programs (48 values per channel, C = 5 odd).
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_train_fp32(activation, with_residual, layout):
    _run((4, 5, 3, 4), layout, torch.float32, True, activation, with_residual)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_eval_fp32(activation, layout):
    # Eval: running statistics normalise; the residual rides along on half of the cases.
    _run((3, 5, 2, 3), layout, torch.float32, False, activation,
         with_residual=(layout == "channels_last"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("activation", ["relu", "silu", "gelu_tanh"])
@pytest.mark.parametrize("training", [True, False])
def test_dtypes(dtype, activation, training):
    # Half inputs with float32 parameters (mixed precision), and float64 end to end.
    _run((4, 5, 3, 2), "channels_last", dtype, training, activation, with_residual=True)


@pytest.mark.compat
def test_compat_relu_residual():
    # The ResNet epilogue relu(bn(x) + shortcut), forward and backward, training.
    _run((2, 3, 4, 4), "contiguous", torch.float32, True, "relu", with_residual=True)


@pytest.mark.parametrize("training", [True, False])
def test_affine_off(training):
    _run((4, 3, 5), "contiguous", torch.float32, training, "silu", with_residual=True,
         affine=False)


@pytest.mark.parametrize("slope", [0.2, -0.5])
def test_leaky_relu_slope(slope):
    _run((4, 3, 2, 3), "contiguous", torch.float32, True, "leaky_relu", with_residual=False,
         slope=slope)


def test_momentum_none_cumulative():
    # momentum=None: cumulative average with factor 1 / num_batches_tracked (the modules'
    # path, reached through batch_norm_tracked).
    x = _make((4, 3, 5), "contiguous", torch.float32)
    rm, rv = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
    nbt = torch.tensor(4, device=DEVICE)
    y = batch_norm_tracked(x, rm, rv, None, None, True, None, 1e-5, nbt,
                           activation="relu", residual=None)
    xd = x.double()
    ref_rm = 0.75 * 0 + 0.25 * xd.mean(dim=(0, 2))
    ref_rv = 0.75 * 1 + 0.25 * xd.var(dim=(0, 2), unbiased=True)
    assert_close(rm, ref_rm, torch.float32, "running_mean")
    assert_close(rv, ref_rv, torch.float32, "running_var")
    ref_y = F.relu(F.batch_norm(xd, None, None, training=True))
    assert_close(y, ref_y, torch.float32, "y")


def test_deterministic_reruns():
    # Bitwise identical outputs and gradients across reruns (fixed-order merges, no atomics
    # on floats).
    x = _make((8, 4, 6, 6), "channels_last", torch.float32).requires_grad_()
    r = _make((8, 4, 6, 6), "channels_last", torch.float32).requires_grad_()
    w = torch.randn(4, device=DEVICE, requires_grad=True)
    dy = torch.randn(8, 4, 6, 6, device=DEVICE)
    outs = []
    for _ in range(2):
        x.grad = r.grad = w.grad = None
        y = fg.batch_norm(x, None, None, w, None, training=True, activation="gelu",
                          residual=r)
        y.backward(dy)
        outs.append((y.detach().clone(), x.grad.clone(), r.grad.clone(), w.grad.clone()))
    for a, b in zip(outs[0], outs[1], strict=True):
        assert torch.equal(a, b)


def test_fused_activations_public():
    assert fg.batch_norm.FUSED_ACTIVATIONS == frozenset(ACTIVATIONS)
    assert isinstance(FUSED_ACTIVATIONS, frozenset)


def test_errors():
    x = torch.randn(2, 3, 4, device=DEVICE)
    rm, rv = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
    with pytest.raises(ValueError, match="activation"):
        fg.batch_norm(x, rm, rv, training=True, activation="tanh")
    with pytest.raises(ValueError, match="activation_param"):
        fg.batch_norm(x, rm, rv, training=True, activation="relu", activation_param=0.1)
    with pytest.raises(TypeError, match="activation_param"):
        fg.batch_norm(x, rm, rv, training=True, activation="leaky_relu",
                      activation_param="0.1")
    with pytest.raises(ValueError, match="residual"):
        fg.batch_norm(x, rm, rv, training=True, residual=torch.randn(2, 3, 5, device=DEVICE))
    with pytest.raises(TypeError, match="residual"):
        fg.batch_norm(x, rm, rv, training=True, residual=x.double())
    with pytest.raises(TypeError, match="residual"):
        fg.batch_norm(x, rm, rv, training=True, residual=1.0)


def _all_tiles():
    """Every (dtype, layout, tile) the launcher's tables offer."""
    from fusedgrad import _bn_launch as L

    out = [(torch.float32, "contiguous", t) for t in L.S_INNER_TILES]
    out += [(torch.float32, "channels_last", t) for t in L.C_INNER_TILES]
    out += [(torch.float64, "contiguous", L.FP64_TILES["s_inner"]),
            (torch.float64, "channels_last", L.FP64_TILES["c_inner"])]
    return out


@pytest.mark.parametrize("dtype,layout,tile", _all_tiles(),
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v))
def test_every_tile(monkeypatch, dtype, layout, tile):
    # Each tile shape of the tables, forced, on a shape that leaves partial tiles along both
    # axes (C = 5, H * W = 77) and several splits: the fused epilogue forward and backward.
    from fusedgrad import _bn_launch as L

    monkeypatch.setattr(L, "choose_tile", lambda orientation, C, S, dt: tile)
    monkeypatch.setattr(L, "FLAT_MAX_C", 0)  # C = 5 channels_last would take a flat tile
    monkeypatch.setattr(L, "_PLANS", {})
    x = torch.empty((2, 5, 7, 11), device=DEVICE)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    plan = L.make_plan(x)
    assert (plan.block_c, plan.block_s) == tile
    _run((2, 5, 7, 11), layout, dtype, True, "silu", with_residual=True)


def test_tickets_left_zero():
    # The reductions' last program resets its channel block's counter: after a forward and
    # backward every counter is zero again (the next launch depends on it).
    from fusedgrad import _bn_launch as L

    _run((4, 70, 3, 3), "channels_last", torch.float32, True, "relu", with_residual=True)
    assert L._TICKETS
    for t in L._TICKETS.values():
        assert int(t.abs().sum()) == 0


def test_compile_fullgraph_fused_epilogue():
    # torch.compile traces the custom ops with the epilogue arguments (aot_eager on CPU:
    # fake tensors, no C++ compiler), gradients reach x, the residual and the parameters.
    backend = "inductor" if DEVICE == "cuda" else "aot_eager"
    C = 3
    w = torch.rand(C, device=DEVICE).add_(0.5).requires_grad_()
    b = torch.randn(C, device=DEVICE).requires_grad_()
    rm, rv = torch.zeros(C, device=DEVICE), torch.ones(C, device=DEVICE)

    def step(x, r):
        return fg.batch_norm(x, rm, rv, w, b, training=True, activation="relu", residual=r)

    compiled = torch.compile(step, fullgraph=True, backend=backend)
    x = _make((2, C, 3, 4), "channels_last", torch.float32).requires_grad_()
    r = _make((2, C, 3, 4), "channels_last", torch.float32).requires_grad_()
    dy = torch.randn(2, C, 3, 4, device=DEVICE)
    compiled(x, r).backward(dy)
    xr, rr = x.detach().double().requires_grad_(), r.detach().double().requires_grad_()
    wr, br = w.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    F.relu(F.batch_norm(xr, None, None, wr, br, training=True) + rr).backward(dy.double())
    for name, out, ref in (("dx", x.grad, xr.grad), ("dresidual", r.grad, rr.grad),
                           ("dweight", w.grad, wr.grad), ("dbias", b.grad, br.grad)):
        assert_close(out, ref, torch.float32, name)
