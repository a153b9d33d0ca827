"""The kernels around the fused cross-entropy kernel (kernels/ce_prep.py, ops/_ce_prep.py):
the prep kernel's [scale, W, divisor, n_bad] and the finishing reduction, against torch
in float64."""

import pytest
import torch

from fusedgrad import _ce_prep as prep

from helpers import DEVICE, assert_close


def run_prep(target, weight=None, divisor=None, *, n_classes, mode, weight_sum=False,
             ignore_index=-100, divisor_value=None, class_target=True, acc=torch.float32):
    """Launch the prep kernel on target viewed as (n_outer, n_inner)."""
    rows = target.view(target.shape[0], -1) if target.dim() > 0 else target.view(1, 1)
    out = torch.full((prep.REDUCE_SLOTS,), float("nan"), dtype=acc, device=DEVICE)
    hi, lo = (divisor_value, 0.0) if divisor_value is not None else (1.0, 0.0)
    n_rows = rows.numel() if class_target else target.shape[0]  # probabilities: (N, C)
    prep.launch_prep(rows, weight, divisor, out, n_rows=n_rows, n_inner=rows.shape[1],
                     n_classes=n_classes, target_strides=rows.stride(),
                     ignore_index=ignore_index, divisor_hi=hi, divisor_lo=lo,
                     class_target=class_target, weight_sum=weight_sum, divisor_mode=mode)
    return out.cpu().double()


# Row counts: fewer than one PREP_BLOCK, and more than two (the loop and its tail).
@pytest.mark.parametrize("n_rows", [7, 2 * prep.PREP_BLOCK + 3])
@pytest.mark.parametrize("weighted", [False, True])
def test_mean_divisor_counts_non_ignored_rows(n_rows, weighted):
    n_classes = 50
    t = torch.randint(0, n_classes, (n_rows,))
    t[torch.rand(n_rows) < 0.3] = -100
    w = torch.rand(n_classes) + 0.5 if weighted else None
    got = run_prep(t.to(DEVICE), w.to(DEVICE) if weighted else None, n_classes=n_classes,
                   mode=prep.DIVISOR_VALID_ROWS)
    valid = t != -100
    expect = w.double()[t[valid]].sum() if weighted else valid.sum().double()
    assert_close(got[2], expect, torch.float32, "divisor")
    assert_close(got[0], 1.0 / expect, torch.float32, "scale")
    assert got[1] == n_classes and got[3] == 0


def test_strided_targets():
    # Targets read in place through (outer, inner) strides: a column slice of a wider
    # buffer, viewed as (3 samples, 10 positions) with strides (40, 1).
    wide = torch.randint(0, 9, (3, 4, 10), device=DEVICE)
    wide[:, 1, ::3] = -100
    t = wide[:, 1, :]
    out = torch.full((prep.REDUCE_SLOTS,), float("nan"), device=DEVICE)
    prep.launch_prep(t, None, None, out, n_rows=30, n_inner=10, n_classes=9,
                     target_strides=t.stride(), ignore_index=-100, divisor_hi=1.0,
                     divisor_lo=0.0, class_target=True, weight_sum=False,
                     divisor_mode=prep.DIVISOR_VALID_ROWS)
    assert out[2].item() == (t != -100).sum().item() == 18 and out[3].item() == 0


@pytest.mark.parametrize("bad", [9, -1, 10_000_000_000])
def test_out_of_range_indices_are_counted(bad):
    t = torch.tensor([0, bad, -100, 3, bad], device=DEVICE)
    got = run_prep(t, n_classes=9, mode=prep.DIVISOR_VALID_ROWS)
    assert got[3] == 2


def test_bad_index_with_weights_is_never_an_address():
    # A weighted mean gathers w[t]; a bad t must read nothing outside the weights.
    t = torch.tensor([1, 1 << 40, -5], device=DEVICE)
    w = torch.rand(4, device=DEVICE)
    got = run_prep(t, w, n_classes=4, mode=prep.DIVISOR_VALID_ROWS)
    assert got[3] == 2 and torch.isfinite(got[2])


def test_weight_sum_only_with_smoothing():
    t = torch.randint(0, 3000, (5,), device=DEVICE)
    w = torch.rand(3000, device=DEVICE, dtype=torch.float64)
    got = run_prep(t, w, n_classes=3000, mode=prep.DIVISOR_ONE, weight_sum=True,
                   acc=torch.float64)
    assert_close(got[1], w.cpu().sum(), torch.float64, "W")
    assert got[0] == 1 and got[2] == 1
    got = run_prep(t, w, n_classes=3000, mode=prep.DIVISOR_ONE, acc=torch.float64)
    assert got[1] == 3000  # W = n_classes: nothing reads it without smoothing


@pytest.mark.parametrize("divisor", [torch.tensor(7), torch.tensor(2.5, dtype=torch.float64),
                                     torch.tensor(3.0, dtype=torch.bfloat16)])
def test_device_divisor(divisor):
    t = torch.randint(0, 5, (4,), device=DEVICE)
    got = run_prep(t, None, divisor.to(DEVICE), n_classes=5, mode=prep.DIVISOR_DEVICE)
    assert got[2] == divisor.double() and got[0] == pytest.approx(1.0 / divisor.double().item())


def test_host_divisor_and_probability_mean():
    t = torch.rand(6, 3, device=DEVICE)
    got = run_prep(t, None, None, n_classes=3, mode=prep.DIVISOR_HOST, divisor_value=4.0,
                   class_target=False)
    assert got[2] == 4.0 and got[0] == 0.25 and got[3] == 0
    got = run_prep(t, None, None, n_classes=3, mode=prep.DIVISOR_N_ROWS, class_target=False)
    assert got[2] == 6 and got[0] == pytest.approx(1 / 6)


@pytest.mark.parametrize("n_rows", [0, 5, prep.FINISH_BLOCK + 9])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_finish_sums_in_fixed_order(n_rows, out_dtype):
    loss_rows = torch.randn(n_rows, device=DEVICE)
    reduce_buf = torch.tensor([0.5, 1.0, 2.0, 0.0], device=DEVICE)
    out = torch.full((), float("nan"), dtype=out_dtype, device=DEVICE)
    prep.launch_finish(loss_rows, reduce_buf, out, n_rows)
    expect = loss_rows.double().sum() / 2.0
    if n_rows:
        assert_close(out.double(), expect, out_dtype, "loss")
    else:
        assert out.item() == 0
    again = torch.empty_like(out)
    prep.launch_finish(loss_rows, reduce_buf, again, n_rows)
    assert torch.equal(out, again)
