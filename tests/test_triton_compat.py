"""Constructs whose behaviour differs between Triton versions (kernels/_compat.py) and the
launch options that must not be left to a version's default.

Run on every CI stack (``compat``): the oldest and the newest Triton must agree here.
"""

import pytest
import torch
import triton
import triton.language as tl

import fusedgrad as fg
from fusedgrad import _runtime
from fusedgrad.kernels._compat import mask_if

from helpers import poison_

pytestmark = pytest.mark.compat


@triton.jit(do_not_specialize=["flag"])
def _masked_copy_kernel(src_ptr, dst_ptr, n, flag, BLOCK: tl.constexpr):
    """src/dst [2, BLOCK] rows of 2 programs; n: valid columns; flag: runtime int.
    Program p loads row p where mask_if(cols < n, flag) (else 7.0) and stores it only when
    p == 0 (a program_id comparison as the flag: BatchNorm's shift store)."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    x = tl.load(src_ptr + pid * BLOCK + cols, mask=mask_if(mask, flag), other=7.0)
    tl.store(dst_ptr + pid * BLOCK + cols, x, mask=mask_if(mask, pid == 0))


@triton.jit
def _masked_copy_2d_kernel(src_ptr, dst_ptr, flag, R: tl.constexpr, C: tl.constexpr):
    """src/dst [R, C]; a 2-D block mask gated by a runtime int ``flag`` (BatchNorm's tiles)."""
    r = tl.arange(0, R)[:, None]
    c = tl.arange(0, C)[None, :]
    mask = (r < R - 1) & (c < C - 1)
    x = tl.load(src_ptr + r * C + c, mask=mask_if(mask, flag), other=-1.0)
    tl.store(dst_ptr + r * C + c, x)


@triton.jit
def _scalar_mask_kernel(src_ptr, dst_ptr, idx_ptr, n, flag):
    """A *scalar* mask (index in range) gated by a runtime flag: cross-entropy's target-weight
    load. src [n]; idx [1]; dst [1]."""
    i = tl.load(idx_ptr)
    in_range = (i >= 0) & (i < n)
    safe = tl.where(in_range, i, 0)
    tl.store(dst_ptr, tl.load(src_ptr + safe, mask=mask_if(in_range, flag), other=-3.0))


# Flag values: 0 and 1 (1 is the value Triton would specialise on), 16 (divisible by 16,
# the other specialisation), -1 (any non-zero value means "on").
@pytest.mark.parametrize("flag", [0, 1, 16, -1])
def test_mask_if_runtime_flag(device, flag):
    block, n = 8, 5
    src = torch.randn(2, block, device=device)
    dst = poison_(torch.empty_like(src))
    _masked_copy_kernel[(2,)](src, dst, n, flag, BLOCK=block)
    want = torch.where(torch.tensor(flag != 0), src, torch.full_like(src, 7.0))
    torch.testing.assert_close(dst[0, :n], want[0, :n], rtol=0, atol=0)
    # Row 0 beyond n and all of row 1 (program 1) stay unwritten.
    assert torch.isnan(dst[0, n:]).all() and torch.isnan(dst[1]).all()


@pytest.mark.parametrize("flag", [0, 3])
def test_mask_if_2d(device, flag):
    src = torch.randn(4, 8, device=device)
    dst = poison_(torch.empty_like(src))
    _masked_copy_2d_kernel[(1,)](src, dst, flag, R=4, C=8)
    want = torch.full_like(src, -1.0)
    if flag:
        want[:3, :7] = src[:3, :7]
    torch.testing.assert_close(dst, want, rtol=0, atol=0)


@pytest.mark.parametrize("idx,flag", [(2, 1), (2, 0), (9, 1), (-1, 1)])
def test_mask_if_scalar_mask(device, idx, flag):
    src = torch.randn(5, device=device)
    dst = poison_(torch.empty(1, device=device))
    _scalar_mask_kernel[(1,)](src, dst, torch.tensor([idx], device=device), 5, flag)
    want = src[idx].item() if (0 <= idx < 5 and flag) else -3.0
    assert dst.item() == want


def _recorded_launches(fn):
    """Run ``fn`` with every Triton launch recorded (name, launch kwargs) and still executed."""
    from triton.runtime import interpreter, jit

    seen = []
    patched = []
    for cls in (jit.JITFunction, interpreter.InterpretedFunction):
        orig = cls.run

        def run(self, *args, _orig=orig, **kwargs):
            seen.append((getattr(self, "__name__", "?"), dict(kwargs)))
            return _orig(self, *args, **kwargs)

        patched.append((cls, orig))
        cls.run = run
    try:
        fn()
    finally:
        for cls, orig in patched:
            cls.run = orig
    return seen


def test_every_launch_sets_fp_fusion(device):
    # Triton 3.10 flips the default of floating-point contraction; every launch must pass
    # the explicit setting (ops/_runtime.FP_FUSION) so results do not depend on the version.
    def run_ops():
        x = torch.randn(6, 11, device=device, requires_grad=True)
        t = torch.randint(0, 11, (6,), device=device)
        w = torch.rand(11, device=device)
        fg.cross_entropy(x, t, weight=w, label_smoothing=0.1).backward()
        p = torch.softmax(torch.randn(6, 11, device=device), -1)
        fg.cross_entropy(x, p, reduction="none").sum().backward()
        fg.cross_entropy(x, p.requires_grad_()).backward()  # probability-target gradient
        xb = torch.randn(4, 3, 5, device=device, requires_grad=True)
        rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
        fg.batch_norm(xb, rm, rv, torch.rand(3, device=device), torch.randn(3, device=device),
                      training=True).square().sum().backward()
        fg.batch_norm(xb.detach(), rm, rv, training=False)

    seen = _recorded_launches(run_ops)
    names = {name for name, _ in seen}
    assert any("cross_entropy" in n for n in names) and any("bn_" in n for n in names), names
    assert "ce_target_grad_kernel" in names, names
    missing = sorted({name for name, kw in seen
                      if kw.get("enable_fp_fusion") is not _runtime.FP_FUSION})
    assert not missing, f"launches without enable_fp_fusion=FP_FUSION: {missing}"
