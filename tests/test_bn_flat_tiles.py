"""BatchNorm's flat tiles (ops/_bn_launch.py choose_flat_tile, the FLAT_C paths of
kernels/batch_norm.py): channels innermost with C <= 8, each sample one contiguous run read as
flat 16-byte vectors. The heuristic's choices, and every kernel of a training forward +
backward (statistics, normalise with residual and activation, backward reduction, dx) and
of eval against float64 torch, on outputs poisoned with NaN (tests/conftest.py)."""

import pytest
import torch
import torch.nn.functional as F

import fusedgrad as fg
from fusedgrad import _bn_launch as L

from helpers import DEVICE, assert_close

PARAM_DTYPE = {torch.float32: torch.float32, torch.float16: torch.float32,
               torch.bfloat16: torch.float32}


def _layout(x, layout):
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "channels_last_3d":
        return x.contiguous(memory_format=torch.channels_last_3d)
    if layout == "seq_channels":  # (N, L, C) storage viewed as (N, C, L): Conv1d / BN1d users
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "seq_first":  # (L, N, C) storage (sequence-first models) viewed as (N, C, L)
        return x.permute(2, 0, 1).contiguous().permute(1, 2, 0)
    return x.contiguous()


def _make(shape, layout, dtype):
    # Mean 0.3, std 1.5 before normalisation, plus a different offset per channel (a
    # channel mixed up with its neighbour shows in every output).
    C = shape[1]
    offset = torch.arange(C, dtype=torch.float32).view(1, C, *([1] * (len(shape) - 2)))
    x = torch.randn(shape) * 1.5 + 0.3 + offset
    return _layout(x, layout).to(dtype).to(DEVICE)


def _plan(x):
    return L.make_plan(L.prepare_input(x))


# ----------------------------------------------------------------------------- heuristic


@pytest.mark.parametrize("C", range(1, 9))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_channels_last_small_c_is_flat(C, dtype):
    x = torch.empty((2, C, 5, 7), dtype=dtype, device="meta").contiguous(
        memory_format=torch.channels_last)
    plan = L.make_plan(x)
    rows = 1 << (C - 1).bit_length()
    assert (plan.orientation, plan.flat_c, plan.block_c) == ("flat", C, rows)
    # A tile is FLAT_TILE_ELEMS lanes (half as many when C is not a power of two).
    assert plan.block_c * plan.block_s in (L.FLAT_TILE_ELEMS, L.FLAT_TILE_ELEMS_NPOT)


def test_flat_choice_boundaries():
    def plan(shape, fmt=torch.contiguous_format, dtype=torch.float32):
        return L.make_plan(torch.empty(shape, dtype=dtype, device="meta").contiguous(
            memory_format=fmt))

    cl = torch.channels_last
    # The first layer of an image model: flat, 4 rows x 256 positions (C = 3 is not a power
    # of two: 1024 lanes), N folded into one run of 16 * 512 * 512 positions.
    p = plan((16, 3, 512, 512), cl, torch.bfloat16)
    assert (p.orientation, p.block_c, p.block_s, p.N, p.S) == ("flat", 4, 256, 1, 16 * 512**2)
    assert plan((16, 8, 64, 64), cl).block_s == 256
    assert plan((4, 8, 3, 3, 3), torch.channels_last_3d).orientation == "flat"
    assert plan((37, 3)).orientation == "flat"           # BatchNorm1d (N, C) rows
    assert plan((4, 1, 9, 9)).orientation == "flat"      # C == 1: every dense layout
    # Not flat: more than FLAT_MAX_C channels, float64, channels not innermost.
    assert plan((2, 9, 4, 4), cl).orientation == "c_inner"
    assert plan((2, 3, 4, 4), cl, torch.float64).orientation == "c_inner"
    assert plan((2, 3, 4, 4)).orientation == "s_inner"


def test_plan_reports_flat_c():
    p = L.plan_batch_norm((16, 3, 512, 512), torch.bfloat16, channels_last=True)
    for _, _, meta in p.kernels_fwd + p.kernels_bwd:
        assert (meta["FLAT_C"], meta["BLOCK_C"], meta["BLOCK_S"]) == (3, 4, 256)


# ----------------------------------------------------------------------------- numerics


def _torch_act(z, activation):
    return {"identity": lambda t: t, "silu": F.silu, "hardswish": F.hardswish,
            "gelu": F.gelu}[activation](z)


def _run(shape, layout, dtype, training, activation, with_residual):
    """Forward + backward of fg.batch_norm on a flat plan against float64 torch: y, dx,
    d(residual), dweight, dbias and the running statistics."""
    C = shape[1]
    pdt = PARAM_DTYPE[dtype]
    x = _make(shape, layout, dtype).requires_grad_()
    assert _plan(x.detach()).orientation == "flat"
    res = _make(shape, layout, dtype).requires_grad_() if with_residual else None
    w = (torch.rand(C, dtype=pdt) + 0.5).to(DEVICE).requires_grad_()
    b = (torch.randn(C, dtype=pdt) * 0.5).to(DEVICE).requires_grad_()
    rm = (torch.randn(C, dtype=pdt) * 0.2).to(DEVICE)
    rv = (torch.rand(C, dtype=pdt) + 0.5).to(DEVICE)
    dy = _layout(torch.randn(shape), layout).to(dtype).to(DEVICE)

    xr, rr, wr, br = (t.detach().double().requires_grad_() if t is not None else None
                      for t in (x, res, w, b))
    rmr, rvr = rm.double(), rv.double()
    z = F.batch_norm(xr, rmr, rvr, wr, br, training=training, momentum=0.1, eps=1e-5)
    yr = _torch_act(z + rr if rr is not None else z, activation)
    yr.backward(dy.double())

    y = fg.batch_norm(x, rm, rv, w, b, training=training, momentum=0.1, eps=1e-5,
                      activation=activation, residual=res)
    assert y.stride() == x.stride()
    y.backward(dy)
    assert_close(y, yr, dtype, "y")
    assert_close(x.grad, xr.grad, dtype, "dx")
    if with_residual:
        assert_close(res.grad, rr.grad, dtype, "dresidual")
    assert_close(w.grad, wr.grad, dtype, "dweight")
    assert_close(b.grad, br.grad, dtype, "dbias")
    assert_close(rm, rmr, pdt, "running_mean")
    assert_close(rv, rvr, pdt, "running_var")


# Why each shape (positions M = N * prod(spatial); the interpreter's target of 8 programs
# splits every reduction that has several tiles):
#   C = 3 channels_last: the RGB first layer; not a power of two (padded 4th row masked);
#     M = 1350 over 6 tiles of 256 positions, the last one partial (M * C not a multiple of
#     the block), 6 splits merged by the last program.
#   C = 8 channels_last: a full power-of-two tile (per-lane parameters per column); M = 270
#     over 2 tiles of 256, the last holding 14 positions.
#   C = 4 channels_last: M = 546 over 2 tiles of 512.
#   C = 1 contiguous (NCHW): the single-channel run; M = 2115 over 2 tiles of 2048.
#   C = 5 channels_last_3d: odd, 5-D input; M = 462 over 4 tiles of 128.
#   C = 3 (N, C, L) stored as (N, L, C): channels innermost without a memory format.
#   C = 2 (N, C, L) stored as (L, N, C): positions step over samples (the launcher folds
#     n inside s); the one flat layout whose sample stride is not S * C.
FLAT_CASES = [
    ((6, 3, 15, 15), "channels_last"),
    ((2, 8, 9, 15), "channels_last"),
    ((3, 4, 13, 14), "channels_last"),
    ((5, 1, 9, 47), "contiguous"),
    ((2, 5, 3, 7, 11), "channels_last_3d"),
    ((4, 3, 70), "seq_channels"),
    ((5, 2, 61), "seq_first"),
]
_IDS = [f"C{s[1]}-{lay}" for s, lay in FLAT_CASES]


@pytest.mark.parametrize("shape,layout", FLAT_CASES, ids=_IDS)
@pytest.mark.parametrize("training", [True, False])
def test_fp32(shape, layout, training):
    # Training with a residual and an activation (every epilogue term), eval too.
    _run(shape, layout, torch.float32, training, "silu", with_residual=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,layout", [FLAT_CASES[0], FLAT_CASES[1]], ids=_IDS[:2])
@pytest.mark.parametrize("training", [True, False])
def test_half(dtype, shape, layout, training):
    # 16-bit inputs: 8 elements per 16-byte vector (the odd and the power-of-two C).
    _run(shape, layout, dtype, training, "hardswish", with_residual=True)


@pytest.mark.compat
def test_plain_no_epilogue():
    # Plain BatchNorm (identity, no residual) on the first-layer shape.
    _run((6, 3, 15, 15), "channels_last", torch.float32, True, "identity", False)


def test_deterministic_reruns():
    # Split partials merged in a fixed order: reruns are bitwise identical.
    x = _make((2, 3, 15, 15), "channels_last", torch.float32).requires_grad_()
    dy = torch.randn(x.shape).to(DEVICE)
    outs = []
    for _ in range(2):
        x.grad = None
        rm, rv = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
        y = fg.batch_norm(x, rm, rv, training=True, activation="gelu")
        y.backward(dy)
        outs.append((y.detach().clone(), x.grad.clone(), rm, rv))
    for a, b in zip(*outs, strict=True):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- occupancy


def test_programs_per_sm_from_registers():
    # Registers are allocated per warp in units of 256 (8 per thread): 128 per thread at 4
    # warps is 4 programs per SM; one more register costs a program (3 up to 168 per
    # thread), past 168 another. Shared memory binds only when large.
    f = L.programs_per_sm
    assert [f(r, 4) for r in (64, 128, 129, 168, 169, 255)] == [8, 4, 3, 3, 2, 2]
    assert f(32, 4) == 16                      # threads: 2048 per SM
    assert f(32, 1) == 32                      # blocks: 32 per SM
    assert f(64, 4, shared_bytes=64 * 1024) == 2
    assert L.PROGRAMS_PER_SM == f(L.REDUCTION_REGISTERS, L.NUM_WARPS,
                                  L.REDUCTION_SHARED_BYTES)
