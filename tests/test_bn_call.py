"""The eager host path of fusedgrad.batch_norm (ops/_bn_call.py): per-signature Calls are
reused only for the same signature, the checks still run for new arguments, poisoning and
wrapped kernels still take effect on a cached call, the table is bounded, and a training
step is four launches."""

import importlib
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fusedgrad as fg
from fusedgrad import _alloc
from fusedgrad import _bn_launch as L

from helpers import DEVICE, assert_close

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import host  # noqa: E402

bn_call = importlib.import_module("fusedgrad._bn_call")

SHAPE = (2, 3, 4, 5)  # tiny: every call below is a few interpreted programs


def _ref(x, rm, rv, w, b, training, momentum, eps, act, res):
    xd = x.detach().double()
    rmd = rm.double() if rm is not None else None
    rvd = rv.double() if rv is not None else None
    y = F.batch_norm(xd, rmd, rvd, w.double() if w is not None else None,
                     b.double() if b is not None else None, training, momentum, eps)
    if res is not None:
        y = y + res.double()
    return (F.relu(y) if act == "relu" else y), rmd, rvd


# One input shape, one plan: each call changes one thing the Call depends on, so a Call
# reused for the wrong signature gives a wrong output or running statistics.
VARIANTS = [
    dict(),
    dict(momentum=0.5),
    dict(eps=1e-1),
    dict(activation="relu"),
    dict(residual=True),
    dict(weight_dtype=torch.float64),  # converted for the kernels
    dict(affine=False),
    dict(training=False),
    dict(running=False),
    dict(),
]


def test_signatures_are_not_mixed_up():
    x = torch.randn(SHAPE, device=DEVICE) * 2 + 1
    res_t = torch.randn(SHAPE, device=DEVICE)
    for v in VARIANTS:
        training, momentum, eps = v.get("training", True), v.get("momentum", 0.1), \
            v.get("eps", 1e-5)
        wd = v.get("weight_dtype", torch.float32)
        w = torch.rand(3, device=DEVICE, dtype=wd) + 0.5 if v.get("affine", True) else None
        b = torch.randn(3, device=DEVICE, dtype=wd) if v.get("affine", True) else None
        rm = torch.randn(3, device=DEVICE) if v.get("running", True) else None
        rv = torch.rand(3, device=DEVICE) + 0.5 if v.get("running", True) else None
        res = res_t if v.get("residual") else None
        act = v.get("activation")
        y_ref, rm_ref, rv_ref = _ref(x, rm, rv, w, b, training, momentum, eps, act, res)
        y = fg.batch_norm(x, rm, rv, w, b, training=training, momentum=momentum, eps=eps,
                          activation=act, residual=res)
        assert_close(y, y_ref, torch.float32, f"y {v}")
        if rm is not None:
            assert_close(rm, rm_ref, torch.float32, f"running_mean {v}")
            assert_close(rv, rv_ref, torch.float32, f"running_var {v}")


def test_checks_still_run_for_new_arguments():
    x = torch.randn(SHAPE, device=DEVICE)
    rm, rv = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
    fg.batch_norm(x, rm, rv, training=True, momentum=1)
    # Same value, another type: True == 1, but a bool momentum is an error.
    with pytest.raises(TypeError, match="momentum"):
        fg.batch_norm(x, rm, rv, training=True, momentum=True)
    with pytest.raises(ValueError, match="eps"):
        fg.batch_norm(x, rm, rv, training=True, momentum=1, eps=0.0)
    with pytest.raises(ValueError, match="weight"):
        fg.batch_norm(x, rm, rv, torch.ones(4, device=DEVICE), training=True, momentum=1)
    with pytest.raises(ValueError, match="activation"):
        fg.batch_norm(x, rm, rv, training=True, momentum=1, activation="tanh")


class _Recorder:
    """Stands for a kernel: records whether each launch's output argument is all NaN."""

    def __init__(self, out_index, seen):
        self.out_index, self.seen = out_index, seen

    def run(self, *args, grid, warmup, **kwargs):
        self.seen.append(bool(args[self.out_index].isnan().all()))


def test_cached_call_still_poisons_and_looks_kernels_up(monkeypatch):
    x = torch.randn(SHAPE, device=DEVICE)
    with _alloc.poisoned_outputs(False):  # (the tests' default is on)
        fg.batch_norm(x, None, None, training=True)  # the signature's Call is built here
    seen = []
    monkeypatch.setattr(L.bn_kernels, "bn_stats_kernel", _Recorder(3, seen))
    monkeypatch.setattr(L.bn_kernels, "bn_apply_kernel", _Recorder(2, seen))
    with _alloc.poisoned_outputs():
        fg.batch_norm(x, None, None, training=True)
    assert seen == [True, True]  # both launches reached the wrappers, outputs poisoned


def test_calls_per_plan_bounded(monkeypatch):
    monkeypatch.setattr(bn_call, "CALLS_PER_PLAN", 2)
    x = torch.randn(SHAPE, device=DEVICE)
    for eps in (1e-5, 1e-4, 1e-3, 1e-2):
        fg.batch_norm(x, None, None, training=True, eps=eps)
    assert 1 <= len(L.planned(x).calls) <= 2


@pytest.mark.parametrize("case", ["plain", "relu_residual", "eval"])
def test_launches_and_no_other_device_ops(case):
    # What the host path issues per training step (eval: per forward): four launches (one
    # in eval) and no other device operation when dy has x's layout.
    x = torch.randn(SHAPE, device=DEVICE, requires_grad=True)
    w = torch.rand(3, device=DEVICE, requires_grad=True)
    b = torch.randn(3, device=DEVICE, requires_grad=True)
    rm, rv = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
    kwargs = {}
    if case == "relu_residual":
        kwargs = dict(activation="relu",
                      residual=torch.randn(SHAPE, device=DEVICE, requires_grad=True))
    training = case != "eval"
    dy = torch.randn(SHAPE, device=DEVICE)

    def step():
        for t in (x, w, b, kwargs.get("residual")):  # no accumulation into earlier grads
            if t is not None:
                t.grad = None
        if training:
            fg.batch_norm(x, rm, rv, w, b, training=True, **kwargs).backward(dy)
        else:
            with torch.no_grad():
                fg.batch_norm(x, rm, rv, w, b, training=False)

    # Without the tests' default output poisoning (a fill per allocation).
    with host.stubbed_launches() as counter, host.device_branches(), \
            _alloc.poisoned_outputs(False):
        step()  # builds the Call
        n0 = counter.count
        step()
        assert counter.count - n0 == (4 if training else 1), counter.names
        assert host.count_device_ops(step) == []
