"""BatchNorm launcher coverage (ops/_bn_launch.py, kernels/batch_norm.py): every tile shape
the launcher can pick, in each dtype, forward and backward against float64; and the int64
row offset n * stride_n with stride_n != 0 (the older probe passes stride_n = 0, so an
int32 product there survived a planted bug); split heuristics and merges over many chunks,
int64 tile offsets, host floats as fp32 pairs, the dx kernel's centring, and the offline
compile of every configuration."""

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

import fusedgrad as fg
from fusedgrad import _bn_launch as L
from fusedgrad.kernels.batch_norm import _tile

from bn_reference import reference, run_and_compare
from helpers import DEVICE, assert_close
from static_recorded import recorded_reports


@triton.jit
def _row_offset_probe(offs_ptr, t, tiles_per_n, S, stride_n, stride_s, BLOCK_S: tl.constexpr):
    # One channel at offset 0: the offsets of tile t, -1 where masked.
    c = tl.arange(0, 1)
    offs, mask, n_valid = _tile(t, tiles_per_n, S, c.to(tl.int64) * 0, c < 1, stride_n,
                                stride_s, BLOCK_S)
    tl.store(offs_ptr + tl.arange(0, BLOCK_S)[None, :] + c[:, None], tl.where(mask, offs, -1))


@pytest.mark.parametrize("n", [3, 7])  # below and above 2^31 / stride_n
def test_row_offset_n_times_stride_n_is_int64(n):
    # A batch whose sample stride is large (N not foldable into S, e.g. a slice of a wider
    # buffer): n * stride_n passes 2^31 for n = 7 although both factors fit in int32.
    block_s = 128
    S = 100
    stride_n = 2**29 + 3
    offs = torch.zeros(1, block_s, dtype=torch.int64, device=DEVICE)
    _row_offset_probe[(1,)](offs, n, 1, S, stride_n, 1, BLOCK_S=block_s)
    s = torch.arange(block_s, dtype=torch.int64)
    expected = torch.where(s < S, n * stride_n + s, -1)
    assert torch.equal(offs.cpu()[0], expected)


def _layout_for(orientation, tile, dtype):
    """A small input whose plan picks ``tile``: (N, C, S) contiguous for spatial-inner
    tiles (S selects), (N, C) for channel-inner ones (C selects; N becomes the row)."""
    block_c, block_s = tile
    if orientation == "s_inner":
        S = block_s - 5 if block_s > 64 else 50
        if (block_c, block_s) == L.S_INNER_TILES[-1] and dtype != torch.float64:
            S = L.S_INNER_TILES[-2][1] + 77  # wider than every other tile
        return torch.randn(2, 3, S) * 2 + 1
    C = block_c - 3 if block_c > 4 else 3
    if (block_c, block_s) == L.C_INNER_TILES[-1] and dtype != torch.float64:
        C = L.C_INNER_TILES[-2][0] + 9
    return torch.randn(5, C) * 2 + 1


_TILE_CASES = [(dt, "s_inner", t) for dt in (torch.float32, torch.float16, torch.bfloat16)
               for t in L.S_INNER_TILES]
_TILE_CASES += [(dt, "c_inner", t) for dt in (torch.float32, torch.float16, torch.bfloat16)
                for t in L.C_INNER_TILES]
_TILE_CASES += [(torch.float64, o, t) for o, t in L.FP64_TILES.items()]


@pytest.mark.parametrize("dtype,orientation,tile", _TILE_CASES,
                         ids=[f"{str(d)[6:]}-{o}-{t[0]}x{t[1]}" for d, o, t in _TILE_CASES])
def test_every_tile_shape(monkeypatch, dtype, orientation, tile):
    # Flat tiles off: the small channel-inner tiles still serve layouts whose positions do
    # not step by C, and float64 (tests/test_bn_flat_tiles.py covers the flat ones).
    monkeypatch.setattr(L, "FLAT_MAX_C", 0)
    monkeypatch.setattr(L, "_PLANS", {})
    x = _layout_for(orientation, tile, dtype).to(dtype).to(DEVICE)
    plan = L.make_plan(L.prepare_input(x))
    assert (plan.orientation, (plan.block_c, plan.block_s)) == (orientation, tile)
    C = x.shape[1]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    w = (torch.rand(C, dtype=acc) + 0.5).to(DEVICE)
    b = torch.randn(C, dtype=acc).to(DEVICE)
    rm, rv = torch.zeros(C, dtype=acc, device=DEVICE), torch.ones(C, dtype=acc, device=DEVICE)
    dy = torch.randn(x.shape).to(dtype).to(DEVICE)
    xg, wg, bg = (t.detach().clone().requires_grad_(True) for t in (x, w, b))
    y = fg.batch_norm(xg, rm, rv, wg, bg, training=True, momentum=0.1, eps=1e-5)
    y.backward(dy)

    x64, w64, b64 = (t.detach().double().requires_grad_(True) for t in (x, w, b))
    rm64, rv64 = torch.zeros(C, dtype=torch.float64), torch.ones(C, dtype=torch.float64)
    y64 = F.batch_norm(x64.cpu(), rm64, rv64, w64.cpu(), b64.cpu(), training=True,
                       momentum=0.1, eps=1e-5)
    y64.backward(dy.double().cpu())
    assert_close(y, y64, dtype, "y")
    assert_close(xg.grad, x64.grad, dtype, "dx")
    assert_close(wg.grad, w64.grad, dtype, "dweight")
    assert_close(bg.grad, b64.grad, dtype, "dbias")
    assert_close(rm, rm64, dtype, "running_mean")
    assert_close(rv, rv64, dtype, "running_var")


# ----------------------------------------------------- moved here from test_batch_norm.py


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


def test_static_compile_sm90():
    # Every configuration the launcher chose over the recorded grid of real calls
    # (bench/launch_capture.py: every tile of each layout and dtype, every fused activation,
    # residuals, int64 offsets) compiles for sm_90: no spills, shared memory within the limit.
    from bench import launch_capture

    reports = recorded_reports((launch_capture._bn_calls,))
    problems = {f"{r['name']} {r['constexprs']}": r["problems"] for r in reports
                if r["problems"]}
    assert not problems, problems
    assert {"bn_stats_kernel", "bn_apply_kernel", "bn_bwd_reduce_kernel",
            "bn_bwd_dx_kernel"} <= {r["kernel"] for r in reports}
    assert max(r["registers"] for r in reports) <= 255


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

    @property
    def arg_names(self):
        return self.kernel.arg_names

    def run(self, *args, grid, warmup, **kwargs):  # what kernel[grid](...) calls
        assert not warmup
        return self[grid](*args, **kwargs)


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
    ref = reference(x, w, b, rm, rv, training, 0.1, 1e-5, dy)
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
    run_and_compare(shape, layout, torch.float32, training=True)
