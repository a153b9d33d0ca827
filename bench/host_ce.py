"""Host-cost cases for cross-entropy (``python -m bench host``): tiny CPU inputs, so
the time is the host path around the kernels (see bench/host.py)."""

from __future__ import annotations

from .host import HostCase

N_ROWS, N_CLASSES = 8, 32


def _make():
    import torch

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(N_ROWS, N_CLASSES, generator=g).requires_grad_()
    target = torch.randint(0, N_CLASSES, (N_ROWS,), generator=g)
    return {"logits": logits, "target": target}


def _fused_fwd_bwd(inp):
    import fusedgrad as fg

    fg.cross_entropy(inp["logits"], inp["target"]).backward()


def _torch_fwd_bwd(inp):
    import torch.nn.functional as F

    F.cross_entropy(inp["logits"], inp["target"]).backward()


def _fused_fwd(inp):
    import torch

    import fusedgrad as fg

    with torch.no_grad():
        fg.cross_entropy(inp["logits"], inp["target"])


def _torch_fwd(inp):
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        F.cross_entropy(inp["logits"], inp["target"])


CASES = [
    HostCase(f"ce fwd+bwd {N_ROWS}x{N_CLASSES} mean", _make, _fused_fwd_bwd, _torch_fwd_bwd),
    HostCase(f"ce fwd (no grad) {N_ROWS}x{N_CLASSES} mean", _make, _fused_fwd, _torch_fwd),
]
