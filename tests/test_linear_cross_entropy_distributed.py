"""Vocab-parallel fusedgrad.linear_cross_entropy (ops/_linear_ce_parallel.py) in 2 gloo
processes on CPU: each rank holds a slice of the classifier's rows; the loss, the full
input gradient and each rank's weight/bias slice gradient match the single-process
float64 reference on the full vocabulary. One spawn runs every case.
"""

import torch

from _distributed import run_workers
from helpers import assert_close
from lce_reference import reference

WIDTHS = (23, 18)  # unequal slices on purpose
CASES = [
    dict(seed=1, kw=dict(label_smoothing=0.1, z_loss=1e-3), weighted=True, chunk_size=5),
    dict(seed=2, kw=dict(reduction="none", softcap=4.0), chunk_size=4),
    dict(seed=3, kw=dict(reduction="sum"), divisor=7.0, chunk_size=None),
]


def build(case):
    g = torch.Generator().manual_seed(case["seed"])
    n_classes = sum(WIDTHS)
    x = torch.randn(2, 6, 8, generator=g)
    w = torch.randn(n_classes, 8, generator=g) / 2
    b = torch.randn(n_classes, generator=g) / 2
    t = torch.randint(0, n_classes, (2, 6), generator=g)
    t[0, 1] = -100
    cw = torch.rand(n_classes, generator=g) + 0.5 if case.get("weighted") else None
    go = torch.randn(2, 6, generator=g) if case["kw"].get("reduction") == "none" \
        else torch.tensor(1.3)
    return x, w, b, t, cw, go


def _body(rank, world_size, cases):
    import torch.distributed as dist

    import fusedgrad as fg

    out = []
    start = sum(WIDTHS[:rank])
    sl = slice(start, start + WIDTHS[rank])
    for case in cases:
        x, w, b, t, cw, go = build(case)
        xg = x.clone().requires_grad_(True)
        wg = w[sl].clone().requires_grad_(True)
        bg = b[sl].clone().requires_grad_(True)
        loss = fg.linear_cross_entropy(
            xg, wg, t, linear_bias=bg, weight=cw[sl] if cw is not None else None,
            divisor=case.get("divisor"), process_group=dist.group.WORLD,
            chunk_size=case["chunk_size"], **case["kw"])
        loss.backward(go)
        out.append((loss.detach(), xg.grad, wg.grad, bg.grad))
    return out


def test_vocab_parallel_linear_cross_entropy():
    results = run_workers(2, _body, CASES)
    for i, case in enumerate(CASES):
        x, w, b, t, cw, go = build(case)
        ref_loss, (dx, dw, db) = reference(x, w, b, t, grad_output=go, weight=cw,
                                           divisor=case.get("divisor"), **case["kw"])
        start = 0
        for rank, width in enumerate(WIDTHS):
            loss, gx, gw, gb = results[rank][i]
            assert_close(loss, ref_loss, torch.float32, f"case {i} rank {rank} loss")
            assert_close(gx, dx, torch.float32, f"case {i} rank {rank} dx")
            assert_close(gw, dw[start:start + width], torch.float32, f"case {i} dW")
            assert_close(gb, db[start:start + width], torch.float32, f"case {i} db")
            start += width
