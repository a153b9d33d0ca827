"""Host-cost cases for fused linear + cross-entropy (``python -m bench host``): tiny CPU
inputs, so the time is the host path around the kernels and matrix products (see
bench/host.py). torch's reference is eager ``F.cross_entropy(F.linear(x, W), t)``."""

from __future__ import annotations

from .host import HostCase

N_ROWS, HIDDEN, N_CLASSES = 8, 16, 32
CHUNK = 4  # two chunks: the per-chunk host work shows


def _make():
    import torch

    g = torch.Generator().manual_seed(0)
    return {"x": torch.randn(N_ROWS, HIDDEN, generator=g).requires_grad_(),
            "W": torch.randn(N_CLASSES, HIDDEN, generator=g).requires_grad_(),
            "t": torch.randint(0, N_CLASSES, (N_ROWS,), generator=g)}


def _fused(reduction, chunk_size):
    def run(inp):
        import fusedgrad as fg

        loss = fg.linear_cross_entropy(inp["x"], inp["W"], inp["t"], reduction=reduction,
                                       chunk_size=chunk_size)
        loss.sum().backward()

    return run


def _torch(reduction):
    def run(inp):
        import torch.nn.functional as F

        F.cross_entropy(F.linear(inp["x"], inp["W"]), inp["t"],
                        reduction=reduction).sum().backward()

    return run


_SHAPE = f"{N_ROWS}x{HIDDEN}x{N_CLASSES}"
CASES = [
    HostCase(f"lce fwd+bwd {_SHAPE} mean", _make, _fused("mean", None), _torch("mean")),
    HostCase(f"lce fwd+bwd {_SHAPE} mean {N_ROWS // CHUNK} chunks", _make,
             _fused("mean", CHUNK), _torch("mean")),
    HostCase(f"lce fwd+bwd {_SHAPE} none", _make, _fused("none", None), _torch("none")),
]
