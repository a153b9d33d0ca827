"""fusedgrad.cross_entropy(..., reduction="sum", divisor=d) (ops/cross_entropy.py): the loss
is sum / d and the gradient is written already divided by d, so backward has nothing to
scale. Hugging Face's ``num_items_in_batch`` is the use: a token count over the whole
(accumulated) batch, an integer tensor on the device.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fusedgrad as fg
from fusedgrad import _ce_launch

from ce_reference import reference_with_grad
from helpers import DEVICE, assert_close


def _logits(shape, dtype=torch.float32):
    return (torch.randn(shape) * 3).to(dtype).to(DEVICE)


def _targets(shape, n_classes):
    t = torch.randint(0, n_classes, shape)
    t[torch.rand(shape) < 0.25] = -100
    return t.to(DEVICE)


# A Python int, a float, an int64 device tensor (num_items_in_batch) and a float tensor.
DIVISORS = [
    pytest.param(lambda: 7, id="int"),
    pytest.param(lambda: 2.5, id="float"),
    pytest.param(lambda: torch.tensor(13, device=DEVICE), id="int64-tensor"),
    pytest.param(lambda: torch.tensor(0.75, dtype=torch.float64, device=DEVICE),
                 id="f64-tensor"),
]


def _check(x, t, divisor, grad_output=None, inplace=False, **kw):
    dtype = x.dtype
    leaf = x.detach().clone().requires_grad_(True)
    inp = leaf * 1.0 if inplace else leaf  # in-place needs a non-leaf
    loss = fg.cross_entropy(inp, t, reduction="sum", divisor=divisor, inplace_backward=inplace,
                            **kw)
    go = torch.tensor(1.0, dtype=dtype, device=DEVICE) if grad_output is None else grad_output
    loss.backward(go)
    d = float(divisor)
    ref_loss, ref_grad = reference_with_grad(x, t, grad_output=go / d, reduction="sum", **kw)
    assert loss.shape == ()
    assert_close(loss, ref_loss / d, dtype, "loss")
    assert_close(leaf.grad, ref_grad, dtype, "grad")


@pytest.mark.parametrize("make_divisor", DIVISORS)
def test_divisor_index_targets(make_divisor):
    x = _logits((9, 37))
    _check(x, _targets((9,), 37), make_divisor(), weight=torch.rand(37, device=DEVICE),
           label_smoothing=0.1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_divisor_dtypes_grad_output(dtype):
    # grad_output != 1 still reaches the gradient (backward rescale), on top of the divisor.
    x = _logits((6, 50), dtype)
    go = torch.tensor(-1.5, dtype=dtype, device=DEVICE)
    _check(x, _targets((6,), 50), torch.tensor(11, device=DEVICE), grad_output=go,
           z_loss=1e-3)


def test_divisor_probability_targets_spatial():
    x = _logits((3, 20, 4))
    y = torch.softmax(torch.randn(3, 20, 4, dtype=torch.float64), dim=1).to(DEVICE)
    _check(x, y, 5)


def test_divisor_inplace_backward_two_pass():
    # The two-pass (looped) kernel path and the in-place variant.
    n_classes = _ce_launch.MAX_SINGLE_BLOCK_V[(False, False)] + 3
    x = _logits((2, n_classes))
    _check(x, _targets((2,), n_classes), torch.tensor(3.0, device=DEVICE), inplace=True)


def test_divisor_forward_only():
    x = _logits((5, 16))
    t = _targets((5,), 16)
    with torch.no_grad():
        loss = fg.cross_entropy(x, t, reduction="sum", divisor=4)
    ref, _ = reference_with_grad(x, t, reduction="sum")
    assert_close(loss, ref / 4, torch.float32, "loss")


class _ScalarReads(TorchDispatchMode):
    """Counts aten._local_scalar_dense (.item(), float(t), bool(t)): host reads of data."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_divisor_tensor_never_read_on_host():
    # The op reads host floats of its own (fp32 splits of scalar arguments); a tensor
    # divisor must add no read of data to the host, forward or backward.
    x = _logits((4, 10))
    t = _targets((4,), 10)
    counts = []
    for divisor in (None, torch.tensor(3, device=DEVICE)):
        xg = x.clone().requires_grad_(True)
        with _ScalarReads() as reads:
            loss = fg.cross_entropy(xg, t, reduction="sum", divisor=divisor)
            loss.backward()
        counts.append(reads.count)
        assert torch.isfinite(xg.grad).all()
    assert counts[1] == counts[0], counts


def test_divisor_compile_fullgraph():
    x = _logits((6, 30)).requires_grad_(True)
    t = _targets((6,), 30)
    d = torch.tensor(9, device=DEVICE)

    def step(inp, num_items):
        return fg.cross_entropy(inp, t, reduction="sum", divisor=num_items)

    loss = torch.compile(step, fullgraph=True)(x, d)
    loss.backward()
    ref_loss, ref_grad = reference_with_grad(x, t, grad_output=torch.tensor(1 / 9),
                                             reduction="sum")
    assert_close(loss, ref_loss / 9, torch.float32, "loss")
    assert_close(x.grad, ref_grad, torch.float32, "grad")


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_divisor_needs_sum_reduction(reduction):
    x = _logits((3, 5))
    with pytest.raises(ValueError, match="divisor.*reduction='sum'"):
        fg.cross_entropy(x, _targets((3,), 5), reduction=reduction, divisor=2)


@pytest.mark.parametrize("bad, err", [
    (0, ValueError), (float("inf"), ValueError), (True, TypeError), ("2", TypeError),
    (torch.ones(2), ValueError), (torch.tensor(True), TypeError),
])
def test_divisor_bad_values(bad, err):
    x = _logits((3, 5))
    with pytest.raises(err, match="divisor"):
        fg.cross_entropy(x, _targets((3,), 5), reduction="sum", divisor=bad)


def test_divisor_requiring_grad_is_refused():
    x = _logits((3, 5))
    d = torch.tensor(2.0, device=DEVICE, requires_grad=True)
    with pytest.raises(ValueError, match="divisor.detach"):
        fg.cross_entropy(x, _targets((3,), 5), reduction="sum", divisor=d)
