"""The host path of fusedgrad.cross_entropy (ops/cross_entropy.py): launches per call with
Triton's launches stubbed (bench/host.py), per-shape caching, and the eager fast path
agreeing with the custom op."""

import importlib
import sys
from pathlib import Path

import pytest
import torch

import fusedgrad as fg
from fusedgrad import _alloc
from fusedgrad import _ce_launch as launch

from ce_reference import reference_with_grad
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


def _fused_kernel_options(fn):
    """Constexprs and options of the fused forward kernel launched by fn()."""
    with host.stubbed_launches(record=True) as counter:
        fn()
    return [kw for kernel, _grid, _args, kw in counter.calls
            if kernel.__name__ == "cross_entropy_fwd_bwd_kernel"]


def test_setting_a_launcher_tunable_drops_the_cached_plans(monkeypatch):
    # Plans are cached per call signature; tests and benchmarks route calls by setting
    # ops/_ce_launch.py's globals. A setattr after a cached call must take effect.
    x = torch.randn(3, 200, device=DEVICE, requires_grad=True)
    t = torch.randint(0, 200, (3,), device=DEVICE)
    first = _fused_kernel_options(lambda: fg.cross_entropy(x, t).backward())
    assert [kw["SINGLE_BLOCK"] for kw in first] == [True]
    monkeypatch.setattr(launch, "FORCE_PATH", "two_pass")
    monkeypatch.setattr(launch, "TWO_PASS_SOLO", False)  # the streaming fused kernel
    monkeypatch.setattr(launch, "LOOP_BLOCK_V", {k: 64 for k in launch.LOOP_BLOCK_V})
    forced = _fused_kernel_options(lambda: fg.cross_entropy(x, t).backward())
    assert [(kw["SINGLE_BLOCK"], kw["BLOCK_V"]) for kw in forced] == [(False, 64)]
    # ... and really runs that way (two_pass path through the interpreter).
    x.grad = None
    loss = fg.cross_entropy(x, t)
    loss.backward()
    ref_loss, ref_grad = reference_with_grad(x.detach(), t)
    assert_close(loss, ref_loss, torch.float32, "loss")
    assert_close(x.grad, ref_grad, torch.float32, "grad")
    monkeypatch.undo()
    again = _fused_kernel_options(lambda: fg.cross_entropy(x, t).backward())
    assert [kw["SINGLE_BLOCK"] for kw in again] == [True]


def test_poisoned_outputs_apply_to_planned_calls():
    # The plan is cached; the buffers are not: poisoning (tests' unwritten-element check)
    # still reaches every allocation of a planned call.
    x = torch.randn(4, 50, device=DEVICE, requires_grad=True)
    t = torch.randint(0, 50, (4,), device=DEVICE)
    fg.cross_entropy(x, t).backward()  # planned
    x.grad = None
    with _alloc.poisoned_outputs(), host.stubbed_launches():  # no kernel writes anything
        loss = fg.cross_entropy(x, t)
        loss.backward()
    assert torch.isnan(loss) and torch.isnan(x.grad).all()


# Layouts users pass (why each): contiguous; a slice of a wider buffer (not dense: the
# gradient is allocated contiguous); batch and class axes swapped (dense, permuted);
# channels-last 4-D logits; int32 targets (converted to int64 per call); a strided weight.
@pytest.mark.parametrize("layout", ["contiguous", "sliced", "permuted", "channels_last",
                                    "int32_target", "strided_weight"])
def test_planned_strides_are_those_of_the_real_buffers(layout):
    # The plan predicts, on meta tensors, the strides of what each call allocates or
    # converts (gradient, int64 targets, float weights); the launches bake them in.
    x = torch.randn(2, 7, 3, 5, device=DEVICE)
    t = torch.randint(0, 7, (2, 3, 5), device=DEVICE)
    w = None
    if layout == "sliced":
        x = torch.randn(2, 9, 3, 5, device=DEVICE)[:, 1:8]
    elif layout == "permuted":
        x = torch.randn(7, 2, 3, 5, device=DEVICE).transpose(0, 1)
    elif layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "int32_target":
        t = t.to(torch.int32)
    elif layout == "strided_weight":
        w = torch.rand(14, device=DEVICE)[::2]
    plan = ce_module._plan_of(x, t, w, "mean", -100, 0.0, 0.0, None)
    assert torch.empty_like(x).stride() == plan.grad_stride
    kernel_target = t.to(torch.int64) if plan.target_to_int64 else t
    rows = launch.rows_view(kernel_target, class_dim=False)
    assert rows.stride() == plan.fwd_args["target_strides"]
    if w is not None:
        assert w.to(torch.float32).contiguous().stride(0) == plan.prep_args["weight_stride"]
    # ... and the op agrees with the reference on that layout (strides kept: detach).
    xg = x.detach().requires_grad_(True)
    loss = fg.cross_entropy(xg, t, weight=w)
    loss.backward()
    ref_loss, ref_grad = reference_with_grad(x, t.long(), weight=w)
    assert_close(loss, ref_loss, torch.float32, "loss")
    assert_close(xg.grad, ref_grad, torch.float32, "grad")
