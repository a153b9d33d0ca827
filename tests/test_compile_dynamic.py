"""torch.compile with dynamic shapes (dynamic=True, or mark_dynamic on the batch) and
fullgraph=True for every op, and autocast behaviour like torch's ops."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fusedgrad as fg

from helpers import assert_close

# Three batch sizes: the first compiles, the others must reuse the dynamic graph.
BATCHES = (4, 6, 9)


def _ce_step(x, t, w, smoothing, z_loss, softcap):
    # Floats as arguments: under dynamic=True they reach the op as symbolic floats.
    return fg.cross_entropy(x, t, weight=w, label_smoothing=smoothing, z_loss=z_loss,
                            softcap=softcap)


def _bn_step(x, rm, rv, w, b):
    return fg.batch_norm(x, rm, rv, w, b, training=True, momentum=0.1, eps=1e-5).square().sum()


def _run(fn, make, mark):
    """Compile fn, run it on every batch size and compare with eager fn (loss and grads)."""
    torch._dynamo.reset()
    compiled = (torch.compile(fn, fullgraph=True) if mark
                else torch.compile(fn, dynamic=True, fullgraph=True))
    for i, n in enumerate(BATCHES):
        args = make(n)
        ref_args = [a.detach().clone().requires_grad_(a.requires_grad)
                    if isinstance(a, torch.Tensor) else a for a in args]
        if mark:
            for a in args:
                if isinstance(a, torch.Tensor) and a.dim() and a.shape[0] == n:
                    torch._dynamo.mark_dynamic(a, 0)
        ref = fn(*ref_args)  # eager first: ops' one-time lazy set-up is not a recompile
        # After the first batch size the graph must be reused: a recompile is an error.
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            out = compiled(*args)
        assert_close(out, ref, torch.float32, f"output (batch {n})")
        out.backward()
        ref.backward()
        for a, r in zip(args, ref_args, strict=True):
            if isinstance(a, torch.Tensor) and a.requires_grad:
                assert_close(a.grad, r.grad, torch.float32, f"grad (batch {n})")


@pytest.mark.compat
@pytest.mark.parametrize("mark", [False, True], ids=["dynamic", "mark_dynamic"])
def test_cross_entropy_dynamic(device, mark):
    def make(n):
        return (torch.randn(n, 11, device=device, requires_grad=True),
                torch.randint(0, 11, (n,), device=device), torch.rand(11, device=device),
                0.1, 1e-4, 20.0)

    _run(_ce_step, make, mark)


@pytest.mark.parametrize("mark", [False, True], ids=["dynamic", "mark_dynamic"])
def test_cross_entropy_probability_target_grad_dynamic(device, mark):
    def fn(x, y, smoothing):
        return fg.cross_entropy(x, y, label_smoothing=smoothing)

    def make(n):
        return (torch.randn(n, 7, device=device, requires_grad=True),
                torch.softmax(torch.randn(n, 7, device=device), 1).requires_grad_(), 0.2)

    _run(fn, make, mark)


@pytest.mark.compat
@pytest.mark.parametrize("mark", [False, True], ids=["dynamic", "mark_dynamic"])
def test_batch_norm_dynamic(device, mark):
    def make(n):
        return (torch.randn(n, 3, 5, device=device, requires_grad=True),
                torch.zeros(3, device=device), torch.ones(3, device=device),
                torch.rand(3, device=device, requires_grad=True),
                torch.randn(3, device=device, requires_grad=True))

    _run(_bn_step, make, mark)


# A fresh process (the ops' module state is fresh there, whatever earlier tests did): the first
# compiled call of fg.batch_norm, with no eager call before it, must leave nothing that makes
# the second call with the same inputs recompile (a lazily filled cache in the op's checks
# did: one recompile per model). Dynamo only: the recompile is decided before any backend.
_FIRST_COMPILE_SCRIPT = textwrap.dedent("""
    import torch
    import conftest  # the backend choice (interpreter without CUDA) before triton loads
    import fusedgrad as fg

    dev = conftest.DEVICE
    step = torch.compile(lambda x, rm, rv: fg.batch_norm(x, rm, rv, training=True),
                         fullgraph=True, backend="eager")
    args = (torch.randn(4, 3, 5, device=dev), torch.zeros(3, device=dev),
            torch.ones(3, device=dev))
    step(*args)
    with torch._dynamo.config.patch(error_on_recompile=True):
        step(*args)
    print("ONE GRAPH", torch._dynamo.utils.counters["stats"]["unique_graphs"])
""")


def test_batch_norm_first_compiled_call_does_not_recompile():
    tests = Path(__file__).resolve().parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(tests), os.environ.get("PYTHONPATH")) if p))
    res = subprocess.run([sys.executable, "-c", _FIRST_COMPILE_SCRIPT], cwd=tests, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "ONE GRAPH 1" in res.stdout, res.stderr[-3000:]


def test_batch_norm_module_dynamic(device):
    torch._dynamo.reset()
    m = fg.BatchNorm2d(3).to(device)
    ref = torch.nn.BatchNorm2d(3).to(device)
    compiled = torch.compile(m, dynamic=True, fullgraph=True)
    for i, n in enumerate(BATCHES):
        x = torch.randn(n, 3, 2, 2, device=device)
        want = ref(x)
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            out = compiled(x)
        assert_close(out, want, torch.float32, f"output (batch {n})")
    assert_close(m.running_var, ref.running_var, torch.float32, "running_var")


# ---------------------------------------------------------------- autocast

@pytest.mark.compat
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("prob", [False, True])
def test_cross_entropy_autocast_float32_loss(device, reduction, prob, monkeypatch):
    # torch's autocast runs cross-entropy in float32: a float32 loss. fusedgrad gives the
    # same without copying the logits to float32 (no bf16 -> fp32 copy of the logits).
    x = torch.randn(6, 50, device=device).to(torch.bfloat16).requires_grad_()
    t = (torch.softmax(torch.randn(6, 50, device=device), 1) if prob
         else torch.randint(0, 50, (6,), device=device))
    copies = []
    orig_to = torch.Tensor.to

    def spy_to(self, *a, **k):
        out = orig_to(self, *a, **k)
        if self is x and out.dtype == torch.float32:
            copies.append(out.shape)
        return out

    with torch.autocast(device, dtype=torch.bfloat16):
        ref = F.cross_entropy(x.detach().requires_grad_(), t, reduction=reduction)
        monkeypatch.setattr(torch.Tensor, "to", spy_to)
        loss = fg.cross_entropy(x, t, reduction=reduction)
        monkeypatch.undo()
    assert not copies, f"the logits were copied to float32: {copies}"
    assert loss.dtype == ref.dtype == torch.float32
    x64 = x.detach().double().requires_grad_()
    want = F.cross_entropy(x64, t.double() if prob else t, reduction=reduction)
    assert_close(loss, want, torch.float32, "loss")
    go = torch.rand_like(loss)
    (gx,) = torch.autograd.grad(loss, x, go)
    (ref_gx,) = torch.autograd.grad(want, x64, go.double())
    assert gx.dtype == torch.bfloat16
    assert_close(gx, ref_gx, torch.bfloat16, "dlogits")


def test_cross_entropy_autocast_compiled(device):
    def step(x, t):
        with torch.autocast(device, dtype=torch.bfloat16):
            return fg.cross_entropy(x, t)

    torch._dynamo.reset()
    x = torch.randn(5, 9, device=device).to(torch.bfloat16).requires_grad_()
    t = torch.randint(0, 9, (5,), device=device)
    loss = torch.compile(step, fullgraph=True)(x, t)
    assert loss.dtype == torch.float32
    loss.backward()
    x64 = x.detach().double().requires_grad_()
    F.cross_entropy(x64, t).backward()
    assert_close(x.grad, x64.grad, torch.bfloat16, "dlogits")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_batch_norm_autocast_like_torch(device, dtype):
    # F.batch_norm has no autocast rule: the output keeps the input's dtype (half
    # activations stay half, float32 stays float32), with float32 parameters.
    x = torch.randn(4, 3, 5, device=device).to(dtype)
    args = (torch.zeros(3, device=device), torch.ones(3, device=device),
            torch.rand(3, device=device), torch.randn(3, device=device))
    with torch.autocast(device, dtype=torch.bfloat16):
        ref = F.batch_norm(x, *[a.clone() for a in args], training=True)
        out = fg.batch_norm(x, *[a.clone() for a in args], training=True)
    assert out.dtype == ref.dtype == dtype
    assert_close(out, ref.double(), dtype, "output", factor=2.0)
