"""Cross-entropy cases that a mutation run of the suite showed missing (ops/cross_entropy.py,
ops/_vocab_parallel.py, kernels/cross_entropy.py): each test here failed with one realistic
planted bug that the rest of the suite let through, and combinations never run before.

Planted bugs these tests catch (see bench/NOTES.md, "mutation survivors"):
- the gradient stored with the logits' strides instead of its own (real views: check()
  passes a slice of a wider leaf; the two-pass path as well);
- a class index equal to C (or -1) used as an address (``<=`` in the kernel's range check):
  the kernel runs with the host check bypassed;
- vocab-parallel inplace_backward without the version-counter bump;
- a logit dropped from the logsumexp (element-wise check in check()).
"""

import pytest
import torch

import fusedgrad as fg
from fusedgrad import _ce_launch as launch

from ce_reference import reference_with_grad
from helpers import DEVICE, assert_close
from test_cross_entropy import check, make_logits, make_probs, make_targets


def force_two_pass(monkeypatch, chunk=256):
    """Every row through the two-pass (multi-chunk) path with narrow chunks: small V then
    spans several chunks (the launcher's knobs; no huge vocabulary needed). The streaming
    fused kernel, not the split kernel's SOLO variant (tests/test_ce_paths.py runs that)."""
    monkeypatch.setattr(launch, "FORCE_PATH", "two_pass")
    monkeypatch.setattr(launch, "TWO_PASS_SOLO", False)
    monkeypatch.setattr(launch, "LOOP_BLOCK_V", {k: chunk for k in launch.LOOP_BLOCK_V})


# ----------------------------------------------------------------------------- real views

@pytest.mark.parametrize("path", ["single", "two_pass"])
def test_strided_view_grad_inside_zero_outside(monkeypatch, path):
    # Rows every other row of a wider buffer, classes a window of it: logits' strides
    # (1400, 1) differ from the gradient buffer's (600, 1). check() proves the gradient
    # matches inside the view and is exactly 0 in the rest of the leaf.
    if path == "two_pass":
        force_two_pass(monkeypatch)
    wide = make_logits((12, 700), torch.float32)
    x = wide[::2, 50:650]
    check(x, make_targets((6,), 600), label_smoothing=0.1)


def test_strided_spatial_view(monkeypatch):
    # (N, C, L) sliced on every axis: the class and spatial strides both differ from a
    # contiguous gradient's.
    force_two_pass(monkeypatch, chunk=128)
    wide = make_logits((2, 400, 5), torch.float32)
    x = wide[:, 20:320, 1:4]
    check(x, make_targets((2, 3), 300), weight=torch.rand(300, device=DEVICE) + 0.1)


# ----------------------------------------------------------------------------- kernel range check

@pytest.mark.parametrize("path", ["single", "two_pass"])
def test_kernel_never_addresses_an_out_of_range_target(monkeypatch, path):
    # The host check bypassed: the kernel itself gets targets exactly C and -1. Their rows
    # must come out NaN (loss and gradient), never a plausible number read from the next
    # row's logits; the other rows stay exact. The logits are a slice of a wider buffer,
    # so column C is a real neighbour value.
    if path == "two_pass":
        force_two_pass(monkeypatch, chunk=16)
    C = 37
    wide = make_logits((4, 64), torch.float32)
    logits = wide[:, :C]
    target = torch.tensor([C, 3, -1, C - 1], device=DEVICE)
    loss = torch.empty(4, dtype=torch.float32, device=DEVICE)
    lse = torch.empty(4, dtype=torch.float32, device=DEVICE)
    grad = torch.full((4, C), 7.0, device=DEVICE)
    reduce_buf = torch.zeros(8, dtype=torch.float32, device=DEVICE)
    reduce_buf[0], reduce_buf[1] = 1.0, float(C)  # [gradient scale, sum of class weights]
    launch.launch_fwd_bwd(
        launch.rows_view(logits, True), launch.rows_view(grad, True),
        launch.rows_view(target, False), None, loss, lse, reduce_buf, ignore_index=-100,
        label_smoothing=0.0, z_loss=0.0, softcap=None, prob_target=False, write_grad=True)
    bad = torch.tensor([True, False, True, False])
    assert torch.isnan(loss.cpu()[bad]).all(), loss
    assert torch.isnan(grad.cpu()[bad]).all()
    ref_loss, ref_grad = reference_with_grad(logits[~bad.to(DEVICE)],
                                             target[~bad.to(DEVICE)], reduction="none")
    assert_close(loss[~bad.to(DEVICE)], ref_loss, torch.float32, "loss", elementwise=True)
    assert_close(grad[~bad.to(DEVICE)], ref_grad, torch.float32, "grad", elementwise=True)


# ----------------------------------------------------------------------------- vocab-parallel

def test_vocab_parallel_inplace_refuses_a_graph_needing_old_logits(world_of_one):
    # sigmoid saves its output: overwriting it with the gradient must make autograd refuse.
    h = torch.randn(4, 30, device=DEVICE, requires_grad=True)
    logits = h.sigmoid()
    loss = fg.cross_entropy(logits, make_targets((4,), 30, ignore_frac=0),
                            process_group=world_of_one, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


# ----------------------------------------------------------------------------- never-run combos

def test_fp16_multi_chunk(monkeypatch):
    force_two_pass(monkeypatch)
    x = make_logits((5, 1000), torch.float16)
    check(x, make_targets((5,), 1000), weight=torch.rand(1000, device=DEVICE).half() + 0.1,
          label_smoothing=0.1, z_loss=1e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("path", ["single", "two_pass"])
def test_half_probability_targets(monkeypatch, dtype, path):
    if path == "two_pass":
        force_two_pass(monkeypatch)
    x = make_logits((4, 700), dtype)
    check(x, make_probs((4, 700)).to(dtype).to(DEVICE), label_smoothing=0.05)


def _inplace_check(x, target, **kwargs):
    """inplace_backward vs the float64 reference; the gradient lands in x's storage."""
    base = x.detach().clone().requires_grad_(True)
    xi = base * 1  # a non-leaf holding the logits
    loss = fg.cross_entropy(xi, target, inplace_backward=True, **kwargs)
    loss.backward()
    ref_loss, ref_grad = reference_with_grad(x, target, **kwargs)
    assert_close(loss, ref_loss, x.dtype, "loss", elementwise=True)
    assert_close(base.grad, ref_grad, x.dtype, "grad", elementwise=True)
    assert_close(xi.detach(), ref_grad, x.dtype, "gradient written into the logits")


def test_spatial_inplace_backward():
    x = make_logits((2, 50, 2, 3), torch.float32)
    _inplace_check(x, make_targets((2, 2, 3), 50), reduction="sum")


@pytest.mark.parametrize("path", ["single", "two_pass"])
def test_inplace_weights_softcap(monkeypatch, path):
    if path == "two_pass":
        force_two_pass(monkeypatch)
    x = make_logits((6, 600), torch.float32)
    _inplace_check(x, make_targets((6,), 600), weight=torch.rand(600, device=DEVICE) + 0.1,
                   softcap=8.0, label_smoothing=0.1)


def test_inplace_probability_targets():
    x = make_logits((5, 300), torch.float32)
    _inplace_check(x, make_probs((5, 300)).float().to(DEVICE), z_loss=1e-3)
