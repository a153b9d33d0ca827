"""Output allocation for launchers, with optional poisoning for tests.

Tests turn poisoning on so that every element a kernel forgot to write is NaN
(or a sentinel for integers) and shows up in comparisons. Off by default: then
this is exactly ``torch.empty``.
"""

from __future__ import annotations

import contextlib

import torch

_POISON = False


def empty(*shape, dtype, device, **kwargs) -> torch.Tensor:
    out = torch.empty(*shape, dtype=dtype, device=device, **kwargs)
    if _POISON:
        _fill_poison(out)
    return out


def empty_like(t: torch.Tensor, **kwargs) -> torch.Tensor:
    out = torch.empty_like(t, **kwargs)
    if _POISON:
        _fill_poison(out)
    return out


def new_empty(like: torch.Tensor, *shape: int) -> torch.Tensor:
    """An uninitialised tensor of ``shape`` with ``like``'s dtype and device: half the host
    time of ``empty`` with dtype and device keywords (sizes as separate ints: a shape tuple
    costs torch another microsecond to parse)."""
    out = like.new_empty(*shape)
    if _POISON:
        _fill_poison(out)
    return out


def _fill_poison(t: torch.Tensor) -> None:
    if t.is_floating_point():
        t.fill_(float("nan"))
    elif t.dtype != torch.bool:
        t.fill_(-12345)


def poisoning() -> bool:
    """True while outputs are being poisoned (tests)."""
    return _POISON


@contextlib.contextmanager
def poisoned_outputs(enabled: bool = True):
    """Within the block, outputs allocated by fusedgrad launchers start as NaN."""
    global _POISON
    old, _POISON = _POISON, enabled
    try:
        yield
    finally:
        _POISON = old
