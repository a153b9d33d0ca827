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


def assert_close(out, ref, dtype, what="", factor=1.0):
    tol = REL_TOL[dtype] * factor
    err = rel_err(out, ref)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e} ({dtype})"


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill with NaN (floating) so any element a kernel forgot to write shows."""
    if t.is_floating_point():
        t.fill_(float("nan"))
    else:
        t.fill_(-12345)
    return t
