"""Gradients with respect to probability targets (ops/_ce_target_grad.py) against float64
references and torch's gradcheck."""

import pytest
import torch
import torch.nn.functional as F

import fusedgrad as fg

from ce_reference import reference_cross_entropy
from helpers import assert_close

FEATURES = {
    "plain": {},
    "weight": {"weight": True},
    "smoothing": {"label_smoothing": 0.15},
    # softcap and z_loss change the logits' gradient; dL/dy uses the capped log-probs.
    "all": {"weight": True, "label_smoothing": 0.1, "softcap": 4.0, "z_loss": 1e-3},
}


def _inputs(shape, dtype, device, n_classes_dim=1):
    x = torch.randn(shape, dtype=dtype, device=device) * 2
    y = torch.softmax(torch.randn(shape, device=device), dim=n_classes_dim).to(dtype)
    return x, y


def _kwargs(feature, n_classes, device):
    kw = dict(FEATURES[feature])
    if kw.pop("weight", False):
        kw["weight"] = torch.rand(n_classes, device=device) + 0.5
    return kw


def _reference(x, y, go, kw):
    xr = x.detach().double().requires_grad_()
    yr = y.detach().double().requires_grad_()
    kw = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    loss = reference_cross_entropy(xr, yr, **kw)
    gx, gy = torch.autograd.grad(loss, (xr, yr), go.double())
    return loss, gx, gy


# Every feature with every reduction on (N, C) rows; then the other shapes with everything
# on: (N, C, H, W) spatial (class dim strided) and (C,), one unbatched row.
CASES = [((6, 37), r, f) for f in FEATURES for r in ("mean", "sum", "none")] + [
    (shape, r, "all") for shape in [(2, 9, 3, 2), (11,)] for r in ("mean", "none")]


@pytest.mark.parametrize("shape,reduction,feature", CASES)
def test_target_grad_vs_float64(device, shape, reduction, feature):
    cdim = 1 if len(shape) > 1 else 0
    x, y = _inputs(shape, torch.float32, device, cdim)
    x.requires_grad_()
    y.requires_grad_()
    kw = _kwargs(feature, shape[cdim], device)
    loss = fg.cross_entropy(x, y, reduction=reduction, **kw)
    # A non-trivial grad_output: per row for "none", else a scalar != 1.
    go = torch.randn(loss.shape, device=device) if reduction == "none" else torch.tensor(
        0.7, device=device)
    gx, gy = torch.autograd.grad(loss, (x, y), go)
    ref_loss, ref_gx, ref_gy = _reference(x, y, go, dict(kw, reduction=reduction))
    assert gy.shape == y.shape and gy.dtype == y.dtype
    assert_close(loss, ref_loss, torch.float32, "loss")
    assert_close(gx, ref_gx, torch.float32, "dlogits")
    assert_close(gy, ref_gy, torch.float32, "dtarget")


@pytest.mark.compat
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_target_grad_gradcheck_float64(device, reduction):
    x, y = _inputs((2, 4, 2), torch.float64, device)
    x.requires_grad_()
    y.requires_grad_()
    w = torch.rand(4, dtype=torch.float64, device=device) + 0.5

    def f(x, y):
        return fg.cross_entropy(x, y, weight=w, reduction=reduction, label_smoothing=0.2)

    # fast_mode: a random projection of the Jacobian (fewer interpreted launches).
    assert torch.autograd.gradcheck(f, (x, y), eps=1e-6, atol=1e-7, fast_mode=True)


def test_target_only_requires_grad(device):
    # Distillation the other way round: the logits are fixed, the soft labels learn.
    x, y = _inputs((4, 10), torch.float32, device)
    y.requires_grad_()
    fg.cross_entropy(x, y).backward()
    yr = y.detach().double().requires_grad_()
    F.cross_entropy(x.double(), yr).backward()
    assert_close(y.grad, yr.grad, torch.float32, "dtarget")


def test_target_grad_with_divisor(device):
    x, y = _inputs((5, 8), torch.float32, device)
    x.requires_grad_()
    y.requires_grad_()
    divisor = torch.tensor(3.0, device=device)
    fg.cross_entropy(x, y, reduction="sum", divisor=divisor).backward()
    xr = x.detach().double().requires_grad_()
    yr = y.detach().double().requires_grad_()
    (F.cross_entropy(xr, yr, reduction="sum") / 3.0).backward()
    assert_close(x.grad, xr.grad, torch.float32, "dlogits")
    assert_close(y.grad, yr.grad, torch.float32, "dtarget")


def test_target_grad_strided_target(device):
    # A transposed (non-contiguous) target and logits, as users pass them.
    x = torch.randn(13, 4, device=device).t().requires_grad_()
    y = torch.softmax(torch.randn(13, 4, device=device), 0).t().requires_grad_()
    assert not y.is_contiguous()
    gx, gy = torch.autograd.grad(fg.cross_entropy(x, y), (x, y))
    _, ref_gx, ref_gy = _reference(x, y, torch.tensor(1.0), {})
    assert_close(gx, ref_gx, torch.float32, "dlogits")
    assert_close(gy, ref_gy, torch.float32, "dtarget")


def test_target_grad_refused_with_process_group(device):
    x, y = _inputs((2, 3), torch.float32, device)
    with pytest.raises(ValueError, match="process_group"):
        fg.cross_entropy(x, y.requires_grad_(), process_group=object())


def test_detached_target_takes_the_common_path(device, monkeypatch):
    # Only a target that requires grad reaches the target-gradient op.
    from fusedgrad import _ce_target_grad

    def boom(*a, **k):
        raise AssertionError("target-gradient path taken")

    monkeypatch.setattr(_ce_target_grad, "launch_target_grad", boom)
    x, y = _inputs((3, 6), torch.float32, device)
    fg.cross_entropy(x.requires_grad_(), y).backward()
    with torch.no_grad():
        fg.cross_entropy(x, y.requires_grad_())
