"""fusedgrad.batch_norm against a float64 F.batch_norm reference (mirrors ops/batch_norm.py)."""

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

import fusedgrad as fg
from fusedgrad import _bn_launch as L
from fusedgrad.kernels.batch_norm import _tile

from helpers import DEVICE, assert_close, rel_err

PARAM_DTYPE = {torch.float32: torch.float32, torch.float16: torch.float32,
               torch.bfloat16: torch.float32, torch.float64: torch.float64}


def _make_input(shape, layout, dtype):
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


def _reference(x, weight, bias, running_mean, running_var, training, momentum, eps, dy):
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


def _run_and_compare(shape, layout, dtype, training, affine=True, running=True,
                     momentum=0.1, eps=1e-5, factor=1.0):
    x = _make_input(shape, layout, dtype).requires_grad_()
    C = shape[1]
    pdt = PARAM_DTYPE[dtype]
    weight = torch.randn(C, device=DEVICE, dtype=pdt).requires_grad_() if affine else None
    bias = torch.randn(C, device=DEVICE, dtype=pdt).requires_grad_() if affine else None
    rm = torch.randn(C, device=DEVICE, dtype=pdt) if running else None
    rv = (torch.rand(C, device=DEVICE, dtype=pdt) + 0.5) if running else None
    ref = _reference(x, weight, bias, rm, rv, training, momentum, eps,
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
    _run_and_compare(shape, layout, torch.float32, training=True)


@pytest.mark.parametrize("shape,layout", [
    ((4, 3, 37), "contiguous"), ((3, 4, 6, 5), "channels_last"), ((5, 3, 4, 4), "sliced_n"),
    ((2, 3, 3, 4, 5), "channels_last_3d"),
])
def test_eval_fp32(shape, layout):
    _run_and_compare(shape, layout, torch.float32, training=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape,layout", [
    ((4, 3, 9, 7), "contiguous"), ((3, 5, 6, 7), "channels_last"), ((6, 5), "contiguous"),
])
@pytest.mark.parametrize("training", [True, False])
def test_dtypes(dtype, shape, layout, training):
    # Half inputs use float32 weight, bias and running statistics (mixed precision).
    _run_and_compare(shape, layout, dtype, training=training)


@pytest.mark.parametrize("affine,running,training", [
    (False, True, True), (True, False, True), (False, False, True),
    (False, True, False),  # eval without parameters: dx only, no reduction pass
])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_affine_and_running_options(affine, running, training, layout):
    _run_and_compare((3, 4, 5, 6), layout, torch.float32, training=training, affine=affine,
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
    ref = _reference(x, w, None, rm, rv, training, 0.1, 1e-5, v.expand(3, 4, 5, 6))
    y = fg.batch_norm(x, rm, rv, w, None, training=training)
    (y.sum(0) * v).sum().backward()
    assert_close(y, ref["y"], torch.float32, "y")
    assert_close(x.grad, ref["dx"], torch.float32, "dx")
    assert_close(wbase.grad[:, 0], ref["dw"], torch.float32, "dweight")
    assert_close(rbuf[:, 1], ref["rv"], torch.float32, "running_var (strided, in place)")


@pytest.mark.parametrize("momentum,eps", [(0.0, 1e-5), (1.0, 1e-3), (0.3, 0.1)])
def test_momentum_and_eps(momentum, eps):
    _run_and_compare((4, 3, 5, 6), "contiguous", torch.float32, training=True,
                     momentum=momentum, eps=eps)


def test_weight_without_bias_and_half_weights():
    # weight without bias; and an all-half module's fp16 weight and buffers.
    x = torch.randn(4, 3, 5, 6, device=DEVICE).half().requires_grad_()
    w = torch.randn(3, device=DEVICE).half().requires_grad_()
    rm, rv = torch.zeros(3, device=DEVICE).half(), torch.ones(3, device=DEVICE).half()
    dy = torch.randn_like(x)
    ref = _reference(x, w, None, rm, rv, True, 0.1, 1e-5, dy)
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
        ref = _reference(x, None, None, torch.zeros(3), torch.ones(3), True, 1.0, 1e-5,
                         torch.ones_like(x))
        assert_close(rv, ref["rv"], torch.float32, f"running_var ({layout})")
        assert_close(rm, ref["rm"], torch.float32, f"running_mean ({layout})")
        # y = (x - mean) / std: the fp32 mean itself is only known to ulp(100)/2 = 3.8e-6, i.e.
        # 3.8e-4 of a std: that bounds any fp32 implementation's y (torch's included).
        assert rel_err(y, ref["y"]) < 1e-3


def test_split_heuristics_fill_the_gpu():
    # The two extremes of the issue, planned for an H100-sized target (132 SMs).
    target = L.PROGRAMS_PER_SM * 132
    for shape, fmt in [((32, 3, 512, 512), torch.contiguous_format),
                       ((32, 64, 112, 112), torch.channels_last),
                       ((32, 2048, 7, 7), torch.contiguous_format),
                       ((32, 2048, 7, 7), torch.channels_last)]:
        x = torch.empty(shape, device="meta").contiguous(memory_format=fmt)
        plan = L.make_plan(x)
        splits, tiles_per_split = L.num_splits(plan, target)
        programs = splits * plan.n_cblocks
        assert programs >= target // 2, (shape, plan, splits)
        assert (splits - 1) * tiles_per_split < plan.n_tiles <= splits * tiles_per_split


@pytest.mark.compat
def test_small_shapes_exercise_the_merge():
    # The shapes above named "several splits" really split under this device's target.
    for shape, fmt in [((4, 3, 40, 40), torch.contiguous_format),
                       ((8, 4, 16, 16), torch.channels_last)]:
        x = torch.empty(shape, device=DEVICE).contiguous(memory_format=fmt)
        splits, _ = L.num_splits(L.make_plan(x), L.target_programs(x.device))
        assert splits > 1


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


def test_errors():
    x = torch.randn(2, 3, 4, device=DEVICE)
    rm, rv = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        fg.batch_norm(torch.randn(1, 3, device=DEVICE), rm, rv, training=True)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        fg.batch_norm(torch.randn(1, 3, 1, 1, device=DEVICE), rm, rv, training=True)
    with pytest.raises(ValueError, match="running_mean"):
        fg.batch_norm(x, torch.zeros(4, device=DEVICE), rv, training=True)
    with pytest.raises(ValueError, match="weight"):
        fg.batch_norm(x, rm, rv, torch.ones(4, device=DEVICE), training=True)
    with pytest.raises(ValueError, match="bias"):
        fg.batch_norm(x, rm, rv, None, torch.ones(2, device=DEVICE), training=True)
    with pytest.raises(ValueError, match="evaluation mode"):
        fg.batch_norm(x, None, None, training=False)
    with pytest.raises(ValueError, match="input"):
        fg.batch_norm(torch.randn(3, device=DEVICE), rm, rv, training=True)
    with pytest.raises(TypeError, match="input"):
        fg.batch_norm(x.long(), rm, rv, training=True)
    with pytest.raises(ValueError, match="eps"):
        fg.batch_norm(x, rm, rv, training=True, eps=0.0)
    with pytest.raises(TypeError, match="momentum"):
        fg.batch_norm(x, rm, rv, training=True, momentum=None)
    # One value per channel is fine in eval, as in torch.
    y = fg.batch_norm(torch.randn(1, 3, device=DEVICE), rm, rv, training=False)
    assert torch.isfinite(y).all()


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
    ref = _reference(x, w, b, torch.zeros(C), torch.ones(C), True, 0.1, 1e-5,
                     2 * F.batch_norm(x.double().cpu(), None, None, w.detach().double().cpu(),
                                      b.detach().double().cpu(), training=True))
    assert_close(w.grad, ref["dw"], torch.float32, "dweight")
    assert_close(rv, ref["rv"], torch.float32, "running_var")


_STATIC_SCRIPT = """
import json
from fusedgrad import _bn_launch, static_check
reports = static_check.compile_all(_bn_launch.static_configs(), arch=90, workers=2)
print(json.dumps([[r.name, r.registers, r.problems()] for r in reports]))
"""


def test_static_compile_sm90():
    # Every configuration the launcher can choose compiles for sm_90: no spills, shared
    # memory within the limit. Compiling needs real (not interpreted) @triton.jit functions,
    # so it runs in a fresh interpreter without TRITON_INTERPRET (~35 s on 2 cores).
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", _STATIC_SCRIPT], env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    reports = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(reports) == len(L.static_configs())
    problems = {name: probs for name, _, probs in reports if probs}
    assert not problems, problems
    assert max(regs for _, regs, _ in reports) <= 255


# ----------------------------------------------------------------------------- reviewer findings


class _AsCompiled:
    """A kernel whose Python float arguments arrive rounded to float32, as compiled Triton
    passes them (it types every Python float argument fp32; the interpreter keeps float64).
    Records each launch's arguments by name."""

    def __init__(self, kernel, launches):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(dict(zip(self.kernel.arg_names, args, strict=False)))
            args = [float(torch.tensor(a, dtype=torch.float32)) if isinstance(a, float) else a
                    for a in args]
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.fixture
def compiled_scalars(monkeypatch):
    """Every BatchNorm kernel sees its host floats as a CUDA launch would; yields the launch
    log. The launcher looks the kernels up on the module at each call."""
    launches = []
    for name in dir(L.bn_kernels):
        if name.endswith("_kernel"):
            kernel = getattr(L.bn_kernels, name)
            monkeypatch.setattr(L.bn_kernels, name, _AsCompiled(kernel, launches))
    return launches


@pytest.mark.parametrize("training", [True, False])
def test_fp64_host_scalars_survive_fp32_arguments(compiled_scalars, training):
    # float64 on CUDA: momentum and eps used to reach the kernels as fp32 (running stats off
    # by 2.5e-9, y by 1e-8 for a small variance, over the 1e-10 float64 tolerance). Small
    # variance (std 1e-3) makes eps = 1e-5 matter to y and dx; momentum 0.1 is not an fp32
    # value.
    shape = (4, 3, 9, 7)
    x = (1e-3 * torch.randn(shape, device=DEVICE, dtype=torch.float64)).requires_grad_()
    w = torch.randn(3, device=DEVICE, dtype=torch.float64).requires_grad_()
    b = torch.randn(3, device=DEVICE, dtype=torch.float64).requires_grad_()
    rm = 1e-3 * torch.randn(3, device=DEVICE, dtype=torch.float64)
    rv = 1e-6 * (torch.rand(3, device=DEVICE, dtype=torch.float64) + 0.5)
    dy = torch.randn(shape, device=DEVICE, dtype=torch.float64)
    ref = _reference(x, w, b, rm, rv, training, 0.1, 1e-5, dy)
    y = fg.batch_norm(x, rm, rv, w, b, training=training, momentum=0.1, eps=1e-5)
    y.backward(dy)
    for name, out in (("y", y), ("dx", x.grad), ("dw", w.grad), ("db", b.grad), ("rm", rm),
                      ("rv", rv)):
        assert_close(out, ref[name], torch.float64, name)
    # What the launcher passed: each host float as an fp32 pair hi + lo that reproduces the
    # float64 value, and the element count m as an exact integer.
    pairs = 0
    for args in compiled_scalars:
        for name in ("eps", "momentum"):
            if f"{name}_hi" not in args:
                continue
            hi, lo = args[f"{name}_hi"], args[f"{name}_lo"]
            for part in (hi, lo):
                assert float(torch.tensor(part, dtype=torch.float32)) == part
            expected = {"eps": 1e-5, "momentum": 0.1}[name]
            if hi != 0.0:
                assert abs(hi + lo - expected) <= 1e-15 * expected, (name, hi, lo)
                pairs += 1
        if "count" in args:
            assert isinstance(args["count"], int) and args["count"] == 4 * 9 * 7
    assert pairs >= (3 if training else 2)


@triton.jit
def _tile_probe(offs_ptr, n_valid_ptr, t, tiles_per_n, S, stride_s, BLOCK_S: tl.constexpr):
    # One channel at offset 0 (c_off = 0): the offsets and the valid count of tile t.
    c = tl.arange(0, 1)
    offs, mask, n_valid = _tile(t, tiles_per_n, S, c.to(tl.int64) * 0, c < 1, 0, stride_s,
                                BLOCK_S)
    tl.store(n_valid_ptr, n_valid.to(tl.int64))
    tl.store(offs_ptr + tl.arange(0, BLOCK_S)[None, :] + c[:, None], tl.where(mask, offs, -1))


@pytest.mark.parametrize("tile", ["straddles_2^31", "last"])
@pytest.mark.parametrize("stride_s", [1, 3])  # folded NCHW rows / channels_last with C = 3
def test_tile_offsets_past_2_31(tile, stride_s):
    # Folding N into S (channels_last, C == 1, (N, C) inputs) makes S = N * H * W, which may
    # pass 2^31: the row index of a tile must not wrap in int32. Only the index math runs
    # here (no 2^31-element tensor).
    block_s = 2048
    S = 2**31 + block_s + 100
    tiles_per_n = -(-S // block_s)
    t = 2**31 // block_s if tile == "straddles_2^31" else tiles_per_n - 1
    offs = torch.zeros(1, block_s, dtype=torch.int64, device=DEVICE)
    n_valid = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    _tile_probe[(1,)](offs, n_valid, t, tiles_per_n, S, stride_s, BLOCK_S=block_s)
    s = t * block_s + torch.arange(block_s, dtype=torch.int64)
    expected = torch.where(s < S, s * stride_s, -1)
    assert int(n_valid) == min(S - t * block_s, block_s)
    assert torch.equal(offs.cpu()[0], expected)


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
    ref = _reference(x, w, b, rm0, rv0, False, 0.1, 1e-5, dy)
    assert_close(x.grad, ref["dx"], torch.float32, "dx")
    assert_close(w.grad, ref["dw"], torch.float32, "dweight")
    assert_close(b.grad, ref["db"], torch.float32, "dbias")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_dx_kernel_large_mean(layout):
    # x = 1000 + 0.01 * randn: the dx kernel, given fp32 statistics, must evaluate its formula
    # without cancellation. The old fold dx = a * dy + q * x + (r - q * mean) subtracted
    # q * x and q * mean (each ~1e5 times dx's size here): relative error ~3e-4.
    shape = (4, 3, 8, 8)
    x = (1000 + 0.01 * torch.randn(shape, device=DEVICE))
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    dy = torch.randn(shape, device=DEVICE).contiguous(memory_format=torch.channels_last)
    w = torch.randn(3, device=DEVICE)
    xd, dyd = x.double(), dy.double()
    m = x.numel() // 3
    mean = xd.mean(dim=(0, 2, 3)).float()
    invstd = (xd.var(dim=(0, 2, 3), unbiased=False) + 1e-5).rsqrt().float()
    # float64 evaluation of the same formula with the same fp32 statistics.
    x_hat = (xd - mean.double()[:, None, None]) * invstd.double()[:, None, None]
    sums = torch.stack([dyd.sum(dim=(0, 2, 3)), (dyd * x_hat).sum(dim=(0, 2, 3))])
    expected = (w.double() * invstd.double())[:, None, None] / m * (
        m * dyd - sums[0][:, None, None] - x_hat * sums[1][:, None, None])
    xp = L.prepare_input(x)
    plan = L.make_plan(xp)
    dx = L.dx(xp, L.match_layout(dy, xp), plan, mean, invstd, False, w, sums.float(), m,
              True, 1e-5)
    assert_close(dx, expected, torch.float32, "dx")


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
    ref = _reference(x, w, None, None, None, True, 0.1, 1e-5, dy)
    fg.batch_norm(x, None, None, w, None, training=True).backward(dy)
    assert_close(x.grad, ref["dx"], torch.float32, "dx")
    assert_close(w.grad, ref["dw"], torch.float32, "dweight")


@pytest.mark.parametrize("shape,layout", [
    ((100, 3, 8, 8), "contiguous"),   # spatial-inner, one 32x64 tile per sample: 100 splits
    ((40000, 3), "contiguous"),       # (N, C) folded to one channel-inner row: 79 splits
])
def test_merge_over_many_chunks(monkeypatch, shape, layout):
    # Under the interpreter the split count targets PROGRAMS_PER_SM * INTERPRETER_SMS programs
    # (8): the merges never loop past their first MERGE_BLOCK_P parts. A bigger pretend GPU
    # makes both merges (statistics and backward sums) run over several chunks, the last
    # one partly filled.
    monkeypatch.setattr(L, "INTERPRETER_SMS", 40)
    x = torch.empty(shape, device=DEVICE)
    splits, _ = L.num_splits(L.make_plan(x), L.target_programs(x.device))
    assert splits > 2 * L.MERGE_BLOCK_P and splits % L.MERGE_BLOCK_P != 0, splits
    _run_and_compare(shape, layout, torch.float32, training=True)


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
