"""Vocab-parallel fusedgrad.cross_entropy (ops/_vocab_parallel.py) in 2 and 3 gloo
processes on CPU, against the single-process float64 reference on the full vocabulary.

Each world size is one spawn running every case (process start-up dominates).
"""

import contextlib

import pytest
import torch

from _distributed import run_workers
from ce_reference import reference_with_grad
from helpers import assert_close, rel_err

# Each case: the full problem, built identically on every rank from its seed.
#   widths: this case's vocabulary split (unequal on purpose; one width-1 slice).
CASES_2 = [
    dict(seed=1, shape=(6,), widths=(37, 60), kw=dict(label_smoothing=0.1, z_loss=1e-3),
         weighted=True, ignore=True),
    dict(seed=2, shape=(5,), widths=(3000, 1900), kw=dict(reduction="none"), ignore=True),
    dict(seed=3, shape=(4,), widths=(20, 33), kw=dict(reduction="sum", softcap=3.0),
         prob=True),
    dict(seed=4, shape=(4,), widths=(40, 24), kw=dict(label_smoothing=0.2), inplace=True,
         ignore=True),
    # Slices wider than one chunk (the shard kernels' multi-chunk loop), soft-cap.
    dict(seed=8, shape=(3,), widths=(5000, 4500), kw=dict(softcap=20.0, label_smoothing=0.05),
         ignore=True),
    # Every target ignored: NaN mean, zero gradient, as torch.
    dict(seed=9, shape=(4,), widths=(10, 12), kw={}, all_ignored=True, weighted=True),
    # A masked vocabulary (-inf logits) without smoothing stays finite, as torch.
    dict(seed=10, shape=(5,), widths=(30, 34), kw=dict(z_loss=1e-3), minus_inf=True),
    dict(seed=11, shape=(4,), widths=(300, 211), kw=dict(label_smoothing=0.1),
         dtype=torch.bfloat16, inplace=True),
    # The int64-offset variants of the shard kernels (forced: 2^31 elements do not fit here).
    dict(seed=12, shape=(3, 2), widths=(70, 50), kw=dict(label_smoothing=0.1, softcap=5.0),
         large_offsets=True, ignore=True),
    dict(seed=13, shape=(3,), widths=(20, 26), kw=dict(z_loss=1e-2), prob=True,
         large_offsets=True),
    # Confident rows (logits ~30, the target leads by 12): loss and gradient no further
    # from float64 than torch's own float32 result (issue 9: z - max and log(sum exp)
    # stay apart across ranks too).
    dict(seed=14, shape=(16,), widths=(900, 1100), kw=dict(reduction="none"), confident=True),
    # bf16 logits under autocast: a float32 loss as torch's autocast gives, without a float32
    # copy of the logits; the gradient stays bf16. Mean and per-row losses.
    dict(seed=15, shape=(4,), widths=(30, 41), kw=dict(label_smoothing=0.1),
         dtype=torch.bfloat16, autocast=True, ignore=True),
    dict(seed=16, shape=(3,), widths=(25, 19), kw=dict(reduction="none"), prob=True,
         dtype=torch.bfloat16, autocast=True),
]
CASES_3 = [
    dict(seed=5, shape=(2, 3), widths=(10, 1, 25), kw=dict(label_smoothing=0.1)),
    dict(seed=6, shape=(7,), widths=(50, 70, 30), kw=dict(reduction="none", z_loss=1e-2),
         weighted=True, ignore=True, inplace=True),
    dict(seed=7, shape=(3,), widths=(16, 16, 17), kw=dict(label_smoothing=0.3), prob=True,
         weighted=True),
]


def build(case):
    """Full-vocabulary logits, targets, weights and grad_output for a case (CPU)."""
    g = torch.Generator().manual_seed(case["seed"])
    n_classes = sum(case["widths"])
    n = case["shape"][0]
    spatial = case["shape"][1:]
    x = torch.randn(n, n_classes, *spatial, generator=g) * 3
    if case.get("confident"):
        x = torch.randn(n, n_classes, *spatial, generator=g) + 30.0
    if case.get("minus_inf"):
        x[:, 3] = float("-inf")
        x[0, 40:50] = float("-inf")  # spans both slices
    x = x.to(case.get("dtype", torch.float32))
    if case.get("prob"):
        t = torch.softmax(torch.randn(x.shape, generator=g) * 2, dim=1)
    else:
        t = torch.randint(0, n_classes, case["shape"], generator=g)
        if case.get("minus_inf"):
            t[t == 3] = 4
            t.view(-1)[0] = 20
        if case.get("ignore"):
            t.view(-1)[1] = -100
        if case.get("all_ignored"):
            t.fill_(-100)
        if case.get("confident"):
            x[torch.arange(n), t] = x.amax(dim=1) + 12.0
    w = torch.rand(n_classes, generator=g) + 0.2 if case.get("weighted") else None
    reduction = case["kw"].get("reduction", "mean")
    go = torch.rand(case["shape"], generator=g) + 0.5 if reduction == "none" \
        else torch.tensor(1.7)
    return x, t, w, go


def _slice(t, lo, hi):
    return t.narrow(1, lo, hi - lo)


def _worker(rank, world_size, cases):
    import torch.distributed as dist

    import fusedgrad as fg
    from fusedgrad import _ce_launch

    out = []
    real_needs_large_offsets = _ce_launch.needs_large_offsets
    for case in cases:
        _ce_launch.needs_large_offsets = (lambda *t: True) if case.get("large_offsets") \
            else real_needs_large_offsets
        x, t, w, go = build(case)
        lo = sum(case["widths"][:rank])
        hi = lo + case["widths"][rank]
        x_local = _slice(x, lo, hi).clone()
        t_local = _slice(t, lo, hi).contiguous() if case.get("prob") else t
        w_local = w[lo:hi] if w is not None else None
        base = x_local.clone().requires_grad_(True)
        # In-place mode on a view of a non-leaf, as logits.view(-1, V) would be.
        inp = (base * 1.0).view(base.shape) if case.get("inplace") else base
        copies = []
        with _autocast_spy(case.get("autocast"), inp, copies):
            loss = fg.cross_entropy(inp, t_local, weight=w_local,
                                    process_group=dist.group.WORLD,
                                    inplace_backward=bool(case.get("inplace")), **case["kw"])
        assert not copies, f"the logits were copied to float32: {copies}"
        loss.backward(go)
        out.append((loss.detach(), base.grad))
    return out


@contextlib.contextmanager
def _autocast_spy(enabled, logits, copies):
    """Under bf16 autocast when enabled, recording every float32 copy of ``logits``."""
    if not enabled:
        yield
        return
    orig_to = torch.Tensor.to

    def spy_to(self, *a, **k):
        out = orig_to(self, *a, **k)
        if out.dtype == torch.float32 and out.shape == logits.shape:
            copies.append(out.shape)
        return out

    torch.Tensor.to = spy_to
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            yield
    finally:
        torch.Tensor.to = orig_to


def _check(world_size, cases):
    results = run_workers(world_size, _worker, cases)
    for i, case in enumerate(cases):
        x, t, w, go = build(case)
        ref_loss, ref_grad = reference_with_grad(x, t, grad_output=go, weight=w, **case["kw"])
        dtype = case.get("dtype", torch.float32)
        grad = torch.cat([results[r][i][1] for r in range(world_size)], dim=1)
        assert grad.dtype == dtype
        if case.get("autocast"):
            # torch's autocast gives a float32 loss; its digits are float32's, from the
            # bf16 logits as they are (the reference reads the same bf16 values).
            for rank in range(world_size):
                assert results[rank][i][0].dtype == torch.float32
                assert_close(results[rank][i][0], ref_loss, torch.float32,
                             f"case {i} rank {rank}")
            assert_close(grad, ref_grad, dtype, f"case {i} gradient")
            continue
        if not case.get("confident"):
            for rank in range(world_size):
                assert_close(results[rank][i][0], ref_loss, dtype, f"case {i} rank {rank}")
            assert_close(grad, ref_grad, dtype, f"case {i} gradient")
        else:
            # Losses of ~1e-5: no fixed tolerance applies; torch's own fp32 error is the bar.
            for rank in range(1, world_size):
                assert torch.equal(results[rank][i][0], results[0][i][0])
            xt = x.clone().requires_grad_(True)
            torch_loss = torch.nn.functional.cross_entropy(xt, t, **case["kw"])
            torch_loss.backward(go)
            slack = 1.25
            assert rel_err(results[0][i][0], ref_loss) <= slack * rel_err(torch_loss, ref_loss)
            assert rel_err(grad, ref_grad) <= slack * rel_err(xt.grad, ref_grad)


@pytest.mark.compat
def test_two_ranks():
    _check(2, CASES_2)


def test_three_ranks():
    _check(3, CASES_3)
