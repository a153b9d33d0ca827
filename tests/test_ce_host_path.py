"""The host path of fusedgrad.cross_entropy (ops/cross_entropy.py): launches per call with
Triton's launches stubbed (bench/host.py), per-shape caching, and the eager fast path
agreeing with the custom op."""

import importlib
import sys
from pathlib import Path

import pytest
import torch

import fusedgrad as fg

from helpers import DEVICE, assert_close

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import host  # noqa: E402

ce_module = importlib.import_module("fusedgrad.cross_entropy")


def _launches(fn):
    with host.stubbed_launches() as counter:
        fn()
    return counter.names


# The common case and the ones that keep the same launch count: prep, fused, finish
# (reduction="none" has no finish).
@pytest.mark.parametrize("kwargs, fwd", [
    (dict(), 3),
    (dict(reduction="sum"), 3),
    (dict(reduction="none"), 2),
    (dict(label_smoothing=0.1, weight=True), 3),
    (dict(reduction="sum", divisor=torch.tensor(3.0)), 3),
])
def test_launches_per_call(kwargs, fwd):
    kwargs = dict(kwargs)
    if kwargs.pop("weight", False):
        kwargs["weight"] = torch.rand(32, device=DEVICE)
    if isinstance(kwargs.get("divisor"), torch.Tensor):
        kwargs["divisor"] = kwargs["divisor"].to(DEVICE)
    x = torch.randn(8, 32, device=DEVICE, requires_grad=True)
    t = torch.randint(0, 32, (8,), device=DEVICE)
    with host.stubbed_launches() as counter:
        loss = fg.cross_entropy(x, t, **kwargs)
        n_fwd = counter.count
        loss.backward(torch.ones_like(loss))
    assert n_fwd == fwd, counter.names
    assert counter.count - n_fwd == 1, counter.names  # backward: one rescale launch


def test_eager_fast_path_matches_custom_op():
    # The eager path skips the custom op's dispatch; results must be bitwise equal.
    x = torch.randn(6, 300, device=DEVICE)
    t = torch.randint(0, 300, (6,), device=DEVICE)
    t[2] = -100
    w = torch.rand(300, device=DEVICE)
    xa = x.clone().requires_grad_(True)
    loss_a = fg.cross_entropy(xa, t, weight=w, label_smoothing=0.1)
    loss_a.backward()
    loss_b, grad_b = torch.ops.fusedgrad.cross_entropy_fwd(x, t, w, -100, "mean", 0.1, 0.0,
                                                           None, True)
    assert torch.equal(loss_a, loss_b) and torch.equal(xa.grad, grad_b)


def test_checks_are_cached_but_still_run_for_new_arguments():
    x = torch.randn(4, 10, device=DEVICE)
    t = torch.randint(0, 10, (4,), device=DEVICE)
    fg.cross_entropy(x, t, ignore_index=1)
    # Same values, other types: True == 1 and 1.0 == 1, but they are not valid.
    with pytest.raises(TypeError, match="ignore_index"):
        fg.cross_entropy(x, t, ignore_index=1.0)
    fg.cross_entropy(x, t, inplace_backward=False)
    with pytest.raises(TypeError, match="inplace_backward"):
        fg.cross_entropy(x, t, inplace_backward=0)
    assert len(ce_module._CHECKED) >= 2


def test_plan_is_reused_and_loss_is_right_after_reuse():
    x = torch.randn(5, 40, device=DEVICE)
    t = torch.randint(0, 40, (5,), device=DEVICE)
    ce_module._plan.cache_clear()
    ce_module._CHECKED.clear()
    first = fg.cross_entropy(x, t)
    second = fg.cross_entropy(x * 2, t)
    assert ce_module._plan.cache_info().misses == 1  # planned once, then reused
    ref = torch.nn.functional.cross_entropy((x * 2).double(), t)
    assert_close(second, ref, torch.float32, "loss")
    assert not torch.equal(first, second)
