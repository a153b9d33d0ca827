"""BatchNorm launcher coverage (ops/_bn_launch.py, kernels/batch_norm.py): every tile shape
the launcher can pick, in each dtype, forward and backward against float64; and the int64
row offset n * stride_n with stride_n != 0 (the older probe passes stride_n = 0, so an
int32 product there survived a planted bug)."""

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

import fusedgrad as fg
from fusedgrad import _bn_launch as L
from fusedgrad.kernels.batch_norm import _tile

from helpers import DEVICE, assert_close


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
def test_every_tile_shape(dtype, orientation, tile):
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
