"""Bad input to fusedgrad.cross_entropy (ops/_ce_validate.py, ops/cross_entropy.py):
clear errors naming the argument, never a crash or a plausible number."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fusedgrad as fg

from helpers import DEVICE


def x_t(n=4, c=10):
    return torch.randn(n, c, device=DEVICE), torch.randint(0, c, (n,), device=DEVICE)


@pytest.mark.parametrize("kwargs, exc, name", [
    (dict(reduction="avg"), ValueError, "reduction"),
    (dict(label_smoothing=1.5), ValueError, "label_smoothing"),
    (dict(label_smoothing=-0.1), ValueError, "label_smoothing"),
    (dict(z_loss=-1.0), ValueError, "z_loss"),
    (dict(z_loss=float("nan")), ValueError, "z_loss"),
    (dict(softcap=0.0), ValueError, "softcap"),
    (dict(softcap=-3.0), ValueError, "softcap"),
    (dict(ignore_index=1.5), TypeError, "ignore_index"),
    (dict(inplace_backward=1), TypeError, "inplace_backward"),
])
def test_bad_scalar_arguments(kwargs, exc, name):
    x, t = x_t()
    with pytest.raises(exc, match=name):
        fg.cross_entropy(x, t, **kwargs)


def test_bad_input_dtype_and_shape():
    _, t = x_t()
    with pytest.raises(TypeError, match="input"):
        fg.cross_entropy(torch.randint(0, 3, (4, 10), device=DEVICE), t)
    with pytest.raises(ValueError, match="input"):
        fg.cross_entropy(torch.tensor(1.0, device=DEVICE), t)
    with pytest.raises(ValueError, match="input"):
        fg.cross_entropy(torch.randn(4, 0, device=DEVICE), t)
    with pytest.raises(TypeError, match="input"):
        fg.cross_entropy([1.0, 2.0], t)


def test_bad_target():
    x, t = x_t()
    with pytest.raises(ValueError, match="target"):
        fg.cross_entropy(x, t[:3])
    with pytest.raises(ValueError, match="target"):
        fg.cross_entropy(x, torch.rand(4, 9, device=DEVICE))  # probabilities, wrong shape
    with pytest.raises(TypeError, match="target"):
        fg.cross_entropy(x, t.bool())
    with pytest.raises(ValueError, match="target"):
        fg.cross_entropy(torch.randn(2, 5, 3, device=DEVICE), torch.zeros(2, 4, dtype=torch.long,
                                                                          device=DEVICE))


def test_bad_weight():
    x, t = x_t()
    with pytest.raises(ValueError, match="weight"):
        fg.cross_entropy(x, t, weight=torch.rand(9, device=DEVICE))
    with pytest.raises(TypeError, match="weight"):
        fg.cross_entropy(x, t, weight=torch.ones(10, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match="weight"):
        fg.cross_entropy(x, t, weight=torch.rand(10, 1, device=DEVICE))


def test_device_mismatch():
    x, t = x_t()
    with pytest.raises(ValueError, match="target"):
        fg.cross_entropy(x, t.to("meta"))
    with pytest.raises(ValueError, match="weight"):
        fg.cross_entropy(x, t, weight=torch.rand(10, device="meta"))


def test_weight_requiring_grad_is_refused():
    x, t = x_t()
    with pytest.raises(ValueError, match="weight"):
        fg.cross_entropy(x, t, weight=torch.rand(10, device=DEVICE, requires_grad=True))


def test_ignore_index_with_probability_targets():
    # torch's rule: a non-negative ignore_index is refused for probability targets.
    x, _ = x_t()
    y = torch.softmax(torch.randn(4, 10, device=DEVICE), 1)
    with pytest.raises(ValueError, match="ignore_index"):
        fg.cross_entropy(x, y, ignore_index=0)
    fg.cross_entropy(x, y, ignore_index=-1)  # accepted, as by torch


def test_ignore_index_out_of_int64_range():
    x, t = x_t()
    with pytest.raises(ValueError, match="ignore_index"):
        fg.cross_entropy(x, t, ignore_index=2**63)


@pytest.mark.skipif(DEVICE == "cuda", reason="CUDA reports bad targets by a device-side assert "
                                             "(see test_out_of_range_target_cuda_asserts)")
@pytest.mark.parametrize("bad", [10, -1, -7, 1000])
def test_out_of_range_target_raises_on_cpu(bad):
    x, t = x_t()
    t[1] = bad
    with pytest.raises(ValueError, match="target"):
        fg.cross_entropy(x, t)


@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device (device-side assert)")
def test_out_of_range_target_cuda_asserts():
    # A device-side assert poisons the CUDA context: run it in a child process.
    code = textwrap.dedent("""
        import torch, fusedgrad as fg
        x = torch.randn(4, 10, device="cuda")
        t = torch.tensor([1, 10, 2, 3], device="cuda")
        loss = fg.cross_entropy(x, t)
        torch.cuda.synchronize()
        print("NO ERROR", loss.item())
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode != 0 and "NO ERROR" not in res.stdout
    assert "out of bounds" in res.stderr or "assert" in res.stderr.lower()


def test_kernel_never_trusts_a_bad_target():
    # Bypassing the range check, the kernel must still not address with a bad target:
    # the row's loss and gradient are NaN, never a plausible number.
    from fusedgrad import _ce_launch as launch

    x = torch.randn(3, 50, device=DEVICE)
    t = torch.tensor([2, 10_000_000, -5], device=DEVICE)
    grad = torch.empty_like(x)
    loss_rows = torch.empty(3, device=DEVICE)
    lse_rows = torch.empty(3, device=DEVICE)
    reduce_buf = torch.tensor([1.0, 50.0], device=DEVICE)
    launch.launch_fwd_bwd(launch.rows_view(x, True), launch.rows_view(grad, True),
                          launch.rows_view(t, False), None, loss_rows, lse_rows, reduce_buf,
                          ignore_index=-100, label_smoothing=0.0, z_loss=0.0, softcap=None,
                          prob_target=False, write_grad=True)
    assert torch.isfinite(loss_rows[0]) and torch.isnan(loss_rows[1:]).all()
    assert torch.isfinite(grad[0]).all() and torch.isnan(grad[1:]).all()


@pytest.mark.skipif(DEVICE == "cuda", reason="the error is for CPU tensors without a GPU; on a "
                                             "CUDA machine CPU tensors are not the tested path")
def test_cpu_tensor_without_interpreter_explains():
    code = textwrap.dedent("""
        import torch, fusedgrad as fg
        try:
            fg.cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]))
        except ValueError as e:
            print("ERR", e)
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert "ERR" in res.stdout, res.stderr
    assert "TRITON_INTERPRET=1" in res.stdout and "`input`" in res.stdout
