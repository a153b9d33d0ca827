"""Shared test utilities: the per-dtype tolerance table, error metric, poisoning."""

import torch

from conftest import DEVICE  # noqa: F401  (re-exported for test modules)

# Relative tolerance on ||out - ref|| / ||ref|| against a float64 reference, by the
# dtype the kernel reads and writes. One table for the whole suite.
REL_TOL = {
    torch.float64: 1e-10,
    torch.float32: 2e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN anywhere in ``out`` gives inf (never passes)."""
    out = out.detach().to(torch.float64).cpu()
    ref = ref.detach().to(torch.float64).cpu()
    assert out.shape == ref.shape, (out.shape, ref.shape)
    nan_out, nan_ref = torch.isnan(out), torch.isnan(ref)
    if not torch.equal(nan_out, nan_ref):
        return float("inf")
    out = out[~nan_ref]
    ref = ref[~nan_ref]
    if not torch.isfinite(out).all() or not torch.equal(torch.isinf(out), torch.isinf(ref)):
        return float("inf")
    denom = ref.norm().item()
    num = (out - ref).norm().item()
    if denom == 0.0:
        return num
    return num / denom


# Element-wise check (opt-in, ``assert_close(..., elementwise=True)``): the largest
# |out - ref| / |ref| over the elements whose reference is not tiny, i.e. at least
# ELEM_FLOOR[dtype] * max |ref| (smaller ones are rounding noise of the dtype and stay with
# the norm-wise check). It catches an error confined to small elements (e.g. a logit
# dropped from a row's logsumexp shifts every probability of the row by the same factor,
# invisible next to the norm of the target's -1). The tolerance covers the output's own
# rounding (bf16 2^-9, fp16 2^-11) plus the kernels' fp32 math (fp32: probability targets
# with smoothing, z_loss and softcap reach 1.7e-4 where p - y cancels).
ELEM_TOL = {
    torch.float64: 1e-9,
    torch.float32: 5e-4,
    torch.float16: 4e-3,
    torch.bfloat16: 3e-2,
}
ELEM_FLOOR = {
    torch.float64: 1e-9,
    torch.float32: 1e-5,
    torch.float16: 1e-3,
    torch.bfloat16: 1e-2,
}


def max_elem_rel_err(out: torch.Tensor, ref: torch.Tensor, floor: float) -> float:
    """max |out - ref| / |ref| over elements with |ref| >= floor * max |ref| (float64).
    Non-finite references are left to rel_err (which compares NaN/inf patterns)."""
    out = out.detach().to(torch.float64).cpu()
    ref = ref.detach().to(torch.float64).cpu()
    assert out.shape == ref.shape, (out.shape, ref.shape)
    finite = torch.isfinite(ref)
    if not finite.any():
        return 0.0
    mag = ref.abs()
    keep = finite & (mag >= floor * mag[finite].max()) & (mag > 0)
    if not keep.any():
        return 0.0
    err = ((out[keep] - ref[keep]).abs() / mag[keep]).max().item()
    return err if err == err else float("inf")  # NaN never passes


def assert_close(out, ref, dtype, what="", factor=1.0, elementwise=False):
    tol = REL_TOL[dtype] * factor
    err = rel_err(out, ref)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e} ({dtype})"
    if elementwise:
        etol = ELEM_TOL[dtype] * factor
        eerr = max_elem_rel_err(out, ref, ELEM_FLOOR[dtype])
        assert eerr <= etol, (f"{what}: element-wise relative error {eerr:.3e} > {etol:.1e} "
                              f"({dtype}; elements >= {ELEM_FLOOR[dtype]:.0e} * max |ref|)")


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill with NaN (floating) so any element a kernel forgot to write shows."""
    if t.is_floating_point():
        t.fill_(float("nan"))
    else:
        t.fill_(-12345)
    return t
