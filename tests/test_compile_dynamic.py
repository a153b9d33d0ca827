"""torch.compile with dynamic shapes (dynamic=True, or mark_dynamic on the batch) and
fullgraph=True for every op, and autocast behaviour like torch's ops."""

import pytest
import torch

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
